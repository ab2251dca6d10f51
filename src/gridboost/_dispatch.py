"""Where capacity is, by this grid's own books, and the moves of work that waits for it.

Placement is decided when a task is submitted (or, for ``await grid.offload``, when
its coroutine first runs), and the capacity it will use is *claimed at that moment*
in a ledger — the host's, the cluster's or a boost's — so a burst of submissions sees
the room shrink one task at a time instead of all seeing the same free capacity.
A claim is given back when the task ends or moves.

Work that found no room anywhere waits for local capacity (a ``waiting`` placement).
It moves, before it starts and never after:

* onto a boost as the boost becomes active — at most ``auto_offload_limit`` tasks per
  activation, chosen by the ``gridboost_offload_candidates`` hook; an activation that
  comes within ``auto_offload_backoff`` seconds of the previous one that moved work
  gets half of that one's budget (5, 2, 1, 1, ...; never below one), so a burst of
  activations does not empty the host's queue onto leases that may be short-lived;
* into room that frees on the cluster or in a boost (a remote task of this grid ended,
  the cluster grew), oldest first, one task per freed slot.

``grid.auto_offload = False`` stops both at once; placement at submit is unaffected.
The cluster's capacity is what the engine's snapshot says its live nodes have (read at
enter and every few seconds), less what this grid's boosts hold there. Others' use of
the cluster is not subtracted: where they take capacity, the engine queues our work.
Automatic placement hands the cluster up to ``cluster_queue`` (default 0.5) of its
capacity beyond it: work the engine holds queued starts the moment a slot frees, instead
of a round trip later when this grid hears of it and sends the next task. Short tasks
need that to keep remote slots busy; for long ones, ``cluster_queue=0`` keeps every task
here until the cluster really has room.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio

from ._book import BoostBook
from ._boost import Boost
from ._ledger import Ledger
from ._plugins import call_decision
from ._records import BoostState
from ._resources import Resources
from ._runtime import Runtime
from ._spec import Placement, TaskSpec
from .exceptions import GridboostError, PolicyError

if TYPE_CHECKING:
    from ._task import Run

__all__ = ["FITS_HERE", "Dispatch", "Move"]

log = logging.getLogger("gridboost")

#: Seconds between two reads of the cluster's capacity.
VIEW_REFRESH = 5.0
# A refill looks this far down the queue for a task that fits the freed room, then stops:
# a long queue of tasks too large for it must not make every completion cost O(queue).
_REFILL_LOOKAHEAD = 64


#: The default policy's placement of work that fits here. Such work may still wait a moment for a slot (tasks
#: reach the host's queue in the order the event loop runs them, not the order they were placed), so it moves
#: like ``waiting`` work if room frees elsewhere first. Work a plugin placed here stays here.
FITS_HERE = Placement("local", "fits in free local capacity")


class Move(Exception):
    """Not an error: the cause a queued run is cancelled with when it moves to another placement."""

    def __init__(self, placement: Placement) -> None:
        super().__init__(placement.kind)
        self.placement = placement


def _minus(total: Resources, held: Iterable[Resources]) -> Resources:
    left = total.as_dict()
    for amount in held:
        for key, value in amount.as_dict().items():
            left[key] = max(0.0, left.get(key, 0.0) - value)
    return Resources.coerce(left)


class Dispatch:
    """The ledgers of one grid, the work waiting for local capacity, and the moves out of that queue."""

    def __init__(self, runtime: Runtime, book: BoostBook) -> None:
        self._runtime = runtime
        self._book = book
        book.on_activated = self.boost_activated
        book.on_ended = self.boost_ended
        self.local = Ledger("local")
        self.cluster = Ledger("cluster", queue=runtime.settings.cluster_queue)
        self._cluster_total: Resources | None = None
        self.waiting: dict[Run, None] = {}  # insertion order: oldest first
        self._level = 0
        self._last_moved = -math.inf

    # -- claims -----------------------------------------------------------------------

    def ledger_of(self, placement: Placement) -> Ledger:
        if placement.boost is not None:
            return placement.boost.ledger
        return self.local if placement.kind == "local" else self.cluster

    def claim(self, run: Run) -> None:
        placement = run.placement
        assert placement is not None
        if run.spec.resources:
            ledger = self.ledger_of(placement)
            ledger.take(run.spec.resources)
            run.ledger = ledger
        if placement.waiting or placement is FITS_HERE:
            self.waiting[run] = None

    def release(self, run: Run) -> None:
        """The run ended: give its claim back, and let waiting work into remote room that freed."""
        self.waiting.pop(run, None)
        ledger = run.ledger
        if ledger is None:
            return
        run.ledger = None
        ledger.give(run.spec.resources)
        if ledger is not self.local and self.waiting:
            self.refill()

    def move(self, run: Run, placement: Placement) -> None:
        """Move a run that has not started: its claim goes with it, and it re-enters at ``placement`` as it wakes."""
        self.waiting.pop(run, None)
        if run.ledger is not None:
            run.ledger.give(run.spec.resources)
            run.ledger = None
        run.cancel(Move(placement))
        if run.placement is not None and run.placement.boost is not None:
            run.placement.boost.work.discard(run)  # out of the boost it leaves now: its end must not wait for it
        run.placement = placement  # what its handle says from now on; the run re-enters it as it wakes
        self.claim_moved(run, placement)
        counts = self._runtime.counts
        counts["moves"] += 1
        counts[f"moves.{placement.kind}"] += 1

    def claim_moved(self, run: Run, placement: Placement) -> None:
        if run.spec.resources:
            ledger = self.ledger_of(placement)
            ledger.take(run.spec.resources)
            run.ledger = ledger

    # -- where there is room ------------------------------------------------------------

    def remote_can_run(self, task: TaskSpec) -> bool:
        try:
            self._runtime.backend.check_task(task)
        except GridboostError:
            return False
        return True

    def remote_room(self, task: TaskSpec, why: str) -> Placement | None:
        """A boost of this grid with room for ``task``, else the cluster if it has room; ``None`` if neither."""
        amount = task.resources
        pending = Resources()
        for boost in self._book.boosts.values():
            if boost.is_active and boost.ledger.room_for(amount):
                return Placement("boost", f"{why}; boost {boost.id} has room", boost)
            if boost.state is BoostState.PENDING and self.cluster.could_hold(boost.resources):
                pending = pending + boost.resources  # (one that waits for growth is not kept room here)
        # Room a pending boost needs is kept for it: an engine places a reservation only once that much is free at
        # once, which never happens on a busy cluster if every freed slot goes to waiting work.
        if self.cluster.room_for(amount + pending if pending else amount):
            return Placement("cluster", f"{why}; the cluster has room")
        return None

    def refill(self) -> None:
        """Move the oldest waiting work into remote room that freed, one task per slot."""
        runtime = self._runtime
        if not runtime.settings.auto_offload or runtime.state != "open":
            return
        misses = 0
        for run in list(self.waiting):
            if not run.is_waiting_locally:
                del self.waiting[run]
                continue
            placement = self.remote_room(run.spec, "room freed while it waited for local capacity")
            if placement is None:
                misses += 1
                if misses >= _REFILL_LOOKAHEAD:
                    break
                continue
            if not self.remote_can_run(run.spec):
                del self.waiting[run]  # this one stays here for good
                continue
            self.move(run, placement)

    # -- boosts ---------------------------------------------------------------------------

    def boost_activated(self, boost: Boost) -> None:
        """A boost became active: take its capacity off the cluster's, and move queued work onto it."""
        self._update_cluster()
        runtime = self._runtime
        settings = runtime.settings
        if not settings.auto_offload or runtime.state != "open":
            return
        ledger = boost.ledger
        queued = {
            run.spec.id: run
            for run in runtime.runs
            if run.is_waiting_locally and run.spec.where == "auto" and ledger.room_for(run.spec.resources)
        }
        if not queued:
            return
        now = anyio.current_time()
        self._level = self._level + 1 if now - self._last_moved < settings.auto_offload_backoff else 0
        limit = settings.auto_offload_limit
        budget = max(1, limit >> self._level) if limit else 0
        try:
            chosen = call_decision(
                runtime.plugins.hook.gridboost_offload_candidates,
                "gridboost_offload_candidates",
                grid=runtime.view,
                boost=boost,
                queued=[run.spec for run in queued.values()],
                limit=budget,
            )
        except PolicyError as exc:  # the boost is granted either way; only the move is off
            runtime.log_error(f"choosing work to move onto boost {boost.id} failed", exc)
            return
        moved = 0
        for spec in list(chosen or ())[:budget]:
            run = queued.pop(getattr(spec, "id", None), None)  # type: ignore[arg-type]
            if run is None or not ledger.room_for(run.spec.resources) or not self.remote_can_run(run.spec):
                continue
            self.move(run, Placement("boost", f"moved onto boost {boost.id} when it became active", boost))
            moved += 1
        if moved:
            self._last_moved = now

    def boost_ended(self) -> None:
        self._update_cluster()
        if self.waiting:
            self.refill()

    # -- the cluster's capacity -----------------------------------------------------------

    def _update_cluster(self) -> None:
        if self._cluster_total is None:
            return
        held = [b.resources for b in self._book.boosts.values() if b.is_active]
        self.cluster.set_capacity(_minus(self._cluster_total, held) if held else self._cluster_total)

    async def read_cluster(self) -> None:
        """Ask the engine what its live nodes have; keep the last answer when it cannot say."""
        backend = self._runtime.backend
        try:
            with anyio.fail_after(min(self._runtime.settings.teardown_timeout, 30.0)):
                snapshot = await backend.snapshot()
        except Exception as exc:
            log.warning("reading the %s cluster's capacity failed: %s: %s", backend.name, type(exc).__name__, exc)
            return
        grew = self._cluster_total is None or not snapshot.total.fits_in(self._cluster_total)
        self._cluster_total = snapshot.total
        self._update_cluster()
        if grew and self.waiting:
            self.refill()

    async def watch_cluster(self) -> None:
        """Re-read the cluster's capacity every few seconds (nodes join and leave). A background loop."""
        while True:
            await anyio.sleep(VIEW_REFRESH)
            await self.read_cluster()
