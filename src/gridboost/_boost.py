"""``Boost``: the handle of one lease, and the block that requests, enters and releases one.

Its life cycle (grant, renewal, expiry, release) is the book's, in ``_book``; a boost
points at its book, through the small protocol below, and never at the grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Protocol, Required, TypedDict

import anyio

from ._kit import Tracked
from ._ledger import Ledger, Pool
from ._records import BoostState, Priority, Reservation, ReservationRequest, Strategy, new_id
from ._resources import Resources
from .exceptions import BoostExpired, BoostPreempted

__all__ = ["Boost", "BoostBlock", "BoostOptions", "current_boost"]

_current: ContextVar[Boost | None] = ContextVar("gridboost_current_boost", default=None)


class _Work(Protocol):
    """Work running inside a boost, as the boost's end sees it."""

    def cancel(self, cause: BaseException) -> None: ...


class _Book(Protocol):
    """What a boost asks of the book that granted it."""

    async def renew(self, boost: Boost, ttl: float) -> None: ...

    async def finish(self, boost: Boost, state: BoostState) -> None: ...


class BoostOptions(TypedDict, total=False):
    """The keywords of a boost request beside its resources (see :meth:`gridboost.Grid.request_boost`)."""

    ttl: Required[float]
    priority: Priority
    wait: float
    strategy: Strategy
    nodes: Sequence[str] | None
    labels: Mapping[str, str] | None
    preemptible: bool


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
        book: _Book,
        resources: Resources,
        *,
        ttl: float,
        priority: Priority,
        wait: float,
        strategy: Strategy,
        nodes: tuple[str, ...] | None,
        labels: Mapping[str, str] | None,
        tenant: str = "",
        preemptible: bool = False,
    ) -> None:
        self.id = new_id("boost")
        self._book = book
        self.resources = resources
        self.ttl = ttl
        self.priority = priority
        self.wait = wait
        self.strategy = strategy
        self.nodes = nodes
        self.labels = labels
        #: Whose quota it counts against (the grid's ``tenant``).
        self.tenant = tenant
        #: A higher-priority request of another owner may take it back.
        self.preemptible = preemptible
        self.state = BoostState.PENDING
        #: Wall-clock time of the request: with ``activated_at``, how long the grant took (telemetry's grant latency).
        self.requested_at = time.time()
        self.placements: tuple[str, ...] = ()
        self.expires_at: float | None = None  # wall-clock time, for people and other processes
        self.activated_at: float | None = None
        self.error: BaseException | None = None
        self.reservation: Reservation | None = None
        self._deadline = math.inf  # anyio clock
        self._ending = False  # its end (release, expiry, loss, preemption) has begun
        self._runs: Tracked[_Work] = Tracked()  # the work running inside it, cancelled when it ends
        self._tokens: list[Token[Boost | None]] = []
        self._ledger = Ledger(f"boost {self.id}", resources)  # what the grid placed in it, claimed at placement
        self._slots: Pool | None = None

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
    def token(self) -> int:
        """The grant's fencing token: every grant on the cluster gets a larger one (0 until granted).

        Pass it with writes to an outside system so that it can refuse a writer whose lease has ended."""
        return 0 if self.reservation is None else self.reservation.token

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
            tenant=self.tenant,
            preemptible=self.preemptible,
            wait=self.wait,
        )

    async def renew(self, ttl: float | None = None) -> None:
        """Extend the lease to ``ttl`` seconds from now (default: its original TTL)."""
        await self._book.renew(self, self.ttl if ttl is None else ttl)

    async def release(self) -> None:
        """Cancel the work running inside, give the capacity back, awaited. Idempotent."""
        await self._book.finish(self, BoostState.RELEASED)

    async def __aenter__(self) -> Boost:
        self._tokens.append(_current.set(self))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _current.reset(self._tokens.pop())
        await self.release()

    @property
    def ledger(self) -> Ledger:
        """What the grid placed in it, claimed at placement (dispatch's books)."""
        return self._ledger

    def slots(self, queue: float) -> Pool:
        """Where its work waits in the grid for room in it: its capacity, and ``queue`` of that beyond (work the
        engine holds queued, ready for the next slot that frees). Work still waiting here can move elsewhere."""
        if self._slots is None:
            self._slots = Pool(self.resources * (1 + queue))
        return self._slots

    @property
    def work(self) -> Tracked[_Work]:
        """The work running inside it now: cancelled, and awaited, when it ends."""
        return self._runs

    def admit(self, work: _Work) -> None:
        """Count ``work`` as running inside; ``BoostExpired`` if the boost is no longer active."""
        self.require_active()
        self._runs.add(work)

    def require_active(self) -> None:
        if self.state is BoostState.PREEMPTED:
            raise BoostPreempted(f"boost {self.id} was preempted; work cannot run inside it")
        if not self.is_active:
            raise BoostExpired(f"boost {self.id} is {self.state}; work cannot run inside it")
        if anyio.current_time() >= self._deadline:
            # Its owner stalled past the TTL (a stopped process, a blocked event loop) and has just woken: the engine
            # may have given the capacity to someone else already, so nothing more goes in, before the expiry loop
            # even runs. A lease's fence on its own side.
            raise BoostExpired(f"boost {self.id} ran out at its TTL; work cannot run inside it, nor can it be renewed")


class BoostBlock:
    """What ``grid.boost(...)`` returns: an async context manager that requests, enters and releases."""

    def __init__(self, request: Callable[[], Awaitable[Boost]]) -> None:
        self._request = request
        self._boost: Boost | None = None

    async def __aenter__(self) -> Boost:
        self._boost = await self._request()
        return await self._boost.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._boost is not None
        await self._boost.__aexit__(exc_type, exc, tb)
