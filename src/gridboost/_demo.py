"""``gridboost demo``: a burst of more work than this machine holds, a boost taken for it, and all given back.

What it shows, in order: the nodes; a burst submitted at once (most of it waits for room); a live progress bar with
local pressure; a boost taken half-way, and waiting work moving onto it as it becomes active; then a table of where
each group of tasks ran and how long it took, and proof that the boost was released and nothing is left.
Everything it prints comes through the same hooks and calls an application would use.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio

from ._boost import Boost
from ._grid import Grid
from ._plugins import hookimpl
from ._records import Priority, TaskOutcome
from ._resources import Resources
from ._spec import Placement, TaskSpec
from .exceptions import GridboostError

__all__ = ["run_demo"]

#: Each task: CPU half the time (so the host's pressure rises), then waiting (gentle on a shared machine).
_SPIN = 0.07
_SLEEP = 0.07


def _work(index: int) -> int:
    """Stand-in for a preprocessing step."""
    deadline = time.perf_counter() + _SPIN
    while time.perf_counter() < deadline:
        pass
    time.sleep(_SLEEP)
    return index


class _Narrator:
    """An observer plugin: the demo's story comes through the hooks yours would use."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.t0 = time.perf_counter()
        self.ran: dict[str, list[float]] = defaultdict(list)
        self.moved = 0

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self.t0:6.2f}s[/dim] {text}")

    @hookimpl
    def gridboost_boost_activated(self, boost: Boost) -> None:
        self.say(f"boost [bold]{boost.id}[/bold] active: {boost.resources} on {', '.join(boost.placements)}")

    @hookimpl
    def gridboost_boost_released(self, boost: Boost) -> None:
        self.say(f"boost [bold]{boost.id}[/bold] released after {boost.held_for:.2f}s")

    @hookimpl
    def gridboost_pressure_changed(self, old: Any, new: Any) -> None:
        self.say(f"local pressure: {old.level} -> [bold]{new}[/bold]")

    @hookimpl
    def gridboost_task_finished(self, task: TaskSpec, placement: Placement, outcome: TaskOutcome) -> None:
        where = "here" if placement.kind == "local" else placement.kind
        self.ran[f"{where} ({outcome.status})"].append(outcome.duration)


async def _demo(console: Any, backend: str, tasks: int, address: str | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    narrator = _Narrator(console)
    options: dict[str, Any] = {} if address is None else {"address": address}
    if backend != "local":
        options["local_capacity"] = "cpu=2"  # this machine's share of the burst; the rest goes out
        # Work beyond the cluster's room waits here, where it can move, rather than in the engine's own queue,
        # which would take every freed slot before the boost's reservation could form.
        options["cluster_queue"] = 0
    async with Grid(backend, plugins=[narrator], **options) as grid:
        snapshot = await grid.snapshot()
        await grid.pressure()  # starts the monitor, and gives the first real reading
        narrator.say(f"engine: {_engine(backend, address, len(snapshot.alive))}; total {snapshot.total.human()}")
        each = Resources(cpu=1)
        slots = max(1, int(grid.local_available.cpu)) if backend == "local" else 2
        narrator.say(f"a burst of {tasks} tasks of {each} each; this machine runs {slots} at once")
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[pressure]}"),
        )
        boost_size = each * max(1, slots // 2) if backend == "local" else each * 2
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("burst", total=tasks, pressure="")
            async with anyio.create_task_group() as tg:
                done = anyio.Event()

                async def show_pressure() -> None:
                    while not done.is_set():
                        progress.update(bar, pressure=f"pressure {grid.latest_pressure}")
                        with anyio.move_on_after(0.2):
                            await done.wait()

                tg.start_soon(show_pressure)
                if grid.backend.capabilities.remote:
                    await _burst(grid, tasks, each, boost_size, narrator, lambda n: progress.update(bar, completed=n))
                else:
                    await _waves(
                        grid, tasks, each, slots, boost_size, narrator, lambda n: progress.update(bar, completed=n)
                    )
                done.set()
        stats = grid.stats()
        if grid.backend.capabilities.remote:
            narrator.say(f"waiting work moved: {stats['moves']} (onto the boost: {stats.get('moves.boost', 0)})")
        held = len(grid.boosts)

    table = Table(title="where the burst ran", title_justify="left", header_style="bold")
    for column, justify in (("ran", "left"), ("tasks", "right"), ("mean s", "right"), ("total s", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for where, durations in sorted(narrator.ran.items()):
        table.add_row(where, str(len(durations)), f"{sum(durations) / len(durations):.3f}", f"{sum(durations):.2f}")
    console.print(table)
    console.print(
        f"boosts held at the end: {held}; grid closed: {grid.closed}; the engine was asked at teardown and "
        "holds nothing of this grid"
    )


def _engine(backend: str, address: str | None, nodes: int) -> str:
    """Which engine the demo runs on, in words."""
    if backend == "local":
        return "[bold]local[/bold] backend: this machine alone (a boost is its capacity set aside)"
    if address is not None:
        return f"[bold]{backend}[/bold] cluster at {address}: {nodes} node(s)"
    stand_in = {
        "dask": f"an embedded Dask LocalCluster of {nodes} worker process(es)",
        "ray": f"a private Ray instance ({nodes} node)",
    }.get(backend, f"the {backend} backend's embedded engine ({nodes} node(s))")
    return f"[bold]{backend}[/bold]: {stand_in}, standing in for your cluster"


async def _burst(
    grid: Grid, tasks: int, each: Resources, size: Resources, narrator: _Narrator, show: Callable[[int], Any]
) -> None:
    """A remote backend: submit the whole burst at once; what has no room waits here, then moves onto the boost."""
    handles = [grid.submit(_work, i, resources=each) for i in range(tasks)]
    waiting = sum(1 for h in handles if h.placement is not None and h.placement.waiting)
    narrator.say(f"submitted: {waiting} wait for room here")
    asked = False
    async with anyio.create_task_group() as tg:

        def ask(why: str) -> None:
            nonlocal asked
            if not asked:
                asked = True
                narrator.say(f"{why}: asking for a boost of {size} for the rest of the burst")
                tg.start_soon(_boosted, grid, size, handles, narrator)

        async def on_pressure() -> None:
            async for pressure in grid.pressure_changes():
                if pressure.level == "high":
                    ask("this machine is under pressure")
                    return

        watching = anyio.CancelScope()  # entered by the watcher, cancelled when the burst is done
        tg.start_soon(_until_cancelled, watching, on_pressure)
        for finished, handle in enumerate(handles, 1):
            await handle
            show(finished)
            if finished == max(1, tasks // 8):
                ask(f"{finished} of {tasks} done and {tasks - finished} to go")
        watching.cancel()


async def _waves(
    grid: Grid,
    tasks: int,
    each: Resources,
    slots: int,
    size: Resources,
    narrator: _Narrator,
    show: Callable[[int], Any],
) -> None:
    """The local backend: the boost is capacity set aside on this machine, and work of its block runs inside it."""
    finished = 0
    first = tasks // 2
    async for _ in grid.map(_work, range(first), resources=each, max_in_flight=2 * slots):
        finished += 1
        show(finished)
    narrator.say(f"asking for a boost of {size} for the second half of the burst")
    try:
        async with grid.boost(size, ttl=60, priority=Priority.HIGH, wait=20):
            async for _ in grid.map(_work, range(first, tasks), resources=each, max_in_flight=2 * slots):
                finished += 1
                show(finished)
    except GridboostError as exc:
        narrator.say(f"no boost this time: {exc}")
    narrator.say(
        "on the local backend a boost is this machine's capacity set aside; with --backend ray or dask, work "
        "waiting for room here moves onto the boost as it becomes active"
    )


async def _until_cancelled(scope: anyio.CancelScope, work: Callable[[], Any]) -> None:
    with scope:
        await work()


async def _boosted(grid: Grid, size: Resources, handles: list[Any], narrator: _Narrator) -> None:
    """Hold a boost while the burst lasts: waiting work moves onto it as it becomes active."""
    try:
        async with grid.boost(size, ttl=60, priority=Priority.HIGH, wait=20):
            for handle in handles:
                await handle
    except GridboostError as exc:
        narrator.say(f"no boost this time: {exc}")


def run_demo(*, backend: str = "local", tasks: int = 48, address: str | None = None) -> int:
    """Run the demo; 0 on success. Errors are the caller's to report (the CLI prints one line)."""
    from rich.console import Console

    if tasks < 4:
        raise ValueError(f"--tasks must be at least 4, got {tasks}")
    console = Console(highlight=False)
    anyio.run(_demo, console, backend, tasks, address)
    return 0
