"""Leases beyond this process: the scheduler's lease registry, and the workers a boost grows the cluster by.

Two things the backend's placing and running rely on, each kept apart from them:

* :class:`Registry` is this process's side of the scheduler's :class:`~gridboost_dask._worker.LeaseRegistry` (a
  scheduler plugin named ``gridboost-leases``, which every client registers, idempotently by name): it writes each
  lease's record, asks the registry to place, renew and release leases, and reads its records back as
  :class:`gridboost.Lease` values, so another process can list, renew and release the cluster's leases. The registry
  removes a lease by itself at its TTL plus grace, or once its owner client has been gone longer than the grace; a
  *detached* lease outlives its owner, until its TTL plus grace. See ``docs/dask.md`` for why the scheduler, and not
  the grid, is the source of truth. The registry also serves requests of every owner in turn, keeps per-tenant
  quotas and gives every grant a fencing token (:mod:`gridboost.worker_leases`): :meth:`Registry.ticket` is what a
  request waits in line with.
* :class:`Growth` adds workers to a cluster gridboost can scale (an embedded ``LocalCluster``) for a boost that does
  not fit, and gives them back when that boost is released.

Nothing here imports distributed: what runs on the scheduler lives in ``_worker`` with the rest of the code that runs
in the cluster, and every call to it crosses over to Dask's loop through the ``call`` given at :meth:`Registry.connect`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio

from gridboost import Lease, Quota, Resources
from gridboost.abc import ReservationRequest
from gridboost.backend_kit import amounts as flat_amounts
from gridboost.backend_kit import lease_from_record, owner_name, shown
from gridboost.exceptions import BackendError, BoostPreempted, BoostUnavailable

from ._errors import map_errors

__all__ = [
    "DETACHED",
    "LEASE_PREFIX",
    "Growth",
    "Registry",
    "from_amounts",
    "from_flat",
    "held_on_workers",
    "lease",
    "lease_amounts",
    "notice_error",
    "pending_lease",
]

_log = logging.getLogger("gridboost.dask")

#: Every worker resource that marks a lease starts with this (the same as ``_worker.LEASE_PREFIX``).
LEASE_PREFIX = "gridboost-lease:"
#: The session part of a detached lease's name and record (``gridboost-lease:lease:<id>``); no backend's is so called.
DETACHED = "lease"
# Dask's conventional name for GPUs, and the registry's.
_GPU = "GPU"
_EPS = 1e-9

Amounts = dict[str, float]
Call = Callable[..., Awaitable[Any]]


async def _unconnected(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the lease registry is used before the backend connected")


def lease_amounts(resources: Resources) -> Amounts:
    """A lease's amounts in the registry's names: ``cpu`` (threads), ``memory`` (bytes), ``GPU``, custom names."""
    amounts: Amounts = {}
    if resources.cpu:
        amounts["cpu"] = float(resources.cpu)
    if resources.gpu:
        amounts[_GPU] = float(resources.gpu)
    if resources.memory:
        amounts["memory"] = float(resources.memory)
    for key, value in resources.custom.items():
        if value and not math.isclose(value, 0.0):
            amounts[key] = float(value)
    return amounts


def from_amounts(amounts: Mapping[str, float]) -> dict[str, Any]:
    """The registry's names (``cpu``, ``memory``, ``GPU``, custom) as a ``Resources`` mapping."""
    out: dict[str, Any] = {}
    custom: dict[str, float] = {}
    for key, value in amounts.items():
        if key == "cpu":
            out["cpu"] = value
        elif key == "memory":
            out["memory"] = math.ceil(value)
        elif key == _GPU:
            out["gpu"] = value
        else:
            custom[key] = value
    if custom:
        out["custom"] = custom
    return out


def from_flat(amounts: Mapping[str, float]) -> Resources:
    """Flat amounts as :func:`gridboost.backend_kit.amounts` writes them (``cpu``, ``gpu``, ``memory``,
    ``gpu_memory``, custom names) back as ``Resources``."""
    own = {"cpu", "gpu", "memory", "gpu_memory"}
    values: dict[str, Any] = {key: value for key, value in amounts.items() if key in own}
    for key in ("memory", "gpu_memory"):
        if key in values:
            values[key] = math.ceil(values[key])
    custom = {key: value for key, value in amounts.items() if key not in own}
    return Resources.coerce({**values, "custom": custom} if custom else values)


def lease(record: Mapping[str, Any]) -> Lease:
    """A registry record as a :class:`gridboost.Lease`: ``preempting`` when the registry is taking it back, else
    active (whatever the registry's own state: granting, lost)."""
    return lease_from_record(
        record, backend="dask", state="preempting" if record.get("state") == "preempting" else "active"
    )


def notice_error(lease_id: str, notice: Mapping[str, Any], now: float | None = None) -> BaseException:
    """What an owner's watch reports of a lease the registry's notice (``LeaseRegistry.notices``) names: being taken
    back (``BoostPreempted``, its grace what is left until ``preempt_at``), taken back already (grace 0), lost (a worker
    left) or gone (released by another process, reaped, the scheduler restarted)."""
    now = time.time() if now is None else now
    state = notice["state"]
    if state in ("preempting", "preempted"):
        grace = max(0.0, float(notice["preempt_at"]) - now) if state == "preempting" else 0.0
        return BoostPreempted(
            f"boost {lease_id} was preempted: the Dask scheduler's lease registry takes it back for request "
            f"{notice.get('preempted_for')} of another owner",
            grace=grace,
        )
    why = notice.get("lost") if state == "lost" else ""
    return BackendError(
        "Dask lost the lease: "
        + (why or "the scheduler no longer holds it (released by another process, reaped, or restarted)")
    )


def pending_lease(record: Mapping[str, Any]) -> Lease:
    """A request waiting in the registry's line as a :class:`gridboost.Lease` (``pending``, no token, no expiry)."""
    return lease_from_record({**record, "state": "pending"}, backend="dask")


def held_on_workers(records: Sequence[Mapping[str, Any]]) -> dict[str, Amounts]:
    """What the leases hold on each worker, in the registry's names, by worker address."""
    held: dict[str, Amounts] = {}
    for record in records:
        for addr, amounts in record["amounts"].items():
            into = held.setdefault(addr, {})
            for key, value in amounts.items():
                into[key] = into.get(key, 0.0) + value
    return held


#: How long a renewal waits for those of this process's other backends, when others renew too (see _Together).
RENEW_LINGER = 0.01
# What the backends of this process send to the registry together, by event loop (Dask's), then by (kind, scheduler).
_TOGETHER: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], _Together]] = (
    weakref.WeakKeyDictionary()
)


class _Together:
    """Requests of one kind (renewals, or the watches' notices) that the backends of this process send to one
    scheduler from one event loop, sent together: each message is what every backend asked for while the last one was
    on its way, answered to each asker in its own part.

    The scheduler pays for each message far more than for what is in it, and an owner process may run many grids (a
    service with a grid per tenant; the benchmark, 25 in a process). Renewals come each at its lease's own time: while
    more than one backend renews (within a second), a renewal waits ``RENEW_LINGER`` for the others to join it; a lone
    renewer never waits, and its renewals go as fast as the scheduler answers. Every backend's watch looks at the same
    instants, so their asks come together by themselves. A message goes through the client of one of the askers; if it
    fails, each asker's part is sent again through its own client, so that one closing grid fails nobody else. An older
    registry (the first client's) that refuses requests sent together gets them one a message.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pending: list[tuple[Registry, Any, asyncio.Future[Any]]] = []
        self.sending = False
        self.askers: dict[str, float] = {}  # the sessions that asked lately, and when (the loop's clock)
        self.many = True  # until an older registry refuses requests sent together

    @staticmethod
    async def ask(kind: str, registry: Registry, item: Any) -> Any:
        """``item`` of ``kind`` for ``registry``'s scheduler, sent with the others; its answer."""
        loop = asyncio.get_running_loop()
        shared = _TOGETHER.setdefault(loop, {})
        key = (kind, str(registry.client.scheduler.address))
        together = shared.get(key)
        if together is None:
            together = shared[key] = _Together(kind)
        return await together._ask(registry, item)

    async def _ask(self, registry: Registry, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        self.askers[registry.session] = loop.time()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((registry, item, future))
        if not self.sending:
            self.sending = True
            task = loop.create_task(self._send())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # each future has the outcome
        return await future

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[Registry, Any, asyncio.Future[Any]]] = []
        try:
            while self.pending:
                now = loop.time()
                self.askers = {session: at for session, at in self.askers.items() if now - at < 1.0}
                # A step of the loop, for the asks made at this instant; a moment more when other backends renew.
                await asyncio.sleep(RENEW_LINGER if self.kind == "renew" and len(self.askers) > 1 else 0)
                batch = [asked for asked in self.pending if not asked[2].done()]  # not those given up
                self.pending = []
                if batch:
                    await self._answer(batch)
        except BaseException:  # cancelled (the loop closes): the askers are cancelled with it
            for _, _, future in [*batch, *self.pending]:
                future.cancel()
            self.pending = []
            raise
        finally:
            self.sending = False

    async def _answer(self, batch: list[tuple[Registry, Any, asyncio.Future[Any]]]) -> None:
        answers: list[Any] | None = None
        if self.many:
            try:
                answers = await self._many(batch[0][0].client.scheduler, [item for _, item, _ in batch])
            except TypeError as exc:
                if "unexpected keyword argument" not in str(exc):
                    answers = None
                else:
                    self.many = False  # an older registry: one a message
            except Exception:  # perhaps the client it went through is closing: each through its own, below
                answers = None
        if answers is not None:
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
            return
        for registry, item, future in batch:
            try:
                answer = await self._one(registry.client.scheduler, item)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(answer)

    async def _many(self, scheduler: Any, items: list[Any]) -> list[Any]:
        if self.kind == "renew":
            return list(await scheduler.gridboost_extend(many=[[name, ttl] for name, ttl in items]))
        return list(await scheduler.gridboost_notices(many=[[session, ids] for session, ids in items]))

    async def _one(self, scheduler: Any, item: Any) -> Any:
        if self.kind == "renew":
            name, ttl = item
            return await scheduler.gridboost_extend(name=name, ttl=ttl)
        session, ids = item
        return await scheduler.gridboost_notices(session=session, ids=ids)


class Registry:
    """This process's side of the scheduler's lease registry; each coroutine crosses over to Dask's loop itself."""

    def __init__(self, *, session: str, backend: str, grace: float, preempt_grace: float = 10.0) -> None:
        self.session = session
        self.backend = backend
        self.grace = grace
        #: Seconds a lease of this backend's has, once the registry takes it back for another owner, before it goes.
        self.preempt_grace = preempt_grace
        self.owner = owner_name()
        self.client: Any = None  # the distributed.Client, given at connect
        self._call: Call = _unconnected

    def connect(self, client: Any, call: Call) -> None:
        """Use ``client``; ``call(fn, *args)`` runs a coroutine function in its loop (``DaskLoop.call``)."""
        self.client, self._call = client, call

    def name(self, request: ReservationRequest) -> str:
        """The lease's resource name in Dask. A detached lease's is outside this backend's session, so the backend
        neither counts it among its reservations nor releases it when it closes."""
        return f"{LEASE_PREFIX}{DETACHED if request.detached else self.session}:{request.id}"

    def record(self, request: ReservationRequest, name: str) -> dict[str, Any]:
        """What the registry keeps of a lease: who took it, what it holds, until when (placements are its own)."""
        resources = request.resources
        return {
            "name": name,
            "id": request.id,
            "session": DETACHED if request.detached else self.session,
            "backend": self.backend,
            "owner": self.owner,
            "client": str(self.client.id),
            "resources": resources.as_dict(),
            "amounts": lease_amounts(resources),
            "strategy": request.strategy,
            "priority": int(request.priority),
            "ttl": float(request.ttl),
            "grace": self.grace,
            "detached": request.detached,
            # What the registry's quotas count: the whole lease, in gridboost's names (``amounts`` are Dask's, and
            # per worker once placed).
            "total": flat_amounts(resources),
            "tenant": request.tenant,
            "preemptible": request.preemptible,
            "preempt_grace": self.preempt_grace,
        }

    def ticket(self, request: ReservationRequest, name: str, requested_at: float) -> dict[str, Any]:
        """What ``request`` waits in the registry's line with (an :class:`~gridboost.worker_leases.Arbiter` ticket,
        keyed by lease name); ``requested_at``: the wall-clock time it was first asked for, so it keeps its place."""
        return {
            "id": name,
            "lease": request.id,
            "owner": self.owner,
            "client": str(self.client.id),
            "backend": self.backend,
            "tenant": request.tenant,
            "priority": int(request.priority),
            "requested_at": requested_at,
            "amounts": flat_amounts(request.resources),
            "resources": request.resources.as_dict(),
            "preemptible": request.preemptible,
        }

    def ours(self, record: Mapping[str, Any]) -> bool:
        """Whether a record is one of this backend's leases (detached ones are not)."""
        return bool(record["session"] == self.session)

    async def register(self) -> None:
        await self._call(self._register)

    async def _register(self) -> None:
        from . import _worker

        # Idempotent by name: every client of the cluster registers it, the first one installs it.
        await self.client.register_plugin(_worker.LeaseRegistry(), name=_worker.REGISTRY)

    async def reserve(
        self,
        record: Mapping[str, Any],
        candidates: list[str] | None,
        ticket: Mapping[str, Any] | None = None,
        hold: float = 0.0,
    ) -> dict[str, Any]:
        """Ask the registry to place and mark a lease in its turn: ``granted`` (with ``token``), ``wait``, ``quota``,
        ``busy``, ``never`` or ``taken``; an answer other than a grant comes back after up to ``hold`` seconds, or
        as soon as something changed in the registry."""
        try:
            answer = await self._call(
                self.client.scheduler.gridboost_reserve,
                lease=dict(record),
                candidates=candidates,
                ticket=None if ticket is None else dict(ticket),
                hold=float(hold),
            )
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
            # The registry is the first client's (registration is idempotent by name): an older one is still there.
            raise BackendError(
                "the Dask scheduler runs the lease registry of an older gridboost-dask (it knows no turns, quotas or "
                "fencing tokens): restart the scheduler, or run one gridboost-dask on all its clients"
            ) from exc
        return dict(answer)

    async def set_quota(self, tenant: str, limit: Resources | None) -> None:
        amounts = None if limit is None else flat_amounts(limit)
        await self._call(self.client.scheduler.gridboost_set_quota, tenant=tenant, amounts=amounts)

    async def quotas(self) -> list[Quota]:
        rows = await self._call(self.client.scheduler.gridboost_quotas)
        return [Quota(tenant=r["tenant"], limit=from_flat(r["quota"]), used=from_flat(r["used"])) for r in rows]

    async def over_quota(self, tenant: str, resources: Resources) -> str:
        """Why a request of ``resources`` by ``tenant`` would pass its quota now (``""``: it would not)."""
        why = await self._call(
            self.client.scheduler.gridboost_over_quota, tenant=tenant, amounts=flat_amounts(resources)
        )
        return str(why)

    async def release(self, name: str, *, any_owner: bool = False, wait: float = 0.0) -> list[str]:
        """Remove a lease and its marks, awaited; by default only one this client took (idempotent). Waits up to
        ``wait`` seconds for workers whose tasks still hold some of it to let its mark go; returns those that still
        show it."""
        client = None if any_owner else str(self.client.id)
        answer = await self._call(self.client.scheduler.gridboost_release, name=name, client=client, wait=float(wait))
        return list(answer["marked"])

    async def settle(self, prefix: str, lease_prefix: str, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds until the scheduler and every worker show nothing of this backend: no lease
        record or mark of its session, no task whose key starts with ``prefix``; what still shows, named."""
        remains = await self._call(
            self.client.scheduler.gridboost_settle,
            prefix=prefix,
            lease_prefix=lease_prefix,
            session=self.session,
            timeout=float(timeout),
        )
        return list(remains)

    async def notices(self, ids: Sequence[str]) -> dict[str, BaseException]:
        """Of this backend's leases ``ids``, those the registry no longer simply holds for it, each with the error its
        watch reports (:func:`notice_error`)."""
        if not ids:
            return {}
        notices = await self._call(_Together.ask, "notices", self, (self.session, list(ids)))
        now = time.time()
        return {lease_id: notice_error(lease_id, notice, now) for lease_id, notice in notices.items()}

    async def extend(self, name: str, ttl: float) -> bool:
        """Move this backend's lease ``name`` to expire ``ttl`` seconds from when the registry gets this; ``False`` if
        the registry has no such lease. Sent with the renewals of this process's other backends (see _Together)."""
        return bool(await self._call(_Together.ask, "renew", self, (name, float(ttl))))

    async def renew(self, lease_id: str, ttl: float) -> dict[str, Any] | None:
        """Move any owner's lease to expire ``ttl`` seconds from now; its record, or ``None`` if there is none."""
        record = await self._call(self.client.scheduler.gridboost_renew, lease_id=lease_id, ttl=float(ttl))
        return None if record is None else dict(record)

    async def get(self, lease_id: str) -> dict[str, Any] | None:
        """The registry's record of ``lease_id``, of any owner, or ``None``."""
        record = await self._call(self.client.scheduler.gridboost_get, lease_id=lease_id)
        return None if record is None else dict(record)

    async def records(self, *, pending: bool = False) -> list[dict[str, Any]]:
        """Every lease the registry holds (granting, active or lost), of any owner; with ``pending``, the requests
        waiting in line too (``state`` ``pending``)."""
        return list(await self._call(self.client.scheduler.gridboost_leases, pending=pending))

    async def state(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The scheduler's workers (``identity``) and every lease, in one round trip."""
        result: tuple[dict[str, Any], list[dict[str, Any]]] = await self._call(self._state)
        return result

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The scheduler's workers as a snapshot reads them, each with what the leases hold on it (``held``, in the
        registry's names): an answer whose size grows with the workers, not with the leases."""
        try:
            return dict(await self._call(self.client.scheduler.gridboost_leases, nodes=True))
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
        # An older registry (the first client's): every lease record, summed here.
        identity, records = await self.state()
        held = held_on_workers(records)
        return {addr: {**info, "held": held.get(addr, {})} for addr, info in identity.get("workers", {}).items()}

    async def _state(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        scheduler = self.client.scheduler
        identity, records = await asyncio.gather(scheduler.identity(n_workers=-1), scheduler.gridboost_leases())
        return identity, list(records)


class Growth:
    """Workers added to a cluster gridboost can scale for the boosts that did not fit, given back at their release.

    Only with a cluster manager (``Connection.can_grow``). A boost's new workers are known by name; one still under
    another lease when the boost is released is given back with that one.
    """

    def __init__(
        self, registry: Registry, *, n_workers: int, max_workers: int | None, timeout: float, close_timeout: float
    ) -> None:
        self._registry = registry
        self._n_workers = n_workers
        #: The most workers the cluster may grow to.
        self.limit = max_workers if max_workers is not None else 2 * n_workers
        self._timeout = timeout
        self._close_timeout = close_timeout
        #: Worker names grown for each boost, by boost id.
        self.grown: dict[str, list[str]] = {}
        self._conn: Any = None  # a _connect.Connection
        self._call: Call = _unconnected

    def connect(self, conn: Any, call: Call) -> None:
        self._conn, self._call = conn, call

    async def _names(self) -> set[str]:
        identity = await self._call(self._conn.client.scheduler.identity, n_workers=-1)
        return {str(info.get("name")) for info in identity.get("workers", {}).values()}

    async def grow(self, request: ReservationRequest, missing: Resources, wanted: Mapping[str, float]) -> None:
        """Add workers so that ``missing`` (``wanted`` in Dask's names) fits, and wait for them."""
        template = self._conn.worker_template or {}
        threads = float(template.get("nthreads") or 1)
        extra = dict(template.get("resources") or {})
        need = 1
        if missing.cpu:
            need = max(need, math.ceil(missing.cpu / threads - _EPS))
        for key, value in wanted.items():
            if not extra.get(key):
                raise BoostUnavailable(
                    f"boost {request.id} ({request.resources}): missing {missing}, and new workers of this cluster "
                    f"have no {shown(key)}"
                )
            need = max(need, math.ceil(value / extra[key] - _EPS))
        before = await self._names()
        if len(before) + need > self.limit:
            raise BoostUnavailable(
                f"boost {request.id} ({request.resources}): missing {missing}; growing the cluster by {need} "
                f"worker(s) would pass max_workers={self.limit} (it has {len(before)})"
            )
        self.grown[request.id] = []
        try:
            with map_errors(f"growing the cluster for boost {request.id}"):
                await self._call(self._scale_up, len(before) + need)
        except TimeoutError:
            raise BoostUnavailable(
                f"boost {request.id}: the cluster did not grow to {len(before) + need} workers within "
                f"{self._timeout:g}s"
            ) from None
        finally:
            self.grown[request.id] = sorted(await self._names() - before)

    async def _scale_up(self, n: int) -> None:
        self._conn.cluster.scale(n)
        await self._conn.client.wait_for_workers(n, timeout=self._timeout)

    async def shrink(self, boost_id: str) -> None:
        """Give back the workers grown for a boost, unless another lease is on them."""
        names = self.grown.pop(boost_id, [])
        if not names or self._conn is None or self._conn.cluster is None:
            return
        try:
            with anyio.move_on_after(self._close_timeout):
                identity, records = await self._registry.state()
                name_of = {addr: str(info.get("name")) for addr, info in identity.get("workers", {}).items()}
                busy = {name_of.get(addr) for r in records for addr in r["placements"]}
                keep = [n for n in names if n in busy]
                if keep:  # still under another boost: given back with that one
                    other = next(r["id"] for r in records if any(name_of.get(a) in keep for a in r["placements"]))
                    self.grown.setdefault(other, []).extend(keep)
                drop = [n for n in names if n not in busy]
                if drop:
                    await self._call(self._scale_down, drop)
        except Exception as exc:
            _log.warning("shrinking the Dask cluster after boost %s failed: %s: %s", boost_id, type(exc).__name__, exc)

    async def _scale_down(self, names: list[str]) -> None:
        cluster = self._conn.cluster
        if hasattr(cluster, "scale_down"):
            # The scheduler reports names as strings; a SpecCluster's specs may be keyed by ints (LocalCluster's are).
            specs = getattr(cluster, "worker_spec", {})
            await cluster.scale_down([next((k for k in specs if str(k) == n), n) for n in names])
        else:
            cluster.scale(max(self._n_workers, len(cluster.workers) - len(names)))
