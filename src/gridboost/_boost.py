"""Boosts: time-bounded leases on capacity that the backend really holds.

The life cycle is the same for every backend and lives here: validation, the
at-once refusal of a request larger than the cluster, priority order among pending
requests, the ``wait`` bound, TTL expiry, renewal and release. The backend only
reserves and releases.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from attrs import evolve

from ._dispatch import Ledger
from ._kit import seconds, shown
from ._records import (
    STRATEGIES,
    BoostState,
    Lease,
    NodeSnapshot,
    Priority,
    Strategy,
    new_id,
    owner_name,
    priority_of,
)
from ._resources import Resources
from .abc import Reservation, ReservationRequest
from .exceptions import BoostExpired, BoostLost, BoostUnavailable, InvalidRequest, TaskCancelled

if TYPE_CHECKING:
    from ._grid import Grid
    from ._task import Run

__all__ = ["Boost", "BoostBlock", "current_boost"]

_current: ContextVar[Boost | None] = ContextVar("gridboost_current_boost", default=None)


def current_boost() -> Boost | None:
    """The boost of the innermost ``async with`` boost block in this task, if any."""
    return _current.get()


class Boost:
    """A lease on capacity: granted by the grid, held by the engine, bounded by its TTL.

    Use it as an async context manager (work submitted inside the block with
    ``where="auto"`` runs inside it; leaving the block releases it), or call
    :meth:`release` yourself. ``release`` is idempotent.
    """

    def __init__(
        self,
        grid: Grid,
        resources: Resources,
        *,
        ttl: float,
        priority: Priority,
        wait: float,
        strategy: Strategy,
        nodes: tuple[str, ...] | None,
        labels: Mapping[str, str] | None,
    ) -> None:
        self.id = new_id("boost")
        self.grid = grid
        self.resources = resources
        self.ttl = ttl
        self.priority = priority
        self.wait = wait
        self.strategy = strategy
        self.nodes = nodes
        self.labels = labels
        self.state = BoostState.PENDING
        self.placements: tuple[str, ...] = ()
        self.expires_at: float | None = None  # wall-clock time, for people and other processes
        self.activated_at: float | None = None
        self.error: BaseException | None = None
        self.reservation: Reservation | None = None
        self._deadline = math.inf  # anyio clock
        self._runs: set[Run] = set()
        self._runs_idle: anyio.Event | None = None
        self._tokens: list[Token[Boost | None]] = []
        self._ledger = Ledger(f"boost {self.id}", resources)  # what the grid placed in it, claimed at placement

    def __repr__(self) -> str:
        return f"<Boost {self.id} {self.state} {self.resources} priority={self.priority.name}>"

    @property
    def is_active(self) -> bool:
        return self.state is BoostState.ACTIVE

    @property
    def ttl_left(self) -> float:
        """Seconds until expiry (0 once no longer active)."""
        return max(0.0, self._deadline - anyio.current_time()) if self.is_active else 0.0

    @property
    def available(self) -> Resources:
        """Capacity of the boost not yet claimed by work placed in it, by the grid's books."""
        free = self._ledger.free
        assert free is not None
        return free

    @property
    def held_for(self) -> float:
        """Seconds since the boost became active."""
        return 0.0 if self.activated_at is None else time.time() - self.activated_at

    def request(self) -> ReservationRequest:
        return ReservationRequest(
            id=self.id,
            resources=self.resources,
            strategy=self.strategy,
            priority=self.priority,
            ttl=self.ttl,
            nodes=self.nodes,
            labels=self.labels,
        )

    async def renew(self, ttl: float | None = None) -> None:
        """Extend the lease to ``ttl`` seconds from now (default: its original TTL)."""
        await self.grid._boosts.renew(self, self.ttl if ttl is None else ttl)

    async def release(self) -> None:
        """Cancel the work running inside, give the capacity back, awaited. Idempotent."""
        await self.grid._boosts.finish(self, BoostState.RELEASED)

    async def __aenter__(self) -> Boost:
        self._tokens.append(_current.set(self))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _current.reset(self._tokens.pop())
        await self.release()

    def require_active(self) -> None:
        if not self.is_active:
            raise BoostExpired(f"boost {self.id} is {self.state}; work cannot run inside it")


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

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._gate = _PriorityGate()
        self._seq = itertools.count()
        self.boosts: dict[str, Boost] = {}
        self._wake: anyio.Event | None = None
        self.outcomes: dict[str, int] = {
            s.value: 0 for s in BoostState if s not in (BoostState.PENDING, BoostState.ACTIVE)
        }
        self.granted = 0

    def make(
        self,
        resources: Any,
        *,
        ttl: Any,
        priority: Any,
        wait: Any,
        strategy: Any,
        nodes: Any,
        labels: Any,
    ) -> Boost:
        """Validate every argument at the API boundary, before anything reaches the engine."""
        amount = Resources.coerce(resources)
        if not amount:
            raise InvalidRequest("a boost must ask for some resources, got none")
        if strategy not in STRATEGIES:
            raise InvalidRequest(f"strategy must be one of {', '.join(STRATEGIES)}, got {shown(strategy)}")
        level = priority_of(priority)
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
            self._grid,
            amount,
            ttl=seconds("ttl", ttl),
            priority=level,
            wait=seconds("wait", wait, allow_zero=True),
            strategy=strategy,
            nodes=nodes,
            labels=None if labels is None else dict(labels),
        )
        self._grid.backend.check_reservation(boost.request())  # what the engine cannot express, refused here
        return boost

    async def grant(self, boost: Boost) -> Boost:
        """Wait (at most ``boost.wait``) until the backend holds the boost; fail with what was missing."""
        grid = self._grid
        self.boosts[boost.id] = boost
        try:
            await self._refuse_impossible(boost)
            key = (-boost.priority, next(self._seq))
            # move_on_after, not fail_after: an engine's own TimeoutError (Ray's
            # GetTimeoutError is one) must not pass for our `wait` running out.
            with anyio.move_on_after(boost.wait) as waited:
                reservation = await self._reserve_in_turn(boost, key)
            if waited.cancelled_caught:
                raise await self._not_granted(boost) from None
        except BaseException as exc:
            del self.boosts[boost.id]
            boost.state = BoostState.FAILED
            self.outcomes["failed"] += 1
            if isinstance(exc, Exception):
                boost.error = exc
                grid._notify("gridboost_boost_failed", boost=boost, error=exc)
            raise
        boost.reservation = reservation
        boost.placements = reservation.placements
        boost.state = BoostState.ACTIVE
        boost.activated_at = time.time()
        boost.expires_at = boost.activated_at + boost.ttl
        boost._deadline = anyio.current_time() + boost.ttl
        self._poke()
        self.granted += 1
        grid._notify("gridboost_boost_activated", boost=boost)
        grid._dispatch.boost_activated(boost)
        return boost

    async def lease(self, boost: Boost) -> Lease:
        """Reserve ``boost``'s request as a *detached* lease: the engine's registry, not this grid, ends it.

        The same validation, refusal of the impossible, priority order and ``wait`` bound as
        :meth:`grant`; the grid keeps no record of it afterwards (no expiry, no release at teardown).
        """
        backend = self._grid.backend
        if not backend.capabilities.shared_leases:
            raise InvalidRequest(
                f"the {backend.name} backend keeps leases inside one process; a lease that outlives it needs a "
                "backend with a lease registry on the cluster (ray, dask)"
            )
        await self._refuse_impossible(boost)
        key = (-boost.priority, next(self._seq))
        with anyio.move_on_after(boost.wait) as waited:
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
        )

    async def _not_granted(self, boost: Boost) -> BoostUnavailable:
        snapshot = await self._grid.backend.snapshot()
        room = sum((n.available for n in snapshot.matching(boost.nodes, boost.labels)), Resources())
        return BoostUnavailable(
            f"boost {boost.id} ({boost.resources.human()}) was not granted within {boost.wait:g}s: "
            f"missing {boost.resources.shortfall(room).human()} (free now: {room.human()})"
        )

    async def _refuse_impossible(self, boost: Boost) -> None:
        backend = self._grid.backend
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
                    return await self._grid.backend.reserve(request)
            # preempted by a request of higher priority: queue again, keeping our key

    async def renew(self, boost: Boost, ttl: float) -> None:
        ttl = seconds("ttl", ttl)
        boost.require_active()
        assert boost.reservation is not None
        await self._grid.backend.extend(boost.reservation, ttl)
        boost.ttl = ttl
        boost.expires_at = time.time() + ttl
        boost._deadline = anyio.current_time() + ttl
        self._poke()

    async def finish(self, boost: Boost, state: BoostState, error: BoostLost | None = None) -> None:
        """End an active boost: cancel its work, release its reservation; awaited and shielded.

        ``state`` is ``released``, ``expired``, or ``failed`` with the ``error`` that
        says what the engine lost.
        """
        if boost.state is not BoostState.ACTIVE:
            return
        boost.state = state  # first, so a second caller returns at once
        boost.expires_at = None
        if state is BoostState.FAILED:
            assert error is not None
            reason: Exception = error
            boost.error = error
        elif state is BoostState.EXPIRED:
            reason = BoostExpired(f"boost {boost.id} expired")
        else:
            reason = TaskCancelled(f"boost {boost.id} was released")
        grid = self._grid
        with anyio.CancelScope(shield=True):
            for run in list(boost._runs):
                run.cancel(reason)
            with anyio.move_on_after(grid.teardown_timeout):
                while boost._runs:
                    boost._runs_idle = anyio.Event()
                    await boost._runs_idle.wait()
            assert boost.reservation is not None
            try:
                with anyio.fail_after(grid.teardown_timeout):
                    await grid.backend.release(boost.reservation)
            except BaseException as exc:
                if state is not BoostState.FAILED:
                    boost.state = BoostState.FAILED
                    boost.error = exc
                    self.outcomes["failed"] += 1
                    if isinstance(exc, Exception):
                        grid._notify("gridboost_boost_failed", boost=boost, error=exc)
                raise
            finally:
                self.boosts.pop(boost.id, None)
                self._poke()
                grid._dispatch.boost_ended()
        self.outcomes[state.value] += 1
        if state is BoostState.FAILED:
            assert error is not None
            grid._notify("gridboost_boost_failed", boost=boost, error=error)
        else:
            hook = "gridboost_boost_expired" if state is BoostState.EXPIRED else "gridboost_boost_released"
            grid._notify(hook, boost=boost)

    async def lost(self, reservation_id: str, error: BaseException) -> None:
        """The backend says the engine lost this reservation: fail the boost and stop its work."""
        boost = self.boosts.get(reservation_id)
        if boost is None or not boost.is_active:
            return  # already ended, or not ours: engines may report a loss twice
        lost = BoostLost(f"boost {boost.id} lost its reservation: {error}")
        lost.__cause__ = error
        try:
            await self.finish(boost, BoostState.FAILED, lost)
        except Exception as exc:  # what is left of it could not be released; the boost is failed anyway
            self._grid._log_error(f"releasing what is left of lost boost {boost.id} failed", exc)
            self.outcomes["failed"] += 1
            self._grid._notify("gridboost_boost_failed", boost=boost, error=lost)

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
                    self._grid._log_error(f"releasing expired boost {boost.id} failed", exc)
            deadline = min((b._deadline for b in self.boosts.values() if b.is_active), default=math.inf)
            self._wake = anyio.Event()
            with anyio.move_on_after(deadline - anyio.current_time()):
                await self._wake.wait()


class BoostBlock:
    """What ``grid.boost(...)`` returns: an async context manager that requests, enters and releases."""

    def __init__(self, grid: Grid, resources: Any, kwargs: dict[str, Any]) -> None:
        self._grid, self._resources, self._kwargs = grid, resources, kwargs
        self._boost: Boost | None = None

    async def __aenter__(self) -> Boost:
        self._boost = await self._grid.request_boost(self._resources, **self._kwargs)
        return await self._boost.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._boost is not None
        await self._boost.__aexit__(exc_type, exc, tb)


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
