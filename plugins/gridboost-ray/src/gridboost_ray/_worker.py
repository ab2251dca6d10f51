"""What runs inside Ray's worker processes.

This module is shipped to the workers *by value* (``cloudpickle.register_pickle_by_value``), so a cluster whose
nodes do not have gridboost-ray installed can still run gridboost's work; it therefore imports only the standard
library at the top, ray inside the functions (every Ray worker has it), and the two parts of gridboost made to
travel the same way, which the backend ships by value too: :mod:`gridboost.worker_command` (commands: started,
waited for, stopped when cancelled) and :mod:`gridboost.worker_leases` (the lease keeper's turns, quotas and fencing
tokens).

Work under a boost runs inside :func:`in_lease`, so that ``gridboost.current_lease()`` names the lease there. It calls
the ``in_lease`` of the gridboost *installed* on the worker, imported when the task runs: shipped by value, a copy of
gridboost's own would carry a copy of its context variable, which cannot be pickled (and is not the one user code
reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gridboost.worker_command import run
from gridboost.worker_leases import Arbiter

__all__ = ["LeaseKeeper", "by_name", "call", "first_fit", "hold", "in_lease", "leased", "run_command"]

#: How many leases taken back for other owners the keeper remembers (for their owners' watch, and tests).
_PREEMPTED_KEPT = 1000
#: How many leases whose group Ray removed (or another process released) the keeper remembers, for their owners' watch.
_GONE_KEPT = 10_000
#: Record states whose capacity counts for quotas: active ones, and those being taken back (until they go).
_HOLDING = ("active", "preempting")
#: Seconds past a preempted lease's ``preempt_at`` before the keeper removes its group: its owner, told the grace,
#: ends its work with BoostPreempted and releases the lease itself at ``preempt_at``; the keeper fences only an owner
#: that did not (stopped, stuck).
PREEMPT_SLACK = 1.0


def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run a callable that ``ray.remote`` cannot wrap itself (a builtin, a ``partial``, a callable object).

    Its arguments are this task's own, not a tuple of them: Ray resolves an ``ObjectRef`` (parked data) only where
    it is a whole argument."""
    return fn(*args, **kwargs)


def in_lease(lease_id: str, token: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``gridboost.current_lease()`` saying ``(lease_id, token)`` on this worker.

    Its gridboost's :func:`gridboost.worker_leases.in_lease`, imported here (see the module docstring); a worker
    without gridboost has nothing that could ask, and ``fn`` runs as it is."""
    try:
        from gridboost.worker_leases import in_lease as installed
    except ImportError:
        return fn(*args, **kwargs)
    return installed(lease_id, token, fn, *args, **kwargs)


def leased(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under a lease named by its first two arguments (id, token): what a boost's function is made remote
    as, once per function, so that ``fn`` travels with the remote function and not with every task."""

    def under(lease_id: str, token: int, /, *args: Any, **kwargs: Any) -> Any:
        return in_lease(lease_id, token, fn, *args, **kwargs)

    under.__name__ = under.__qualname__ = getattr(fn, "__name__", "under")
    return under


def by_name(module: str, qualname: str) -> Callable[..., Any]:
    """A function of a module shipped by value (``gridboost.current_lease``), called as the worker's installed one:
    a copy would read state of its own (a context variable, which cannot even be pickled)."""

    def named(*args: Any, **kwargs: Any) -> Any:
        import importlib

        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        return target(*args, **kwargs)

    named.__name__ = named.__qualname__ = qualname
    return named


def first_fit(bundles: Sequence[Mapping[str, float]], strategy: str, rooms: Mapping[str, Mapping[str, float]]) -> bool:
    """Whether ``bundles`` fit in ``rooms`` (what each node has free, by node id) the way Ray places a group of
    ``strategy``: one node for ``STRICT_PACK``, distinct nodes for ``STRICT_SPREAD``, anywhere for the others;
    largest bundle first, each in the first node with room (a simple check, not Ray's own scheduler)."""
    free = {node: dict(room) for node, room in rooms.items()}

    def fits(bundle: Mapping[str, float], room: Mapping[str, float]) -> bool:
        return all(value <= room.get(key, 0.0) + 1e-9 for key, value in bundle.items() if value > 0)

    if strategy == "STRICT_PACK":
        whole: dict[str, float] = {}
        for bundle in bundles:
            for key, value in bundle.items():
                whole[key] = whole.get(key, 0.0) + value
        return any(fits(whole, room) for room in free.values())
    used: set[str] = set()
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        spot = next(
            (n for n, room in free.items() if fits(bundle, room) and not (strategy == "STRICT_SPREAD" and n in used)),
            None,
        )
        if spot is None:
            return False
        used.add(spot)
        for key, value in bundle.items():
            free[spot][key] = free[spot].get(key, 0.0) - value
    return True


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

    Preemption. An owner whose turn it is but whose group Ray has not placed says so when it asks again (``busy``:
    its bundles, strategy and candidate nodes). The keeper then picks victims (``Arbiter.victims``: preemptible
    leases of lower priority of other owners, the fewest that make room, checked by :func:`first_fit` against what
    Ray reports free on each node plus what the victims' groups hold there) and marks them ``preempting``, with
    ``preempt_at`` (now plus the victim's ``preempt_grace``) and ``preempted_for``. A preempting lease still counts
    as held (quotas, turns). Its owner learns it from ``notices`` (its ``watch``), ends its work within the grace
    and releases it; at ``preempt_at`` plus ``PREEMPT_SLACK`` the keeper removes the group itself, which makes Ray
    kill the tasks still in it. No new victims are picked for a ticket while its victims are being taken back.

    What owners watch. The keeper reads Ray's placement group table for every owner (an owner reading it itself would
    read every group of the cluster, each time, for a few of its own): ``notices`` then tells an owner
    about its leases that are being taken back, taken back, whose group Ray no longer holds whole (a node died), or
    that went (their group removed, another process released them). Renewals come in batches (``renew_many``).

    Scale. No call on one lease looks at every lease: quotas count from running sums (the arbiter's ``hold``), the
    line is sorted, renewals and notices look records up by id, expiries wait in a heap. Ray's table grows with the
    cluster's groups: it is read in a thread, at most a twentieth of the time.

    With no record, ticket, demand or quota for ``idle_exit`` seconds the keeper exits, so a cluster that gridboost
    stopped using is left as it was found. An async actor: its methods run on one event loop, so nothing needs a
    lock; the ones that wait (``ask`` with ``hold``) await an event set when their ticket may have its turn.
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
        # The asks waiting for a change (see ask), by ticket id: only the one whose turn it may be now is woken.
        self._wake: dict[str, asyncio.Event] = {}
        self.reaped: list[str] = []
        #: Leases this keeper took back for other owners, by id: when, for which request, and whether the keeper
        #: removed the group itself (``fenced``: its owner had not released it by then). The last ones only.
        self.preempted: dict[str, dict[str, Any]] = {}
        # What the last tick saw of groups Ray does not hold whole (by lease id: why), and the leases that went without
        # their owner releasing them (by id: why); what ``notices`` tells their owners.
        self._broken: dict[str, str] = {}
        self._gone: dict[str, str] = {}
        # Beside the records, so that no call looks at every lease: the ids of active preemptible leases (what may be
        # taken back), of those being taken back, and (when the reaper must look, id) of every expiry, in a heap (a
        # renewal pushes a new entry; an old one is skipped when it comes up).
        self._takeable: set[str] = set()
        self._taking: set[str] = set()
        self._due: list[tuple[float, str]] = []

    def _set(self, record: dict[str, Any]) -> None:
        """Keep ``record`` (in place of the lease's last one); what it holds counts for its tenant's quota while it is
        active or being taken back."""
        lease_id = record["id"]
        self._records[lease_id] = record
        state = record.get("state")
        if state in _HOLDING:
            self._arbiter.hold(lease_id, str(record.get("tenant", "")), record.get("amounts") or {})
        else:
            self._arbiter.unhold(lease_id)
        self._takeable.discard(lease_id)
        self._taking.discard(lease_id)
        if state == "active" and record.get("preemptible"):
            self._takeable.add(lease_id)
        elif state == "preempting":
            self._taking.add(lease_id)
        self._expires(record)

    def _expires(self, record: Mapping[str, Any]) -> None:
        """Note when the reaper must look at a lease again: its expiry plus grace (after each renewal, anew)."""
        deadline = float(record["expires_at"]) + float(record.get("grace", self._grace))
        heapq.heappush(self._due, (deadline, record["id"]))

    def _pop(self, lease_id: str, gone: str = "") -> dict[str, Any] | None:
        """Forget a lease's record; ``gone``: why, for its owner's watch (it did not release it itself)."""
        record = self._records.pop(lease_id, None)
        self._arbiter.unhold(lease_id)
        self._broken.pop(lease_id, None)
        self._takeable.discard(lease_id)
        self._taking.discard(lease_id)
        if gone and record is not None:
            self._gone[lease_id] = gone
            while len(self._gone) > _GONE_KEPT:
                del self._gone[next(iter(self._gone))]
        return record

    def _start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    def _granted(self) -> list[dict[str, Any]]:
        """The leases that hold capacity for their owners: active ones, and those being taken back (until they go)."""
        return [record for record in self._records.values() if record.get("state") in _HOLDING]

    def _notify(self) -> None:
        """A grant, a release, a ticket gone or a quota may have made a turn: wake the ``ask`` of the ticket first in
        line, and those a quota holds back (their tenant may have room now). The others would only be told to wait."""
        for ticket_id in self._arbiter.to_wake() if self._wake else ():
            event = self._wake.get(ticket_id)
            if event is not None:
                event.set()

    # -- turns, grants and tokens ------------------------------------------------------------------------------------

    async def ask(
        self, ticket: dict[str, Any], hold: float = 0.0, busy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue ``ticket`` (or refresh it) and say whether its owner may place it now (the arbiter's answer).

        With ``hold``, an answer other than ``turn`` waits up to that many seconds for something to change first:
        an owner that waits learns of its turn at once, without polling fast. ``busy`` (``bundles``, ``strategy``,
        ``candidates``: node ids) says that the ticket's group is made but Ray has not placed it: when it is the
        ticket's turn, preemptible leases may be taken back for it (see the class docstring).
        """
        self._start()
        deadline = time.monotonic() + hold
        while True:
            answer = self._arbiter.ask(ticket)  # quotas: the arbiter's running sums (see _set)
            if answer["status"] == "turn" and busy is not None:
                self._preempt_for(ticket, busy)
            left = deadline - time.monotonic()
            if answer["status"] == "turn" or left <= 0:
                return answer
            event = self._wake[ticket["id"]] = asyncio.Event()
            try:
                with contextlib.suppress(TimeoutError):  # then asked once more, and answered as it is
                    await asyncio.wait_for(event.wait(), left)
            finally:
                if self._wake.get(ticket["id"]) is event:
                    del self._wake[ticket["id"]]
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
            answer = self._arbiter.ask(ticket)
            if answer["status"] != "turn":
                return answer
            record.setdefault("requested_at", self._arbiter.pending[ticket["id"]]["requested_at"])
            self._arbiter.leave(ticket["id"])
        old = self._records.get(record["id"])
        if old is not None:
            for key in ("token", "requested_at"):
                if not record.get(key) and old.get(key):
                    record[key] = old[key]
        if old is not None and old.get("state") == "preempting" and replaces is None:
            # Being taken back: a renewal (or anything else its owner puts meanwhile) does not undo that.
            for key in ("state", "preempt_at", "preempted_for", "granted_at"):
                if key in old:
                    record[key] = old[key]
        if record.get("state") == "active" and not record.get("token"):
            record["token"] = self._arbiter.token()
            record["granted_at"] = time.time()
        elif old is not None and "granted_at" in old:
            record.setdefault("granted_at", old["granted_at"])
        if replaces is not None:
            self._pop(replaces)
        self._gone.pop(record["id"], None)
        self._set(record)
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
            self._expires(record)
        return record

    async def renew_many(self, renewals: list[tuple[str, float]]) -> list[bool]:
        """Move the expiry of several leases (id, expires_at: an owner's renewals sent together); of each, whether
        the keeper has it (a keeper that restarted has none: the owner then puts its record again)."""
        self._start()
        found = []
        for lease_id, expires_at in renewals:
            record = self._records.get(lease_id)
            if record is not None:
                record["expires_at"] = expires_at
                self._expires(record)
            found.append(record is not None)
        return found

    async def get(self, lease_id: str) -> dict[str, Any] | None:
        self._start()
        return self._records.get(lease_id)

    async def drop(self, lease_id: str, gone: str = "") -> None:
        """Forget a lease (its group is removed); ``gone``: why, when another process than its owner released it."""
        self._start()
        record = self._pop(lease_id, gone)
        if record is not None:
            if record.get("state") == "preempting":  # its owner gave it back within the grace
                self._remember_preempted(record, fenced=False)
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

    # -- preemption --------------------------------------------------------------------------------------------------

    def _preempt_for(self, ticket: Mapping[str, Any], busy: Mapping[str, Any]) -> None:
        """Mark the leases to take back so that ``ticket`` (its turn; its group not placed) fits, if any may be."""
        if not self._takeable:
            return  # nothing may be taken: no need to read Ray's nodes
        if any(self._records[i].get("preempted_for") == ticket["id"] for i in self._taking):
            return  # its victims are being taken back: none more until they are gone
        granted = self._granted()
        from ray._private.state import state

        available = state.available_resources_per_node()
        candidates = busy.get("candidates")
        rooms = {
            node: {k: float(v) for k, v in room.items()}
            for node, room in available.items()
            if candidates is None or node in candidates
        }
        bundles, strategy = busy["bundles"], str(busy["strategy"])

        def frees(chosen: list[Mapping[str, Any]]) -> bool:
            room = {node: dict(free) for node, free in rooms.items()}
            for record in chosen:
                for bundle, node in zip(record.get("bundles", ()), record.get("placements", ()), strict=False):
                    if node in room:
                        for key, value in bundle.items():
                            room[node][key] = room[node].get(key, 0.0) + float(value)
            return first_fit(bundles, strategy, room)

        if frees([]):
            return  # it fits as things are: Ray is about to place it
        victims = Arbiter.victims(ticket, granted, frees)
        if not victims:
            return
        now = time.time()
        for victim in victims:
            record = self._records[victim["id"]]
            record["state"] = "preempting"  # still holds what it held (see _set)
            self._takeable.discard(victim["id"])
            self._taking.add(victim["id"])
            record["preempt_at"] = now + float(record.get("preempt_grace", 0.0))
            record["preempted_for"] = ticket["id"]
        self._notify()

    async def notices(self, lease_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Of ``lease_ids``, those being taken back (``preempting``, with ``preempt_at`` and ``preempted_for``) or
        taken back already (``preempted``), those whose group Ray does not hold whole (``broken``, with ``why``), and
        those that went without their owner releasing them (``gone``, with ``why``): what an owner's watch asks for
        its leases."""
        out: dict[str, dict[str, Any]] = {}
        for lease_id in lease_ids:
            record = self._records.get(lease_id)
            if record is not None and record.get("state") == "preempting":
                out[lease_id] = {k: record[k] for k in ("state", "preempt_at", "preempted_for")}
            elif lease_id in self.preempted:
                out[lease_id] = {"state": "preempted", **self.preempted[lease_id]}
            elif lease_id in self._broken:
                out[lease_id] = {"state": "broken", "why": self._broken[lease_id]}
            elif lease_id in self._gone:
                out[lease_id] = {"state": "gone", "why": self._gone[lease_id]}
        return out

    async def preempted_ids(self) -> dict[str, dict[str, Any]]:
        """The leases this keeper took back for other owners (for tests and the CLI)."""
        return dict(self.preempted)

    def _remember_preempted(self, record: Mapping[str, Any], fenced: bool) -> None:
        self.preempted[record["id"]] = {
            "preempt_at": record["preempt_at"],
            "preempted_for": record["preempted_for"],
            "fenced": fenced,
        }
        while len(self.preempted) > _PREEMPTED_KEPT:
            del self.preempted[next(iter(self.preempted))]

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

        idle_since = time.monotonic()
        next_table = 0.0
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
            changed = False
            if time.monotonic() >= next_table:
                # Ray's table grows with the cluster's groups (about 0.3 ms a group to read and convert): it is read in
                # a thread, so this loop goes on serving owners meanwhile, and at most a twentieth of the time (every
                # tick on a small cluster, every few seconds with thousands of groups).
                began = time.monotonic()
                known = {lease_id: record["pg_id"] for lease_id, record in self._records.items()}
                demands = {lease_id: demand["pg_id"] for lease_id, demand in self._demand.items()}
                table = await asyncio.to_thread(_group_table)
                changed = self._look(table, known, demands)
                next_table = time.monotonic() + max(self._tick, _TABLE_SHARE * (time.monotonic() - began))
            if self._reap(time.time()):
                changed = True
            if changed:
                self._notify()

    def _look(
        self, table: Mapping[str, Mapping[str, Any]], known: Mapping[str, str], demands: Mapping[str, str]
    ) -> bool:
        """What Ray's placement group ``table`` says of the leases: records of groups Ray removed go (their owners'
        watch is told, unless they released them), groups not whole are noted for their owners' watch, and demand of
        groups Ray removed goes. Whether a record went.

        Only what was there before the table was read (``known`` records and ``demands``, by lease id: their group's
        id) is judged by it: a group made while it was read is not in it."""
        now = time.time()
        changed = False
        broken: dict[str, str] = {}
        for lease_id, pg_id in known.items():
            record = self._records.get(lease_id)
            if record is None or record["pg_id"] != pg_id:
                continue  # gone, or another group now, while the table was read
            row = table.get(pg_id)
            state = "REMOVED" if row is None else str(row.get("state"))
            if state == "REMOVED":
                self._pop(lease_id, gone="Ray reports its placement group REMOVED")
                if record.get("state") == "preempting":
                    self._remember_preempted(record, fenced=False)
                changed = True
            elif state != "CREATED":
                broken[lease_id] = state
        if broken:
            import ray

            dead = {str(n["NodeID"]) for n in ray.nodes() if not n.get("Alive")}
            for lease_id, state in broken.items():
                died = sorted(dead.intersection(self._records[lease_id].get("placements") or ()))
                broken[lease_id] = (
                    f"node(s) {', '.join(died)} holding its placement group died; Ray reports the group {state}"
                    if died
                    else f"Ray reports its placement group {state}"
                )
        self._broken = broken
        # Demand of a group Ray removed (its owner died before it could take its demand back). A group just made may
        # not be in the table yet: only one missing for a while counts as gone.
        gone = [
            lid
            for lid, d in self._demand.items()
            if demands.get(lid) == d["pg_id"] and _removed(table.get(d["pg_id"]), now - d["since"])
        ]
        for lease_id in gone:
            del self._demand[lease_id]
        if gone:
            with contextlib.suppress(Exception):  # the GCS is busy: the next change sends the sum again
                self._send_demand()
        return changed

    def _reap(self, now: float) -> bool:
        """Remove the groups of leases taken back whose owner did not give them back in time, and of leases past
        their expiry plus grace; whether a record went. Looks only at what may be due: those being taken back, and the
        expiries that came up in the heap."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        due: dict[str, bool] = {}  # id: fenced (taken back) or reaped (expired)
        for lease_id in self._taking:
            if now >= self._records[lease_id]["preempt_at"] + PREEMPT_SLACK:
                due[lease_id] = True
        while self._due and self._due[0][0] <= now:
            _, lease_id = heapq.heappop(self._due)
            record = self._records.get(lease_id)
            if record is not None and now >= record["expires_at"] + record.get("grace", self._grace):
                due.setdefault(lease_id, False)
        for lease_id, fenced in due.items():
            record = self._records[lease_id]
            # Removing the group makes Ray kill the tasks still in it (a taken-back lease's owner did not end them).
            with contextlib.suppress(Exception):  # already being removed: the next look drops it
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["pg_id"]))))
            if fenced:
                self._pop(lease_id, gone="taken back for another owner's request")
                self._remember_preempted(record, fenced=True)
            else:
                self._pop(lease_id, gone="the keeper removed it: its TTL and grace passed")
                self.reaped.append(lease_id)
        return bool(due)


def _group_table() -> dict[str, Any]:
    from ray.util.placement_group import placement_group_table

    table: dict[str, Any] = placement_group_table()
    return table


#: The most of its time the keeper spends reading Ray's placement group table: one read per this many times its length.
_TABLE_SHARE = 20.0


def _removed(row: Mapping[str, Any] | None, age: float) -> bool:
    """Whether Ray removed a group (its row in Ray's table, ``None`` when it has none) made ``age`` seconds ago."""
    return row.get("state") == "REMOVED" if row is not None else age > _DEMAND_UNSEEN


#: Seconds a demand's placement group may be missing from Ray's table before the keeper takes it for removed.
_DEMAND_UNSEEN = 30.0
