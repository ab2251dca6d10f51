"""What runs inside Ray's worker processes.

This module is shipped to the workers *by value* (``cloudpickle.register_pickle_by_value``), so a cluster whose
nodes do not have gridboost-ray installed can still run gridboost's work; it therefore imports only the standard
library at the top, and ray inside the functions (every Ray worker has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["LeaseKeeper", "call", "run_command"]

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


class LeaseKeeper:
    """The cluster's registry of gridboost leases: a detached actor, one per cluster, on the head node.

    Every backend records its leases here (``put``), so any process connected to the cluster can list, renew or
    release them, and the keeper removes a lease's placement group its ``grace`` seconds (the record's, else the
    keeper's) past its ``expires_at``, whoever owns it: a lease never outlives its TTL, even when its owner hangs.
    Records whose group Ray removed (released, or its owner's job ended, which takes its groups with it) are
    dropped. With no record for ``idle_exit`` seconds the keeper exits, so a cluster that gridboost stopped using
    is left as it was found.

    An async actor: its methods run on one event loop, so the records need no lock.
    """

    def __init__(self, grace: float, tick: float, idle_exit: float) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._grace = grace
        self._tick = tick
        self._idle_exit = idle_exit
        self._reaper: asyncio.Task[None] | None = None
        self.reaped: list[str] = []

    def _start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def put(self, record: dict[str, Any], replaces: str | None = None) -> None:
        """Record a lease (or replace its record): id, pg_id, owner, state, expires_at, and what it holds.

        ``replaces`` names a record this one takes over (a lingering group reused by a new lease).
        """
        self._start()
        if replaces is not None:
            self._records.pop(replaces, None)
        self._records[record["id"]] = record

    async def renew(self, lease_id: str, expires_at: float) -> dict[str, Any] | None:
        """Move a lease's expiry; its record, or ``None`` when there is no such lease."""
        self._start()
        record = self._records.get(lease_id)
        if record is not None:
            record["expires_at"] = expires_at
        return record

    async def get(self, lease_id: str) -> dict[str, Any] | None:
        self._start()
        return self._records.get(lease_id)

    async def drop(self, lease_id: str) -> None:
        self._start()
        self._records.pop(lease_id, None)

    async def leases(self) -> list[dict[str, Any]]:
        self._start()
        return list(self._records.values())

    async def reaped_ids(self) -> list[str]:
        """The leases this keeper removed at their expiry (for tests and the CLI)."""
        return list(self.reaped)

    async def _reap_forever(self) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(self._tick)
            if self._records:
                idle_since = time.monotonic()
                table = placement_group_table()
                now = time.time()
                for lease_id, record in list(self._records.items()):
                    row = table.get(record["pg_id"])
                    if row is None or row.get("state") == "REMOVED":
                        self._records.pop(lease_id, None)
                    elif now >= record["expires_at"] + record.get("grace", self._grace):
                        with contextlib.suppress(Exception):  # already being removed: the next tick drops it
                            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["pg_id"]))))
                        self._records.pop(lease_id, None)
                        self.reaped.append(lease_id)
            elif time.monotonic() - idle_since >= self._idle_exit:
                # exit_actor() works only from a method; from this task the keeper ends itself by its handle.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
