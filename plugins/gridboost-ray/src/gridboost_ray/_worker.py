"""What runs inside Ray's worker processes.

This module is shipped to the workers *by value* (``cloudpickle.register_pickle_by_value``), so a cluster whose
nodes do not have gridboost-ray installed can still run gridboost's work; it therefore imports only the standard
library at the top, and ray inside the functions (every Ray worker has it).
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

__all__ = ["call", "run_command"]

# How often a waiting command checks in: Ray's cancel raises KeyboardInterrupt in the task's thread, and Python
# delivers it only between bytecodes, never while the thread is blocked in waitpid().
_POLL = 0.05
_PR_SET_PDEATHSIG = 1


def call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Run a callable that ``ray.remote`` cannot wrap itself (a builtin, a ``partial``, a callable object)."""
    return fn(*args, **kwargs)


def _kill_with_parent() -> Callable[[], None] | None:
    # Resolved here, in the parent: the child runs between fork and exec, where loading a library could deadlock.
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None

    def arm() -> None:
        # A force-cancel SIGKILLs the worker; without this the command would outlive it.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return arm


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The command leads its own session, so its children go with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace``; returns once the process is reaped, whatever interrupts it meanwhile."""
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
    """Holds back the KeyboardInterrupt that ``ray.cancel`` raises while a command's process is being started.

    Ray cancels a running task with ``_thread.interrupt_main()``, which runs the main thread's SIGINT handler at its
    next bytecode. Landing inside ``Popen()`` after the fork (a loaded machine gets there: the parent waits there
    until the child has exec'd), it would lose the ``Popen`` object and leave the process running. So SIGINT only
    notes the interrupt until the process is in hand, and :meth:`release` raises it then, where it is handled.
    """

    def __init__(self) -> None:
        self.pending = False
        try:
            self._previous: Any = signal.signal(signal.SIGINT, self._note)
        except ValueError:  # not the main thread (a threaded actor): interrupt_main cannot reach us anyway
            self._previous = None

    def _note(self, signum: int, frame: object) -> None:
        self.pending = True

    def release(self, *, raise_pending: bool = True) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self.pending and raise_pending:
            raise KeyboardInterrupt


def run_command(
    argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None, grace: float
) -> tuple[int, bytes, bytes, str]:
    """Run ``argv``; return (status, stdout, stderr, node id). Cancelled: SIGTERM, then SIGKILL after ``grace``."""
    import ray

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
                continue
    except BaseException:  # KeyboardInterrupt is how ray.cancel reaches a running task
        held.release(raise_pending=False)
        if process is not None:
            _stop(process, grace)
        raise
    return process.returncode, out, err, ray.get_runtime_context().get_node_id()
