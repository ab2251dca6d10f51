"""``Grid``: the facade, and the async context manager that owns everything it starts.

Teardown, in order, whether the block ends normally, by exception or by
cancellation (all of it shielded, each wait bounded by ``teardown_timeout``):

1. new calls are refused with :class:`~gridboost.exceptions.GridClosed`;
2. every task in flight and every pending boost request is cancelled, and awaited;
3. the host app's own resources (``enter_async_context``/``push_async_callback``)
   are closed, in reverse order;
4. every boost is released;
5. observer coroutines are awaited and background loops stopped (the pressure monitor's
   probe closed, after any reading in flight);
6. the engine is asked which of our reservations it still holds — there must be
   none — and the backends are closed.

Whatever could not be done is named in one :class:`~gridboost.exceptions.TeardownError`.
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import anyio
from anyio.abc import TaskGroup

from ._advisor import OffloadRecommendation, scan_processes
from ._boost import Boost, BoostBlock, BoostBook
from ._dispatch import Dispatch, Move, bounded
from ._kit import did_you_mean, seconds, shown
from ._local import LocalBackend
from ._plugins import GridPluginManager, call_decision, observer_impls
from ._policy import default_placement
from ._pressure import Monitor, Pressure, PressureChanges, Threshold
from ._probes import Probe
from ._records import (
    BoostState,
    ClusterSnapshot,
    Command,
    CommandResult,
    Lease,
    Placement,
    Priority,
    Strategy,
    TaskOutcome,
    TaskSpec,
    owner_name,
)
from ._resources import Resources
from ._task import Run, TaskHandle, TaskMap
from .abc import Backend, BackendSpec
from .exceptions import (
    BackendError,
    CommandFailed,
    CommandNotFound,
    GridboostError,
    GridClosed,
    InvalidRequest,
    PolicyError,
    TaskCancelled,
    TeardownError,
    UnknownBackend,
)

__all__ = ["Grid"]

T = TypeVar("T")
log = logging.getLogger("gridboost")

_PLACE_LOCAL = Placement("local", "asked for: where='local'")
_PLACE_CLUSTER = Placement("cluster", "asked for: where='cluster'")
_PLACED = {kind: f"placed.{kind}" for kind in ("local", "cluster", "boost")}
_TASKS = {status: f"tasks.{status}" for status in ("succeeded", "failed", "cancelled", "timed_out")}
_DEFAULT_MAP_IN_FLIGHT = 32

# Grids between __aenter__ and the end of teardown; the test kit's leak check reads it.
_open_grids: weakref.WeakSet[Grid] = weakref.WeakSet()


def _not_found(command: Command, exc: FileNotFoundError) -> CommandNotFound:
    # Every backend's runner raises subprocess's FileNotFoundError, as the user's own
    # error would cross; it is gridboost's verdict on the command, typed the same everywhere.
    if isinstance(exc, CommandNotFound):
        return exc
    missing = exc.filename if isinstance(exc.filename, str) else command.argv[0]
    what = "working directory" if missing == command.cwd else "program"
    return CommandNotFound(errno.ENOENT, f"command {shown(command.argv[0], 40)} cannot start: no such {what}", missing)


def _describe(cm: object) -> str:
    """An app resource as a teardown error names it: ``resource('db')`` for an ``@asynccontextmanager``."""
    func, args = getattr(cm, "func", None), getattr(cm, "args", None)
    if callable(func) and isinstance(args, tuple):
        return f"{getattr(func, '__qualname__', 'resource')}({', '.join(shown(a, 30) for a in args)})"
    return shown(cm)


def _unknown_options(
    backend: str, unknown: Sequence[str], accepted: Iterable[str], specs: Mapping[str, BackendSpec]
) -> str:
    """One line: the first unknown option, what was likely meant, and the names accepted (never their descriptions)."""
    first = unknown[0]
    named = first if first.isidentifier() and len(first) < 40 else shown(first, 40)
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    listing = f"it accepts: {', '.join(accepted) or 'none'}"
    others = [name for name, spec in specs.items() if first in spec.options]
    if others:  # Grid(address=...) meant for a cluster backend
        return f"the {backend} backend has no option {named}{more}; {listing} ({named} is for: {', '.join(others)})"
    mine = [name for name in inspect.signature(Grid).parameters if name not in ("backend", "options")]
    everyone = {option for spec in specs.values() for option in spec.options}
    hint = did_you_mean(first, [*accepted, *mine, *sorted(everyone - set(accepted))])
    return f"the {backend} backend has no option {named}{more}" + (f"{hint} ({listing})" if hint else f"; {listing}")


def _lease_id(value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"a lease id is a non-empty string, got {shown(value)}")


class Grid:
    """Capacity on this machine and on a cluster, behind one async context manager.

    >>> async with Grid() as grid:                      # doctest: +SKIP
    ...     print(await grid.offload(sum, [1, 2, 3]))
    6

    ``backend`` names a backend some plugin provides (``"local"`` is built in);
    ``options`` go to that backend and are checked against the ones it declares.

    With a remote backend, ``local_capacity`` is what work placed on this machine is
    accounted against (default: the machine's), and ``cluster_queue`` how much work,
    as a fraction of the cluster's capacity, automatic placement may queue at the
    engine beyond it. ``probe`` reads the machine's load
    (default: :class:`SystemProbe`) every ``pressure_interval`` seconds once pressure
    is first needed; ``pressure_thresholds`` overrides the default :class:`Threshold`
    of some dimensions. ``auto_offload``, ``auto_offload_limit`` and
    ``auto_offload_backoff`` govern moving queued work (see ``docs/concepts.md``).
    """

    def __init__(
        self,
        backend: str = "local",
        *,
        plugins: Iterable[object] = (),
        teardown_timeout: float = 30.0,
        auto_offload: bool = True,
        auto_offload_limit: int = 5,
        auto_offload_backoff: float = 1.0,
        local_capacity: Resources | str | Mapping[str, Any] | None = None,
        cluster_queue: float = 0.5,
        probe: Probe | None = None,
        pressure_interval: float = 1.0,
        pressure_thresholds: Mapping[str, Threshold | tuple[float, float]] | None = None,
        **options: Any,
    ) -> None:
        self.teardown_timeout = seconds("teardown_timeout", teardown_timeout)
        if isinstance(auto_offload_limit, bool) or not isinstance(auto_offload_limit, int) or auto_offload_limit < 0:
            raise InvalidRequest(f"auto_offload_limit must be a whole number >= 0, got {shown(auto_offload_limit)}")
        #: Move queued auto-placed work onto each boost as it becomes active; takes effect at once.
        self.auto_offload = bool(auto_offload)
        #: At most this many queued tasks move per boost activation.
        self.auto_offload_limit = auto_offload_limit
        #: An activation this soon after the previous one that moved work gets half its budget.
        self.auto_offload_backoff = bounded("auto_offload_backoff", auto_offload_backoff, "seconds", math.inf)
        #: How far beyond the cluster's capacity (a fraction of it) automatic placement queues work at the engine.
        self.cluster_queue = bounded("cluster_queue", cluster_queue, "a fraction of the cluster's capacity", 10)
        host_capacity = None if local_capacity is None else Resources.coerce(local_capacity)
        self.plugins = GridPluginManager.for_grid(plugins)
        specs = self.plugins.backend_specs()
        if not isinstance(backend, str):
            raise InvalidRequest(f"backend must be a backend's name (a string), got {shown(backend)}")
        if backend not in specs:
            raise UnknownBackend(backend, sorted(specs), self.plugins.install_hint(backend))
        spec = specs[backend]
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise InvalidRequest(_unknown_options(backend, unknown, spec.options, specs))
        self.backend: Backend = spec.factory(**options)
        # Work placed "local" runs on this machine even when the cluster is elsewhere.
        # A backend that is this machine (the local one, or a wrapper of it) is also the host.
        if self.backend.capabilities.remote:
            self._host: Backend = LocalBackend(capacity=host_capacity)
        elif host_capacity is not None:
            raise InvalidRequest(
                f"local_capacity is for remote backends; the {backend} backend is this machine "
                "(give it its own capacity option, if it has one)"
            )
        else:
            self._host = self.backend
        self._monitor = Monitor(self, probe, pressure_interval, pressure_thresholds)
        self._dispatch = Dispatch(self)
        self._boosts = BoostBook(self)
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._tg: TaskGroup | None = None
        self._loops: anyio.CancelScope | None = None  # made in __aenter__: Grid() may be built outside a loop
        self._loops_tg: TaskGroup | None = None
        self._app_closers: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        self._runs: set[Run] = set()
        self._runs_idle: anyio.Event | None = None
        self._grants: set[anyio.CancelScope] = set()
        self._observing = 0
        self._observers_idle: anyio.Event | None = None
        self._hook_cache: dict[str, Any] = {}
        self._hook_version = -1
        self._counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<Grid backend={self.backend.name} {self._state}>"

    # -- life cycle -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    async def __aenter__(self) -> Grid:
        if self._state != "new":
            raise GridClosed("a Grid can be entered only once; make a new one")
        self._state = "open"
        try:
            await self.backend.start()
            if self._host is not self.backend:
                await self._host.start()
                self._dispatch.local.set_capacity(getattr(self._host, "capacity", None))
                await self._dispatch.read_cluster()
            self._loops = anyio.CancelScope()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            self._state = "closed"
            with anyio.CancelScope(shield=True):
                for backend in {self._host, self.backend}:
                    try:
                        await backend.aclose()
                    except Exception as exc:
                        log.warning("closing %s after a failed start: %s", backend.name, exc)
            raise
        _open_grids.add(self)
        await self._tg.start(self._run_loops)
        if self._cached("gridboost_pressure_changed"):
            self._monitor.start()  # someone listens: pressure is needed from the start
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._state = "closing"
        leftovers: list[str] = []
        errors: list[BaseException] = []
        assert self._tg is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._stop_work(leftovers, errors)
        finally:
            assert self._loops is not None
            self._loops.cancel()
            self._tg.cancel_scope.cancel()
            try:
                await self._tg.__aexit__(None, None, None)
            finally:
                if self._monitor.leftover is not None:
                    leftovers.append(self._monitor.leftover)
                with anyio.CancelScope(shield=True):
                    await self._close_backends(leftovers, errors)
                self._state = "closed"
                _open_grids.discard(self)
        if leftovers:
            raise TeardownError(leftovers, errors)

    async def _stop_work(self, leftovers: list[str], errors: list[BaseException]) -> None:
        for scope in self._grants:
            scope.cancel()
        for run in list(self._runs):
            run.cancel(TaskCancelled(f"task {run.spec.id} ({run.spec.name}) was cancelled: the grid closed"))
        with anyio.move_on_after(self.teardown_timeout):
            while self._runs or self._grants:
                self._runs_idle = anyio.Event()
                await self._runs_idle.wait()
        leftovers += [
            f"task {r.spec.id} ({r.spec.name}) still running after {self.teardown_timeout:g}s" for r in self._runs
        ]
        await self._close_app(leftovers, errors)

        async def release(boost: Boost) -> None:
            try:
                await self._boosts.finish(boost, BoostState.RELEASED)
            except Exception as exc:
                errors.append(exc)
                leftovers.append(f"boost {boost.id} was not released: {type(exc).__name__}: {exc}")

        # All at once: each release is an engine round trip (a placement group removed, a marker cleared).
        async with anyio.create_task_group() as tg:
            for boost in list(self._boosts.boosts.values()):
                tg.start_soon(release, boost)
        with anyio.move_on_after(self.teardown_timeout):
            while self._observing:
                self._observers_idle = anyio.Event()
                await self._observers_idle.wait()
        if self._observing:
            leftovers.append(f"{self._observing} observer hook(s) still running after {self.teardown_timeout:g}s")

    async def _close_app(self, leftovers: list[str], errors: list[BaseException]) -> None:
        """Close the app's resources in reverse order, each within its own ``teardown_timeout``."""
        while self._app_closers:
            name, close = self._app_closers.pop()
            try:
                with anyio.move_on_after(self.teardown_timeout) as scope:
                    await close()
            except Exception as exc:
                errors.append(exc)
                leftovers.append(f"closing the app's resource {name} failed: {type(exc).__name__}: {str(exc)[:120]}")
            else:
                if scope.cancelled_caught:
                    leftovers.append(f"the app's resource {name} did not close within {self.teardown_timeout:g}s")

    async def _close_backends(self, leftovers: list[str], errors: list[BaseException]) -> None:
        with anyio.move_on_after(self.teardown_timeout) as scope:
            try:
                held = await self.backend.reservations()
            except Exception as exc:
                errors.append(exc)
                leftovers.append(f"could not ask the {self.backend.name} engine for its reservations: {exc}")
                held = []
        if scope.cancelled_caught:
            leftovers.append(f"the {self.backend.name} engine did not list its reservations in time")
        leftovers += [f"reservation {r.id} is still held by the {self.backend.name} engine" for r in held]
        for backend in dict.fromkeys((self._host, self.backend)):
            try:
                with anyio.fail_after(self.teardown_timeout):
                    await backend.aclose()
            except TeardownError as exc:
                leftovers += [f"{backend.name}: {item}" for item in exc.leftovers]
            except Exception as exc:
                errors.append(exc)
                leftovers.append(f"closing the {backend.name} backend failed: {type(exc).__name__}: {exc}")

    async def _run_loops(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self._loops is not None
        with self._loops:
            async with anyio.create_task_group() as tg:
                self._loops_tg = tg
                tg.start_soon(self._boosts.expire_loop)
                tg.start_soon(self._watch)
                if self._host is not self.backend:
                    tg.start_soon(self._dispatch.watch_cluster)
                task_status.started()

    def _start_loop(self, loop: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Start a background loop that ends at teardown, with the others."""
        assert self._loops_tg is not None
        self._loops_tg.start_soon(loop)

    async def _watch(self) -> None:
        try:
            await self.backend.watch(self._boosts.lost)
        except Exception as exc:  # losing the watch must not take the grid down; say so loudly
            self._log_error(f"the {self.backend.name} backend stopped watching its reservations", exc)

    def _check_open(self) -> None:
        if self._state != "open":
            raise GridClosed(
                "this grid is closed"
                if self._state != "new"
                else "this grid is not open yet: use `async with Grid(...)`"
            )

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now and exit it at teardown, after the work stopped, in reverse order.

        Each is closed on its own, bounded by ``teardown_timeout``: one that hangs or fails
        is named in the ``TeardownError`` and the others still close."""
        self._check_open()
        kind = type(cm)
        if not (callable(getattr(kind, "__aenter__", None)) and callable(getattr(kind, "__aexit__", None))):
            raise InvalidRequest(f"enter_async_context takes an async context manager, got {shown(cm)}")
        name = _describe(cm)  # before entering: an @asynccontextmanager forgets its arguments then
        result = await kind.__aenter__(cm)
        self._app_closers.append((name, partial(kind.__aexit__, cm, None, None, None)))
        return result

    def push_async_callback(self, callback: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> None:
        """Await ``callback(*args, **kwargs)`` at teardown, after the work stopped, in reverse order (each bounded)."""
        self._check_open()
        if not callable(callback):
            raise InvalidRequest(f"push_async_callback takes a coroutine function, got {shown(callback)}")
        name = getattr(callback, "__qualname__", None) or shown(callback)
        self._app_closers.append((f"callback {name}", partial(callback, *args, **kwargs)))

    # -- seeing ---------------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        """Every node of the backend, with total and available resources (a ``ClusterSnapshot``)."""
        self._check_open()
        return await self.backend.snapshot()

    @property
    def task_prefix(self) -> str | None:
        """How the engine names this grid's work in its own task table: this, then ``TaskSpec.id``.

        ``None`` where the engine names no tasks (the local backend). With Ray,
        ``ray.util.state.list_tasks(filters=[("name", "=", grid.task_prefix + task_id)])``
        finds a task; with Dask, the scheduler's keys start with it.
        """
        return self.backend.task_prefix

    @property
    def local_available(self) -> Resources:
        """Capacity free on this machine for work placed here, by gridboost's own books: with a remote
        backend, what placed work (waiting work included) has not claimed; else what work and boosts left."""
        if self._host is not self.backend:
            free = self._dispatch.local.free
            if free is not None:
                return free
        available: Resources = getattr(self._host, "available", Resources())
        return available

    @property
    def cluster_available(self) -> Resources | None:
        """Capacity of the cluster not claimed by this grid's work or boosts; ``None`` when unknown or not remote."""
        return self._dispatch.cluster.free if self._host is not self.backend else None

    async def pressure(self) -> Pressure:
        """This machine's pressure: the latest reading (the first call starts the monitor and waits for one).

        ``ProbeError`` when there is none: the probe failed, or gave none in time."""
        self._check_open()
        return await self._monitor.current()

    def pressure_changes(self, *, buffer: int = 16) -> PressureChanges:
        """``async for p in grid.pressure_changes():`` each change of level or of which dimensions are high.

        Keeps the newest ``buffer`` changes a slow reader has not taken; ends when the grid closes."""
        self._check_open()
        return self._monitor.subscribe(buffer)

    @property
    def latest_pressure(self) -> Pressure:
        """The latest reading, without waiting or starting the monitor: ``Pressure()`` before the first."""
        return self._monitor.latest

    @property
    def pressure_thresholds(self) -> Mapping[str, Threshold]:
        """The :class:`Threshold` of each dimension (``cpu``, ``memory``, ``gpu``, ``gpu_memory``)."""
        return self._monitor.thresholds

    async def scan_processes(self, *, limit: int = 20, window: float = 0.5) -> list[OffloadRecommendation]:
        """What on this machine could run elsewhere: ``OffloadRecommendation`` records, the easiest first.

        This grid's queued work, the commands it runs here, and other processes with a
        noticeable share of the machine (CPU measured over ``window`` seconds, off the
        loop). Advice only: it never stops, kills or moves anything.
        """
        self._check_open()
        return await scan_processes(self, limit=limit, window=window)

    async def leases(self) -> Sequence[Lease]:
        """Every lease the engine records, this grid's and other processes' alike (``Lease`` records)."""
        self._check_open()
        return await self.backend.leases()

    @property
    def boosts(self) -> tuple[Boost, ...]:
        """The boosts of this grid that are pending or active."""
        return tuple(self._boosts.boosts.values())

    def stats(self) -> dict[str, int]:
        """Counters: ``placed.<kind>`` (and ``placed.waiting``), ``moves`` (and ``moves.<kind>``),
        ``tasks.<status>``, ``boosts.granted`` and ``boosts.<outcome>``, ``pressure.changes``,
        ``probe_errors``, ``observer_errors``."""
        counts = dict(self._counts)
        counts.update({f"boosts.{k}": v for k, v in self._boosts.outcomes.items()})
        counts["boosts.granted"] = self._boosts.granted
        counts["probe_errors"] = self._monitor.errors
        for name in ("observer_errors", "moves", "pressure.changes"):
            counts.setdefault(name, 0)
        return counts

    # -- boosting -------------------------------------------------------------------

    async def request_boost(
        self,
        resources: Resources | str | Mapping[str, Any],
        *,
        ttl: float,
        priority: Priority = Priority.NORMAL,
        wait: float = 30.0,
        strategy: Strategy = "pack",
        nodes: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Boost:
        """Take a lease; return once the backend holds it. You release it (or its TTL does)."""
        self._check_open()
        boost = self._boosts.make(
            resources, ttl=ttl, priority=priority, wait=wait, strategy=strategy, nodes=nodes, labels=labels
        )
        return await self._pending("boost", self._boosts.grant(boost), boost.id)

    async def request_lease(
        self,
        resources: Resources | str | Mapping[str, Any],
        *,
        ttl: float,
        priority: Priority = Priority.NORMAL,
        wait: float = 30.0,
        strategy: Strategy = "pack",
        nodes: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Lease:
        """Take a lease that outlives this grid and this process, until its TTL; return its ``Lease`` record.

        For the ``gridboost boost`` commands and other tools: the engine's lease registry holds and ends it,
        and any process can ``renew_lease`` or ``release_lease`` it. Needs a backend with
        ``capabilities.shared_leases`` (Ray, Dask); the same validation, priority order and ``wait`` bound as
        :meth:`request_boost`. Work runs inside a boost, not a lease.
        """
        self._check_open()
        boost = self._boosts.make(
            resources, ttl=ttl, priority=priority, wait=wait, strategy=strategy, nodes=nodes, labels=labels
        )
        return await self._pending("lease", self._boosts.lease(boost), boost.id)

    async def _pending(self, what: str, granting: Coroutine[Any, Any, T], ident: str) -> T:
        """Await a boost or lease request in a scope teardown cancels, so closing never waits on a grant."""
        scope = anyio.CancelScope()
        self._grants.add(scope)
        try:
            with scope:
                return await granting
        finally:
            self._grants.discard(scope)
            self._maybe_idle()
        raise GridClosed(f"the grid closed while {what} {ident} was pending")

    async def renew_lease(self, lease_id: str, ttl: float) -> Lease:
        """Move any owner's lease to expire ``ttl`` seconds from now (a boost of this grid: ``boost.renew``)."""
        self._check_open()
        _lease_id(lease_id)
        ttl = seconds("ttl", ttl)
        boost = self._boosts.boosts.get(lease_id)
        if boost is None or not boost.is_active:
            return await self.backend.renew_lease(lease_id, ttl)
        await boost.renew(ttl)
        assert boost.expires_at is not None
        return Lease(
            id=boost.id,
            backend=self.backend.name,
            resources=boost.resources,
            owner=owner_name(),
            state="active",
            priority=boost.priority,
            expires_at=boost.expires_at,
            placements=boost.placements,
        )

    async def release_lease(self, lease_id: str) -> None:
        """Give back any owner's lease now, awaited (a boost of this grid: ``boost.release``)."""
        self._check_open()
        _lease_id(lease_id)
        boost = self._boosts.boosts.get(lease_id)
        if boost is not None and boost.is_active:
            await boost.release()
            return
        await self.backend.release_lease(lease_id)

    def boost(
        self,
        resources: Resources | str | Mapping[str, Any],
        *,
        ttl: float,
        priority: Priority = Priority.NORMAL,
        wait: float = 30.0,
        strategy: Strategy = "pack",
        nodes: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> BoostBlock:
        """``async with grid.boost(...) as boost:`` — auto-placed work in the block runs inside it."""
        options = {"ttl": ttl, "priority": priority, "wait": wait, "strategy": strategy, "nodes": nodes}
        return BoostBlock(self, resources, {**options, "labels": labels})

    # -- running --------------------------------------------------------------------

    def _spec(
        self,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        resources: Any,
        where: Any,
        retries: Any,
        timeout: Any,
    ) -> Run:
        self._check_open()
        spec = TaskSpec(target, args, kwargs, resources=resources, where=where, retries=retries, timeout=timeout)
        return Run(spec)

    def _decide(self, run: Run) -> None:
        """Place the run and claim its capacity there, now: the next decision sees that room taken."""
        spec = run.spec
        placement = self._place(spec)
        backend = self._host if placement.kind == "local" else self.backend
        if run.checked is not backend:
            backend.check_task(spec)
        run.placement = placement
        self._dispatch.claim(run)

    def _precheck(self, run: Run) -> Run:
        """What the backend can refuse of a task whose placement waits until it starts, refused now.

        An explicit ``where`` names its backend; ``auto`` is checked against the host here,
        and against the cluster only if it is placed there (the default policy keeps work the
        cluster cannot run on this machine).
        """
        where = run.spec.where
        backend = self._host if where == "local" or where == "auto" else self.backend
        backend.check_task(run.spec)
        run.checked = backend
        return run

    def _place(self, spec: TaskSpec) -> Placement:
        where = spec.where
        if where == "auto":
            if self._cached("placement_is_default"):
                placement = default_placement(self, spec)
            else:
                placement = call_decision(
                    self.plugins.hook.gridboost_choose_placement, "gridboost_choose_placement", grid=self, task=spec
                )
                if not isinstance(placement, Placement):
                    raise PolicyError(f"gridboost_choose_placement returned {placement!r}, not a Placement")
        elif where == "local":
            placement = _PLACE_LOCAL
        elif where == "cluster":
            placement = _PLACE_CLUSTER
        else:
            assert isinstance(where, Boost)
            placement = Placement("boost", "asked for: where=<boost>", where)
        if placement.boost is not None:
            if placement.boost.grid is not self:
                raise InvalidRequest(f"boost {placement.boost.id} belongs to another grid")
            placement.boost.require_active()
        return placement

    def _cached(self, key: str) -> Any:
        if self._hook_version != self.plugins.version:
            hook = self.plugins.hook
            impls = hook.gridboost_choose_placement.get_hookimpls()
            self._hook_cache = {
                "placement_is_default": len(impls) == 1 and impls[0].plugin_name == "gridboost._policy",
                **{name: observer_impls(getattr(hook, name)) for name in _OBSERVERS},
            }
            self._hook_version = self.plugins.version
        return self._hook_cache[key]

    async def _execute(self, run: Run) -> Any:
        # The hot path of every task. Each resumption of a coroutine walks every frame
        # of its await chain, so one attempt is awaited straight from here, with no
        # helper coroutine in between, and the clock is read only when someone needs it.
        spec = run.spec
        if run.placement is None:  # an offload is placed as its coroutine starts: a burst is accounted task by task
            self._decide(run)
        self._runs.add(run)
        observed = self._cached("gridboost_task_finished")
        started = time.monotonic() if observed or spec.timeout is not None else 0.0
        status: Literal["succeeded", "failed", "cancelled", "timed_out"] = "cancelled"
        error: BaseException | None = None
        try:
            while True:
                self._enter_placement(run)
                # A run cancelled before it starts must not reach the backend at all:
                # some engines submit before their first checkpoint.
                if run.cause is None:
                    with run.scope:
                        if spec.timeout is not None:
                            with anyio.fail_after(started + spec.timeout - time.monotonic()):
                                result = await self._attempts(run)
                        elif spec.retries:
                            result = await self._attempts(run)
                        else:
                            run.attempts += 1
                            result = await self._attempt(run)
                        status = "succeeded"
                        return result
                assert run.cause is not None  # only Run.cancel cancels run.scope, and it sets the cause
                if not isinstance(run.cause, Move):
                    raise run.cause
                self._leave_placement(run)
                run.move_to(run.cause.placement)  # its capacity there was claimed when the move was decided
        except BaseException as exc:
            error = exc
            if exc is not run.cause and not isinstance(exc, anyio.get_cancelled_exc_class()):
                status = "timed_out" if spec.timeout is not None and isinstance(exc, TimeoutError) else "failed"
                if isinstance(exc, FileNotFoundError) and isinstance(spec.target, Command):
                    error = _not_found(spec.target, exc)
                    raise error from exc
            raise
        finally:
            self._leave_placement(run)
            self._dispatch.release(run)
            self._runs.discard(run)
            if self._runs_idle is not None:
                self._maybe_idle()
            self._counts[_TASKS[status]] += 1
            if observed:
                outcome = TaskOutcome(status, run.attempts, time.monotonic() - started, error)
                self._notify("gridboost_task_finished", task=spec, placement=run.placement, outcome=outcome)

    def _enter_placement(self, run: Run) -> None:
        placement = run.placement
        assert placement is not None
        if placement.boost is not None:
            placement.boost.require_active()
            placement.boost._runs.add(run)
        self._counts[_PLACED[placement.kind]] += 1
        if placement.waiting:
            self._counts["placed.waiting"] += 1
        if self._cached("gridboost_task_placed"):
            self._notify("gridboost_task_placed", task=run.spec, placement=placement)

    def _leave_placement(self, run: Run) -> None:
        boost = run.placement.boost if run.placement is not None else None
        if boost is not None:
            boost._runs.discard(run)
            if not boost._runs and boost._runs_idle is not None:
                boost._runs_idle.set()

    def _attempt(self, run: Run) -> Awaitable[Any]:
        """One attempt, as the backend's own coroutine (no frame of ours in the await chain)."""
        placement = run.placement
        assert placement is not None
        if placement.boost is not None:
            return self.backend.run(run.spec, placement.boost.reservation)
        if placement.kind == "local":
            # Only here does work wait for capacity where it can be moved before it starts.
            return self._host.run(run.spec, None, on_start=run.mark_started)
        return self.backend.run(run.spec, None)

    async def _attempts(self, run: Run) -> Any:
        """Attempts until one succeeds or ``retries`` are spent (the backend's own count, if it retries)."""
        placement = run.placement
        assert placement is not None
        backend = self._host if placement.kind == "local" and placement.boost is None else self.backend
        retries = 0 if backend.capabilities.native_retries else run.spec.retries
        while True:
            run.attempts += 1
            try:
                return await self._attempt(run)
            except Exception as exc:
                # The user's errors and the engine's failures (a lost node) are retried;
                # gridboost's verdicts on the request itself (bad input, no capacity) are not.
                if run.attempts > retries or (isinstance(exc, GridboostError) and not isinstance(exc, BackendError)):
                    raise

    def _maybe_idle(self) -> None:
        if self._runs_idle is not None and not self._runs and not self._grants:
            self._runs_idle.set()

    def offload(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        resources: Resources | str | Mapping[str, Any] | None = None,
        where: Literal["auto", "local", "cluster"] | Boost = "auto",
        retries: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, T]:
        """``await grid.offload(fn, ...)``: run ``fn(*args, **kwargs)`` where the policy says; return its result.

        The function's own exception is raised with its own type; ``timeout`` bounds
        all attempts together and raises ``TimeoutError``. Bad input raises as soon
        as ``offload`` is called (what the backend ``where`` names cannot run, too);
        the placement is decided, and its capacity claimed, when the coroutine starts,
        so a burst of offloads is accounted one by one.
        (A plain function returning the coroutine, not an ``async def``: one frame
        fewer on the hot path.)
        """
        run = self._precheck(self._spec(fn, args, kwargs, resources, where, retries, timeout))
        return self._execute(run)

    @overload
    def submit(
        self,
        fn: Command,
        /,
        *,
        resources: Resources | str | Mapping[str, Any] | None = None,
        where: Literal["auto", "local", "cluster"] | Boost = "auto",
        retries: int = 0,
        timeout: float | None = None,
    ) -> TaskHandle[CommandResult]: ...

    @overload
    def submit(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        resources: Resources | str | Mapping[str, Any] | None = None,
        where: Literal["auto", "local", "cluster"] | Boost = "auto",
        retries: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> TaskHandle[T]: ...

    def submit(
        self,
        fn: Callable[..., T] | Command,
        /,
        *args: Any,
        resources: Resources | str | Mapping[str, Any] | None = None,
        where: Literal["auto", "local", "cluster"] | Boost = "auto",
        retries: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> TaskHandle[Any]:
        """Start ``fn(*args, **kwargs)`` (or a ``Command``) and return a handle at once; bad input raises here."""
        run = self._spec(fn, args, kwargs, resources, where, retries, timeout)
        self._decide(run)
        handle: TaskHandle[Any] = TaskHandle(run)
        assert self._tg is not None
        self._runs.add(run)  # counted from now, so teardown waits for it even before it starts
        self._tg.start_soon(self._run_handle, handle)
        return handle

    async def _run_handle(self, handle: TaskHandle[Any]) -> None:
        handle.started_at = time.monotonic()
        try:
            result = await self._execute(handle._run)
        except Exception as exc:
            handle._settle(None, exc)
        except BaseException:  # cancelled from outside: the block holding the grid is being cancelled
            handle._settle(None, handle._run.cause or handle._run_cancelled())
            raise
        else:
            handle._settle(result, None)

    def map(
        self,
        fn: Callable[..., T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        resources: Resources | str | Mapping[str, Any] | None = None,
        max_in_flight: int = _DEFAULT_MAP_IN_FLIGHT,
        ordered: bool = True,
        where: Literal["auto", "local", "cluster"] | Boost = "auto",
        retries: int = 0,
        timeout: float | None = None,
    ) -> TaskMap[T]:
        """``fn(item)`` for each item, as an async iterator, with at most ``max_in_flight`` running."""
        self._check_open()
        options = {"resources": resources, "where": where, "retries": retries, "timeout": timeout}
        return TaskMap(self, fn, items, max_in_flight=max_in_flight, ordered=ordered, options=options)

    def run_command(
        self,
        argv: Sequence[str],
        *,
        resources: Resources | str | Mapping[str, Any] | None = None,
        where: Literal["auto", "local", "cluster"] | Boost = "auto",
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Coroutine[Any, Any, CommandResult]:
        """``await grid.run_command([...])``: run a program (never through a shell); return its ``CommandResult``.

        Bad input (a string ``argv``, a NUL character, ``=`` in an env name, a non-string
        ``cwd``) raises ``InvalidTask`` as soon as ``run_command`` is called. On ``timeout``
        the process is terminated (then killed) and ``TimeoutError`` raised. With
        ``check=True`` a non-zero status raises ``CommandFailed``. A program (or ``cwd``)
        that does not exist where the command runs raises ``CommandNotFound``, a
        ``FileNotFoundError``, on every backend.
        """
        if not isinstance(check, bool):
            raise InvalidRequest(f"check must be True or False, got {shown(check)}")
        command = Command(argv, env=env, cwd=cwd)
        run = self._precheck(self._spec(command, (), {}, resources, where, 0, timeout))
        return self._command(run, command, check)

    async def _command(self, run: Run, command: Command, check: bool) -> CommandResult:
        result: CommandResult = await self._execute(run)
        if check and result.returncode != 0:
            raise CommandFailed(command.argv, result.returncode, result.stdout, result.stderr)
        return result

    # -- hooks ----------------------------------------------------------------------

    def _notify(self, hook: str, **kwargs: Any) -> None:
        """Call each observer on its own; start coroutines in the grid's task group."""
        kwargs["grid"] = self
        for function, argnames, plugin in self._cached(hook):
            try:
                result = function(*[kwargs[name] for name in argnames])
            except Exception as exc:
                self._observer_failed(plugin, hook, exc)
                continue
            if inspect.isawaitable(result):
                if self._tg is None or self._state == "closed":
                    if inspect.iscoroutine(result):
                        result.close()
                    self._observer_failed(plugin, hook, GridClosed("observer coroutine after teardown"))
                    continue
                self._observing += 1
                self._tg.start_soon(self._observe, result, plugin, hook)

    async def _observe(self, awaitable: Awaitable[Any], plugin: str, hook: str) -> None:
        # Shielded but bounded: an observer is awaited even while the host block is
        # being cancelled, and one that hangs is cut off (and counted) at the timeout.
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self.teardown_timeout):
                await awaitable
        except Exception as exc:
            self._observer_failed(plugin, hook, exc)
        finally:
            self._observing -= 1
            if not self._observing and self._observers_idle is not None:
                self._observers_idle.set()

    def _pressure_changed(self, old: Pressure, new: Pressure) -> None:
        self._counts["pressure.changes"] += 1
        if self._state == "open" and self._cached("gridboost_pressure_changed"):
            self._notify("gridboost_pressure_changed", old=old, new=new)

    def _observer_failed(self, plugin: str, hook: str, exc: BaseException) -> None:
        self._counts["observer_errors"] += 1
        log.error("observer %s of plugin %s failed: %s: %s", hook, plugin, type(exc).__name__, exc, exc_info=exc)

    def _log_error(self, message: str, exc: BaseException) -> None:
        self._counts["errors"] += 1
        log.error("%s: %s: %s", message, type(exc).__name__, exc, exc_info=exc)


_OBSERVERS = (
    "gridboost_boost_activated",
    "gridboost_boost_released",
    "gridboost_boost_expired",
    "gridboost_boost_failed",
    "gridboost_task_placed",
    "gridboost_task_finished",
    "gridboost_pressure_changed",
)
