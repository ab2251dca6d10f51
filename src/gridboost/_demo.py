"""``gridboost demo``: a burst of work, a boost taken for it, and proof that all was given back."""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from typing import Any

import anyio

from ._boost import Boost
from ._grid import Grid
from ._plugins import hookimpl
from ._records import Placement, Priority, TaskOutcome, TaskSpec
from ._resources import Resources


def _work(seconds: float) -> float:
    """Stand-in for a preprocessing step: sleeps, so the demo is gentle on a shared machine."""
    time.sleep(seconds)
    return seconds


class _Narrator:
    """An observer plugin: the demo's log lines come through the same hooks yours would."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.where: dict[str, list[float]] = defaultdict(list)
        self.status: Counter[str] = Counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.2f}s] {text}", flush=True)

    @hookimpl
    def gridboost_boost_activated(self, boost: Boost) -> None:
        self.say(f"boost {boost.id} active: {boost.resources} on {', '.join(boost.placements)}, ttl {boost.ttl:g}s")

    @hookimpl
    def gridboost_boost_released(self, boost: Boost) -> None:
        self.say(f"boost {boost.id} released after {boost.held_for:.2f}s")

    @hookimpl
    def gridboost_task_finished(self, task: TaskSpec, placement: Placement, outcome: TaskOutcome) -> None:
        self.where[placement.kind].append(outcome.duration)
        self.status[outcome.status] += 1


async def _demo(backend: str, tasks: int) -> None:
    narrator = _Narrator()
    async with Grid(backend, plugins=[narrator]) as grid:
        snapshot = await grid.snapshot()
        narrator.say(f"backend {backend}: {len(snapshot.alive)} node(s), total {snapshot.total}")
        slots = max(1, int(snapshot.total.cpu))
        each = Resources(cpu=1)
        half = tasks // 2
        narrator.say(f"burst of {tasks} tasks needing {each} each; this machine holds {slots} at once")

        done = 0

        def progress() -> None:
            bar = "#" * (30 * done // tasks)
            print(f"\r  [{bar:<30}] {done}/{tasks}", end="", flush=True)

        async def wave(count: int) -> None:
            nonlocal done
            async for _ in grid.map(_work, [0.05] * count, resources=each, max_in_flight=2 * slots):
                done += 1
                progress()
            print()

        await wave(half)
        narrator.say("asking for a boost to take the rest of the burst")
        async with grid.boost(each * max(1, slots // 2), ttl=60, priority=Priority.HIGH, wait=10):
            await wave(tasks - half)
        narrator.say(f"boosts still held: {len(grid.boosts)}")

    print()
    print(f"{'ran':<10}{'tasks':>7}{'mean s':>10}{'total s':>10}")
    for kind, durations in sorted(narrator.where.items()):
        print(f"{kind:<10}{len(durations):>7}{sum(durations) / len(durations):>10.3f}{sum(durations):>10.2f}")
    outcome: dict[str, Any] = dict(narrator.status)
    print(f"outcomes: {outcome}; grid closed: {grid.closed}; reservations left: 0 (checked at teardown)")


def run_demo(*, backend: str = "local", tasks: int = 48) -> int:
    if tasks < 2:
        print("gridboost demo: --tasks must be at least 2", file=sys.stderr)
        return 2
    anyio.run(_demo, backend, tasks)
    return 0
