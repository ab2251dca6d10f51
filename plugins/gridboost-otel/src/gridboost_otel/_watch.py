"""The grids one telemetry watches, and the figures the meter reads from them rather than being told.

A grid is watched from the first hook it calls (or ``GridTelemetry.watch(grid)``) until it closes: the telemetry
then adds a callback to the grid's teardown (``grid.push_async_callback``), which is where the Prometheus endpoint
stops. Per-task figures stay off the hot path: counts the core keeps anyway (placements, moves) are read from
``grid.stats()`` when the meter collects, folded into running totals, and folded once more as the grid closes, so
the totals keep growing across grids that come and go. Tasks finished, by destination and status, are counted by
the hook in a plain dict that observable counters read — a task costs a dict increment, not an instrument call
(about 5 µs in the OpenTelemetry SDK).

Collections run in the reader's thread (a periodic exporter, a Prometheus scrape) while grids run on their event
loops: a lock guards what both touch. The loops take it once per task (uncontended: well under a microsecond) and
when a grid starts or stops being watched.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from gridboost import GridClosed, Pressure
from gridboost.hookspecs import GridView

__all__ = ["STATS", "GridWatch", "Watched"]

log = logging.getLogger("gridboost_otel")

#: The counters of ``grid.stats()`` the metrics carry: stat → (metric, attributes).
STATS: dict[str, tuple[str, dict[str, str]]] = {
    **{f"placed.{kind}": ("placed", {"destination": kind}) for kind in ("local", "cluster", "boost")},
    "placed.waiting": ("queued", {}),
    **{f"moves.{kind}": ("moves", {"destination": kind}) for kind in ("local", "cluster", "boost")},
}
_DIMENSIONS = ("cpu", "memory", "gpu", "gpu_memory")


class Watched:
    """One grid, as its telemetry watches it."""

    __slots__ = ("backend", "grid", "ignored", "seen", "serving", "trouble")

    def __init__(self, grid: GridView, ignored: bool) -> None:
        self.grid = grid
        self.backend = grid.backend.name
        #: Another telemetry of the grid's own reports it; this one (the environment's) stays out of its way.
        self.ignored = ignored
        #: The stats already folded into the totals.
        self.seen: dict[str, int] = {}
        #: What went wrong as it started being watched, raised by the hook once its own work is done.
        self.trouble: BaseException | None = None
        #: It holds the telemetry's Prometheus endpoint (released as it closes).
        self.serving = False

    def take_trouble(self) -> BaseException:
        trouble, self.trouble = self.trouble, None
        assert trouble is not None
        return trouble


class GridWatch:
    """The grids being watched, the counts of their finished tasks, and the totals folded from their stats.

    ``opened(watched)`` is called as a hook's grid starts being watched (what it raises is kept as the watched grid's
    trouble), ``closing(watched)`` as the grid closes (awaited in its teardown); ``ignore(grid)`` says whether to
    leave a grid alone.
    """

    def __init__(
        self,
        opened: Callable[[Watched], None],
        closing: Callable[[Watched], Awaitable[None]],
        ignore: Callable[[GridView], bool],
    ) -> None:
        self._opened, self._closing, self._ignore = opened, closing, ignore
        self._lock = threading.Lock()
        self._watched: dict[int, Watched] = {}
        self._last: Watched | None = None
        self._closed: weakref.WeakSet[Any] = weakref.WeakSet()
        self._totals: dict[tuple[str, str], int] = {}  # (backend, stat) → folded total
        #: (backend, destination, status) → tasks finished; written by the hooks, read by the collector.
        self.finished: dict[tuple[str, str, str], int] = {}

    # -- the hooks' side (the grids' event loops) ----------------------------------------------------------------

    def of(self, grid: GridView) -> Watched:
        """The grid as watched: the same object from its first hook on (a grid that is closing gets a passing one)."""
        last = self._last
        if last is not None and last.grid is grid:
            return last
        return self._find(grid)

    def count_finished(self, backend: str, destination: str, status: str) -> None:
        key = (backend, destination, status)
        with self._lock:
            self.finished[key] = self.finished.get(key, 0) + 1

    def watch(self, grid: GridView) -> Watched:
        """Start watching an open grid now, without opening it; ``GridClosed`` for one that is not open."""
        if getattr(grid, "closed", False):
            raise GridClosed("this grid is closed: there is nothing left to watch")
        return self._find(grid, strict=True)

    def _find(self, grid: GridView, strict: bool = False) -> Watched:
        with self._lock:
            watched = self._watched.get(id(grid))
            if watched is not None and watched.grid is grid:
                self._last = watched
                return watched
            watched = Watched(grid, self._ignore(grid))
            if grid in self._closed:
                if strict:
                    raise GridClosed("this grid is closing: there is nothing left to watch")
                return watched  # its stats are folded already
            try:
                grid.push_async_callback(self._closed_now, watched)  # type: ignore[attr-defined]  # Grid's
            except GridClosed:
                if strict:
                    raise
                # Seen first as it closes: everything it placed or moved is final now, and folded at once.
                if not watched.ignored:
                    self._fold(watched)
                self._closed.add(grid)
                return watched
            self._watched[id(grid)] = watched
            self._last = watched
        if watched.ignored or strict:
            return watched  # (GridTelemetry.watch opens it itself, raising what goes wrong)
        try:
            self._opened(watched)
        except Exception as exc:
            watched.trouble = exc
        return watched

    async def _closed_now(self, watched: Watched) -> None:
        # In the grid's teardown, after its work stopped: its placements and moves are final. Never raises: an
        # error here would be named in the grid's TeardownError, and telemetry must not break a teardown.
        try:
            with self._lock:
                if not watched.ignored:
                    self._fold(watched)
                self._watched.pop(id(watched.grid), None)
                self._closed.add(watched.grid)
                if self._last is watched:
                    self._last = None
            if not watched.ignored:
                await self._closing(watched)
        except Exception as exc:
            log.error("gridboost-otel: closing the watch of a grid failed: %s: %s", type(exc).__name__, exc)

    def _fold(self, watched: Watched) -> None:
        """Add what the grid's counters grew by since the last fold to the totals (the lock is held)."""
        stats = watched.grid.stats()
        seen = watched.seen
        for key in STATS:
            value = stats.get(key, 0)
            grown = value - seen.get(key, 0)
            if grown > 0:
                total = (watched.backend, key)
                self._totals[total] = self._totals.get(total, 0) + grown
                seen[key] = value

    # -- the collector's side (the reader's thread) ----------------------------------------------------------------

    def grids(self) -> list[Watched]:
        with self._lock:
            return [watched for watched in self._watched.values() if not watched.ignored]

    def totals(self, metric: str) -> Iterator[tuple[int, dict[str, str]]]:
        """The folded total of each stat of ``metric`` (``placed``, ``queued``, ``moves``), with its attributes."""
        with self._lock:
            for watched in self._watched.values():
                if not watched.ignored:
                    self._fold(watched)
            totals = dict(self._totals)
        for (backend, key), value in totals.items():
            name, attributes = STATS[key]
            if name == metric:
                yield value, {**attributes, "backend": backend}

    def finished_counts(self) -> list[tuple[tuple[str, str, str], int]]:
        with self._lock:
            return list(self.finished.items())

    def pressure(self) -> Pressure | None:
        """The newest reading any watched grid has (they all measure this machine), or ``None``."""
        readings = [w.grid.latest_pressure for w in self.grids()]
        known = [p for p in readings if p.taken_at is not None]
        return max(known, key=lambda p: p.taken_at or 0.0, default=None)

    def ttl_left(self) -> Iterator[tuple[float, dict[str, str]]]:
        """Seconds each active boost of the watched grids has left, with its id, priority and backend."""
        now = time.time()
        for watched in self.grids():
            for boost in watched.grid.boosts:
                expires = boost.expires_at  # wall-clock: readable from this thread, unlike boost.ttl_left
                if expires is not None and boost.is_active:
                    attributes = {
                        "boost": boost.id,
                        "priority": boost.priority.name.lower(),
                        "backend": watched.backend,
                    }
                    yield max(0.0, expires - now), attributes


def pressure_values(pressure: Pressure | None) -> Iterator[tuple[str, float, bool]]:
    """(dimension, utilisation, high) for each dimension the reading knows."""
    if pressure is None:
        return
    for dimension in _DIMENSIONS:
        value = getattr(pressure, dimension)
        if value is not None:
            yield dimension, float(value), dimension in pressure.high_dimensions
