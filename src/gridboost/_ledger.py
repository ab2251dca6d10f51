"""A ledger: capacity promised away at one place (the host, the cluster, a boost), claim by claim."""

from __future__ import annotations

import math

from ._resources import BYTE_FIELDS, Resources, format_bytes, format_number

__all__ = ["Ledger"]

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
