"""What runs inside Dask's processes: the lease registry on the scheduler, and lease marks and commands on workers.

This module is shipped *by value* (``cloudpickle.register_pickle_by_value``), so a cluster whose scheduler and workers
do not have gridboost-dask installed can still run it. It imports only the standard library, ``distributed``
(which every Dask process has), and the two parts of gridboost made to travel the same way,
:mod:`gridboost.worker_command` (commands: started, waited for, stopped when cancelled) and
:mod:`gridboost.worker_leases` (turns, quotas and fencing tokens across owners), which the backend ships by value too.

The registry (:class:`LeaseRegistry`, a ``SchedulerPlugin`` named ``gridboost-leases``) is the one source of truth of
leases: it places a lease on workers with free capacity, marks it there with a resource of its own
(``gridboost-lease:<session>:<boost id>``, set in the worker's books and then in the scheduler's, see
:func:`lease_marks`), lists, renews and releases leases for any client, and removes — by itself, on a periodic
callback — a lease whose TTL plus grace has passed or whose owner client has been gone for longer than the grace (a
*detached* lease outlives its owner: only its TTL plus grace ends it). Capacity is accounted here, in one event loop,
so two clients can never book the same threads: a worker's capacity is its threads (``cpu``), its ``memory_limit`` and
its own resources; what leases hold is subtracted from it.

Across owners the registry keeps one :class:`~gridboost.worker_leases.Arbiter`: a request that is not placed at once
leaves a ticket, and requests are placed strictly in turn (priority, then age), a tenant's quota holds back its own
requests only, and every grant gets a fencing token. Owners poll; an answer that says "not yet" is held back here, and
when something changes that may let it through (a release, a grant, a ticket gone, a quota, a worker) the request is
tried again right here, so the next in line is granted without a round trip. Only that request is woken (and those a
quota holds back), not every waiting one. Tickets of a client the scheduler saw leave go at once.

Scale. No operation on one lease looks at every lease: the registry keeps, beside its records, what the leases book on
each worker, leases by id and by client, and the expiries in a heap; the arbiter keeps the line sorted and each
tenant's use as a running sum. A worker's own capacity is read once (its resources hold a mark per lease). Marks asked
for while others are on their way to a worker go together in one message, and the scheduler's books are written for
those names alone. What a snapshot reads (:meth:`LeaseRegistry.nodes`) grows with the workers, not the leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from gridboost.worker_command import run
from gridboost.worker_leases import Arbiter

from ._placing import add, fits, missing, place, split

if TYPE_CHECKING:
    from distributed import Scheduler, Worker

__all__ = [
    "LEASE_PREFIX",
    "REGISTRY",
    "LeaseRegistry",
    "call",
    "in_lease",
    "lease_marks",
    "named",
    "ours_on_worker",
    "run_command",
]

_log = logging.getLogger("gridboost.dask")

#: Every worker resource that marks a lease starts with this.
LEASE_PREFIX = "gridboost-lease:"
#: The registry's name on the scheduler.
REGISTRY = "gridboost-leases"
_EPS = 1e-9
# Between two looks at workers that still show a lease or a task being let go: first fast, then at most this.
_SETTLE_POLL = 0.1
# Worker task states in which a task will never again ask for its resources here.
_SETTLED = frozenset({"memory", "error", "released", "forgotten"})
#: Seconds past a preempted lease's ``preempt_at`` before the registry removes it itself: its owner, told the grace,
#: stops its work with BoostPreempted and gives the lease back at ``preempt_at``; the registry fences only an owner that
#: did not (stopped, stuck), cancelling its tasks. (Ray's lease keeper waits as long.)
PREEMPT_SLACK = 1.0
# How many leases taken back the registry remembers (for their owners' watch, and tests).
_PREEMPTED_KEPT = 1000
# Every how many rounds of the reaper stale lease marks are swept (a look at every resource of every worker).
_SWEEP_EVERY = 4

Amounts = dict[str, float]


# -- on workers: lease marks ----------------------------------------------------------------------------------------


def lease_marks(sets: Mapping[str, float], drops: Sequence[str], dask_worker: Worker | None = None) -> dict[str, bool]:
    """Set lease marks (name: amount) on this worker and drop others, in this worker's own books; the registry writes
    the scheduler's for these names alone. (``Worker.set_resources`` sends the scheduler every resource the worker has,
    a mark per lease on it, and the scheduler then rebuilds its books of all of them: work that grows with the leases.)

    Of each dropped name: ``True`` if it is gone, ``False`` if a task still holds or waits for some: it is set to 0
    then, and removed by a later call. Removing it while a task holds it would break the worker's books when that
    task ends, and while a task here still asks for it (queued, its cancellation not arrived yet) the worker fails hard
    at its next look for ready work (a ``KeyError``).
    """
    assert dask_worker is not None
    state = dask_worker.state
    for name, amount in sets.items():  # as Worker.set_resources books them
        if name in state.total_resources:
            state.available_resources[name] += amount - state.total_resources[name]
        else:
            state.available_resources[name] = amount
        state.total_resources[name] = amount
    dropped: dict[str, bool] = {}
    if not drops:
        return dropped
    wanted = {r for ts in state.tasks.values() if ts.state not in _SETTLED for r in (ts.resource_restrictions or {})}
    for name in drops:
        total = state.total_resources.get(name)
        if total is None:
            dropped[name] = True
        elif name not in wanted and state.available_resources.get(name, 0.0) + _EPS >= total:
            del state.total_resources[name]
            state.available_resources.pop(name, None)
            dropped[name] = True
        else:
            state.available_resources[name] = state.available_resources.get(name, 0.0) - total
            state.total_resources[name] = 0.0
            dropped[name] = False
    return dropped


def ours_on_worker(prefix: str, lease_prefix: str, dask_worker: Worker | None = None) -> dict[str, list[str]]:
    """What this worker's own state shows of one backend: its tasks (cancelled ones still running included), its
    lease marks."""
    assert dask_worker is not None
    state = dask_worker.state
    return {
        "tasks": sorted(str(key) for key in state.tasks if str(key).startswith(prefix)),
        "marks": sorted(name for name in state.total_resources if name.startswith(lease_prefix)),
    }


def call(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Run a callable whose keywords would collide with ``Client.submit``'s own (``key=``, ``resources=``...)."""
    return fn(*args, **kwargs)


def in_lease(lease_id: str, token: int, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``gridboost.current_lease()`` saying ``(lease_id, token)`` on this worker.

    The worker's *installed* :func:`gridboost.worker_leases.in_lease`, imported when the task runs: shipped by value,
    gridboost's own would carry a copy of its context variable, which cannot be pickled (and is not the one user code
    reads). A worker without gridboost has nothing that could ask, and ``fn`` runs as it is.
    """
    try:
        from gridboost.worker_leases import in_lease as installed
    except ImportError:
        return fn(*args, **kwargs)
    return installed(lease_id, token, fn, *args, **kwargs)


def named(module: str, qualname: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call the worker's installed ``module.qualname`` (``gridboost.current_lease``): a function of a module shipped by
    value would run as a copy reading state of its own (a context variable, which cannot even be pickled)."""
    import importlib

    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target(*args, **kwargs)


# -- on workers: commands -------------------------------------------------------------------------------------------


def _cancelled(worker: Worker, key: Any) -> bool:
    """Whether the scheduler took this task back (cancelled, or its future released) while it runs here."""
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _cut(text: str, limit: int = 120) -> str:
    # gridboost.backend_kit.shown's job, but this module runs where gridboost may not be installed.
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class CommandCancelled(Exception):
    """The command's task was cancelled while it ran; its process was stopped."""


def run_command(
    argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None, grace: float
) -> tuple[int, bytes, bytes, str]:
    """Run ``argv``; return (status, stdout, stderr, worker address). Cancelled: SIGTERM, then SIGKILL after ``grace``,
    reaped before the task ends, whatever interrupts meanwhile (:func:`gridboost.worker_command.run`).

    A Dask task cannot be interrupted in its thread, so the command watches its own task in the worker's state and
    stops its process as soon as the scheduler cancels the task.
    """
    from distributed import get_worker

    worker = get_worker()
    key = worker.get_current_task()

    def check() -> None:
        if _cancelled(worker, key):
            raise CommandCancelled(f"{_cut(repr(list(argv)))} was cancelled")

    status, out, err = run(argv, env, cwd, grace, check=check)
    return status, out, err, str(worker.address)


# -- on the scheduler: the lease registry ---------------------------------------------------------------------------


class _MarkQueue:
    """Marks waiting to be sent to one worker (name, amount or ``None`` to drop, the asker's future), and the task
    sending them."""

    __slots__ = ("ops", "task")

    def __init__(self) -> None:
        self.ops: list[tuple[str, float | None, asyncio.Future[tuple[bool, Any]]]] = []
        self.task: asyncio.Task[None] | None = None


class LeaseRegistry(SchedulerPlugin):
    """gridboost's leases, held by the scheduler (see the module docstring). Registered idempotently by name."""

    name = REGISTRY
    idempotent = True

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.leases: dict[str, dict[str, Any]] = {}
        self.scheduler: Scheduler | None = None
        # Marking a lease on its workers is awaited; a release that arrives meanwhile waits for it (by resource name).
        self._marking: dict[str, asyncio.Event] = {}
        # Clients the scheduler saw leave, and when: their leases go after the grace.
        self._gone: dict[str, float] = {}
        #: Turns across owners, quotas and fencing tokens (tickets are keyed by lease name, unique on the cluster).
        self.arbiter = Arbiter()
        # Set (and replaced) whenever a waiting request may get through now; made in the scheduler's loop, at start.
        self._changed: asyncio.Event | None = None
        # Leases removed from the books whose marks are being dropped: their capacity is still booked until then, so
        # no grant can overlap a mark that still lets their queued tasks start.
        self._releasing: dict[str, dict[str, Any]] = {}
        #: Leases taken back for other owners' requests, by name: when, for which request, and whether this registry
        #: removed it itself (``fenced``: its owner had not given it back by ``preempt_at``). The last ones only.
        self.preempted: dict[str, dict[str, Any]] = {}
        # Indexes kept beside ``leases`` so that no operation on one lease looks at every lease (see _index): names by
        # lease id, names by owner client, what the leases (and those being released) book on each worker (with how
        # many leases), and (deadline, name) of every expiry in a heap (a renewal pushes a new entry; old ones are
        # skipped when they come up).
        self._by_id: dict[str, str] = {}
        self._by_client: dict[str, set[str]] = {}
        self._booked: dict[str, Amounts] = {}
        self._booked_n: dict[str, int] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._preempting: set[str] = set()
        # Each worker's own capacity (threads, memory, its resources that are not lease marks), read once: a worker's
        # resources hold a mark per lease on it, too many to filter on every request. Read again when the worker
        # joins again or sets its resources.
        self._base: dict[str, tuple[Amounts, Amounts]] = {}
        # Marks to set and drop on each worker, sent together: one message per worker for all that came meanwhile.
        self._marks: dict[str, _MarkQueue] = {}
        # Answers held back for a request (see reserve), by lease name: set when that request may get through now.
        self._wake: dict[str, asyncio.Event] = {}
        self._reaps = 0
        self._dumped: dict[Any, bytes] = {}  # what runs on workers, pickled

    # -- plugin hooks --------------------------------------------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self._changed = asyncio.Event()
        scheduler.handlers.update(
            {
                "gridboost_reserve": self.reserve,
                "gridboost_release": self.release,
                "gridboost_extend": self.extend,
                "gridboost_renew": self.renew,
                "gridboost_get": self.get,
                "gridboost_leases": self.list,
                "gridboost_settle": self.settle,
                "gridboost_set_quota": self.set_quota,
                "gridboost_quotas": self.quotas,
                "gridboost_over_quota": self.over_quota,
                "gridboost_notices": self.notices,
            }
        )
        # A worker that sets its own resources (Worker.set_resources) may change its capacity: read it again.
        original = scheduler.handlers.get("set_resources")
        if original is not None:

            def set_resources(*args: Any, **kwargs: Any) -> Any:
                self._base.pop(str(kwargs.get("worker", "")), None)
                return original(*args, **kwargs)

            scheduler.handlers["set_resources"] = set_resources
        callback = PeriodicCallback(self.reap, self.interval * 1000)
        scheduler.periodic_callbacks[REGISTRY] = callback  # the scheduler stops it when it closes
        callback.start()

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        self._base.pop(worker, None)
        for name, lease in self.leases.items():
            if worker in lease["placements"] and lease["state"] != "lost":
                lease["state"] = "lost"
                lease["lost"] = f"worker {worker} left the cluster ({stimulus_id})"
                self.arbiter.unhold(name)  # a lost lease holds nothing

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self._base.pop(worker, None)
        self._notify()  # more room: the request whose turn it is may fit now

    def add_client(self, scheduler: Scheduler, client: str) -> None:
        self._gone.pop(client, None)  # a client that reconnects keeps its leases

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        if self._by_client.get(client):
            self._gone[client] = time.time()
        # A request of a client that left is nobody's: it must not hold back those behind it until it goes stale.
        gone = [name for name, ticket in self.arbiter.pending.items() if ticket.get("client") == client]
        for name in gone:
            self.arbiter.leave(name)
        if gone:
            self._notify()

    # -- turns, quotas, tokens -----------------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Something changed that may let a waiting request through: wake the answers held back (see :meth:`reserve`)
        of the request whose turn it is and of those a quota holds back, which look again at once. The others would
        only be told to wait again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()
        for name in self.arbiter.to_wake() if self._wake else ():
            event = self._wake.get(name)
            if event is not None:
                event.set()

    # -- the books beside ``leases`` --------------------------------------------------------------------------------

    def _index(self, name: str, record: dict[str, Any]) -> None:
        """Add a lease to ``leases`` and to every index; its capacity is booked on its workers from now on."""
        self.leases[name] = record
        self._by_id[record["id"]] = name
        self._by_client.setdefault(record["client"], set()).add(name)
        self._book(record, 1.0)
        self._due(name, record)
        if record["state"] != "lost":  # what the arbiter counts for the tenant's quota
            self.arbiter.hold(name, record.get("tenant", ""), record.get("total") or {})

    def _unindex(self, name: str) -> dict[str, Any] | None:
        """Take a lease out of ``leases`` and the indexes (``None`` if it is not there). Its capacity stays booked:
        the caller unbooks it (``_book(record, -1)``) once its marks are gone."""
        record = self.leases.pop(name, None)
        if record is None:
            return None
        if self._by_id.get(record["id"]) == name:
            del self._by_id[record["id"]]
        names = self._by_client.get(record["client"])
        if names is not None:
            names.discard(name)
            if not names:
                del self._by_client[record["client"]]
        self._preempting.discard(name)
        self.arbiter.unhold(name)
        return record

    def _book(self, record: Mapping[str, Any], sign: float) -> None:
        """Add (``sign`` 1) or remove (-1) what a lease holds on each worker to what the leases book there."""
        for addr, amounts in record["amounts"].items():
            left = self._booked_n.get(addr, 0) + int(sign)
            if left <= 0:  # the last one: exactly nothing, not what rounding left over
                self._booked.pop(addr, None)
                self._booked_n.pop(addr, None)
                continue
            self._booked_n[addr] = left
            add(self._booked.setdefault(addr, {}), amounts, sign)

    def _due(self, name: str, record: Mapping[str, Any]) -> None:
        """Note when the reaper must look at a lease again: its expiry plus grace (after each renewal, anew)."""
        heapq.heappush(self._deadlines, (float(record["expires_at"]) + float(record["grace"]), name))

    def _find(self, lease_id: str) -> dict[str, Any] | None:
        name = self._by_id.get(lease_id)
        return None if name is None else self.leases.get(name)

    def _leave(self, name: str, client: str | None = None) -> None:
        """The request ``name`` was granted or given up (by ``client``, when given): its ticket goes."""
        ticket = self.arbiter.pending.get(name)
        if ticket is not None and (client is None or ticket.get("client") == client):
            self.arbiter.leave(name)
            self._notify()

    def set_quota(self, tenant: str, amounts: Mapping[str, float] | None) -> None:
        """Cap what ``tenant``'s leases hold together (flat amounts); ``None`` clears the cap."""
        self.arbiter.set_quota(tenant, amounts)
        self._notify()

    def quotas(self) -> list[dict[str, Any]]:
        """Every quota with what its tenant's leases hold now."""
        return self.arbiter.quota_rows()

    def over_quota(self, tenant: str, amounts: Mapping[str, float]) -> str:
        """Why a request of ``amounts`` by ``tenant`` would pass its quota now; ``""`` when it would not."""
        return self.arbiter.over_quota(tenant, amounts)

    def pending(self) -> list[dict[str, Any]]:
        """The waiting requests in the order they will be served, as lease records (``state`` ``pending``)."""
        return [
            {
                **ticket,
                "name": ticket["id"],
                "id": ticket.get("lease", ticket["id"]),
                "state": "pending",
                "expires_at": 0.0,
                "token": 0,
                "placements": [],
                "position": position,
            }
            for position, ticket in enumerate(self.arbiter.waiting())
        ]

    # -- handlers ------------------------------------------------------------------------------------------------------

    def _own(self, addr: str, ws: Any) -> tuple[Amounts, Amounts]:
        """A worker's own capacity (its threads as ``cpu``, ``memory_limit``, its resources), and its resources that
        are not lease marks."""
        own = self._base.get(addr)
        if own is None:
            resources = {k: float(v) for k, v in ws.resources.items() if not k.startswith(LEASE_PREFIX)}
            own = self._base[addr] = (
                {"cpu": float(ws.nthreads), "memory": float(ws.memory_limit or 0), **resources},
                resources,
            )
        return own

    def _rooms(self, candidates: Sequence[str] | None, *, free: bool) -> dict[str, Amounts]:
        """What each running worker (of ``candidates``) has: in all, or (``free``) less what the leases book there."""
        assert self.scheduler is not None
        rooms: dict[str, Amounts] = {}
        for addr, ws in self.scheduler.workers.items():
            if candidates is not None and addr not in candidates:
                continue
            if ws.status.name not in ("running", "paused"):
                continue
            room = dict(self._own(addr, ws)[0])
            booked = self._booked.get(addr) if free else None
            if booked:
                add(room, booked, -1.0)
            rooms[addr] = room
        return rooms

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Every worker as the backend's snapshot reads it, in one small answer: name, host, status, threads,
        ``memory_limit``, its own resources (no lease marks), what it measured (``metrics``: cpu, memory) and what the
        leases book on it (``held``). Its size grows with the workers, not with the leases."""
        assert self.scheduler is not None
        out: dict[str, dict[str, Any]] = {}
        for addr, ws in self.scheduler.workers.items():
            metrics = ws.metrics or {}
            out[addr] = {
                "name": ws.name,
                "host": ws.host,
                "status": ws.status.name,
                "nthreads": ws.nthreads,
                "memory_limit": ws.memory_limit,
                "resources": dict(self._own(addr, ws)[1]),
                "metrics": {k: metrics[k] for k in ("cpu", "memory") if k in metrics},
                "held": dict(self._booked.get(addr, {})),
            }
        return out

    async def reserve(
        self,
        lease: dict[str, Any],
        candidates: list[str] | None = None,
        ticket: dict[str, Any] | None = None,
        hold: float = 0.0,
    ) -> dict[str, Any]:
        """Place and mark ``lease`` if it is its turn and it fits now: ``granted`` (with its fencing ``token``),
        ``wait`` (``ahead`` requests come first), ``quota`` (``why``: its tenant's quota holds it back), ``busy`` (its
        turn, no room yet), ``never`` (not here) or ``taken`` (another owner's lease of that id).

        ``ticket`` (see :class:`~gridboost.worker_leases.Arbiter`) queues the request across owners: it stays while
        the request waits or is busy, so it holds back those behind it, and goes when it is granted, can never be
        placed, or is given up (:meth:`release`). An answer that is not a grant is held back up to ``hold`` seconds:
        when something changes that may let this request through (it is first in line now, or its tenant's quota
        may have room), it is tried again right here, so a request learns of its turn (and is granted) without a round
        trip, and only that one request looks again, not every waiting one.
        """
        assert self._changed is not None
        name = lease["name"]
        # Capped well below worker_leases.STALE: the owner's next ask is what keeps its ticket alive.
        deadline = time.monotonic() + min(hold, 2.0)
        while True:
            changed = self._changed
            answer = await self._reserve(lease, candidates, ticket)
            left = deadline - time.monotonic()
            if answer["status"] not in ("wait", "quota", "busy") or left <= 0:
                return answer
            if ticket is None:  # no place in line: held back until anything changes
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
                return answer
            event = self._wake[name] = asyncio.Event()
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return answer
            finally:
                if self._wake.get(name) is event:
                    del self._wake[name]
            if name not in self.arbiter.pending and name not in self.leases:
                return answer  # given up (released) or its client left meanwhile: not queued again here

    async def _reserve(
        self, lease: dict[str, Any], candidates: list[str] | None, ticket: dict[str, Any] | None
    ) -> dict[str, Any]:
        name = lease["name"]
        if name in self.leases:
            record = self.leases[name]
            if record["client"] != lease["client"]:  # a detached lease of the same id, of another owner
                return {"status": "taken", "why": f"lease {record['id']} is held by {record['owner']}"}
            return {
                "status": "granted",
                "placements": record["placements"],
                "slots": record["slots"],
                "token": record.get("token", 0),
            }
        amounts: Amounts = lease["amounts"]
        strategy = lease["strategy"]
        totals = self._rooms(candidates, free=False)
        if not totals:
            self._leave(name)
            return {"status": "never", "why": "no running worker matches", "missing": amounts}
        one_node = any(fits(amounts, room) for room in totals.values())
        bundles = split(amounts, strategy, one_node)
        if place(bundles, totals, strategy) is None:
            whole: Amounts = {}
            for room in totals.values():
                add(whole, room)
            why = (
                f"no set of the {len(totals)} matching workers could ever hold its bundles {bundles} "
                f"(strategy {strategy})"
            )
            self._leave(name)
            return {"status": "never", "why": why, "missing": missing(amounts, whole)}
        if ticket is not None:
            turn = self.arbiter.ask({**ticket, "id": name})  # quotas: the arbiter's running sums (see _index)
            if turn["status"] != "turn":
                return turn
        rooms = self._rooms(candidates, free=True)
        chosen = place(bundles, rooms, strategy)
        if chosen is None and ticket is not None:
            self._preempt_for(name, ticket, bundles, strategy, rooms)
        if chosen is None:
            free: Amounts = {}
            for room in rooms.values():
                add(free, {k: max(0.0, v) for k, v in room.items()})
            return {"status": "busy", "missing": missing(amounts, free), "free": free}
        per_worker: dict[str, Amounts] = {}
        for addr, bundle in zip(chosen, bundles, strict=True):
            add(per_worker.setdefault(addr, {}), bundle)
        # Recorded before the first await: from here on no other lease can take this capacity, and a release finds it.
        record = {
            **lease,
            "placements": chosen,
            "amounts": per_worker,
            "slots": {addr: a.get("cpu", 0.0) or 1.0 for addr, a in per_worker.items()},
            "state": "granting",
            "lost": "",
            "expires_at": time.time() + lease["ttl"],
            # Taken before the first await: tokens grow in the order leases are placed.
            "token": self.arbiter.token(),
            "granted_at": time.time(),
            "requested_at": float(ticket["requested_at"]) if ticket is not None else time.time(),
        }
        self._index(name, record)
        # Its capacity is booked: the next in line may be placed while this one is marked (should marking fail, the
        # owner asks again with the same ticket, which keeps its place by the time it was first asked).
        self._leave(name)
        marked = self._marking[name] = asyncio.Event()
        try:
            failed = await self._mark(name, record["slots"])
        finally:
            marked.set()
            del self._marking[name]
        if name not in self.leases:  # released while it was being marked
            return {"status": "busy", "missing": {}, "free": {}}
        if failed:
            await self._unmark(name, list(record["slots"]))
            if self._unindex(name) is not None:
                self._book(record, -1.0)
            return {"status": "busy", "missing": {}, "free": {}, "why": failed}
        record["state"] = "active"
        return {"status": "granted", "placements": chosen, "slots": record["slots"], "token": record["token"]}

    async def release(self, name: str, client: str | None = None, wait: float = 0.0) -> dict[str, Any]:
        """Remove a lease and its marks; idempotent (``released`` is false when there was none). With ``client``: only
        if that client took it (a backend undoing its own request never removes another owner's lease of the same
        name). A worker whose task still holds some of the lease keeps its mark until that task ends: with ``wait``,
        this waits up to that many seconds for it; ``marked`` lists the workers that still show it."""
        marking = self._marking.get(name)
        if marking is not None:
            await marking.wait()
        record = self.leases.get(name)
        if record is not None and client is not None and record["client"] != client:
            return {"released": False, "marked": []}  # another owner's: not ours to touch
        self._leave(name, client)  # a request given up, or released as it was granted
        if record is None:  # released already; a mark may still wait for its last task
            left = await self._unmark(name, self._marked(name)) if wait else self._marked(name)
            return {"released": False, "marked": await self._until_unmarked(name, left, wait)}
        self._unindex(name)
        if record["state"] == "preempting":  # given back within its grace (or fenced: _take_back says so after)
            self._remember_preempted(name, record, fenced=False)
        self._releasing[name] = record
        try:
            left = await self._unmark(name, list(record["slots"]))
        finally:
            del self._releasing[name]
            self._book(record, -1.0)
            self._notify()  # room, and quota, for the request whose turn it is
        return {"released": True, "marked": await self._until_unmarked(name, left, wait)}

    async def _until_unmarked(self, name: str, addrs: list[str], wait: float) -> list[str]:
        deadline = time.monotonic() + wait
        pause = 0.005
        while addrs and time.monotonic() < deadline:
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, _SETTLE_POLL)
            addrs = await self._unmark(name, addrs)
        return addrs

    def _marked(self, name: str) -> list[str]:
        """The workers the scheduler's books say hold resource ``name``."""
        assert self.scheduler is not None
        return [addr for addr, ws in self.scheduler.workers.items() if name in ws.resources]

    async def settle(self, prefix: str, lease_prefix: str, session: str, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds until neither this scheduler nor any worker shows anything of one backend —
        no lease record, no lease mark, no task; what still shows then, named (empty: nothing)."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            remains = await self._remains(prefix, lease_prefix, session)
            if not remains or time.monotonic() >= deadline:
                return remains
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, _SETTLE_POLL)

    async def _remains(self, prefix: str, lease_prefix: str, session: str) -> list[str]:
        scheduler = self.scheduler
        assert scheduler is not None
        remains = [
            f"lease {r['id']} is still in the scheduler's registry ({r['state']})"
            for r in self.leases.values()
            if r["session"] == session
        ]
        tasks = [(str(key), ts.state) for key, ts in scheduler.tasks.items() if str(key).startswith(prefix)]
        if tasks:
            remains.append(f"the scheduler still has {len(tasks)} task(s), e.g. {tasks[0][0]} ({tasks[0][1]})")
        marks: dict[str, list[str]] = {}
        for addr, ws in scheduler.workers.items():
            for name in ws.resources:
                if name.startswith(lease_prefix):
                    marks.setdefault(name, []).append(addr)
        on_workers = await self._run_on(list(scheduler.workers), ours_on_worker, prefix, lease_prefix)
        for addr, (ok, found) in on_workers.items():
            if not ok:
                remains.append(f"worker {addr} could not say what it holds: {_cut(str(found))}")
                continue
            for name in found["marks"]:
                if addr not in marks.setdefault(name, []):
                    marks[name].append(addr)
            if found["tasks"]:
                remains.append(f"worker {addr} still has {len(found['tasks'])} task(s), e.g. {found['tasks'][0]}")
        for name, addrs in marks.items():
            if name not in self.leases and name not in self._marking:  # released: its mark waits for a task to end
                addrs = await self._unmark(name, addrs)
            if addrs:
                remains.append(f"lease mark {name} is still on worker(s) {', '.join(sorted(addrs))}")
        return remains

    def extend(self, name: str = "", ttl: float = 0.0, many: Sequence[tuple[str, float]] = ()) -> Any:
        """Move lease ``name`` to expire ``ttl`` seconds from now; ``False`` if there is no such lease. With ``many``
        (pairs of name and ttl, an owner's renewals sent together), each of them: a list of those answers."""
        if many:
            return [self._extend(n, t) for n, t in many]
        return self._extend(name, ttl)

    def _extend(self, name: str, ttl: float) -> bool:
        record = self.leases.get(name)
        if record is None:
            return False
        record["ttl"] = ttl
        record["expires_at"] = time.time() + ttl
        self._due(name, record)
        return True

    def renew(self, lease_id: str, ttl: float) -> dict[str, Any] | None:
        """Move any owner's lease to expire ``ttl`` seconds from now (a lost one stays as it is); its record, or
        ``None`` when there is no such lease."""
        record = self._find(lease_id)
        if record is not None and record["state"] != "lost":
            record["ttl"] = ttl
            record["expires_at"] = time.time() + ttl
            self._due(self._by_id[lease_id], record)
        return None if record is None else dict(record)

    def get(self, lease_id: str) -> dict[str, Any] | None:
        record = self._find(lease_id)
        return None if record is None else dict(record)

    def list(self, pending: bool = False, nodes: bool = False) -> Any:
        """Every lease record; with ``pending``, the waiting requests too (see :meth:`pending`). With ``nodes``, the
        workers instead (see :meth:`nodes`): a keyword an older registry refuses, so a backend knows to read them as
        it did."""
        if nodes:
            return self.nodes()
        records = [dict(record) for record in self.leases.values()]
        return records + self.pending() if pending else records

    # -- preemption and fencing ---------------------------------------------------------------------------------------

    def _preempt_for(
        self,
        name: str,
        ticket: Mapping[str, Any],
        bundles: Sequence[Amounts],
        strategy: str,
        rooms: Mapping[str, Amounts],
    ) -> None:
        """Mark the leases to take back so that request ``name`` (its turn, no room) fits, if any may be taken."""
        if any(r.get("preempted_for") == ticket.get("lease", name) for r in self.leases.values()):
            return  # its victims are being taken back: none more until they are gone
        pool = [
            {
                "id": key,
                "owner": r["owner"],
                "priority": r["priority"],
                "preemptible": r.get("preemptible", False),
                "state": r["state"],
                "granted_at": r.get("granted_at", 0.0),
            }
            for key, r in self.leases.items()
            if r.get("preemptible") and r["state"] == "active"
        ]
        if not pool:
            return

        def frees(chosen: list[Mapping[str, Any]]) -> bool:
            room = {addr: dict(free) for addr, free in rooms.items()}
            for victim in chosen:
                for addr, amounts in self.leases[victim["id"]]["amounts"].items():
                    if addr in room:
                        add(room[addr], amounts)
            return place(bundles, room, strategy) is not None

        victims = Arbiter.victims({**ticket, "id": name}, pool, frees)
        now = time.time()
        for victim in victims or ():
            record = self.leases[victim["id"]]
            self._preempting.add(victim["id"])
            record["state"] = "preempting"
            record["preempt_at"] = now + float(record.get("preempt_grace", 10.0))
            record["preempted_for"] = ticket.get("lease", name)
            _log.info(
                "gridboost: taking lease %s of %s back for request %s of %s in %.3gs",
                record["id"],
                record["owner"],
                record["preempted_for"],
                ticket.get("owner"),
                record["preempt_at"] - now,
            )

    def _remember_preempted(self, name: str, record: Mapping[str, Any], fenced: bool) -> None:
        self.preempted[name] = {
            "id": record["id"],
            "owner": record["owner"],
            "preempt_at": record.get("preempt_at", 0.0),
            "preempted_for": record.get("preempted_for", ""),
            "gone_at": time.time(),
            "fenced": fenced,
        }
        while len(self.preempted) > _PREEMPTED_KEPT:
            del self.preempted[next(iter(self.preempted))]

    def notices(
        self, session: str = "", ids: Sequence[str] = (), many: Sequence[tuple[str, Sequence[str]]] = ()
    ) -> Any:
        """Of a backend's leases (by id), those that are not simply held: ``preempting`` (with ``preempt_at`` and
        ``preempted_for``), ``preempted`` (taken back already), ``lost`` (with why) or ``gone``: what its watch asks.
        With ``many`` (pairs of session and ids: the watches of an owner process, asked together), a list of those."""
        if many:
            return [self._notices(s, i) for s, i in many]
        return self._notices(session, ids)

    def _notices(self, session: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for lease_id in ids:
            name = f"{LEASE_PREFIX}{session}:{lease_id}"
            record = self.leases.get(name)
            if record is None:
                taken = self.preempted.get(name)
                out[lease_id] = {**taken, "state": "preempted"} if taken is not None else {"state": "gone"}
            elif record["state"] in ("preempting", "lost"):
                out[lease_id] = {k: record.get(k) for k in ("state", "lost", "preempt_at", "preempted_for")}
        return out

    def _cancel_work(self, name: str, why: str) -> int:
        """Cancel, on the scheduler, every task not yet done whose resource restrictions name lease ``name``: what
        is queued never starts (a running one's worker is told; a command stops its process); how many."""
        scheduler = self.scheduler
        assert scheduler is not None
        by_client: dict[str, list[Any]] = {}
        for key, ts in scheduler.tasks.items():
            if ts.state in ("memory", "erred", "released", "forgotten") or not ts.who_wants:
                continue
            if name in (ts.resource_restrictions or {}):
                by_client.setdefault(next(iter(ts.who_wants)).client_key, []).append(key)
        for client, keys in by_client.items():
            scheduler.stimulus_cancel(keys, client, force=True, reason="gridboost", msg=_cut(why))
        return sum(len(keys) for keys in by_client.values())

    async def _fence(self, name: str, why: str) -> None:
        """Remove a lease on this registry's own decision: its engine work is cancelled, then its marks go."""
        record = self.leases.get(name)
        if record is None:
            return
        _log.info("gridboost: removing lease %s of %s: %s", record["id"], record["owner"], why)
        cancelled = self._cancel_work(name, f"lease {record['id']} was removed: {why}")
        if cancelled:
            _log.info("gridboost: cancelled %d task(s) of lease %s", cancelled, record["id"])
        preempting = record["state"] == "preempting"
        await self.release(name)
        if preempting:
            self._remember_preempted(name, record, fenced=True)

    # -- marks on workers ----------------------------------------------------------------------------------------------

    async def _run_on(self, addrs: Sequence[str], fn: Any, *args: Any) -> dict[str, tuple[bool, Any]]:
        """Run ``fn(*args, dask_worker=...)`` on each worker: ``{addr: (ok, result or error)}``."""
        from distributed.protocol.pickle import dumps
        from distributed.protocol.serialize import Serialized, deserialize

        assert self.scheduler is not None
        live = [addr for addr in addrs if addr in self.scheduler.workers]
        if not live:
            return {}
        function = self._dumped.get(fn)
        if function is None:  # pickled once: a function of this module travels by value, its code with it
            function = self._dumped[fn] = dumps(fn)  # type: ignore[no-untyped-call]
        msg = {"op": "run", "function": function, "args": dumps(args), "wait": True}  # type: ignore[no-untyped-call]
        answers = await self.scheduler.broadcast(msg=msg, workers=live, on_error="return")
        results: dict[str, tuple[bool, Any]] = {}
        for addr, answer in answers.items():
            if isinstance(answer, dict) and answer.get("status") == "OK":
                result = answer.get("result")
                # The scheduler passes a worker's answer on as it came, still serialised.
                if isinstance(result, Serialized):
                    result = deserialize(result.header, result.frames)  # type: ignore[no-untyped-call]
                results[addr] = (True, result)
            else:
                results[addr] = (False, answer.get("exception_text", answer) if isinstance(answer, dict) else answer)
        return results

    async def _mark(self, name: str, slots: Mapping[str, float]) -> str:
        answers = await asyncio.gather(*(self._on_worker(addr, name, n) for addr, n in slots.items()))
        for addr, (ok, detail) in zip(slots, answers, strict=True):
            if not ok:
                return f"could not mark the lease on worker {addr}: {detail}"
        return ""

    async def _unmark(self, name: str, addrs: Sequence[str]) -> list[str]:
        """Drop the lease's resource on ``addrs``; the workers that still show it (to the scheduler or themselves)."""
        answers = await asyncio.gather(*(self._on_worker(addr, name, None) for addr in addrs))
        left = []
        for addr, (ok, dropped) in zip(addrs, answers, strict=True):
            if ok and dropped is True:
                self._forget(addr, name)
            ws = self.scheduler.workers.get(addr) if self.scheduler is not None else None
            if ws is None:
                self._forget(addr, name)
            elif not (ok and dropped is True) or name in ws.resources:
                left.append(addr)
        return left

    async def _on_worker(self, addr: str, name: str, amount: float | None) -> tuple[bool, Any]:
        """Set (``amount``) or drop (``None``) lease mark ``name`` on worker ``addr``: ``(True, dropped)``, or
        ``(False, why)``. Marks asked for meanwhile go to a worker together, in one message (see _send_marks)."""
        queue = self._marks.get(addr)
        if queue is None:
            queue = self._marks[addr] = _MarkQueue()
        future: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        queue.ops.append((name, amount, future))
        if queue.task is None:
            queue.task = asyncio.get_running_loop().create_task(self._send_marks(addr, queue))
        return await future

    async def _send_marks(self, addr: str, queue: _MarkQueue) -> None:
        """Send worker ``addr`` the marks asked for, all of them in one message, until none are left; then the
        scheduler's books of those names (the worker's first: no task is sent there for a mark it lacks)."""
        ops: list[tuple[str, float | None, asyncio.Future[tuple[bool, Any]]]] = []
        try:
            while queue.ops:
                ops, queue.ops = queue.ops, []
                sets = {name: amount for name, amount, _ in ops if amount is not None}
                drops = [name for name, amount, _ in ops if amount is None]
                try:
                    answers = await self._run_on([addr], lease_marks, sets, drops)
                except Exception as exc:
                    answers = {addr: (False, f"{type(exc).__name__}: {_cut(str(exc))}")}
                ok, result = answers.get(addr, (None, None))  # None: the worker left (it holds nothing)
                if ok:
                    self._books(addr, sets, result)
                for name, amount, future in ops:
                    if future.done():
                        continue
                    if ok is None:
                        future.set_result((False, "the worker left") if amount is not None else (True, True))
                    elif not ok:
                        future.set_result((False, result))
                    else:
                        future.set_result((True, True if amount is not None else result.get(name, True)))
                ops = []
        finally:  # stopped (the scheduler closes): nobody waits forever
            for _, _, future in [*ops, *queue.ops]:
                if not future.done():
                    future.set_result((False, "the lease registry stopped"))
            queue.ops = []
            queue.task = None
            if self._marks.get(addr) is queue:
                del self._marks[addr]

    def _books(self, addr: str, sets: Mapping[str, float], dropped: Mapping[str, bool]) -> None:
        """The scheduler's books of marks just set on worker ``addr``, and of those it could only set to 0."""
        scheduler = self.scheduler
        assert scheduler is not None
        ws = scheduler.workers.get(addr)
        if ws is None:
            return
        zeroed = {name: 0.0 for name, gone in dropped.items() if not gone and name in ws.resources}
        for name, amount in {**sets, **zeroed}.items():
            ws.resources[name] = amount
            ws.used_resources.setdefault(name, 0.0)
            scheduler.resources.setdefault(name, {})[addr] = amount

    def _forget(self, addr: str, name: str) -> None:
        """Remove a dropped lease resource from the scheduler's books too, unless a task there still counts on it."""
        scheduler = self.scheduler
        assert scheduler is not None
        ws = scheduler.workers.get(addr)
        if ws is not None:
            if any(name in (ts.resource_restrictions or {}) for ts in ws.processing):
                return
            ws.resources.pop(name, None)
            ws.used_resources.pop(name, None)
        holders = scheduler.resources.get(name)
        if holders is not None:
            holders.pop(addr, None)
            if not holders:
                del scheduler.resources[name]

    # -- the reaper ----------------------------------------------------------------------------------------------------

    async def reap(self) -> None:
        """Remove leases past TTL + grace or whose owner has been gone longer than the grace (detached ones: only past
        TTL + grace), and those taken back whose owner did not give them back in time; now and then sweep stale marks.

        Each round looks only at what may be due: the expiries that came up in the heap (a renewed lease has a later
        entry there), the leases of the clients that left, and those being taken back; not at every lease."""
        now = time.time()
        due: dict[str, str] = {}
        while self._deadlines and self._deadlines[0][0] < now:
            _, name = heapq.heappop(self._deadlines)
            record = self.leases.get(name)
            if record is not None and now > record["expires_at"] + record["grace"]:
                due[name] = "its TTL and grace passed"
        for client, since in self._gone.items():
            for name in self._by_client.get(client, ()):
                record = self.leases[name]
                if not record.get("detached") and now > since + record["grace"]:
                    due.setdefault(name, f"its owner {record['owner']} disconnected")
        for name in self._preempting:
            record = self.leases.get(name)
            if record is not None and record["state"] == "preempting" and now >= record["preempt_at"] + PREEMPT_SLACK:
                due[name] = f"taken back for request {record['preempted_for']}; its owner did not give it back in time"
        for name, why in due.items():
            try:
                await self._fence(name, why)
            except Exception:  # the next round tries again
                record = self.leases.get(name)
                if record is not None:
                    self._due(name, record)
        self._gone = {c: t for c, t in self._gone.items() if self._by_client.get(c)}
        if self.arbiter.sweep():  # owners that stopped asking: those behind them move up
            self._notify()
        self._reaps += 1
        if self._reaps % _SWEEP_EVERY == 0:
            await self._sweep()

    async def _sweep(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        stale: dict[str, list[str]] = {}
        for addr, ws in scheduler.workers.items():
            for name in ws.resources:
                known = (self.leases, self._marking, self._releasing)
                if name.startswith(LEASE_PREFIX) and not any(name in books for books in known):
                    stale.setdefault(name, []).append(addr)
        for name, addrs in stale.items():
            with contextlib.suppress(Exception):
                await self._unmark(name, addrs)
