"""What runs inside Ray's worker processes.

This module is shipped to the workers *by value* (``cloudpickle.register_pickle_by_value``), so a cluster whose
nodes do not have gridboost-ray installed can still run gridboost's work; it therefore imports only the standard
library at the top, ray inside the functions (every Ray worker has it), and the two parts of gridboost made to
travel the same way, which the backend ships by value too: :mod:`gridboost.worker_command` (commands: started,
waited for, stopped when cancelled) and :mod:`gridboost.worker_leases` (the lease keeper's turns, quotas and fencing
tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gridboost.worker_command import run
from gridboost.worker_leases import Arbiter

__all__ = ["LeaseKeeper", "call", "hold", "run_command"]


def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run a callable that ``ray.remote`` cannot wrap itself (a builtin, a ``partial``, a callable object).

    Its arguments are this task's own, not a tuple of them: Ray resolves an ``ObjectRef`` (parked data) only where
    it is a whole argument."""
    return fn(*args, **kwargs)


def hold(value: Any) -> Any:
    """Return ``value``: run inside a boost's placement group, it stores parked data on the lease's node."""
    return value


def run_command(
    argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None, grace: float
) -> tuple[int, bytes, bytes, str]:
    """Run ``argv``; return (status, stdout, stderr, node id). Cancelled (``ray.cancel`` raises KeyboardInterrupt
    here): SIGTERM, then SIGKILL after ``grace``, reaped before the task ends (:func:`gridboost.worker_command.run`)."""
    import ray

    status, out, err = run(argv, env, cwd, grace)
    return status, out, err, ray.get_runtime_context().get_node_id()


class LeaseKeeper:
    """The cluster's registry of gridboost leases: a detached actor, one per cluster, on the head node.

    Every backend records its leases here (``put``), so any process connected to the cluster can list, renew or
    release them, and the keeper removes a lease's placement group its ``grace`` seconds (the record's, else the
    keeper's) past its ``expires_at``, whoever owns it: a lease never outlives its TTL, even when its owner hangs.
    Records whose group Ray removed (released, or its owner's job ended, which takes its groups with it) are
    dropped.

    It is also where the owners of a cluster take turns (an :class:`~gridboost.worker_leases.Arbiter`): a backend
    asks (``ask``) before it makes a placement group, and its grant (``put`` with its ticket) is refused when another
    owner's request has come first meanwhile; every grant gets a fencing token here; tenants' quotas are kept here.
    And it keeps the cluster's one autoscaler request (``demand``): Ray keeps only the last ``request_resources``
    call of a cluster, so the sum of every owner's demand must be sent from one place.

    With no record, ticket, demand or quota for ``idle_exit`` seconds the keeper exits, so a cluster that gridboost
    stopped using is left as it was found. An async actor: its methods run on one event loop, so nothing needs a
    lock; the ones that wait (``ask`` with ``hold``) await an event that every change sets.
    """

    def __init__(self, grace: float, tick: float, idle_exit: float) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._arbiter = Arbiter()
        #: What each lease waiting for (or holding) autoscaled capacity asks for: pg_id, bundles, selectors, since.
        self._demand: dict[str, dict[str, Any]] = {}
        self._grace = grace
        self._tick = tick
        self._idle_exit = idle_exit
        self._reaper: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self.reaped: list[str] = []

    def _start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    def _granted(self) -> list[dict[str, Any]]:
        return [record for record in self._records.values() if record.get("state") == "active"]

    def _notify(self) -> None:
        """Wake every ``ask`` that waits: a grant, a release, a ticket gone or a quota may have made a turn."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- turns, grants and tokens ------------------------------------------------------------------------------------

    async def ask(self, ticket: dict[str, Any], hold: float = 0.0) -> dict[str, Any]:
        """Queue ``ticket`` (or refresh it) and say whether its owner may place it now (the arbiter's answer).

        With ``hold``, an answer other than ``turn`` waits up to that many seconds for something to change first:
        an owner that waits learns of its turn at once, without polling fast.
        """
        self._start()
        deadline = time.monotonic() + hold
        while True:
            answer = self._arbiter.ask(ticket, self._granted())
            left = deadline - time.monotonic()
            if answer["status"] == "turn" or left <= 0:
                return answer
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
            if ticket["id"] not in self._arbiter.pending:
                return {"status": "left"}  # its owner gave up (leave) while this waited: do not queue it again

    async def put(
        self, record: dict[str, Any], replaces: str | None = None, ticket: dict[str, Any] | None = None
    ) -> Any:
        """Record a lease (or replace its record): id, pg_id, owner, state, expires_at, and what it holds; its token.

        ``replaces`` names a record this one takes over (a lingering group reused by a new lease). With ``ticket``
        this is a grant, made only if it is the ticket's turn: otherwise nothing is recorded and the arbiter's
        answer comes back (a dict) instead of the token. An active record put without a token is a grant: it gets
        a new fencing token. A record put again for the same lease keeps its token and when it was requested.
        """
        self._start()
        if ticket is not None:
            answer = self._arbiter.ask(ticket, self._granted())
            if answer["status"] != "turn":
                return answer
            record.setdefault("requested_at", self._arbiter.pending[ticket["id"]]["requested_at"])
            self._arbiter.leave(ticket["id"])
        old = self._records.get(record["id"])
        if old is not None:
            for key in ("token", "requested_at"):
                if not record.get(key) and old.get(key):
                    record[key] = old[key]
        if record.get("state") == "active" and not record.get("token"):
            record["token"] = self._arbiter.token()
        if replaces is not None:
            self._records.pop(replaces, None)
        self._records[record["id"]] = record
        self._notify()
        return record.get("token", 0)

    async def leave(self, lease_id: str) -> None:
        """A request was given up (cancelled, failed, or its wait ran out): its ticket goes."""
        self._arbiter.leave(lease_id)
        self._notify()

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
        if self._records.pop(lease_id, None) is not None:
            self._notify()

    async def leases(self, pending: bool = False) -> list[dict[str, Any]]:
        """The records; with ``pending``, the waiting tickets too (state ``pending``, in the order they are served)."""
        self._start()
        records = list(self._records.values())
        if pending:
            records += [
                {**t, "state": "pending", "expires_at": 0.0, "token": 0, "placements": []}
                for t in self._arbiter.waiting()
            ]
        return records

    async def reaped_ids(self) -> list[str]:
        """The leases this keeper removed at their expiry (for tests and the CLI)."""
        return list(self.reaped)

    # -- quotas ------------------------------------------------------------------------------------------------------

    async def set_quota(self, tenant: str, amounts: dict[str, float] | None) -> None:
        self._start()
        self._arbiter.set_quota(tenant, amounts)
        self._notify()

    async def quotas(self) -> list[dict[str, Any]]:
        return self._arbiter.quota_rows(self._granted())

    async def over_quota(self, tenant: str, amounts: dict[str, float]) -> str:
        """Why a request of ``amounts`` would pass ``tenant``'s quota now; ``""`` when it would not."""
        return self._arbiter.over_quota(tenant, amounts, self._granted())

    # -- the autoscaler request --------------------------------------------------------------------------------------

    async def demand(
        self, lease_id: str, pg_id: str, bundles: list[dict[str, float]], selectors: list[dict[str, str]]
    ) -> None:
        """Add a lease's bundles to the cluster's autoscaler request (sent before this returns)."""
        self._start()
        self._demand[lease_id] = {"pg_id": pg_id, "bundles": bundles, "selectors": selectors, "since": time.time()}
        self._send_demand()

    async def undemand(self, lease_id: str) -> None:
        if self._demand.pop(lease_id, None) is not None:
            self._send_demand()

    async def demanded(self) -> dict[str, dict[str, Any]]:
        return dict(self._demand)

    def _send_demand(self) -> None:
        """Replace the cluster's autoscaler request with every owner's demand; an empty one clears it.

        Called (and finished) inside the method that changed the demand, so requests reach the GCS in the order the
        changes were made: Ray keeps only the last one.
        """
        from ray.autoscaler.sdk import request_resources

        bundles = [b for d in self._demand.values() for b in d["bundles"]]
        selectors = [s for d in self._demand.values() for s in d["selectors"]]
        # Ray accepts selectors only with one per bundle, and only when some bundle has one.
        request_resources(bundles=bundles, bundle_label_selectors=selectors if any(selectors) else None)

    # -- the reaper --------------------------------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(self._tick)
            if self._arbiter.sweep():  # owners that stopped asking: the requests behind theirs may have a turn now
                self._notify()
            if self._records or self._demand or self._arbiter.pending or self._arbiter.quotas:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self._idle_exit:
                # exit_actor() works only from a method; from this task the keeper ends itself by its handle.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
            if not self._records and not self._demand:
                continue
            table = placement_group_table()
            now = time.time()
            changed = False
            for lease_id, record in list(self._records.items()):
                row = table.get(record["pg_id"])
                if row is None or row.get("state") == "REMOVED":
                    self._records.pop(lease_id, None)
                    changed = True
                elif now >= record["expires_at"] + record.get("grace", self._grace):
                    with contextlib.suppress(Exception):  # already being removed: the next tick drops it
                        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["pg_id"]))))
                    self._records.pop(lease_id, None)
                    self.reaped.append(lease_id)
                    changed = True
            # Demand of a group Ray removed (its owner died before it could take its demand back). A group just made
            # may not be in the table yet: only one missing for a while counts as gone.
            gone = [lid for lid, d in self._demand.items() if _removed(table.get(d["pg_id"]), now - d["since"])]
            for lease_id in gone:
                del self._demand[lease_id]
            if gone:
                with contextlib.suppress(Exception):  # the GCS is busy: the next change sends the sum again
                    self._send_demand()
            if changed:
                self._notify()


def _removed(row: Mapping[str, Any] | None, age: float) -> bool:
    """Whether Ray removed a group (its row in Ray's table, ``None`` when it has none) made ``age`` seconds ago."""
    return row.get("state") == "REMOVED" if row is not None else age > _DEMAND_UNSEEN


#: Seconds a demand's placement group may be missing from Ray's table before the keeper takes it for removed.
_DEMAND_UNSEEN = 30.0
