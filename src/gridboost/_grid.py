"""``Grid``: the facade. It checks options, composes the services, owns one structured lifetime,
and delegates every public method; the services never call back into it.

A task flows one way: ``Grid`` → ``Executor`` (spec, check, placement, attempts) → backend.
Teardown's steps are in ``_teardown``; ``docs/architecture.md`` has the map.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack, overload

from . import _teardown
from ._advisor import OffloadRecommendation, scan_processes
from ._batch import make_map
from ._book import BoostBook
from ._boost import Boost, BoostBlock, BoostOptions
from ._checks import flag, text
from ._checks import tenant as check_tenant
from ._dispatch import Dispatch
from ._executor import Executor
from ._local import LocalBackend
from ._parking import Parked, Parking
from ._plugins import GridPluginManager
from ._policy import DefaultPolicy
from ._pressure import Monitor, Pressure, PressureChanges, Threshold
from ._probes import Probe
from ._records import ClusterSnapshot, Command, CommandResult, Lease, Quota
from ._resources import Resources
from ._runtime import Runtime, Setting, Settings
from ._task import TaskHandle, TaskMap
from .abc import Backend
from .exceptions import GridClosed, InvalidRequest

if TYPE_CHECKING:
    from ._futures import GridExecutor

__all__ = ["Grid"]

T = TypeVar("T")
_Where = Literal["auto", "local", "cluster"] | Boost
_Amount = Resources | str | Mapping[str, Any]
_DEFAULT_MAP_IN_FLIGHT = 32


class Grid:
    """Capacity on this machine and on a cluster, behind one async context manager.

    >>> async with Grid() as grid:                      # doctest: +SKIP
    ...     print(await grid.offload(sum, [1, 2, 3]))
    6

    ``backend`` names a backend some plugin provides (``"local"`` is built in);
    ``options`` go to that backend and are checked against the ones it declares.

    With a remote backend, ``local_capacity`` is what work placed on this machine is
    accounted against (default: the machine's), and ``cluster_queue`` how much work,
    as a fraction of the cluster's (or a boost's) capacity, may queue at the engine
    beyond it. ``probe`` reads the machine's load
    (default: :class:`SystemProbe`) every ``pressure_interval`` seconds once pressure
    is first needed; ``pressure_thresholds`` overrides the default :class:`Threshold`
    of some dimensions. ``auto_offload``, ``auto_offload_limit`` and
    ``auto_offload_backoff`` govern moving queued work (see ``docs/concepts.md``).
    ``tenant``: whose quota this grid's leases count against (default ``user@host``).
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
        local_capacity: _Amount | None = None,
        cluster_queue: float = 0.5,
        probe: Probe | None = None,
        pressure_interval: float = 1.0,
        pressure_thresholds: Mapping[str, Threshold | tuple[float, float]] | None = None,
        tenant: str | None = None,
        **options: Any,
    ) -> None:
        auto, limit, backoff = flag("auto_offload", auto_offload), auto_offload_limit, auto_offload_backoff
        settings = Settings.checked(teardown_timeout, auto, limit, backoff, cluster_queue, tenant)
        host_capacity = None if local_capacity is None else Resources.coerce(local_capacity)
        self._policy = policy = DefaultPolicy()  # bound to the grid's books below, once they exist
        self.plugins = GridPluginManager.for_grid(plugins, policy=policy)
        mine = [name for name in inspect.signature(Grid).parameters if name not in ("backend", "options")]
        self.backend: Backend = self.plugins.make_backend(backend, options, mine)
        # Work placed "local" runs on this machine even when the cluster is elsewhere.
        # A backend that is this machine (the local one, or a wrapper of it) is also the host.
        if self.backend.capabilities.remote:
            host: Backend = LocalBackend(capacity=host_capacity)
        elif host_capacity is not None:
            raise InvalidRequest(
                f"local_capacity is for remote backends; the {backend} backend is this machine "
                "(give it its own capacity option, if it has one)"
            )
        else:
            host = self.backend
        self._runtime = runtime = Runtime(self.backend, host, settings, self.plugins)
        runtime.view = self
        self._monitor = Monitor(runtime, probe, pressure_interval, pressure_thresholds)
        self._book = BoostBook(runtime)
        self._dispatch = Dispatch(runtime, self._book)
        policy.bind(runtime, self._book, self._dispatch, self._monitor)
        self._parking = Parking(runtime, self._book)
        self._executor = Executor(runtime, self._book, self._dispatch, policy, self._parking)
        self._services = _teardown.Services(self._monitor, self._book, self._dispatch, self._executor, self._parking)
        self._app = _teardown.AppResources()
        self._lifetime: AbstractAsyncContextManager[None] | None = None

    def __repr__(self) -> str:
        return f"<Grid backend={self.backend.name} {self._runtime.state}>"

    # -- settings: kept in the runtime, where the services read them -----------------

    #: Move queued auto-placed work onto each boost as it becomes active; setting it takes effect at once.
    auto_offload = Setting[bool](lambda value: flag("auto_offload", value))
    auto_offload_limit = Setting[int]()  #: At most this many queued tasks move per boost activation.
    #: An activation this soon after the previous one that moved work gets half its budget.
    auto_offload_backoff = Setting[float]()
    cluster_queue = Setting[float]()  #: How far beyond the cluster's capacity automatic placement queues work.
    teardown_timeout = Setting[float]()  #: The bound of each teardown step, in seconds.
    tenant = Setting[str]()  #: Whose quota this grid's leases count against.

    # -- life cycle -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._runtime.state == "closed"

    async def __aenter__(self) -> Grid:
        # The lifetime is one @asynccontextmanager (_teardown.lifetime); this only keeps it while the block runs.
        if self._lifetime is not None:
            raise GridClosed("a Grid can be entered only once; make a new one")
        self._lifetime = _teardown.lifetime(self._runtime, self._services, self._app, owner=self)
        await self._lifetime.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(exc_type, exc, tb)

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now; exit it at teardown, after the work stopped, in reverse order, each bounded by
        ``teardown_timeout``: one that hangs or fails is named in the ``TeardownError``, and the others still close."""
        self._runtime.check_open()
        return await self._app.enter(cm)

    def push_async_callback(self, callback: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> None:
        """Await ``callback(*args, **kwargs)`` at teardown, after the work stopped, in reverse order (each bounded)."""
        self._runtime.check_open()
        self._app.callback(callback, args, kwargs)

    # -- seeing ---------------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        """Every node of the backend, with total and available resources (a ``ClusterSnapshot``)."""
        self._runtime.check_open()
        return await self.backend.snapshot()

    @property
    def task_prefix(self) -> str | None:
        """What the engine's own task table names this grid's work with: every name starts with this.

        ``None`` where the engine names no tasks (the local backend). Dask: a key is this, then ``TaskSpec.id``.
        Ray: a name is this, then the function's qualified name (one name per function, as Ray keeps a metric series
        per name for good); ``grid.backend.ray_task_ids()`` maps ``TaskSpec.id`` to Ray's task id."""
        return self.backend.task_prefix

    @property
    def local_available(self) -> Resources:
        """Capacity free on this machine for work placed here, by gridboost's own books: with a remote
        backend, what placed work (waiting work included) has not claimed; else what work and boosts left."""
        free = self._dispatch.local.free if self._runtime.remote else None
        return free if free is not None else getattr(self._runtime.host, "available", Resources())

    @property
    def cluster_available(self) -> Resources | None:
        """Capacity of the cluster not claimed by this grid's work or boosts; ``None`` when unknown or not remote."""
        return self._dispatch.cluster.free if self._runtime.remote else None

    async def pressure(self) -> Pressure:
        """This machine's pressure: the latest reading (the first call starts the monitor and waits for one);
        ``ProbeError`` when there is none: the probe failed, or gave none in time."""
        self._runtime.check_open()
        return await self._monitor.current()

    def pressure_changes(self, *, buffer: int = 16) -> PressureChanges:
        """``async for p in grid.pressure_changes():`` each change of level or of which dimensions are high; keeps
        the newest ``buffer`` changes a slow reader has not taken; ends when the grid closes."""
        self._runtime.check_open()
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
        """What on this machine could run elsewhere, the easiest first: this grid's queued work, the commands it runs
        here, other processes with a noticeable share (CPU over ``window`` s). Advice only: it never stops anything."""
        self._runtime.check_open()
        return await scan_processes(self._runtime, self._book, self._dispatch, limit=limit, window=window)

    async def leases(self) -> Sequence[Lease]:
        """Every lease the engine records, this grid's and other processes' alike (``Lease`` records)."""
        self._runtime.check_open()
        return await self.backend.leases()

    @property
    def boosts(self) -> tuple[Boost, ...]:
        """The boosts of this grid that are pending or active."""
        return tuple(self._book.boosts.values())

    def stats(self) -> dict[str, int]:
        """Counters: ``placed.<kind>`` (and ``placed.waiting``), ``moves`` (and ``moves.<kind>``),
        ``tasks.<status>``, ``boosts.granted`` and ``boosts.<outcome>``, ``pressure.changes``,
        ``probe_errors``, ``observer_errors``."""
        return self._services.stats(self._runtime.counts)

    # -- boosting -------------------------------------------------------------------

    async def request_boost(self, resources: _Amount, **request: Unpack[BoostOptions]) -> Boost:
        """Take a lease; return once the backend holds it. You release it (or its TTL does).

        Keywords: ``ttl`` (seconds, required), ``priority`` (``Priority.NORMAL``), ``wait`` (30 s), ``strategy``
        (``"pack"``), ``nodes``, ``labels``, ``preemptible`` (``False``); see ``docs/concepts.md``."""
        self._runtime.check_open()
        boost = self._book.make(resources, **request)
        return await self._book.pending("boost", self._book.grant(boost), boost.id)

    async def request_lease(self, resources: _Amount, **request: Unpack[BoostOptions]) -> Lease:
        """Take a lease that outlives this grid and this process, until its TTL; return its ``Lease`` record.

        For tools (``gridboost boost``): the engine's registry holds it, any process may renew or release it. Needs
        ``capabilities.shared_leases`` (Ray, Dask); :meth:`request_boost`'s keywords. Work runs in boosts only."""
        self._runtime.check_open()
        boost = self._book.make(resources, **request)
        return await self._book.pending("lease", self._book.lease(boost), boost.id)

    async def renew_lease(self, lease_id: str, ttl: float) -> Lease:
        """Move any owner's lease to expire ``ttl`` seconds from now (a boost of this grid: ``boost.renew``)."""
        self._runtime.check_open()
        return await self._book.renew_lease(text("a lease id", lease_id), ttl)

    async def release_lease(self, lease_id: str) -> None:
        """Give back any owner's lease now, awaited (a boost of this grid: ``boost.release``)."""
        self._runtime.check_open()
        await self._book.release_lease(text("a lease id", lease_id))

    async def set_quota(self, tenant: str, limit: _Amount | None) -> None:
        """Cap what ``tenant``'s leases may hold together on the cluster (``None`` clears it); needs a registry."""
        self._runtime.check_open()
        await self.backend.set_quota(check_tenant(tenant), None if limit is None else Resources.coerce(limit))

    async def quotas(self) -> Sequence[Quota]:
        """Every tenant's quota on the cluster, with what its leases hold now."""
        self._runtime.check_open()
        return await self.backend.quotas()

    def boost(self, resources: _Amount, **request: Unpack[BoostOptions]) -> BoostBlock:
        """``async with grid.boost(...) as boost:`` — auto-placed work in the block runs inside it.

        Takes :meth:`request_boost`'s keywords; the block requests the boost, enters it and releases it."""
        return BoostBlock(partial(self.request_boost, resources, **request))

    # -- running --------------------------------------------------------------------

    def offload(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        resources: _Amount | None = None,
        where: _Where = "auto",
        retries: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, T]:
        """``await grid.offload(fn, ...)``: run ``fn(*args, **kwargs)`` where the policy says; return its result.

        The function's own exception is raised with its own type; ``timeout`` bounds all attempts together and raises
        ``TimeoutError``. Bad input raises at the call (what the backend ``where`` names cannot run, too); placement
        is decided, and its capacity claimed, when the coroutine starts, so a burst is accounted one by one. (A plain
        function returning the coroutine, not an ``async def``: one frame fewer on the hot path.)
        """
        options = {"resources": resources, "where": where, "retries": retries, "timeout": timeout}
        return self._executor.execute(self._executor.checked(self._executor.task(fn, args, kwargs, options)))

    @overload
    def submit(
        self,
        fn: Command,
        /,
        *,
        resources: _Amount | None = None,
        where: _Where = "auto",
        retries: int = 0,
        timeout: float | None = None,
    ) -> TaskHandle[CommandResult]: ...

    @overload
    def submit(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        resources: _Amount | None = None,
        where: _Where = "auto",
        retries: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> TaskHandle[T]: ...

    def submit(
        self,
        fn: Callable[..., T] | Command,
        /,
        *args: Any,
        resources: _Amount | None = None,
        where: _Where = "auto",
        retries: int = 0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> TaskHandle[Any]:
        """Start ``fn(*args, **kwargs)`` (or a ``Command``) and return a handle at once; bad input raises here."""
        options = {"resources": resources, "where": where, "retries": retries, "timeout": timeout}
        return self._executor.submit(self._executor.task(fn, args, kwargs, options))

    def map(
        self,
        fn: Callable[..., T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        resources: _Amount | None = None,
        max_in_flight: int = _DEFAULT_MAP_IN_FLIGHT,
        ordered: bool = True,
        where: _Where = "auto",
        retries: int = 0,
        timeout: float | None = None,
        batch_size: int | Literal["auto"] = "auto",
    ) -> TaskMap[T]:
        """``fn(item)`` for each item, as an async iterator; ``batch_size`` items run as one engine task (``"auto"``
        adapts it, ``1`` is a task per item) and ``max_in_flight`` bounds those tasks (see ``docs/concepts.md``)."""
        self._runtime.check_open()
        options = {"resources": resources, "where": where, "retries": retries, "timeout": timeout}
        return make_map(
            self.submit, fn, items, max_in_flight=max_in_flight, ordered=ordered, options=options, batch_size=batch_size
        )

    def executor(self, *, resources: _Amount = "cpu=1") -> GridExecutor:
        """A ``concurrent.futures.Executor`` over this grid for sync code in other threads (``docs/executor.md``),
        each task claiming ``resources``. In a boost block its work runs in that boost; ``shutdown`` keeps the grid."""
        from ._futures import bound_executor  # concurrent.futures, only for the code that wants it

        self._runtime.check_open()
        return bound_executor(self, self._executor, resources)

    async def put(self, value: object, *, boost: Boost | None = None) -> Parked:
        """Park ``value`` once in the engine (in ``boost``, counted against its memory) and return its handle: a
        task given the handle as an argument gets the object. Released by ``release()``, its boost's end, teardown."""
        return await self._parking.put(value, boost)

    def run_command(
        self,
        argv: Sequence[str],
        *,
        resources: _Amount | None = None,
        where: _Where = "auto",
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Coroutine[Any, Any, CommandResult]:
        """``await grid.run_command([...])``: run a program (never through a shell); return its ``CommandResult``.

        Bad input raises ``InvalidTask`` at the call. On ``timeout`` the process is terminated (then killed) and
        ``TimeoutError`` raised; with ``check=True`` a non-zero status raises ``CommandFailed``; a program (or
        ``cwd``) missing where it runs raises ``CommandNotFound`` (a ``FileNotFoundError``) on every backend.
        """
        flag("check", check)
        command = Command(argv, env=env, cwd=cwd)
        options = {"resources": resources, "where": where, "retries": 0, "timeout": timeout}
        run = self._executor.checked(self._executor.task(command, (), {}, options))
        return self._executor.command(run, command, check)
