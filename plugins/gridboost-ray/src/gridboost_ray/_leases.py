"""Leases beyond this process: the cluster's lease registry, lingering groups, and the autoscaler request.

Three things a placement group alone does not give, each kept apart from the backend's placing and running:

* :class:`Registry` records every lease with the cluster's :class:`~gridboost_ray._worker.LeaseKeeper` (a detached
  actor on the head node, in the ``gridboost`` namespace), so another process can list the cluster's leases and
  the keeper removes a lease whose owner stopped renewing it at its TTL plus grace. A group is owned by its
  creator's job as well, so Ray itself removes it as soon as its owner process dies; the keeper covers the owner
  that is alive but stuck, and the listing. See ``docs/ray.md`` for why this and not detached groups.
* :class:`Lingering` keeps a released group for ``linger`` seconds, so that a matching request right after reuses it
  instead of paying Ray's removal-then-creation cost (about a second in half the cycles on a small machine).
* :class:`Demand` keeps the one autoscaler request Ray allows per cluster equal to the bundles of every lease this
  process holds or waits for, and clears it when the last one goes.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field

from gridboost import Lease, Priority, Resources
from gridboost.backend_kit import lease_from_record, owner_name

from . import _worker

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

__all__ = ["KEEPER_NAME", "KEEPER_NAMESPACE", "Demand", "Lingering", "Registry"]

KEEPER_NAME = "gridboost-lease-keeper"
KEEPER_NAMESPACE = "gridboost"
# How often the keeper looks for expired leases, and how long it stays with none before it exits.
_TICK = 0.5
_IDLE_EXIT = 60.0
# Ray's resource that only the head node has: the keeper lives where the GCS does, so it dies only with the cluster.
_HEAD = "node:__internal_head__"


class Registry:
    """This process's side of the cluster's lease keeper; every method blocks (run it in a worker thread)."""

    def __init__(self, *, grace: float, timeout: float) -> None:
        self.grace = grace
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

    def _call(self, method: str, *args: Any) -> Any:
        """Call the keeper and wait (bounded) for its answer."""
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

    def record(
        self,
        lease_id: str,
        *,
        pg_id: str,
        state: str,
        expires_at: float,
        resources: Resources,
        priority: Priority,
        placements: Sequence[str],
    ) -> dict[str, Any]:
        """A lease's record, as the keeper keeps it."""
        return {
            "id": lease_id,
            "pg_id": pg_id,
            "owner": self.owner,
            "state": state,
            "expires_at": expires_at,
            "resources": str(resources),
            "priority": int(priority),
            "placements": list(placements),
            "grace": self.grace,
        }

    def put(self, record: Mapping[str, Any], replaces: str | None = None) -> None:
        """Record a lease, and wait (bounded) until the keeper has it: a listing after this sees it."""
        self._call("put", dict(record), replaces)

    def send(self, record: Mapping[str, Any], replaces: str | None = None) -> Any:
        """Send a record to the keeper found before, without blocking: its ref, to await; ``None`` when no keeper has
        been found yet (then :meth:`put` it, which looks the keeper up)."""
        return None if self._keeper is None else self._keeper.put.remote(dict(record), replaces)

    def drop(self, lease_id: str) -> None:
        self._call("drop", lease_id)

    def drop_all(self, lease_ids: Sequence[str]) -> None:
        """Drop records, sent together and awaited together (bounded); a keeper that never ran holds none."""
        import ray

        if not lease_ids or not self._found():
            return
        keeper = self.keeper()
        ray.get([keeper.drop.remote(lease_id) for lease_id in lease_ids], timeout=self._timeout)

    def records(self) -> list[dict[str, Any]]:
        """The keeper's records as it holds them (with each group's id); none when no keeper runs."""
        return list(self._call("leases")) if self._found() else []

    def renew(self, lease_id: str, expires_at: float) -> Lease | None:
        record = self._call("renew", lease_id, expires_at)
        return None if record is None else _lease(record)

    def get(self, lease_id: str) -> dict[str, Any] | None:
        """The keeper's record of ``lease_id``, or ``None`` (also when no keeper runs)."""
        if not self._found():
            return None
        record: dict[str, Any] | None = self._call("get", lease_id)
        return record

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
        return [_lease(record) for record in self._call("leases")] if self._found() else []


def _lease(record: Mapping[str, Any]) -> Lease:
    return lease_from_record(record, backend="ray")


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


@define
class Demand:
    """The bundles of every lease this process holds or waits for, as one ``request_resources`` call."""

    bundles: dict[str, tuple[list[dict[str, float]], list[dict[str, str]]]] = field(factory=dict)

    def add(
        self, lease_id: str, bundles: Sequence[Mapping[str, float]], selectors: Sequence[Mapping[str, str]]
    ) -> None:
        self.bundles[lease_id] = ([dict(b) for b in bundles], [dict(s) for s in selectors])
        self.send()

    def remove(self, lease_id: str) -> None:
        if self.bundles.pop(lease_id, None) is not None:
            self.send()

    def send(self) -> None:
        """Replace the cluster's autoscaler request with ours; an empty one clears it. Blocks on the GCS."""
        from ray.autoscaler.sdk import request_resources

        bundles = [b for shapes, _ in self.bundles.values() for b in shapes]
        selectors = [s for _, sels in self.bundles.values() for s in sels]
        # Ray accepts selectors only with one per bundle, and only when some bundle has one.
        request_resources(bundles=bundles, bundle_label_selectors=selectors if any(selectors) else None)
