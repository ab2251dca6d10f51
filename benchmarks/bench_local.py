"""What does gridboost's local backend cost over calling anyio's thread pool directly?

gridboost promises that offloading through a ``Grid`` is nearly as cheap as
``anyio.to_thread.run_sync``. The callable here is a no-op, so the figures are pure
overhead: placement, the task record, cancel scopes, counters, the thread wrapper.
Real work only dilutes them, which makes this the worst case worth watching.

Fairness: raw calls get a ``CapacityLimiter`` as large as the one gridboost's local
backend makes, so both sides queue for the same number of worker threads, in the same
event loop and the same worker-thread cache. The grid is opened before timing starts.

The machines this runs on are small, shared and noisy, so every figure is the median
of several repetitions, and raw and gridboost runs are interleaved (in an order that
rotates each repetition) so that a burst of noise lands on both rather than on one.

    python benchmarks/bench_local.py            # full: 7 repetitions, asyncio then trio
    python benchmarks/bench_local.py --quick    # CI smoke: 3 repetitions

The last line of output is ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio
from _common import positive

import gridboost

N_THROUGHPUT = 2000
N_ROUNDTRIP = 200
TARGET_RATIO = 0.85


def noop() -> None:
    return None


def noop_item(_item: object) -> None:
    # grid.map calls fn(item); the raw side keeps calling noop(), the difference is one argument.
    return None


def default_bound() -> int:
    # LocalBackend.start()'s formula, for when the live backend does not expose its limiter.
    return max(4, 2 * (os.cpu_count() or 1))


# -- one measurement each: return elapsed seconds -----------------------------------------


async def raw_throughput(limiter: anyio.CapacityLimiter, n: int) -> float:
    call = functools.partial(anyio.to_thread.run_sync, noop, limiter=limiter)
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(call)
    return time.perf_counter() - start


async def gb_offload_throughput(grid: gridboost.Grid, n: int) -> float:
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(grid.offload, noop)
    return time.perf_counter() - start


async def gb_submit_throughput(grid: gridboost.Grid, n: int) -> float:
    start = time.perf_counter()
    handles = [grid.submit(noop) for _ in range(n)]
    for handle in handles:
        await handle
    return time.perf_counter() - start


async def gb_map_throughput(grid: gridboost.Grid, n: int, bound: int) -> float:
    start = time.perf_counter()
    async for _ in grid.map(noop_item, range(n), max_in_flight=bound):
        pass
    return time.perf_counter() - start


async def raw_roundtrip(limiter: anyio.CapacityLimiter, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await anyio.to_thread.run_sync(noop, limiter=limiter)
    return time.perf_counter() - start


async def gb_roundtrip(grid: gridboost.Grid, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await grid.offload(noop)
    return time.perf_counter() - start


# -- probes and the rows that compare them -------------------------------------------------


class Probe(NamedTuple):
    measure: Callable[[], Awaitable[float]]
    kind: str  # "throughput" or "roundtrip": decides the unit and which way is better
    calls: int


# (row, raw probe, gridboost probe): the three throughput rows share one raw baseline.
ROWS = (
    ("throughput offload", "raw_throughput", "gb_offload"),
    ("throughput submit", "raw_throughput", "gb_submit"),
    ("throughput map", "raw_throughput", "gb_map"),
    ("round trip offload", "raw_roundtrip", "gb_roundtrip"),
)
PROBES = ("raw_throughput", "gb_offload", "gb_submit", "gb_map", "raw_roundtrip", "gb_roundtrip")


def make_probes(grid: gridboost.Grid, limiter: anyio.CapacityLimiter, bound: int) -> dict[str, Probe]:
    return {
        "raw_throughput": Probe(lambda: raw_throughput(limiter, N_THROUGHPUT), "throughput", N_THROUGHPUT),
        "gb_offload": Probe(lambda: gb_offload_throughput(grid, N_THROUGHPUT), "throughput", N_THROUGHPUT),
        "gb_submit": Probe(lambda: gb_submit_throughput(grid, N_THROUGHPUT), "throughput", N_THROUGHPUT),
        "gb_map": Probe(lambda: gb_map_throughput(grid, N_THROUGHPUT, bound), "throughput", N_THROUGHPUT),
        "raw_roundtrip": Probe(lambda: raw_roundtrip(limiter, N_ROUNDTRIP), "roundtrip", N_ROUNDTRIP),
        "gb_roundtrip": Probe(lambda: gb_roundtrip(grid, N_ROUNDTRIP), "roundtrip", N_ROUNDTRIP),
    }


def to_figure(probe: Probe, elapsed: float) -> float:
    # The units people reason in: a batch is judged by its rate, a single await by its latency.
    return probe.calls / elapsed if probe.kind == "throughput" else elapsed / probe.calls * 1e6


async def run_backend(reps: int, only: set[str] | None) -> dict[str, Any]:
    async with gridboost.Grid() as grid:
        # The comparison is only fair with equal bounds: take the backend's own limiter size when it
        # exposes one (a private attribute, hence the fallback to the formula it uses today).
        bound = int(getattr(getattr(grid.backend, "_limiter", None), "total_tokens", default_bound()))
        limiter = anyio.CapacityLimiter(bound)
        probes = make_probes(grid, limiter, bound)
        if only:
            probes = {k: v for k, v in probes.items() if k in only}
        rows = [r for r in ROWS if r[1] in probes and r[2] in probes]
        keys = list(probes)

        # Warm-up: worker threads spawned, hook caches filled, code paths hot.
        for key in keys:
            await probes[key].measure()

        samples: dict[str, list[float]] = {key: [] for key in keys}
        cpu: dict[str, list[float]] = {key: [] for key in keys}
        for rep in range(reps):
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                probe = probes[key]
                gc.collect()  # start each run from the same heap state; GC during the run still counts
                cpu_start = time.process_time()
                samples[key].append(to_figure(probe, await probe.measure()))
                # CPU time of all our threads: what other tenants of a shared machine disturb least.
                cpu[key].append((time.process_time() - cpu_start) / probe.calls * 1e6)

    medians = {key: statistics.median(values) for key, values in samples.items()}
    result: dict[str, Any] = {"bound": bound, "probes": {}, "rows": {}}
    for key, values in samples.items():
        result["probes"][key] = {
            "unit": "tasks/s" if probes[key].kind == "throughput" else "us/call",
            "median": medians[key],
            "min": min(values),
            "max": max(values),
            "samples": values,
            "cpu_us_per_call": statistics.median(cpu[key]),
        }
    for name, raw_key, gb_key in rows:
        kind = probes[raw_key].kind
        raw, gb = medians[raw_key], medians[gb_key]
        # Higher is better in both: more tasks/s, or fewer µs per call.
        ratio = gb / raw if kind == "throughput" else raw / gb
        # Median of per-repetition ratios: pairs runs taken moments apart, so it shrugs off slow drifts.
        paired = statistics.median(
            (g / r if kind == "throughput" else r / g) for r, g in zip(samples[raw_key], samples[gb_key], strict=True)
        )
        result["rows"][name] = {
            "unit": result["probes"][raw_key]["unit"],
            "raw": raw,
            "gridboost": gb,
            "raw_probe": raw_key,
            "gridboost_probe": gb_key,
            "ratio": ratio,
            "paired_ratio": paired,
            "cpu_ratio": result["probes"][raw_key]["cpu_us_per_call"] / result["probes"][gb_key]["cpu_us_per_call"],
            "ok": ratio >= TARGET_RATIO,
        }
    return result


def spread(probe: dict[str, Any]) -> str:
    # Half the min-max range, relative to the median: how far to trust the median on this machine.
    return f"{(probe['max'] - probe['min']) / probe['median'] / 2:.0%}"


def print_table(backend: str, reps: int, result: dict[str, Any]) -> None:
    print(f"\n== {backend}: bound={result['bound']} threads, {reps} repetitions, medians ==")
    columns = ("benchmark", "unit", "raw", "±", "gridboost", "±", "ratio", "paired", "cpu")
    header = " ".join(
        f"{c:{w}}" for c, w in zip(columns, ("<20", "<7", ">10", ">4", ">10", ">4", ">6", ">6", ">6"), strict=True)
    )
    print(header)
    print("-" * len(header))
    probes = result["probes"]
    for name, row in result["rows"].items():
        mark = "" if row["ok"] else f"  below {TARGET_RATIO}"
        print(
            f"{name:<20} {row['unit'].replace('us/', 'µs/'):<7} "
            f"{row['raw']:>10,.1f} {spread(probes[row['raw_probe']]):>4} "
            f"{row['gridboost']:>10,.1f} {spread(probes[row['gridboost_probe']]):>4} "
            f"{row['ratio']:>6.3f} {row['paired_ratio']:>6.3f} {row['cpu_ratio']:>6.3f}{mark}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7 (CI smoke)")
    parser.add_argument("--reps", type=positive, help="repetitions (overrides --quick)")
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="both")
    parser.add_argument(
        "--only",
        action="append",
        choices=PROBES,
        metavar="PROBE",
        help=f"run only this probe (repeatable), e.g. for profiling; one of: {', '.join(PROBES)}",
    )
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    print(
        f"gridboost {gridboost.__version__}, anyio {version('anyio')}, trio {version('trio')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"throughput: {N_THROUGHPUT} concurrent no-ops, round trip: {N_ROUNDTRIP} sequential"
    )
    report: dict[str, Any] = {
        "gridboost": gridboost.__version__,
        "anyio": version("anyio"),
        "trio": version("trio"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "n_throughput": N_THROUGHPUT,
        "n_roundtrip": N_ROUNDTRIP,
        "reps": reps,
        "target_ratio": TARGET_RATIO,
        "backends": {},
    }
    only = set(args.only) if args.only else None
    for backend in backends:
        if backend == "trio" and version("trio") is None:
            print("\n== trio: skipped, trio is not installed ==")
            continue
        result = anyio.run(run_backend, reps, only, backend=backend)
        print_table(backend, reps, result)
        report["backends"][backend] = result
    rows = [row for b in report["backends"].values() for row in b["rows"].values()]
    report["ok"] = all(row["ok"] for row in rows)
    print(
        f"\nratio: gridboost vs raw from the medians, higher is better, 1.00 = parity, target >= {TARGET_RATIO}\n"
        "paired: median of the per-repetition ratios; cpu: the same ratio from process CPU time per call\n"
        "±: half the min-max range of the repetitions, relative to the median"
    )
    print("RESULT " + json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
