"""Leases beyond this process: the cluster's lease registry and lingering groups.

Two things a placement group alone does not give, each kept apart from the backend's placing and running:

* :class:`Registry` is this process's side of the cluster's :class:`~gridboost_ray._worker.LeaseKeeper` (a
  detached actor on the head node, in the ``gridboost`` namespace). Every lease is recorded there, so another
  process can list the cluster's leases and the keeper removes a lease whose owner stopped renewing it at its TTL
  plus grace. A group is owned by its creator's job as well, so Ray itself removes it as soon as its owner process
  dies; the keeper covers the owner that is alive but stuck, and the listing. See ``docs/ray.md`` for why this and
  not detached groups. The keeper is also where every owner of the cluster takes its turn (tickets), gets its
  fencing tokens and meets its tenant's quota, and it keeps the cluster's one autoscaler request (the sum of every
  owner's demand: Ray keeps only the last ``request_resources`` call of a cluster).
* Preemption, the owner's side: :meth:`Registry.busy` is what an owner whose group Ray has not placed tells the
  keeper when it asks again (the keeper may then take preemptible leases back for it); :meth:`Registry.notices`
  and :func:`preempted` are how an owner's watch learns that the keeper is taking one of its leases back, and with
  what grace, reported once per lease as :class:`~gridboost.exceptions.BoostPreempted`.
* :class:`Lingering` keeps a released group for ``linger`` seconds, so that a matching request right after reuses it
  instead of paying Ray's removal-then-creation cost (about a second in half the cycles on a small machine).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field

from gridboost import Lease, Quota, Resources
from gridboost.abc import ReservationRequest
from gridboost.backend_kit import amounts, lease_from_record, owner_name
from gridboost.exceptions import BoostPreempted

from . import _worker

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

__all__ = ["KEEPER_NAME", "KEEPER_NAMESPACE", "Lingering", "Registry", "preempted"]

KEEPER_NAME = "gridboost-lease-keeper"
KEEPER_NAMESPACE = "gridboost"
# How often the keeper looks for expired leases, and how long it stays with none before it exits.
_TICK = 0.5
_IDLE_EXIT = 60.0
# Ray's resource that only the head node has: the keeper lives where the GCS does, so it dies only with the cluster.
_HEAD = "node:__internal_head__"


class Registry:
    """This process's side of the cluster's lease keeper; every method blocks (run it in a worker thread)."""

    def __init__(self, *, grace: float, timeout: float, preempt_grace: float = 10.0) -> None:
        self.grace = grace
        #: Seconds a lease of this process's has, once the keeper takes it back for another owner, before it goes.
        self.preempt_grace = preempt_grace
        self._timeout = timeout
        self._keeper: Any = None  # a ray ActorHandle of LeaseKeeper
        self.owner = owner_name()

    def keeper(self) -> Any:
        """The keeper, started (once per cluster) if it is not running."""
        if self._keeper is None:
            import ray

            actor = ray.remote(_worker.LeaseKeeper)
            self._keeper = actor.options(
                name=KEEPER_NAME,
                namespace=KEEPER_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                resources={_HEAD: 0.001},
            ).remote(self.grace, _TICK, _IDLE_EXIT)
        return self._keeper

    def call(self, method: str, *args: Any) -> Any:
        """Call the keeper (started if none runs) and wait (bounded) for its answer."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        for attempt in (1, 2):
            try:
                return ray.get(getattr(self.keeper(), method).remote(*args), timeout=self._timeout)
            except (ActorDiedError, ActorUnavailableError):
                # It exited while idle just as we called: the next keeper() starts a new one, once.
                self._keeper = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ticket(self, request: ReservationRequest) -> dict[str, Any]:
        """A request's ticket, as the keeper queues it (and lists it, pending): made once per request, so that it
        keeps its place (``requested_at``) however often it is asked again."""
        return {
            "id": request.id,
            "owner": self.owner,
            "tenant": request.tenant,
            "priority": int(request.priority),
            "requested_at": time.time(),
            "amounts": amounts(request.resources),
            "preemptible": request.preemptible,
            "resources": str(request.resources),
        }

    def record(
        self,
        request: ReservationRequest,
        *,
        pg_id: str,
        state: str,
        expires_at: float,
        placements: Sequence[str],
        token: int,
        bundles: Sequence[Mapping[str, float]] = (),
    ) -> dict[str, Any]:
        """A lease's record, as the keeper keeps it (token 0: the keeper gives an active one its token); ``bundles``
        (Ray's names, one per node of ``placements``) are what the keeper counts as freed if it takes it back."""
        return {
            "id": request.id,
            "pg_id": pg_id,
            "owner": self.owner,
            "state": state,
            "expires_at": expires_at,
            "resources": str(request.resources),
            "amounts": amounts(request.resources),
            "priority": int(request.priority),
            "tenant": request.tenant,
            "preemptible": request.preemptible,
            "placements": list(placements),
            "grace": self.grace,
            "token": token,
            "bundles": [dict(bundle) for bundle in bundles],
            "preempt_grace": self.preempt_grace,
        }

    @staticmethod
    def busy(bundles: Sequence[Mapping[str, float]], strategy: str, candidates: Sequence[str] | None) -> dict[str, Any]:
        """What an owner whose group Ray has not placed says when it asks again: its bundles, Ray's strategy and the
        nodes it may go to (``None``: any)."""
        return {
            "bundles": [dict(bundle) for bundle in bundles],
            "strategy": strategy.upper(),
            "candidates": None if candidates is None else list(candidates),
        }

    def put(self, record: Mapping[str, Any], replaces: str | None = None) -> Any:
        """Record a lease, and wait (bounded) until the keeper has it: a listing after this sees it. Its token."""
        return self.call("put", dict(record), replaces)

    def send(self, method: str, *args: Any) -> Any:
        """Call the keeper found before without blocking: the answer's ref, to await; ``None`` when no keeper has
        been found yet (then :meth:`call` it, which looks the keeper up)."""
        return None if self._keeper is None else getattr(self._keeper, method).remote(*args)

    def drop(self, lease_id: str, gone: str = "") -> None:
        """Forget a lease's record; ``gone``: why, when this process is not its owner (its owner's watch is told)."""
        if gone:
            self.call("drop", lease_id, gone)
        else:
            self.call("drop", lease_id)

    def drop_all(self, lease_ids: Sequence[str]) -> None:
        """Drop records, sent together and awaited together (bounded); a keeper that never ran holds none."""
        import ray

        if not lease_ids or not self._found():
            return
        keeper = self.keeper()
        ray.get([keeper.drop.remote(lease_id) for lease_id in lease_ids], timeout=self._timeout)

    def records(self) -> list[dict[str, Any]]:
        """The keeper's records as it holds them (with each group's id; no pending tickets); none when no keeper
        runs."""
        return list(self.call("leases")) if self._found() else []

    def renew(self, lease_id: str, expires_at: float) -> Lease | None:
        record = self.call("renew", lease_id, expires_at)
        return None if record is None else _lease(record)

    def get(self, lease_id: str) -> dict[str, Any] | None:
        """The keeper's record of ``lease_id``, or ``None`` (also when no keeper runs)."""
        if not self._found():
            return None
        record: dict[str, Any] | None = self.call("get", lease_id)
        return record

    @property
    def reached(self) -> bool:
        """Whether this process has found (or started) the keeper."""
        return self._keeper is not None

    def _found(self) -> bool:
        """Whether a keeper runs (looked up, never started: asking must not start one)."""
        if self._keeper is None:
            import ray

            try:
                self._keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
            except ValueError:
                return False
        return True

    def leases(self) -> list[Lease]:
        """Every lease the keeper records, and every request that waits for its turn (``pending``)."""
        return [_lease(record) for record in self.call("leases", True)] if self._found() else []

    def over_quota(self, tenant: str, wanted: Mapping[str, float]) -> str:
        """Why ``wanted`` would pass ``tenant``'s quota now (``""``: it would not, or no keeper runs)."""
        return str(self.call("over_quota", tenant, dict(wanted))) if self._found() else ""

    def set_quota(self, tenant: str, limit: Resources | None) -> None:
        self.call("set_quota", tenant, None if limit is None else amounts(limit))

    def quotas(self) -> list[Quota]:
        rows = self.call("quotas") if self._found() else []
        return [Quota(tenant=r["tenant"], limit=resources_of(r["quota"]), used=resources_of(r["used"])) for r in rows]


def preempted(lease_id: str, notice: Mapping[str, Any], now: float | None = None) -> BoostPreempted:
    """The keeper's notice (:meth:`~gridboost_ray._worker.LeaseKeeper.notices`) of a lease taken back, as the error
    its owner's watch reports: the grace is what is left until ``preempt_at`` (none once it is gone)."""
    now = time.time() if now is None else now
    grace = max(0.0, float(notice["preempt_at"]) - now) if notice["state"] == "preempting" else 0.0
    return BoostPreempted(
        f"boost {lease_id} was preempted: the cluster's lease keeper takes it back for request "
        f"{notice['preempted_for']} of another owner",
        grace=grace,
    )


def _lease(record: Mapping[str, Any]) -> Lease:
    return lease_from_record(record, backend="ray")


def resources_of(flat: Mapping[str, float]) -> Resources:
    """Flat amounts (as :func:`gridboost.backend_kit.amounts` writes them) as ``Resources``."""
    return Resources.coerce({k: int(v) if k in ("memory", "gpu_memory") else v for k, v in flat.items()})


@define
class Idle:
    """A released group that waits, until ``until`` (monotonic), for a request of the same shape."""

    key: Hashable
    lease_id: str
    pg: PlacementGroup
    handle: Any
    until: float


@define
class Lingering:
    """Released groups kept for ``seconds``, by shape: the request's resources, strategy, nodes and labels."""

    seconds: float
    idle: dict[str, Idle] = field(factory=dict)  # by the id of the lease that last used the group

    @staticmethod
    def key(
        resources: Resources, strategy: str, nodes: Sequence[str] | None, labels: Mapping[str, str] | None
    ) -> Hashable:
        return (
            resources,
            strategy,
            None if nodes is None else tuple(sorted(nodes)),
            tuple(sorted((labels or {}).items())),
        )

    def keep(self, key: Hashable, lease_id: str, pg: PlacementGroup, handle: Any) -> Idle:
        idle = Idle(key=key, lease_id=lease_id, pg=pg, handle=handle, until=time.monotonic() + self.seconds)
        self.idle[lease_id] = idle
        return idle

    def take(self, key: Hashable) -> Idle | None:
        """The oldest idle group of this shape, removed from the idle ones; ``None`` if there is none."""
        for lease_id, idle in self.idle.items():
            if idle.key == key:
                del self.idle[lease_id]
                return idle
        return None

    def due(self, now: float | None = None) -> list[Idle]:
        """The idle groups whose time is up, removed from the idle ones."""
        now = time.monotonic() if now is None else now
        gone = [idle for idle in self.idle.values() if idle.until <= now]
        for idle in gone:
            del self.idle[idle.lease_id]
        return gone

    def drain(self) -> list[Idle]:
        gone = list(self.idle.values())
        self.idle.clear()
        return gone

    @property
    def next_due(self) -> float | None:
        return min((idle.until for idle in self.idle.values()), default=None)
