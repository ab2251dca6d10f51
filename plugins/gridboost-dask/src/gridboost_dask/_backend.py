"""``DaskBackend``: boosts are leases the scheduler holds on workers, offloads are ``client.submit`` calls.

Nothing here imports distributed until :meth:`DaskBackend.start`: the plugin loads with every grid of an environment
that has it installed, and ``import distributed`` costs most of a second.

Names in the engine. Every task this backend submits has the key ``gridboost:<session>:<task id>``, and every lease
is marked on its workers with the resource ``gridboost-lease:<session>:<boost id>`` (``<session>``: random per
backend; a detached lease's is ``lease``, no backend's own). So the scheduler's own state says what each one is, and
a test (or the CLI) finds a grid's work and leases there. Parked data (``grid.put``) is scattered under the key
``gridboost:<session>:<handle id>``, so the scheduler's books name it as this grid's too, and a backend that closes
waits for it to be gone as it waits for its tasks.

A lease. Dask has no reservation primitive and its resources are abstract counters, so the lease is built from
Dask's own parts: the scheduler plugin :class:`~gridboost_dask._worker.LeaseRegistry` chooses workers with free
capacity and records the lease (the scheduler is the source of truth, so leases of two clients never overlap), then
gives each chosen worker the lease's own resource with ``Worker.set_resources``, as many units as the threads the
lease holds there (one when it holds no CPU). Work of the boost asks for that resource, so it runs only on the
boost's workers, and at most as many tasks at once as the boost holds threads there. This process's side of the
registry, and growing the cluster for a boost, are in ``_leases``.

Owners. Every process that joins the cluster shares that registry: a request that is not placed at once waits in one
line with every other owner's (priority, then age; no backfill), a tenant's quota holds back its own requests, and
every grant gets a fencing token (:mod:`gridboost.worker_leases`, run in the scheduler plugin). Only the process that
holds the cluster manager (the ``LocalCluster`` it started) can grow the cluster, and only once it is its request's
turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import FunctionType
from typing import Any

import anyio
from attrs import evolve, field, frozen

from gridboost import (
    ClusterSnapshot,
    Command,
    CommandResult,
    Lease,
    NodeSnapshot,
    Quota,
    Resources,
    TaskSpec,
    worker_chunk,
    worker_command,
    worker_leases,
)
from gridboost.abc import Backend, Capabilities, Reservation, ReservationRequest
from gridboost.backend_kit import LRU, SendCheck, finite, seconds, shown
from gridboost.exceptions import (
    BackendError,
    BoostUnavailable,
    CapacityUnavailable,
    GridClosed,
    InvalidRequest,
    InvalidResources,
    QuotaExceeded,
    TeardownError,
)

from . import _connect, _leases
from ._errors import map_errors
from ._leases import LEASE_PREFIX

__all__ = ["LEASE_PREFIX", "PREFIX", "DaskBackend"]

_log = logging.getLogger("gridboost.dask")

#: Every task key gridboost gives in Dask starts with this.
PREFIX = "gridboost:"
# Dask's conventional name for GPUs (dask-cuda's workers declare it); gridboost's ``gpu`` maps to it.
_GPU = "GPU"
# The custom names gridboost.Resources accepts; a Dask resource named otherwise cannot be shown.
_OWN_NAMES = frozenset({_GPU, "cpu", "memory"})
# Arguments of Client.submit: a user's keyword of the same name goes through a trampoline instead.
_SUBMIT_NAMES = frozenset(
    {"key", "workers", "resources", "retries", "priority", "fifo_timeout", "allow_other_workers", "actor", "pure"}
)
_EPS = 1e-9
# Between two asks of the lease registry while a boost waits for capacity or its turn: first fast, then at most this
# (the registry holds a "not yet" back that long unless something changes). Far below worker_leases.STALE: a waiting
# request's ticket lives only while its owner asks.
_POLL_MAX = 0.5
assert _POLL_MAX * 4 < worker_leases.STALE
# Reaching a scheduler that is up takes milliseconds; a refused or silent address should fail while the user waits.
_CONNECT_TIMEOUT = 5.0
# Starting processes (a scheduler, workers that import distributed) on a small, busy machine can take many seconds.
_START_TIMEOUT = 60.0
# The loggers distributed's config gives a level of their own (its defaults), apart from "distributed".
_SET_APART = ("distributed.client", "distributed.gc")
# The most workers (or threads per worker) an option may ask for: past it, a typo, never a cluster on one machine.
_MOST = 4096


@frozen(eq=False)
class _Lease:
    """A boost's lease: its resource name in Dask, and how many units of it each of its workers has."""

    name: str
    slots: Mapping[str, float]
    #: The most units one worker has: work of the boost that needs more cannot run in it.
    biggest: float = field(init=False)

    @biggest.default
    def _biggest(self) -> float:
        return max(self.slots.values(), default=0.0)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MOST:
        raise InvalidRequest(f"{name} must be a whole number from {minimum} to {_MOST}, got {shown(value)}")
    return value


def _memory_limit(value: object) -> str | float | None:
    """Dask's ``memory_limit``: ``None``/``"auto"``, bytes (0: none), a fraction of the machine's (<= 1), ``"4GiB"``."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, str):
        if len(value) > 32:
            raise InvalidRequest(f"memory_limit must be a size like '4GiB', got {shown(value)}")
        from dask.utils import parse_bytes

        try:
            size = parse_bytes(value)
        except Exception:  # ValueError for a unit it does not know, OverflowError for "1e999GB"
            raise InvalidRequest(f"memory_limit must be a size like '4GiB', got {shown(value)}") from None
        if not 0 <= size < 2**63:
            raise InvalidRequest(f"memory_limit must be a size >= 0 like '4GiB', got {shown(value)}")
        return value
    number = finite(value)
    if number is None or number < 0 or number >= 2**63:
        raise InvalidRequest(
            f"memory_limit must be None, 'auto', a size like '4GiB' or a number of bytes >= 0, got {shown(value)}"
        )
    return value  # type: ignore[return-value]  # a real number: finite() said so


def _worker_resources(value: object) -> dict[str, float] | None:
    if value is None:
        return None
    why = "resources must map names to finite amounts >= 0, like {'GPU': 1}"
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{why}, got {shown(value)}")
    amounts: dict[str, float] = {}
    for key, amount in value.items():
        number = finite(amount)
        if not isinstance(key, str) or not key or key.startswith(LEASE_PREFIX) or number is None or number < 0:
            raise InvalidRequest(f"{why}, got {shown(key)}: {shown(amount)}")
        amounts[key] = number
    return amounts


def _dumps(value: object) -> object:
    import cloudpickle  # type: ignore[import-untyped]

    return cloudpickle.dumps(value)


def _to_dask(resources: Resources, what: str) -> dict[str, float]:
    """The Dask resources work asks for: ``gpu`` → ``GPU``, custom names as they are (cpu, memory: no counters)."""
    if resources.gpu_memory:
        raise InvalidResources(
            f"{what} asks for gpu_memory={resources.gpu_memory}, which Dask does not track: ask for (fractions of) GPUs"
        )
    clash = sorted(_OWN_NAMES.intersection(resources.custom))
    if clash:
        raise InvalidResources(
            f"{what}: custom resource {shown(clash[0])} is one of gridboost's own; use cpu=, gpu=, memory="
        )
    amounts = {key: float(value) for key, value in resources.custom.items()}
    if resources.gpu:
        amounts[_GPU] = resources.gpu
    return amounts


def _labels_there(nodes: Sequence[NodeSnapshot], most: int = 4) -> str:
    """The labels the workers carry, each key with its values, in one short line: ``name=a|b, host=127.0.0.1``."""
    values: dict[str, set[str]] = {}
    for node in nodes:
        for key, value in node.labels.items():
            values.setdefault(key, set()).add(value)
    if not values:
        return "none (no live worker)"
    parts = []
    for key in sorted(values):
        seen = sorted(values[key])
        more = f"|\u2026 ({len(seen)} values)" if len(seen) > most else ""
        parts.append(f"{key}={'|'.join(v if len(v) <= 24 else v[:23] + chr(0x2026) for v in seen[:most])}{more}")
    return ", ".join(parts)


def _follow_distributed_level() -> None:
    """The loggers distributed's own config sets apart from ``distributed`` (at WARNING) go no lower than it.

    So a host that quieted Dask (``gridboost.quiet_engine_logs()``, or ``logging: {distributed: error}`` in its Dask
    config) hears nothing from the client either: importing distributed sets ``distributed.client`` and
    ``distributed.gc`` to WARNING whatever their parent's level.
    """
    parent = logging.getLogger("distributed").level
    for name in _SET_APART:
        child = logging.getLogger(name)
        if child.level and child.level < parent:
            child.setLevel(parent)


def _local_hosts() -> frozenset[str]:
    import psutil

    hosts = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        hosts.update(socket.gethostbyname_ex(socket.gethostname())[2])
    for addresses in psutil.net_if_addrs().values():
        hosts.update(a.address for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6))
    return frozenset(hosts)


def _node(address: str, info: Mapping[str, Any], leased: Mapping[str, float], local: bool) -> NodeSnapshot:
    """A worker as a node: threads are its ``cpu``, ``memory_limit`` its memory, ``GPU`` its gpus, the rest custom."""
    raw = info.get("resources") or {}
    custom = {k: float(v) for k, v in raw.items() if not k.startswith(LEASE_PREFIX) and k not in _OWN_NAMES and v >= 0}
    total = Resources(
        cpu=float(info.get("nthreads") or 0),
        gpu=float(raw.get(_GPU, 0)),
        memory=int(info.get("memory_limit") or 0),
        custom=custom,
    )
    free = {
        key: max(0.0, value - leased.get(key if key != "gpu" else _GPU, 0.0)) for key, value in total.as_dict().items()
    }
    metrics = info.get("metrics") or {}
    usage = None
    if "cpu" in metrics or "memory" in metrics:
        usage = Resources(
            cpu=max(0.0, float(metrics.get("cpu") or 0)) / 100, memory=max(0, int(metrics.get("memory") or 0))
        )
    labels = {"name": str(info.get("name", "")), "host": str(info.get("host", ""))}
    if local:
        labels["local"] = "true"
    labels.update({f"resource:{k}": f"{v:g}" for k, v in raw.items() if not k.startswith(LEASE_PREFIX)})
    return NodeSnapshot(
        id=address,
        address=address,
        total=total,
        available=Resources.coerce(free),
        labels=labels,
        usage=usage,
        alive=str(info.get("status", "running")) in ("running", "paused"),
    )


_AGAIN = object()
# How long a gather waits for results still being computed to join it: the most a result is held back, under load.
_GATHER_WINDOW = 0.02


class _Gatherer:
    """Fetches finished results in batches, one ``client.gather`` at a time.

    Awaiting a Dask future fetches its result on its own: one scheduler round trip per task, which caps throughput
    well below one ``client.gather`` over many futures. So results that finish while a gather is under way wait for
    the next one, which takes them all (as Nagle's algorithm does), and a gather waits up to ``_GATHER_WINDOW`` for
    results still being computed. A lone result is fetched at once, so a single round trip costs no more than awaiting
    the future. Lives in Dask's loop (plain asyncio).
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._batch: list[tuple[Any, asyncio.Future[Any]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Results still being computed: while there are some, a gather waits a moment for them to join it.
        self._running = 0
        self._idle = asyncio.Event()

    async def result(self, future: Any) -> Any:
        self._running += 1
        self._idle.clear()
        try:
            await future.exception()  # waits until it is done, fetching nothing (returns its error, if any)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()
        if future.status != "finished":  # the user's error, or cancelled: the future raises it itself
            return await future
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batch.append((future, waiter))
        if not self._busy:
            self._flush()
        value = await waiter
        return await future if value is _AGAIN else value

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self._busy = True
        task = asyncio.ensure_future(self._gather(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _gather(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            await asyncio.sleep(0)  # let the results of this tick join the batch
            if self._running:  # more are coming: a few milliseconds of wait saves a round trip each
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), _GATHER_WINDOW)
            batch += self._batch
            self._batch = []
            try:
                values = await self._client.gather([future for future, _ in batch])
            except BaseException:  # one of them failed (a worker died, a waiter cancelled it): each asks on its own
                values = [_AGAIN] * len(batch)
            for (_, waiter), value in zip(batch, values, strict=True):
                if not waiter.done():
                    waiter.set_result(value)
        finally:
            self._busy = False
            if self._batch:
                self._flush()


class _Canceller:
    """Cancels futures in bulk: every cancellation asked for while one is being gathered goes in one ``client.cancel``.

    A grid that closes cancels all its work at once; one ``client.cancel`` per task would be as many scheduler
    messages, each awaited. Lives in Dask's loop (plain asyncio), like :class:`_Gatherer`.
    """

    def __init__(self, client: Any, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._batch: list[Any] = []
        self._sent: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def cancel(self, future: Any) -> None:
        """Cancel ``future`` in Dask with the others of its moment; returns once the scheduler has them."""
        self._batch.append(future)
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._send(self._sent))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: a waiter cancelled again must not cancel the send the others wait for.
        await asyncio.shield(self._sent)

    async def _send(self, sent: asyncio.Future[None]) -> None:
        try:
            # Cancellations delivered together reach us over a few ticks: wait until a tick adds none.
            size = -1
            while size != len(self._batch):
                size = len(self._batch)
                await asyncio.sleep(0)
            batch, self._batch, self._sent = self._batch, [], None
            try:
                await asyncio.wait_for(self._client.cancel(batch, reason="cancelled by gridboost"), self._timeout)
            except Exception as exc:
                _log.warning("cancelling %d Dask task(s) failed: %s: %s", len(batch), type(exc).__name__, exc)
        finally:
            if not sent.done():
                sent.set_result(None)


class DaskBackend(Backend):
    """A Dask cluster as a gridboost backend; see the module docstring and the plugin's README."""

    name = "dask"

    def __init__(
        self,
        *,
        address: str | None = None,
        security: Any = None,
        n_workers: int = 2,
        threads_per_worker: int = 2,
        memory_limit: str | float | None = None,
        resources: Mapping[str, float] | None = None,
        max_workers: int | None = None,
        connect_timeout: float = _CONNECT_TIMEOUT,
        start_timeout: float = _START_TIMEOUT,
        grow_timeout: float = 60.0,
        grace: float = 2.0,
        lease_grace: float = 10.0,
        preempt_grace: float = 10.0,
        watch_interval: float = 1.0,
        close_timeout: float = 10.0,
    ) -> None:
        self._target = _connect.parse_address(address)
        self._n_workers = _count("n_workers", n_workers, 1)
        self._threads = _count("threads_per_worker", threads_per_worker, 1)
        self._max_workers = _count("max_workers", max_workers, self._n_workers) if max_workers is not None else None
        self._memory_limit = _memory_limit(memory_limit)
        self._resources = _worker_resources(resources) or None
        if security is not None and type(security).__name__ != "Security" and not isinstance(security, bool):
            raise InvalidRequest(f"security must be a distributed.security.Security, got {shown(security)}")
        self._security = security
        self._connect_timeout = seconds("connect_timeout", connect_timeout)
        self._start_timeout = seconds("start_timeout", start_timeout)
        self._grow_timeout = seconds("grow_timeout", grow_timeout)
        self._grace = seconds("grace", grace)
        lease_grace = seconds("lease_grace", lease_grace)
        preempt_grace = seconds("preempt_grace", preempt_grace, allow_zero=True)
        self._watch_interval = seconds("watch_interval", watch_interval)
        self._close_timeout = seconds("close_timeout", close_timeout)
        if self._target.kind != "embedded":
            # Compared once checked: every value here is a plain int, str, float, dict or None by now.
            for option, value, default in (
                ("n_workers", self._n_workers, 2),
                ("threads_per_worker", self._threads, 2),
                ("memory_limit", self._memory_limit, None),
                ("resources", self._resources, None),
                ("max_workers", self._max_workers, None),
                ("start_timeout", self._start_timeout, _START_TIMEOUT),
            ):
                if value != default:
                    raise InvalidRequest(f"{option} applies only to a LocalCluster that gridboost starts (no address)")
        #: Random per backend: the middle part of every key and lease resource this backend names in Dask.
        self.session = secrets.token_hex(4)
        #: What this backend's task keys start with (then the task's id).
        self.prefix = f"{PREFIX}{self.session}:"
        #: What this backend's lease resources start with (then the boost's id).
        self.lease_prefix = f"{LEASE_PREFIX}{self.session}:"
        self._conn: _connect.Connection | None = None
        self._loop: _connect.DaskLoop | None = None
        self._closed = False
        self._local_hosts: frozenset[str] = frozenset()
        self._options = LRU()
        self._sendable = SendCheck("Dask", _dumps)
        self._gatherer: _Gatherer = None  # type: ignore[assignment]  # made with the client, at start
        self._canceller: _Canceller = None  # type: ignore[assignment]  # made with the client, at start
        self._worker: Any = None  # the _worker module, imported at start (it imports distributed)
        self._registry = _leases.Registry(
            session=self.session, backend=self.name, grace=lease_grace, preempt_grace=preempt_grace
        )
        self._growth = _leases.Growth(
            self._registry,
            n_workers=self._n_workers,
            max_workers=self._max_workers,
            timeout=self._grow_timeout,
            close_timeout=self._close_timeout,
        )
        # This backend's leases (by boost id) that its watch reports when Dask loses them; detached ones are not.
        self._held: set[str] = set()
        # Parked data not yet released, by handle id: the Futures that keep each scattered key wanted.
        self._parked: dict[str, Any] = {}
        # When each request was first asked for (wall clock), by boost id: asked again (the grid's own turn taken
        # back by a higher priority), it keeps its place in the registry's line.
        self._asked = LRU()

    def __repr__(self) -> str:
        return f"<DaskBackend {self._target} session={self.session}>"

    @property
    def capabilities(self) -> Capabilities:
        grow = self._conn.can_grow if self._conn is not None else self._target.kind == "embedded"
        return Capabilities(
            reserve=True,
            grow=grow,
            interrupt_running=False,
            commands=True,
            native_retries=True,
            remote=True,
            shared_leases=True,
        )

    @property
    def task_prefix(self) -> str:
        """What this backend's task keys on the scheduler start with (``gridboost:<session>:``), then the task's id."""
        return self.prefix

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` this backend uses (asynchronous; in a thread's loop on trio)."""
        return self._require().client

    @property
    def connection(self) -> _connect.Connection | None:
        return self._conn

    # -- life cycle ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed or self._loop is not None:
            raise GridClosed("a DaskBackend starts once; make a new one")
        import cloudpickle  # type: ignore[import-untyped]

        from . import _placing, _worker

        _follow_distributed_level()
        # Scheduler and workers need not have gridboost-dask (nor gridboost) installed: what runs there of it travels
        # by value.
        cloudpickle.register_pickle_by_value(_worker)
        cloudpickle.register_pickle_by_value(_placing)
        cloudpickle.register_pickle_by_value(worker_command)
        cloudpickle.register_pickle_by_value(worker_leases)
        cloudpickle.register_pickle_by_value(worker_chunk)
        self._worker = _worker
        self._local_hosts = await anyio.to_thread.run_sync(_local_hosts)
        self._loop = _connect.DaskLoop(threaded=_connect.on_trio())
        await anyio.to_thread.run_sync(self._loop.start) if self._loop.threaded else self._loop.start()
        self._conn = await self._loop.call(
            _connect.open_connection,
            self._target,
            security=self._security,
            n_workers=self._n_workers,
            threads_per_worker=self._threads,
            memory_limit=self._memory_limit,
            resources=self._resources,
            timeout=self._connect_timeout,
            start_timeout=self._start_timeout,
            threaded=self._loop.threaded,
        )
        self._gatherer = _Gatherer(self._conn.client)
        self._canceller = _Canceller(self._conn.client, self._close_timeout)
        self._registry.connect(self._conn.client, self._loop.call)
        self._growth.connect(self._conn, self._loop.call)
        try:
            with map_errors("registering gridboost's lease registry on the Dask scheduler"):
                await self._registry.register()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn, loop = self._conn, self._loop
        if loop is None:
            return
        leftovers: list[str] = []
        if conn is not None:
            # The grid has already reported any of these as leaked; releasing them keeps the leak from outliving us.
            with contextlib.suppress(Exception):
                for record in await self._registry.records():
                    if self._registry.ours(record):
                        try:
                            await self._registry.release(record["name"])
                        except Exception as exc:
                            leftovers.append(f"lease {record['id']}: {exc}")
            if self._parked:  # the grid releases its handles before we close; these are ones unpark never got to
                parked, self._parked = list(self._parked.values()), {}
                with contextlib.suppress(Exception):
                    await loop.call(_release_all, parked)
            # Closed only once the engine shows nothing of us: a cancelled task still running on a worker thread, a
            # lease mark that waits for it, a key the scheduler has not let go yet.
            try:
                with map_errors("asking the Dask scheduler what it still holds of this grid"):
                    leftovers += await self._registry.settle(self.prefix, self.lease_prefix, self._close_timeout)
            except Exception as exc:
                leftovers.append(f"could not ask the Dask scheduler what it still holds: {type(exc).__name__}: {exc}")
            leftovers += await loop.call(_connect.close, conn, self._close_timeout)
        if loop.threaded and not await anyio.to_thread.run_sync(loop.stop, self._close_timeout):
            leftovers.append(f"the Dask event loop thread did not stop within {self._close_timeout:g}s")
        if leftovers:
            raise TeardownError(leftovers)

    def _require(self) -> _connect.Connection:
        if self._conn is None or self._closed:
            raise GridClosed("the Dask backend is not started" if not self._closed else "the Dask backend is closed")
        return self._conn

    # -- seeing --------------------------------------------------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        self._require()
        with map_errors("reading the Dask scheduler's workers"):
            workers = await self._registry.nodes()
        nodes = []
        local_seen = False
        for address, info in sorted(workers.items()):
            local = str(info.get("host", "")) in self._local_hosts
            node = _node(address, info, info.get("held") or {}, local)
            if local and not local_seen:  # a snapshot names at most one local node: the first worker on this machine
                local_seen = True
                node = evolve(node, is_local=True)
            nodes.append(node)
        return ClusterSnapshot(backend=self.name, nodes=nodes)

    # -- reserving -----------------------------------------------------------------------------------------------------

    async def reserve(self, request: ReservationRequest) -> Reservation:
        conn = self._require()
        what = f"boost {request.id}"
        _to_dask(request.resources, what)  # refuses what Dask cannot express
        name = self._registry.name(request)
        lease = self._registry.record(request, name)
        candidates: list[str] | None = None
        if request.nodes is not None or request.labels:
            snapshot = await self.snapshot()
            matching = snapshot.matching(request.nodes, request.labels)
            if not matching:
                raise BoostUnavailable(
                    f"{what}: no live Dask worker matches nodes={request.nodes} labels={dict(request.labels or {})}; "
                    f"labels there: {_labels_there(snapshot.alive)}"
                )
            candidates = [node.id for node in matching]
        can_grow = conn.can_grow and candidates is None
        asked = self._asked.get(request.id)
        if asked is None:
            asked = self._asked.remember(request.id, time.time())
        ticket = self._registry.ticket(request, name, asked)
        grew = False
        pause = 0.02
        try:
            while True:
                # "Not yet" comes back after up to `pause` seconds, or as soon as the registry's line or room changed.
                with map_errors(what):
                    answer = await self._registry.reserve(lease, candidates, ticket, hold=pause)
                status = answer["status"]
                if status == "granted":
                    break
                if status == "taken":
                    raise InvalidRequest(f"{what}: {answer.get('why', 'another owner holds a lease of this id')}")
                pause = min(pause * 2, _POLL_MAX)
                if status == "quota" and request.wait == 0:  # wait=0: the quota's answer is the answer
                    raise QuotaExceeded(f"boost {request.id} ({request.resources}) was not granted: {answer['why']}")
                if status in ("wait", "quota"):  # others' turn first, or our tenant's quota: ask again
                    continue
                missing = Resources.coerce(_leases.from_amounts(answer.get("missing") or {}))
                # "busy" comes only in our turn, so the cluster grows for the request the line serves next; "never"
                # (no worker could ever hold it) comes before any turn: without growth it would never be served.
                if can_grow and not grew and (status == "never" or missing):
                    grew = True
                    await self._growth.grow(request, missing, _to_dask(missing, what))
                    continue
                if status == "never":
                    raise BoostUnavailable(
                        f"{what} ({request.resources}, strategy {request.strategy}) can never be placed: "
                        f"{answer.get('why', '')}; missing {missing}"
                        + ("" if conn.can_grow else " (the cluster has no manager gridboost could scale)")
                    )
        except BaseException as exc:
            if isinstance(exc, Exception):  # failed for good (a cancelled request may be asked again: keep its place)
                self._asked.pop(request.id, None)
            with anyio.CancelScope(shield=True):
                # A grant may have landed while we gave up on its answer, and our place in line must not hold back
                # others: the registry undoes both by name (only ours).
                with contextlib.suppress(Exception), anyio.move_on_after(self._close_timeout):
                    await self._registry.release(name)
                await self._growth.shrink(request.id)
            raise
        self._asked.pop(request.id, None)
        if not request.detached:  # a detached lease is the registry's from now on, not this backend's
            self._held.add(request.id)
        lease_handle = _Lease(name=name, slots=dict(answer["slots"]))
        return Reservation(
            request=request,
            placements=tuple(answer["placements"]),
            handle=lease_handle,
            token=int(answer.get("token", 0)),
        )

    async def check_quota(self, request: ReservationRequest) -> None:
        """Raise ``QuotaExceeded`` if the registry says ``request``'s tenant's quota holds it back now."""
        if self._conn is None or self._closed:
            return
        with map_errors(f"asking the Dask scheduler about {request.tenant!r}'s quota"):
            why = await self._registry.over_quota(request.tenant, request.resources)
        if why:
            raise QuotaExceeded(f"boost {request.id} ({request.resources}) was not granted: {why}")

    async def set_quota(self, tenant: str, limit: Resources | None) -> None:
        self._require()
        if limit is not None:
            _to_dask(limit, f"the quota of {tenant!r}")  # gpu_memory, which no Dask lease holds, is refused
        with map_errors(f"setting the quota of {tenant!r} on the Dask scheduler"):
            await self._registry.set_quota(tenant, limit)

    async def quotas(self) -> Sequence[Quota]:
        self._require()
        with map_errors("listing the Dask scheduler's quotas"):
            return await self._registry.quotas()

    async def release(self, reservation: Reservation) -> None:
        lease = reservation.handle
        if not isinstance(lease, _Lease):
            raise InvalidRequest(f"reservation {reservation.id} was not made by the Dask backend")
        self._held.discard(reservation.id)
        with map_errors(f"releasing boost {reservation.id}"):
            # Returns once no worker shows the lease: a cancelled task of it may still run on a worker thread.
            marked = await self._registry.release(lease.name, wait=self._close_timeout)
        await self._growth.shrink(reservation.id)
        if marked:
            raise TeardownError(
                [
                    f"boost {reservation.id}: its mark {lease.name} is still on worker(s) {', '.join(marked)} after "
                    f"close_timeout={self._close_timeout:g}s (a task of it still runs there)"
                ]
            )

    async def extend(self, reservation: Reservation, ttl: float) -> None:
        lease = reservation.handle
        if not isinstance(lease, _Lease):
            raise InvalidRequest(f"reservation {reservation.id} was not made by the Dask backend")
        with map_errors(f"extending boost {reservation.id}"):
            await self._registry.extend(lease.name, ttl)

    async def reservations(self) -> Sequence[Reservation]:
        if self._conn is None or self._closed:
            return []
        with map_errors("listing the Dask scheduler's leases"):
            records = await self._registry.records()
        held = []
        for record in filter(self._registry.ours, records):
            request = ReservationRequest(
                id=record["id"], resources=Resources.coerce(record["resources"]), strategy=record["strategy"]
            )
            held.append(Reservation(request=request, placements=tuple(record["placements"])))
        return held

    async def leases(self) -> Sequence[Lease]:
        self._require()
        with map_errors("listing the Dask scheduler's leases"):
            records = await self._registry.records(pending=True)
        return [
            _leases.pending_lease(record) if record["state"] == "pending" else _leases.lease(record)
            for record in records
            if record["state"] in ("active", "pending", "preempting")
        ]

    async def renew_lease(self, lease_id: str, ttl: float) -> Lease:
        self._require()
        ttl = seconds("ttl", ttl)
        with map_errors(f"renewing lease {lease_id}"):
            record = await self._registry.renew(lease_id, ttl)
        if record is None:
            raise InvalidRequest(f"no lease {shown(lease_id)} on this Dask scheduler")
        if record["state"] == "lost":
            raise InvalidRequest(f"lease {shown(lease_id)} was lost ({record['lost']}): it cannot be renewed")
        return _leases.lease(record)

    async def release_lease(self, lease_id: str) -> None:
        self._require()
        with map_errors(f"releasing lease {lease_id}"):
            record = await self._registry.get(lease_id)
            if record is None:
                raise InvalidRequest(f"no lease {shown(lease_id)} on this Dask scheduler")
            # Its owner, if it is alive and watching, sees the lease gone and fails the boost (BoostLost).
            marked = await self._registry.release(record["name"], any_owner=True, wait=self._close_timeout)
        await self._growth.shrink(lease_id)
        if marked:
            raise BackendError(
                f"lease {shown(lease_id)} is released, but its mark is still on worker(s) {', '.join(marked)} after "
                f"close_timeout={self._close_timeout:g}s (a task of it still runs there)"
            )

    async def watch(self, lost: Callable[[str, BaseException], Awaitable[None]]) -> None:
        """Poll the registry: a lease of ours it takes back for another owner is reported once as ``BoostPreempted``
        (with the grace left), one it marks ``lost`` (a worker left) or no longer has as ``BackendError``.

        At the multiples of the interval on the loop's clock, as every other backend of this process with the same
        interval: their asks go to the scheduler together, in one message."""
        reported: set[str] = set()
        while True:
            now = anyio.current_time()
            await anyio.sleep((math.floor(now / self._watch_interval) + 1) * self._watch_interval - now)
            if self._conn is None or self._closed:
                return
            reported &= self._held
            try:
                notices = await self._registry.notices(sorted(self._held - reported))
            except Exception as exc:  # the scheduler may be back in a moment; the next round asks again
                _log.warning("the Dask backend could not read its leases: %s: %s", type(exc).__name__, exc)
                continue
            for boost_id, error in notices.items():
                if boost_id not in self._held or boost_id in reported:  # released while we looked
                    continue
                reported.add(boost_id)
                await lost(boost_id, error)

    # -- running -------------------------------------------------------------------------------------------------------

    def check_reservation(self, request: ReservationRequest) -> None:
        _to_dask(request.resources, f"boost {request.id}")  # gpu_memory, or a name of gridboost's own

    def check_task(self, task: TaskSpec) -> None:
        resources = task.resources
        if resources.gpu_memory or (resources.custom and not _OWN_NAMES.isdisjoint(resources.custom)):
            _to_dask(resources, f"task {task.name}")
        target = task.target
        if type(target) is FunctionType and target.__module__ == worker_leases.__name__:
            return  # sent by name, called as the worker's own (see _prepare)
        self._sendable(target)

    async def run(
        self, task: TaskSpec, reservation: Reservation | None, *, on_start: Callable[[], None] | None = None
    ) -> Any:
        """Submit ``task`` to Dask and await its result; see :meth:`gridboost.abc.Backend.run`."""
        conn = self._require()
        loop = self._loop
        assert loop is not None
        what = f"task {task.id} ({task.name})"
        fn, args, kwargs, options = self._prepare(task, reservation)
        # The scheduler queues work itself and never says when it starts, so nothing we submit may be moved.
        if on_start is not None:
            on_start()
        if loop.threaded:
            with map_errors(what):
                result = await loop.call(self._execute, conn.client, fn, args, kwargs, self.prefix + task.id, options)
        else:
            with map_errors(what):
                future = conn.client.submit(fn, *args, key=self.prefix + task.id, pure=False, **options, **kwargs)
            # The future is recorded: from here on a cancellation can reach the task.
            try:
                with map_errors(what):
                    result = await self._gatherer.result(future)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled here: the task must stop too
                    with anyio.CancelScope(shield=True):
                        await self._cancel(future)
                raise
            finally:
                future.release()  # see _execute
        if isinstance(task.target, Command):
            status, out, err, node = result
            return CommandResult(returncode=status, stdout=out, stderr=err, node=node)
        return result

    async def _execute(
        self, client: Any, fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], key: str, options: dict[str, Any]
    ) -> Any:
        """Submit and await in Dask's own loop (the trio path); cancelled there, cancel the Dask future first."""
        future = client.submit(fn, *args, key=key, pure=False, **options, **kwargs)
        try:
            return await self._gatherer.result(future)
        except asyncio.CancelledError:
            await self._cancel(future)
            raise
        finally:
            # Its result or error is the caller's now: the scheduler may forget the task. (An error's traceback holds
            # this frame, and with it the future, for as long as the caller keeps the error.)
            future.release()

    async def _cancel(self, future: Any) -> None:
        # Dask drops queued work; work already running on a worker thread runs to its end (a command stops its
        # process itself, as soon as its worker sees the cancellation). In bulk: a closing grid cancels everything.
        await self._canceller.cancel(future)

    # -- parked data ---------------------------------------------------------------------------------------------------

    async def park(self, key: str, value: Any, reservation: Reservation | None) -> Any:
        """Scatter ``value`` once (to one of the lease's workers under a boost); tasks given its Future depend on it."""
        conn = self._require()
        loop = self._loop
        assert loop is not None
        workers = None
        if reservation is not None:
            lease = reservation.handle
            if not isinstance(lease, _Lease):
                raise InvalidRequest(f"reservation {reservation.id} was not made by the Dask backend")
            workers = sorted(lease.slots)
        with map_errors(f"parking {key}"):
            future = await loop.call(_scatter, conn.client, self.prefix + key, value, workers)
        self._parked[key] = future
        return future

    async def unpark(self, key: str, token: Any) -> None:
        """Drop our want of the key: the scheduler frees it once the tasks that read it have ended."""
        future = self._parked.pop(key, None)
        if future is None or self._conn is None or self._closed:  # released already, or gone with the client
            return
        assert self._loop is not None
        with map_errors(f"releasing {key}"):
            await self._loop.call(_release_all, [future])

    async def fetch(self, token: Any) -> Any:
        """The parked value, gathered into this process (for work placed on the host)."""
        self._require()
        assert self._loop is not None
        with map_errors(f"fetching parked data {token.key}"):
            return await self._loop.call(_gather_one, token)

    def _prepare(
        self, task: TaskSpec, reservation: Reservation | None
    ) -> tuple[Any, tuple[Any, ...], Mapping[str, Any], dict[str, Any]]:
        target = task.target
        if isinstance(target, Command):
            fn: Any = self._worker.run_command
            args: tuple[Any, ...] = (target.argv, dict(target.env) if target.env else None, target.cwd, self._grace)
            kwargs: Mapping[str, Any] = {}
        else:
            fn, args, kwargs = target, task.args, task.kwargs
            if type(target) is FunctionType and target.__module__ == worker_leases.__name__:
                # gridboost.current_lease: called as the worker's own (see _worker.named), never sent by value.
                fn, args = self._worker.named, (target.__module__, target.__qualname__, *args)
            if kwargs and not _SUBMIT_NAMES.isdisjoint(kwargs):
                fn, args, kwargs = self._worker.call, (fn, args, dict(kwargs)), {}
            if reservation is not None:  # current_lease() names the boost there; the no-boost path stays as it is
                fn, args = self._worker.in_lease, (reservation.id, reservation.token, fn, *args)
        key = (task.resources, reservation, task.retries, task.priority)
        options = self._options.get(key)
        if options is None:
            options = self._options.remember(key, self._task_options(task, reservation))
        return fn, args, kwargs, options

    def _task_options(self, task: TaskSpec, reservation: Reservation | None) -> dict[str, Any]:
        amounts = _to_dask(task.resources, f"task {task.name}")
        if reservation is not None:
            lease = reservation.handle
            if not isinstance(lease, _Lease):
                raise InvalidRequest(f"reservation {reservation.id} was not made by the Dask backend")
            # A task of a boost takes its CPUs of the boost's resource (unsized: one, or what the boost holds).
            need = task.resources.cpu or min(1.0, lease.biggest)
            if need > lease.biggest + _EPS:
                raise CapacityUnavailable(
                    f"task {task.name} needs {task.resources}; the most boost {reservation.id} holds on one worker is "
                    f"cpu={lease.biggest:g}"
                )
            amounts[lease.name] = need
        options: dict[str, Any] = {"priority": int(task.priority)}
        if amounts:
            options["resources"] = amounts
        if task.retries:
            options["retries"] = task.retries
        return options


async def _scatter(client: Any, key: str, value: object, workers: list[str] | None) -> Any:
    # A dict names the key (no hashing of a large value), and keeps a list or dict value from being split into items.
    futures = await client.scatter({key: value}, workers=workers, hash=False)
    return futures[key]


async def _release_all(futures: Sequence[Any]) -> None:
    # In Dask's loop: Future.release schedules its message on the client's loop.
    for future in futures:
        future.release()


async def _gather_one(future: Any) -> Any:
    return await future


_OPTIONS = {
    "address": "None (default) or 'local': an embedded LocalCluster of worker processes; 'tcp://host:port' or "
    "'tls://host:port' joins a running scheduler",
    "security": "a distributed.security.Security, passed through (TLS)",
    "n_workers": "workers of an embedded LocalCluster (default 2)",
    "threads_per_worker": "threads of each embedded worker (default 2)",
    "memory_limit": "memory limit of each embedded worker (default: Dask's 'auto')",
    "resources": "Dask resources of each embedded worker, e.g. {'GPU': 1}",
    "max_workers": "how far an embedded cluster may grow for boosts (default 2 x n_workers)",
    "connect_timeout": "seconds to reach a scheduler at an address (a refused or silent one) before BackendError "
    "(default 5)",
    "start_timeout": "seconds to start an embedded LocalCluster, processes and all, before BackendError (default 60; "
    "separate from connect_timeout because starting processes on a busy machine is slow)",
    "grow_timeout": "seconds to wait for new workers when a boost grows the cluster (default 60)",
    "grace": "seconds between SIGTERM and SIGKILL when a command is cancelled (default 2)",
    "lease_grace": "seconds the scheduler keeps a lease past its TTL, or after its owner left (default 10)",
    "preempt_grace": "seconds a preemptible boost of this process's has to finish its work once the scheduler's lease "
    "registry takes it back for another owner's request of higher priority (default 10; 0: at once)",
    "watch_interval": "seconds between two looks for leases Dask lost (default 1)",
    "close_timeout": "seconds to wait for a cancel, a release (until no worker shows the lease), the engine to show "
    "nothing of the grid at close, or the cluster's close (default 10: within the grid's teardown_timeout, so that "
    "what remains is named)",
}
