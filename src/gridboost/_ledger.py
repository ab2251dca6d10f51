"""Capacity at one place (the host, the cluster, a boost): promised away claim by claim, and waited for.

* :class:`Ledger` — what placements claimed there, against its capacity: books, never a wait.
* :class:`Pool` — capacity that work takes before it starts and gives back, waiting in turn until it fits.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import anyio

from ._resources import BYTE_FIELDS, Resources, format_bytes, format_number

__all__ = ["Ledger", "Pool"]

_EPS = 1e-9


class Ledger:
    """Capacity promised away at one place: what tasks placed there claimed, against its capacity.

    ``capacity`` ``None`` is unknown: everything fits (the engine will queue what does not).
    ``queue`` lets claims run that fraction of the capacity beyond it (work the engine
    holds queued, ready for the next slot that frees); ``free`` never counts it.
    """

    __slots__ = ("_capacity", "_limit", "name", "queue", "used")

    def __init__(self, name: str, capacity: Resources | None = None, *, queue: float = 0.0) -> None:
        self.name = name
        self.queue = queue
        self._capacity: dict[str, float] | None = None
        self._limit: dict[str, float] | None = None
        self.used: dict[str, float] = {}
        self.set_capacity(capacity)

    def set_capacity(self, capacity: Resources | None) -> None:
        self._capacity = None if capacity is None else capacity.as_dict()
        self._limit = None if self._capacity is None else {k: v * (1 + self.queue) for k, v in self._capacity.items()}

    @property
    def known(self) -> bool:
        return self._capacity is not None

    def could_hold(self, amount: Resources) -> bool:
        """Whether ``amount`` fits in the whole capacity, whatever is claimed now."""
        limit = self._limit
        return limit is None or all(v <= limit.get(k, 0.0) + _EPS for k, v in amount._items() if v)

    def room_for(self, amount: Resources) -> bool:
        limit = self._limit
        if limit is None:
            return True
        used = self.used
        for key, value in amount._items():
            if value and used.get(key, 0.0) + value > limit.get(key, 0.0) + _EPS:
                return False
        return True

    def take(self, amount: Resources) -> None:
        used = self.used
        for key, value in amount._items():
            if value:
                used[key] = used.get(key, 0.0) + value

    def give(self, amount: Resources) -> None:
        used = self.used
        for key, value in amount._items():
            if value:
                left = used.get(key, 0.0) - value
                used[key] = left if left > _EPS else 0.0

    def shortfall(self, amount: Resources) -> str:
        """What this place lacks to hold ``amount`` on top of its claims, as text (``cpu=1``): cheap, for reasons."""
        capacity = self._limit
        if capacity is None:
            return "nothing"
        used = self.used
        parts = []
        for key, value in amount._items():
            missing = used.get(key, 0.0) + value - capacity.get(key, 0.0) if value else 0.0
            if missing > _EPS:
                text = format_bytes(math.ceil(missing)) if key in BYTE_FIELDS else format_number(missing)
                parts.append(f"{key}={text}")
        return ",".join(parts) or "nothing"

    @property
    def free(self) -> Resources | None:
        """Capacity not claimed (``None`` when the capacity is unknown)."""
        if self._capacity is None:
            return None
        return Resources.coerce({k: max(0.0, v - self.used.get(k, 0.0)) for k, v in self._capacity.items()})


class Pool:
    """Capacity that tasks and reservations take from and give back, first come first served.

    Waiters are served in arrival order, each as soon as it fits; a large request
    does not hold back smaller ones behind it that fit now (first fit, in order).
    They wait in one queue per amount asked (a burst asks the same amount thousands of
    times): a release looks at the head of each queue, not at every waiter, so it costs
    the number of distinct amounts waiting, not the number of waiters.
    """

    def __init__(self, total: Resources) -> None:
        self.total = total
        self.used = Resources()
        self._waiters: dict[Resources, deque[tuple[int, anyio.Event]]] = {}
        self._arrivals = itertools.count()

    @property
    def available(self) -> Resources:
        return self.total - self.used

    async def take(self, amount: Resources) -> None:
        """Wait until ``amount`` fits, then take it; cancellable while waiting (nothing is taken then)."""
        if not self._waiters and amount.fits_in(self.available):
            self.used = self.used + amount
            return
        waiter = (next(self._arrivals), anyio.Event())
        self._waiters.setdefault(amount, deque()).append(waiter)
        try:
            await waiter[1].wait()
        except BaseException:
            if waiter[1].is_set():  # granted as we were cancelled: hand it on
                self.give(amount)
            else:
                queue = self._waiters[amount]
                queue.remove(waiter)
                if not queue:
                    del self._waiters[amount]
            raise

    def give(self, amount: Resources) -> None:
        self.used = self.used - amount
        free = self.total - self.used
        while self._waiters:
            # The earliest waiter whose amount fits now: queue heads in arrival order, the first that fits.
            heads = sorted((queue[0][0], wanted) for wanted, queue in self._waiters.items())
            fitting = next((wanted for _, wanted in heads if wanted.fits_in(free)), None)
            if fitting is None:
                return
            queue = self._waiters[fitting]
            _, granted = queue.popleft()
            if not queue:
                del self._waiters[fitting]
            self.used = self.used + fitting  # taken on the waiter's behalf, before it wakes
            free = free - fitting
            granted.set()
