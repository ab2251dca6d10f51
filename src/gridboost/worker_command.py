"""A :class:`~gridboost.Command` as an engine's worker runs it: a subprocess that cancellation really stops.

Named for where it runs — in a worker of the engine (a Ray task, a Dask task), on a blocking thread — as the host
runs its own commands with anyio in ``gridboost._command``. It is public because backends outside the core use it
(``gridboost-ray`` and ``gridboost-dask`` do), and it imports only the standard library so that a backend can ship
it to the workers *by value*, with the module that calls it, and a cluster whose nodes lack gridboost still runs
commands::

    from gridboost import worker_command

    cloudpickle.register_pickle_by_value(worker_command)  # the engine's cloudpickle (Ray: ray.cloudpickle)

Call it from a function of your own worker module (``from gridboost.worker_command import run``), never through
the module object: a function travels by value with what it names, a module object would carry its whole
namespace.

* :func:`run` — start ``argv`` in a session of its own, wait for it, return its status and output; an exception
  that reaches the wait (an engine's cancellation, or one the ``check`` callback raises) stops the process first.
* :func:`stop` — SIGTERM the process group, SIGKILL it after ``grace``, and return only once it is reaped, whatever
  interrupts meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["run", "stop"]

# How often a waiting command checks in. An interrupt (Ray's cancel raises KeyboardInterrupt in the task's thread)
# arrives only between bytecodes, never while the thread is blocked in waitpid(); a Dask task cannot be interrupted at
# all, so ``check`` looks at its state this often.
_POLL = 0.05
_PR_SET_PDEATHSIG = 1


def _kill_with_parent() -> Callable[[], None] | None:
    # Resolved here, in the parent: the child runs between fork and exec, where loading a library could deadlock.
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None

    def arm() -> None:
        # A worker that dies (force-cancelled, killed, restarted by its nanny) takes the command with it.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return arm


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The command leads its own session, so its children go with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace``; returns once the process is reaped, whatever interrupts it meanwhile.

    An exception that arrives while it waits (a second cancellation) is held until the process is gone, then raised.
    """
    deadline = time.monotonic() + grace
    signalled = killed = False
    interrupted: BaseException | None = None
    while process.returncode is None:
        try:
            if not signalled:
                signalled = True
                _signal_group(process, signal.SIGTERM)
            elif not killed and time.monotonic() >= deadline:
                killed = True
                _signal_group(process, signal.SIGKILL)
            process.wait(_POLL)
        except subprocess.TimeoutExpired:
            pass
        except BaseException as exc:  # a second interrupt must not leave the process behind
            interrupted = exc
    if interrupted is not None:
        raise interrupted


class _HeldInterrupt:
    """Holds back a SIGINT (Ray's cancel) that arrives while a command's process is being started.

    Ray cancels a running task with ``_thread.interrupt_main()``, which runs the main thread's SIGINT handler at its
    next bytecode. Landing inside ``Popen()`` after the fork (a loaded machine gets there: the parent waits there
    until the child has exec'd), it would lose the ``Popen`` object and leave the process running. So SIGINT only
    notes the interrupt until the process is in hand, and :meth:`release` raises it then, where it is handled. Off
    the main thread (a Dask task, a threaded actor) nothing can be installed, and nothing interrupts the thread.
    """

    def __init__(self) -> None:
        self.pending = False
        try:
            self._previous: Any = signal.signal(signal.SIGINT, self._note)
        except ValueError:  # not the main thread
            self._previous = None

    def _note(self, signum: int, frame: object) -> None:
        self.pending = True

    def release(self, *, raise_pending: bool = True) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self.pending and raise_pending:
            raise KeyboardInterrupt


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    grace: float,
    *,
    check: Callable[[], None] | None = None,
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to its end: ``(status, stdout, stderr)``.

    ``env`` is laid over the worker's environment; the command leads a session of its own and dies with the worker.
    ``check`` is called every few hundredths of a second while the command runs: raise from it (the engine cancelled
    the task) to stop the command. Whatever exception reaches the wait — from ``check``, or an interrupt — stops the
    command (:func:`stop`: SIGTERM, then SIGKILL after ``grace`` seconds) before it goes on.
    """
    arm = _kill_with_parent() if os.name == "posix" else None
    process: subprocess.Popen[bytes] | None = None
    held = _HeldInterrupt()
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,
            preexec_fn=arm,  # only prctl, resolved before the fork: safe in a threaded worker
        )
        held.release()
        while True:
            try:
                out, err = process.communicate(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                pass
            if check is not None:
                check()
    except BaseException:  # KeyboardInterrupt is how ray.cancel reaches a running task
        held.release(raise_pending=False)
        if process is not None:
            try:
                stop(process, grace)
            finally:
                for stream in (process.stdout, process.stderr):  # what it wrote is of no use now
                    if stream is not None:
                        stream.close()
        raise
    return process.returncode, out, err
