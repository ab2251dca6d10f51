"""The local backend: this machine as a one-node cluster. Built in, the embedded default.

Reservations are accounting against the machine's capacity, so boosts, priorities,
TTLs and admission behave as they do on a real cluster with no cluster at all.
Callables run in worker threads, or in a process pool (``executor="process"``) for
CPU-bound work; commands run as subprocesses.

Cancelling: queued work is dropped; a running command or process-pool call is
terminated, then killed after ``grace`` seconds. A running *thread* cannot be
interrupted by Python: the caller is released at once, and the thread runs on until
the function returns or calls :func:`anyio.from_thread.check_cancelled`. The backend
keeps count of such threads, and ``aclose`` waits for them (up to its timeout) and
names any still running in a :class:`~gridboost.exceptions.TeardownError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio

from . import _nvml
from ._checks import seconds, whole
from ._ledger import Pool
from ._plugins import hookimpl
from ._records import ClusterSnapshot, Command, CommandResult, Lease, NodeSnapshot, owner_name
from ._resources import Resources
from ._spec import TaskSpec
from ._text import shown
from .abc import Backend, BackendSpec, Capabilities, Reservation, ReservationRequest
from .exceptions import BoostUnavailable, CapacityUnavailable, GridClosed, InvalidRequest, TeardownError
from .worker_leases import Arbiter, CurrentLease, in_lease
from .worker_leases import _current as _lease

if TYPE_CHECKING:
    from ._procpool import ProcessPool

# psutil, socket, the process pool and the command runner (subprocess) are imported where first used, not here:
# `import gridboost` stays cheap (tests/test_import_cost.py holds it).

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """This machine, as a backend. See the module docstring for how cancelling works."""

    name = "local"

    def __init__(
        self,
        *,
        executor: Literal["thread", "process"] = "thread",
        capacity: Resources | str | Mapping[str, Any] | None = None,
        max_workers: int | None = None,
        grace: float = 2.0,
        close_timeout: float = 10.0,
    ) -> None:
        # A str first: `in` would call a hostile value's own __eq__.
        if not isinstance(executor, str) or executor not in ("thread", "process"):
            raise InvalidRequest(f"executor must be 'thread' or 'process', got {shown(executor)}")
        if max_workers is not None:
            whole("max_workers", max_workers, 1)
        self.executor = executor
        self._capacity = None if capacity is None else Resources.coerce(capacity)
        self._max_workers = max_workers
        # Checked here, not where used: a bad grace found while a command is being stopped
        # would replace its TimeoutError and leave the process running.
        self._grace = seconds("grace", grace, allow_zero=True)
        self._close_timeout = seconds("close_timeout", close_timeout)
        self._node_id = f"local:{_hostname()}"
        self._pool: Pool | None = None
        self._reserved: dict[str, tuple[Reservation, Pool]] = {}
        self._tokens = Arbiter()  # fencing tokens only: one process has no one else to arbitrate with
        self._expires: dict[str, float] = {}
        # What the engine is doing now, by task id: commands and process calls until
        # their process is gone, threads until the function returns (even once their
        # caller was cancelled and moved on). Written from worker threads, hence the lock.
        # A thread's entry is its task alone (no tuple to make per offload); the others say where they run.
        self._running: dict[str, TaskSpec | tuple[TaskSpec, str]] = {}
        self._running_lock = threading.Lock()
        self._commands: dict[str, tuple[TaskSpec, int]] = {}  # task id → (task, pid) of each command running
        self._parked: dict[str, object] = {}  # what the engine holds for parked-data handles, by key
        self._limiter: anyio.CapacityLimiter | None = None
        self._procs: ProcessPool | None = None
        self._closed = False
        self._capabilities = Capabilities(interrupt_running=executor == "process", remote=False)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def available(self) -> Resources:
        """Capacity not taken by reservations or running work (zero before ``start``)."""
        return Resources() if self._pool is None else self._pool.available

    @property
    def capacity(self) -> Resources:
        """The capacity accounted against: ``capacity=`` or this machine's (zero before ``start``)."""
        return Resources() if self._pool is None else self._pool.total

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        total = self._capacity if self._capacity is not None else await anyio.to_thread.run_sync(_machine_capacity)
        self._pool = Pool(total)
        workers = self._max_workers or max(4, 2 * (os.cpu_count() or 1))
        self._limiter = anyio.CapacityLimiter(workers)
        if self.executor == "process":
            from ._procpool import ProcessPool

            self._procs = ProcessPool(self._max_workers or (os.cpu_count() or 1), grace=self._grace)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        leftovers: list[str] = []
        if self._procs is not None:
            leftovers += await self._procs.aclose()
        with anyio.move_on_after(self._close_timeout):
            while self._running:  # noqa: ASYNC110 - an abandoned thread has no event to await
                await anyio.sleep(0.01)
        leftovers += [f"{what} is still running" for what in sorted(self.running_tasks().values())]
        # _reserved is kept: after close it still says what was never released.
        if leftovers:
            raise TeardownError(leftovers)

    # -- seeing ---------------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        pool = self._require_pool()
        import psutil

        memory = psutil.virtual_memory()
        node = NodeSnapshot(
            id=self._node_id,
            address=_hostname(),
            total=pool.total,
            available=pool.available,
            usage=Resources(memory=memory.total - memory.available),
            alive=True,
            is_local=True,
        )
        return ClusterSnapshot(backend=self.name, nodes=(node,))

    # -- reserving ------------------------------------------------------------------

    async def reserve(self, request: ReservationRequest) -> Reservation:
        pool = self._require_pool()
        if request.nodes is not None and self._node_id not in request.nodes and _hostname() not in request.nodes:
            raise BoostUnavailable(
                f"no node matches nodes={list(request.nodes)}; the local backend has {self._node_id!r}"
            )
        if request.labels:
            raise BoostUnavailable(f"no node matches labels={dict(request.labels)}; the local node has no labels")
        if not request.resources.fits_in(pool.total):
            missing = request.resources.shortfall(pool.total)
            raise BoostUnavailable(
                f"{request.resources} is more than this machine has ({pool.total}); missing {missing}"
            )
        await pool.take(request.resources)
        reservation = Reservation(request=request, placements=(self._node_id,), token=self._tokens.token())
        self._reserved[request.id] = (reservation, Pool(request.resources))
        self._expires[request.id] = time.time() + request.ttl
        return reservation

    async def release(self, reservation: Reservation) -> None:
        self._expires.pop(reservation.id, None)
        entry = self._reserved.pop(reservation.id, None)
        if entry is not None:
            self._require_pool().give(reservation.request.resources)

    async def extend(self, reservation: Reservation, ttl: float) -> None:
        if reservation.id in self._expires:
            self._expires[reservation.id] = time.time() + ttl

    async def reservations(self) -> Sequence[Reservation]:
        return [reservation for reservation, _ in self._reserved.values()]

    async def leases(self) -> Sequence[Lease]:
        # One process is the whole cluster here, so its own reservations are every lease.
        return [
            Lease(
                id=r.id,
                backend=self.name,
                resources=r.request.resources,
                owner=owner_name(),
                state="active",
                priority=r.request.priority,
                expires_at=self._expires[r.id],
                placements=r.placements,
                token=r.token,
                tenant=r.request.tenant,
                preemptible=r.request.preemptible,
            )
            for r, _ in self._reserved.values()
        ]

    # -- parked data ----------------------------------------------------------------

    async def park(self, key: str, value: Any, reservation: Reservation | None) -> Any:
        """Kept by reference: tasks run in this process (a process pool's calls get it pickled, per call)."""
        self._parked[key] = value
        return value

    async def unpark(self, key: str, token: Any) -> None:
        self._parked.pop(key, None)

    def parked(self) -> list[str]:
        """The keys of the parked objects this engine holds (the leak check reads it)."""
        return list(self._parked)

    # -- running --------------------------------------------------------------------

    def check_task(self, task: TaskSpec) -> None:
        if self.executor == "process" and not isinstance(task.target, Command):
            from ._parking import Parked
            from ._procpool import check_picklable

            # A parked handle is resolved to its object before the call is sent: it is not what gets pickled.
            args = tuple(value for value in task.args if type(value) is not Parked)
            kwargs = {key: value for key, value in task.kwargs.items() if type(value) is not Parked}
            check_picklable(task.target, args, kwargs)

    def run(
        self, task: TaskSpec, reservation: Reservation | None, *, on_start: Callable[[], None] | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Run ``task``; ``on_start`` is called once it has its capacity, before it starts."""
        if (
            reservation is None
            and self._procs is None
            and self._pool is not None
            and not self._closed
            and not task.resources
            and not isinstance(task.target, Command)
        ):
            # The commonest offload (a callable in a thread, claiming nothing) is anyio's own coroutine, with no
            # frame of ours to resume at each of its steps, nor one more object per task for the collector.
            if on_start is not None:
                on_start()
            return anyio.to_thread.run_sync(self._call_in_thread, task, abandon_on_cancel=True, limiter=self._limiter)
        return self._run(task, reservation, on_start)

    async def _run(self, task: TaskSpec, reservation: Reservation | None, on_start: Callable[[], None] | None) -> Any:
        if self._closed:
            raise GridClosed("the local backend is closed")
        pool = self._require_pool()
        if reservation is not None:
            entry = self._reserved.get(reservation.id)
            if entry is None:
                raise BoostUnavailable(f"reservation {reservation.id} is not held any more")
            pool = entry[1]
        amount = task.resources
        if amount:
            if not amount.fits_in(pool.total):
                where = "its boost holds" if reservation is not None else "this machine has"
                raise CapacityUnavailable(f"task {task.name} needs {amount}; the most {where} is {pool.total}")
            await pool.take(amount)
        if on_start is not None:
            on_start()
        try:
            if isinstance(task.target, Command):
                from ._command import run_command

                with self._tracking(task, "command"):
                    try:
                        status, out, err = await run_command(
                            task.target, grace=self._grace, on_spawn=lambda pid: self._spawned(task, pid)
                        )
                    finally:
                        self._commands.pop(task.id, None)
                return CommandResult(returncode=status, stdout=out, stderr=err, node=self._node_id)
            if self._procs is not None:
                with self._tracking(task, "worker process"):
                    if reservation is None:
                        return await self._procs.run(task.target, task.args, task.kwargs)
                    wrapped = (reservation.id, reservation.token, task.target, *task.args)
                    return await self._procs.run(in_lease, wrapped, task.kwargs)
            if reservation is None:
                return await anyio.to_thread.run_sync(
                    self._call_in_thread, task, abandon_on_cancel=True, limiter=self._limiter
                )
            # The thread runs in a copy of this context: current_lease() there names the boost.
            under = _lease.set(CurrentLease(reservation.id, reservation.token))
            try:
                return await anyio.to_thread.run_sync(
                    self._call_in_thread, task, abandon_on_cancel=True, limiter=self._limiter
                )
            finally:
                _lease.reset(under)
        finally:
            if amount:
                pool.give(amount)

    def _spawned(self, task: TaskSpec, pid: int) -> None:
        self._commands[task.id] = (task, pid)

    def running_commands(self) -> dict[str, tuple[TaskSpec, int]]:
        """Each command running now: task id → (its task, its process id)."""
        return dict(self._commands)

    def running_tasks(self) -> dict[str, str]:
        """The engine's own view: id → description of every task whose work is executing now."""
        with self._running_lock:
            running = list(self._running.items())
        described = {}
        for task_id, entry in running:
            task, where = (entry, "thread") if isinstance(entry, TaskSpec) else entry
            described[task_id] = f"task {task_id} ({task.name}) in a {where}"
        return described

    @contextlib.contextmanager
    def _tracking(self, task: TaskSpec, where: str) -> Iterator[None]:
        with self._running_lock:
            self._running[task.id] = (task, where)
        try:
            yield
        finally:
            with self._running_lock:
                self._running.pop(task.id, None)

    def _call_in_thread(self, task: TaskSpec) -> Any:
        # The hot path of every offload: _tracking's work, without a generator's cost.
        running, lock = self._running, self._running_lock
        with lock:
            running[task.id] = task
        try:
            return task.target(*task.args, **task.kwargs)  # type: ignore[operator]
        finally:
            with lock:
                del running[task.id]

    def _require_pool(self) -> Pool:
        if self._pool is None:
            raise GridClosed("the local backend was not started")
        return self._pool


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _machine_capacity() -> Resources:
    import psutil

    gpus = _nvml.inventory()
    return Resources(
        cpu=os.cpu_count() or 1,
        memory=psutil.virtual_memory().total,
        gpu=len(gpus),
        gpu_memory=sum(g.memory_total for g in gpus),
    )


_OPTIONS = {
    "executor": "'thread' (default) or 'process' for CPU-bound callables",
    "capacity": "the capacity to account against, instead of this machine's (Resources or 'cpu=2,...')",
    "max_workers": "threads (or processes) that run callables at once",
    "grace": "seconds between SIGTERM and SIGKILL when a command or process is cancelled",
    "close_timeout": "seconds aclose waits for threads that cannot be interrupted",
}


@hookimpl
def gridboost_backends() -> Sequence[BackendSpec]:
    return [
        BackendSpec(
            name="local", factory=LocalBackend, description="this machine, as a one-node cluster", options=_OPTIONS
        )
    ]
