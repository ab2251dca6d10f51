"""Does the telemetry plugin (``plugins/gridboost-otel``) slow the hot path? Local offload throughput with and without.

Issue 16's goal: the plugin never slows the hot path measurably, ratio >= 0.95 of the same grid without it. Every
grid here is the local backend and offloads no-ops (as ``bench_local.py`` does): the worst case, where the plugin's
per-task cost is all there is to see. The grids are open side by side in one event loop, and their runs interleaved
in an order that rotates each repetition; every figure is a median.

The sides, each a ``Grid()`` with:

* ``off``      — no plugin: the baseline;
* ``api``      — ``GridTelemetry()`` on OpenTelemetry's API alone, no SDK configured (a library's default: no-ops);
* ``metrics``  — the SDK's ``MeterProvider`` (an in-memory reader, collected after each run), tracing not configured;
* ``sampled``  — the SDK's metrics and tracing, parent-based sampling of 1 trace in 10, a batch processor whose
  exporter drops what it gets (so export costs nothing, and the SDK's own work is what is measured);
* ``traced``   — the same, every span sampled.

The goal is for what an app runs by default (``api``, ``metrics``, ``sampled``); ``traced`` shows what a span per task
costs in the OpenTelemetry SDK itself (about 13 µs in Python) when every one is kept. Besides throughput, each side's
hook is timed on its own, called directly: on a shared machine whose noise swamps a few per cent of throughput, that
figure against a task's own cost (the ``cpu µs`` of ``off``) says what the plugin adds.

    python benchmarks/bench_otel.py            # 7 repetitions, asyncio then trio
    python benchmarks/bench_otel.py --quick    # 3 repetitions

The last line of output is ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from _common import half_range, interleaved, positive, version
from gridboost_otel import GridTelemetry
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

import gridboost

N = 2000
TARGET_RATIO = 0.95
SIDES = ("off", "api", "metrics", "sampled", "traced")
#: The sides the goal applies to: what an app configures by default.
GOAL = ("api", "metrics", "sampled")


def noop() -> None:
    return None


class Drop(SpanExporter):
    """An exporter that exports nothing: the SDK's work is measured, not a collector's."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class Side:
    """One grid and what it reports to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.readers: list[InMemoryMetricReader] = []
        self.tracers: list[TracerProvider] = []
        plugins: list[object] = []
        if name == "api":
            plugins.append(GridTelemetry())
        elif name != "off":
            reader = InMemoryMetricReader()
            self.readers.append(reader)
            meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
            tracer_provider = None
            if name in ("sampled", "traced"):
                sampler = ParentBased(TraceIdRatioBased(0.1)) if name == "sampled" else ParentBased(ALWAYS_ON)
                tracer_provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
                # A queue as deep as a run: what a run ends is exported in the background, never dropped.
                tracer_provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=4 * N))
                self.tracers.append(tracer_provider)
            plugins.append(GridTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider))
        self.grid = gridboost.Grid(plugins=plugins)
        #: Process CPU seconds of each run (all threads): what other tenants of a shared machine disturb least.
        self.cpu: list[float] = []

    async def measure(self, n: int) -> float:
        grid = self.grid
        cpu = time.process_time()
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(grid.offload, noop)
        elapsed = time.perf_counter() - start
        self.cpu.append(time.process_time() - cpu)
        for reader in self.readers:  # a collection per run, as a periodic reader would do now and then
            reader.get_metrics_data()
        for tracer in self.tracers:  # the run's spans out of the queue before the next run, off the clock
            await anyio.to_thread.run_sync(tracer.force_flush)
        return elapsed

    async def hook_cost(self) -> float | None:
        """µs the plugin's own hook takes a task, called directly (no scheduling, no thread, no core around it): the
        steadiest figure of its cost, the best of a few rounds of ``N`` calls. ``None`` without a plugin."""
        telemetry = next((p for p in self.grid.plugins.get_plugins() if isinstance(p, GridTelemetry)), None)
        if telemetry is None:
            return None
        task = gridboost.TaskSpec(noop)
        placement = gridboost.Placement("local", "the backend is this machine")
        outcome = gridboost.TaskOutcome("succeeded", 1, 0.0001)
        hook, grid = telemetry.gridboost_task_finished, self.grid
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(N):
                hook(grid, task, placement, outcome)
            rounds.append((time.perf_counter() - start) / N * 1e6)
            for tracer in self.tracers:
                await anyio.to_thread.run_sync(tracer.force_flush)
        return min(rounds)

    def close(self) -> None:
        for tracer in self.tracers:
            tracer.shutdown()


async def run_backend(reps: int, sides: tuple[str, ...]) -> dict[str, Any]:
    chosen = [Side(name) for name in sides]
    try:
        async with AsyncExitStack() as stack:
            for side in chosen:
                await stack.enter_async_context(side.grid)
            measures: dict[str, Callable[[int], Awaitable[float]]] = {side.name: side.measure for side in chosen}
            seconds = await interleaved(measures, N, N, reps)
            errors = {side.name: side.grid.stats()["observer_errors"] for side in chosen}
            hooks = {side.name: await side.hook_cost() for side in chosen}
    finally:
        for side in chosen:
            side.close()
    rates = {name: [N / s for s in values] for name, values in seconds.items()}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu = {side.name: statistics.median(side.cpu[1:]) / N * 1e6 for side in chosen}  # µs a task; not the warm-up
    result: dict[str, Any] = {"sides": {}, "observer_errors": errors}
    for name, values in rates.items():
        row: dict[str, Any] = {
            "tasks_per_s": medians[name],
            "spread": half_range(values),
            "samples": values,
            "cpu_us_per_task": cpu[name],
            "hook_us_per_task": hooks[name],
        }
        if name != "off":
            row["ratio"] = medians[name] / medians["off"]
            row["paired_ratio"] = statistics.median(w / o for w, o in zip(values, rates["off"], strict=True))
            row["cpu_ratio"] = cpu["off"] / cpu[name]
            row["goal"] = name in GOAL
            row["ok"] = row["ratio"] >= TARGET_RATIO if name in GOAL else None
        result["sides"][name] = row
    return result


def print_table(backend: str, reps: int, result: dict[str, Any]) -> None:
    print(f"\n== {backend}: {N} concurrent no-op offloads a run, {reps} repetitions, medians ==")
    print(f"{'side':<10} {'tasks/s':>10} {'±':>5} {'cpu µs':>7} {'hook µs':>7} {'ratio':>6} {'paired':>7} {'cpu':>6}")
    for name, row in result["sides"].items():
        ratios = (
            f"{row['ratio']:>6.3f} {row['paired_ratio']:>7.3f} {row['cpu_ratio']:>6.3f}"
            if "ratio" in row
            else f"{'':>6} {'':>7} {'':>6}"
        )
        mark = "  below the goal" if row.get("ok") is False else ("" if row.get("goal", True) else "  (no goal)")
        hook = "" if row["hook_us_per_task"] is None else f"{row['hook_us_per_task']:.2f}"
        figures = f"{row['tasks_per_s']:>10,.0f} {row['spread']:>5.0%} {row['cpu_us_per_task']:>7.1f} {hook:>7}"
        print(f"{name:<10} {figures} {ratios}{mark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--reps", type=positive, help="repetitions (overrides --quick)")
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="both")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"a comma list of: {', '.join(SIDES)} (off is kept)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    sides = ("off", *[s for s in args.sides.split(",") if s in SIDES and s != "off"])
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    print(
        f"gridboost {gridboost.__version__}, gridboost-otel {version('gridboost-otel')}, "
        f"opentelemetry-sdk {version('opentelemetry-sdk')}, anyio {version('anyio')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    report: dict[str, Any] = {
        "gridboost": gridboost.__version__,
        "gridboost_otel": version("gridboost-otel"),
        "opentelemetry_sdk": version("opentelemetry-sdk"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "n": N,
        "reps": reps,
        "target_ratio": TARGET_RATIO,
        "goal_sides": [s for s in GOAL if s in sides],
        "backends": {},
    }
    for backend in backends:
        if backend == "trio" and version("trio") is None:
            print("\n== trio: skipped, trio is not installed ==")
            continue
        result = anyio.run(run_backend, reps, sides, backend=backend)
        print_table(backend, reps, result)
        report["backends"][backend] = result
    goals = [row for b in report["backends"].values() for row in b["sides"].values() if row.get("goal")]
    report["ok"] = all(row["ok"] for row in goals)
    print(
        f"\nratio: tasks/s with the plugin ÷ without, from the medians (1.00 = no cost); goal >= {TARGET_RATIO} for "
        f"{', '.join(GOAL)}\npaired: median of the per-repetition ratios; ±: half the min-max range, relative\n"
        "cpu: the same ratio from the process's CPU time per task (all threads; the steadier signal on a shared machine)\n"
        "hook µs: the plugin's own gridboost_task_finished, called directly: the best of 5 rounds"
    )
    print("RESULT " + json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
