"""The boost book: the life cycle of one grid's leases, the same for every backend.

Validation, the at-once refusal of a request larger than the cluster, priority order
among pending requests, the ``wait`` bound, TTL expiry, renewal and release live here;
the backend only reserves and releases. The book tells its peers what changed through
the callbacks it is given (dispatch moves work onto a boost that became active).

Priority order is enforced by a gate that lets one request at a time ask the
backend. A request of higher priority that arrives while a lower one is still
waiting for capacity *preempts* it: the lower one's reservation attempt is cancelled
(the backend undoes it) and it queues again, keeping its place among equals.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, Unpack

import anyio
from attrs import evolve

from ._boost import Boost, BoostOptions
from ._checks import flag, seconds
from ._records import STRATEGIES, BoostState, Lease, NodeSnapshot, Priority, Reservation, owner_name, priority_of
from ._resources import Resources
from ._runtime import Runtime
from ._text import shown
from .exceptions import (
    BoostExpired,
    BoostLost,
    BoostPreempted,
    BoostUnavailable,
    GridClosed,
    InvalidRequest,
    TaskCancelled,
)

__all__ = ["BoostBook", "labels_there"]

T = TypeVar("T")

#: What ``wait=0`` gives a request: one look at the engine, which answers in milliseconds when there is room (a
#: bound of 0 would cancel the request at its first await, before any engine is even asked).
ONE_LOOK = 1.0


class _Waiter:
    __slots__ = ("event", "granted", "key", "left", "scope")

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.event = anyio.Event()
        self.granted = False
        self.left = False
        self.scope: anyio.CancelScope | None = None

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


class _PriorityGate:
    """One request at a time asks the backend; the highest priority (then the oldest) goes first."""

    def __init__(self) -> None:
        self._heap: list[_Waiter] = []
        self._holder: _Waiter | None = None

    @asynccontextmanager
    async def hold(self, key: tuple[int, int]) -> AsyncIterator[_Waiter]:
        me = _Waiter(key)
        if self._holder is not None:
            heapq.heappush(self._heap, me)
            holder = self._holder
            if holder.scope is not None and me.key < holder.key:
                holder.scope.cancel()  # preempt: a lower-priority request is only waiting
            try:
                await me.event.wait()
            except BaseException:
                me.left = True
                if me.granted:
                    self._pass()
                raise
        self._holder = me
        me.scope = anyio.CancelScope()
        if self._heap and self._heap[0].key < me.key and not self._heap[0].left:
            me.scope.cancel()  # a better request arrived while we were being woken
        try:
            yield me
        finally:
            self._pass()

    def _pass(self) -> None:
        self._holder = None
        while self._heap:
            nxt = heapq.heappop(self._heap)
            if not nxt.left:
                nxt.granted = True
                self._holder = nxt  # reserved for it before it wakes, so no one jumps the queue
                nxt.event.set()
                return


class BoostBook:
    """The boosts of one grid: requests, TTL expiry, renewal and release."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        #: Told of each boost that became active, and of each that ended (dispatch listens).
        self.on_activated: Callable[[Boost], None] = lambda boost: None
        self.on_ended: Callable[[], None] = lambda: None
        self.on_preempted: Callable[[Boost], None] = lambda boost: None
        self._gate = _PriorityGate()
        self._seq = itertools.count()
        self.boosts: dict[str, Boost] = {}
        self._wake: anyio.Event | None = None
        self.outcomes: dict[str, int] = {
            s.value: 0 for s in BoostState if s not in (BoostState.PENDING, BoostState.ACTIVE)
        }
        self.granted = 0

    def make(self, resources: Any, **request: Unpack[BoostOptions]) -> Boost:
        """Validate every argument at the API boundary, before anything reaches the engine."""
        if "ttl" not in request:
            raise TypeError("a boost request needs the keyword argument 'ttl' (seconds)")
        ttl, strategy, wait = request["ttl"], request.get("strategy", "pack"), request.get("wait", 30.0)
        nodes, labels = request.get("nodes"), request.get("labels")
        amount = Resources.coerce(resources)
        if not amount:
            raise InvalidRequest("a boost must ask for some resources, got none")
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise InvalidRequest(f"strategy must be one of {', '.join(STRATEGIES)}, got {shown(strategy)}")
        level = priority_of(request.get("priority", Priority.NORMAL))
        if nodes is not None:
            if isinstance(nodes, str) or not isinstance(nodes, Sequence) or not all(isinstance(n, str) for n in nodes):
                raise InvalidRequest(f"nodes must be a list of node ids or addresses, got {shown(nodes)}")
            nodes = tuple(nodes)
        if labels is not None and (
            not isinstance(labels, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise InvalidRequest(f"labels must map strings to strings, got {shown(labels)}")
        boost = Boost(
            self,
            amount,
            tenant=self._runtime.settings.tenant,
            preemptible=flag("preemptible", request.get("preemptible", False)),
            ttl=seconds("ttl", ttl),
            priority=level,
            wait=seconds("wait", wait, allow_zero=True),
            strategy=strategy,
            nodes=nodes,
            labels=None if labels is None else dict(labels),
        )
        self._runtime.backend.check_reservation(boost.request())  # what the engine cannot express, refused here
        return boost

    async def grant(self, boost: Boost) -> Boost:
        """Wait (at most ``boost.wait``) until the backend holds the boost; fail with what was missing."""
        notify = self._runtime.observers.notify
        self.boosts[boost.id] = boost
        try:
            await self._refuse_impossible(boost)
            key = (-boost.priority, next(self._seq))
            # move_on_after, not fail_after: an engine's own TimeoutError (Ray's
            # GetTimeoutError is one) must not pass for our `wait` running out.
            with anyio.move_on_after(boost.wait or ONE_LOOK) as waited:
                reservation = await self._reserve_in_turn(boost, key)
            if waited.cancelled_caught:
                raise await self._not_granted(boost) from None
        except BaseException as exc:
            del self.boosts[boost.id]
            boost.state = BoostState.FAILED
            self.outcomes["failed"] += 1
            if isinstance(exc, Exception):
                boost.error = exc
                notify("gridboost_boost_failed", boost=boost, error=exc)
            raise
        boost.reservation = reservation
        boost.placements = reservation.placements
        boost.state = BoostState.ACTIVE
        boost.activated_at = time.time()
        boost.expires_at = boost.activated_at + boost.ttl
        boost._deadline = anyio.current_time() + boost.ttl
        self._poke()
        self.granted += 1
        notify("gridboost_boost_activated", boost=boost)
        self.on_activated(boost)
        return boost

    async def lease(self, boost: Boost) -> Lease:
        """Reserve ``boost``'s request as a *detached* lease: the engine's registry, not this grid, ends it.

        The same validation, refusal of the impossible, priority order and ``wait`` bound as
        :meth:`grant`; the grid keeps no record of it afterwards (no expiry, no release at teardown).
        """
        backend = self._runtime.backend
        if not backend.capabilities.shared_leases:
            raise InvalidRequest(
                f"the {backend.name} backend keeps leases inside one process; a lease that outlives it needs a "
                "backend with a lease registry on the cluster (ray, dask)"
            )
        await self._refuse_impossible(boost)
        key = (-boost.priority, next(self._seq))
        with anyio.move_on_after(boost.wait or ONE_LOOK) as waited:
            reservation = await self._reserve_in_turn(boost, key, detached=True)
        if waited.cancelled_caught:
            raise await self._not_granted(boost) from None
        return Lease(
            id=boost.id,
            backend=backend.name,
            resources=boost.resources,
            owner=owner_name(),
            state="active",
            priority=boost.priority,
            expires_at=time.time() + boost.ttl,
            placements=reservation.placements,
            token=reservation.token,
            tenant=boost.tenant,
            preemptible=boost.preemptible,
        )

    async def _not_granted(self, boost: Boost) -> BoostUnavailable:
        await self._runtime.backend.check_quota(boost.request())  # QuotaExceeded when the quota held it back
        snapshot = await self._runtime.backend.snapshot()
        room = sum((n.available for n in snapshot.matching(boost.nodes, boost.labels)), Resources())
        return BoostUnavailable(
            f"boost {boost.id} ({boost.resources.human()}) was not granted within {boost.wait:g}s: "
            f"missing {boost.resources.shortfall(room).human()} (free now: {room.human()})"
        )

    async def _refuse_impossible(self, boost: Boost) -> None:
        backend = self._runtime.backend
        if not backend.capabilities.reserve:
            raise BoostUnavailable(f"the {backend.name} backend cannot reserve capacity")
        snapshot = await backend.snapshot()
        nodes = snapshot.matching(boost.nodes, boost.labels)
        growable = backend.capabilities.grow and boost.nodes is None  # new nodes may carry the labels
        if not nodes and (boost.nodes is not None or boost.labels) and not growable:
            there = (
                f"labels there: {labels_there(snapshot.alive)}"
                if boost.labels
                else f"nodes are {', '.join(n.id for n in snapshot.alive[:4]) or 'none'}"
            )
            asked = f"labels={dict(boost.labels)}" if boost.labels else f"nodes={list(boost.nodes or ())}"
            raise BoostUnavailable(f"no live node matches {shown(asked, 120)}; {there}")
        if backend.capabilities.grow:
            return  # the backend may add nodes; only it can say no
        if boost.strategy == "strict_pack":
            biggest = max(nodes, key=lambda n: boost.resources.fits_in(n.total), default=None)
            if biggest is None or not boost.resources.fits_in(biggest.total):
                raise BoostUnavailable(
                    f"boost {boost.id} ({boost.resources.human()}) fits on no single node (strategy strict_pack)"
                )
        total = sum((n.total for n in nodes), Resources())
        if not boost.resources.fits_in(total):
            raise BoostUnavailable(
                f"boost {boost.id} asks for {boost.resources.human()}, more than the whole cluster has "
                f"({total.human()}); missing {boost.resources.shortfall(total).human()}"
            )

    async def _reserve_in_turn(self, boost: Boost, key: tuple[int, int], *, detached: bool = False) -> Reservation:
        request = evolve(boost.request(), detached=True) if detached else boost.request()
        while True:
            async with self._gate.hold(key) as turn:
                assert turn.scope is not None
                with turn.scope:
                    return await self._runtime.backend.reserve(request)
            # preempted by a request of higher priority: queue again, keeping our key

    async def renew(self, boost: Boost, ttl: float) -> None:
        ttl = seconds("ttl", ttl)
        boost.require_active()
        assert boost.reservation is not None
        await self._runtime.backend.extend(boost.reservation, ttl)
        boost.ttl = ttl
        boost.expires_at = time.time() + ttl
        boost._deadline = anyio.current_time() + ttl
        self._poke()

    async def finish(self, boost: Boost, state: BoostState, error: BoostLost | None = None) -> None:
        """End an active (or preempted) boost: cancel its work, release its reservation; awaited and shielded.

        ``state`` is ``released``, ``expired``, or ``failed`` with the ``error`` that
        says what the engine lost. A preempted boost ends as ``preempted`` whoever ends it.
        """
        if boost._ending or boost.state not in (BoostState.ACTIVE, BoostState.PREEMPTED):
            return
        boost._ending = True  # first, so a second caller returns at once
        if boost.state is BoostState.PREEMPTED:
            assert isinstance(boost.error, BoostPreempted)
            state, error = BoostState.PREEMPTED, boost.error
        boost.state = state
        boost.expires_at = None
        if error is not None:
            reason: Exception = error
            boost.error = error
        elif state is BoostState.EXPIRED:
            reason = BoostExpired(f"boost {boost.id} expired")
        else:
            reason = TaskCancelled(f"boost {boost.id} was released")
        runtime = self._runtime
        notify = runtime.observers.notify
        timeout = runtime.settings.teardown_timeout
        with anyio.CancelScope(shield=True):
            for run in list(boost.work):
                run.cancel(reason)
            with anyio.move_on_after(timeout):
                await boost.work.emptied()
            assert boost.reservation is not None
            try:
                with anyio.fail_after(timeout):
                    await runtime.backend.release(boost.reservation)
            except BaseException as exc:
                if state is not BoostState.FAILED:
                    boost.state = BoostState.FAILED
                    boost.error = exc
                    self.outcomes["failed"] += 1
                    if isinstance(exc, Exception):
                        notify("gridboost_boost_failed", boost=boost, error=exc)
                raise
            finally:
                self.boosts.pop(boost.id, None)
                self._poke()
                self.on_ended()
        self.outcomes[state.value] += 1
        if state is BoostState.FAILED:
            assert error is not None
            notify("gridboost_boost_failed", boost=boost, error=error)
        elif state is not BoostState.PREEMPTED:  # a preempted boost's hook fired at the notice
            hook = "gridboost_boost_expired" if state is BoostState.EXPIRED else "gridboost_boost_released"
            notify(hook, boost=boost)

    async def lost(self, reservation_id: str, error: BaseException) -> None:
        """The backend says the engine lost this reservation (or takes it back: ``BoostPreempted``)."""
        boost = self.boosts.get(reservation_id)
        if boost is None or not boost.is_active:
            return  # already ended, or not ours: engines may report a loss twice
        if isinstance(error, BoostPreempted):
            self._preempted(boost, error)
            return
        lost = BoostLost(f"boost {boost.id} lost its reservation: {error}")
        lost.__cause__ = error
        try:
            await self.finish(boost, BoostState.FAILED, lost)
        except Exception as exc:  # what is left of it could not be released; the boost is failed anyway
            self._runtime.log_error(f"releasing what is left of lost boost {boost.id} failed", exc)
            self.outcomes["failed"] += 1
            self._runtime.observers.notify("gridboost_boost_failed", boost=boost, error=lost)

    def _preempted(self, boost: Boost, error: BoostPreempted) -> None:
        """The notice: no new work goes in, work still waiting in the grid moves, the hook fires, and the boost ends
        once its work is done or the grace is over, whichever comes first (its release meanwhile ends it at once)."""
        boost.state = BoostState.PREEMPTED
        boost.error = error
        self.on_preempted(boost)  # its work that has not reached the engine moves elsewhere
        self._runtime.observers.notify("gridboost_boost_preempted", boost=boost, grace=error.grace)
        self._runtime.start_soon(self._end_preempted, boost, error.grace)

    async def _end_preempted(self, boost: Boost, grace: float) -> None:
        with anyio.move_on_after(grace):
            await boost.work.emptied()
        try:
            await self.finish(boost, BoostState.PREEMPTED)
        except Exception as exc:  # the engine took it back already; what is left could not be released
            self._runtime.log_error(f"releasing what is left of preempted boost {boost.id} failed", exc)

    async def pending(self, what: str, granting: Coroutine[Any, Any, T], ident: str) -> T:
        """Await a boost or lease request in a scope teardown cancels, so closing never waits on a grant."""
        scope = anyio.CancelScope()
        grants = self._runtime.grants
        grants.add(scope)
        try:
            with scope:
                return await granting
        finally:
            grants.discard(scope)
        raise GridClosed(f"the grid closed while {what} {ident} was pending")

    async def renew_lease(self, lease_id: str, ttl: float) -> Lease:
        """Renew any owner's lease; a boost of this book's through :meth:`renew`."""
        ttl = seconds("ttl", ttl)
        boost = self.boosts.get(lease_id)
        if boost is None or not boost.is_active:
            return await self._runtime.backend.renew_lease(lease_id, ttl)
        await boost.renew(ttl)
        assert boost.expires_at is not None
        return Lease(
            id=boost.id,
            backend=self._runtime.backend.name,
            resources=boost.resources,
            owner=owner_name(),
            state="active",
            priority=boost.priority,
            expires_at=boost.expires_at,
            placements=boost.placements,
            token=boost.token,
            tenant=boost.tenant,
            preemptible=boost.preemptible,
        )

    async def release_lease(self, lease_id: str) -> None:
        """Release any owner's lease now, awaited; a boost of this book's through :meth:`finish`."""
        boost = self.boosts.get(lease_id)
        if boost is not None and boost.is_active:
            await boost.release()
            return
        await self._runtime.backend.release_lease(lease_id)

    def owns(self, boost: Boost) -> bool:
        """Whether ``boost`` was granted by this book (this grid)."""
        return boost._book is self

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def expire_loop(self) -> None:
        """Release each boost at its deadline. Runs in the grid's task group until teardown."""
        while True:
            now = anyio.current_time()
            for boost in [b for b in self.boosts.values() if b.is_active and b._deadline <= now]:
                try:
                    await self.finish(boost, BoostState.EXPIRED)
                except Exception as exc:  # the loop must outlive one bad release
                    self._runtime.log_error(f"releasing expired boost {boost.id} failed", exc)
            deadline = min((b._deadline for b in self.boosts.values() if b.is_active), default=math.inf)
            self._wake = anyio.Event()
            with anyio.move_on_after(deadline - anyio.current_time()):
                await self._wake.wait()


def labels_there(nodes: Sequence[NodeSnapshot], most: int = 4) -> str:
    """The labels live nodes carry, each key with its values, in one short line: ``name=a|b, zone=x``.

    Engine-internal labels (Ray's ``ray.io/...``) are left out; at most ``most`` values a key and 8 keys.
    """
    values: dict[str, set[str]] = {}
    for node in nodes:
        for key, value in node.labels.items():
            if not key.startswith("ray.io/"):
                values.setdefault(key, set()).add(value)
    if not values:
        return "none"
    parts = []
    for key in sorted(values)[:8]:
        seen = sorted(values[key])
        more = f"|\u2026 ({len(seen)} values)" if len(seen) > most else ""
        parts.append(f"{key}={'|'.join(v if len(v) <= 24 else v[:23] + chr(0x2026) for v in seen[:most])}{more}")
    return ", ".join(parts) + (", \u2026" if len(values) > 8 else "")
