"""What does gridboost's Dask backend cost over calling ``client.submit`` directly?

Two raw baselines for throughput: the best raw Dask can do (2000 ``client.submit`` in a row, then one
``client.gather``), and raw Dask in the shape gridboost has (each submission awaited in a task of its own, as
``bench_local.py`` compares ``to_thread.run_sync`` calls in a task group).

Both sides use the *same* asynchronous ``distributed.Client`` — the grid's own, connected to the embedded
LocalCluster the grid started — in the same event loop, against the same scheduler and workers, so the only
difference is gridboost's path: placement, the task record, cancel scopes, the key and options it builds. The
callable is a no-op, so the figures are pure overhead; real work only dilutes them.

Raw Dask is asyncio-only, so the comparison runs on asyncio. With ``--trio`` the gridboost figures on trio (where the
client lives in a thread's loop) are printed too, against the same raw asyncio baseline measured in that run.

Every figure is the median of several repetitions, and raw and gridboost runs are interleaved (in an order that
rotates each repetition) so that a burst of noise on a small shared machine lands on both.

    python benchmarks/bench_dask.py            # full: 7 repetitions
    python benchmarks/bench_dask.py --quick    # CI smoke: 3 repetitions

The last line of output is ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
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

import gridboost

N_THROUGHPUT = 2000
N_ROUNDTRIP = 200
TARGET_THROUGHPUT = 0.95  # gridboost tasks/s >= 0.95 x raw
TARGET_ROUNDTRIP = 1.05  # gridboost latency <= 1.05 x raw


def noop() -> None:
    return None


async def raw_throughput(client: Any, n: int) -> float:
    start = time.perf_counter()
    futures = [client.submit(noop, pure=False) for _ in range(n)]
    await client.gather(futures)
    return time.perf_counter() - start


async def gb_offload_cluster(grid: gridboost.Grid) -> None:
    await grid.offload(noop, where="cluster")  # "cluster": never the host, whatever the local pressure


async def gb_throughput(grid: gridboost.Grid, n: int) -> float:
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(gb_offload_cluster, grid)
    return time.perf_counter() - start


async def raw_await_each(client: Any, n: int) -> float:
    """Raw Dask in gridboost's shape: each submission awaited in a task of its own."""

    async def one() -> None:
        await client.submit(noop, pure=False)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return time.perf_counter() - start


async def raw_roundtrip(client: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await client.submit(noop, pure=False)
    return time.perf_counter() - start


async def gb_roundtrip(grid: gridboost.Grid, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await grid.offload(noop, where="cluster")
    return time.perf_counter() - start


class Probe(NamedTuple):
    measure: Callable[[], Awaitable[float]]
    kind: str  # "throughput" or "roundtrip"
    calls: int


def to_figure(probe: Probe, elapsed: float) -> float:
    return probe.calls / elapsed if probe.kind == "throughput" else elapsed / probe.calls * 1e3


async def run_asyncio(reps: int) -> dict[str, Any]:
    async with gridboost.Grid("dask") as grid:  # the embedded default: a LocalCluster of 2 workers x 2 threads
        client = grid.backend.client  # type: ignore[attr-defined]
        probes = {
            "raw_throughput": Probe(lambda: raw_throughput(client, N_THROUGHPUT), "throughput", N_THROUGHPUT),
            "raw_await_each": Probe(lambda: raw_await_each(client, N_THROUGHPUT), "throughput", N_THROUGHPUT),
            "gb_throughput": Probe(lambda: gb_throughput(grid, N_THROUGHPUT), "throughput", N_THROUGHPUT),
            "raw_roundtrip": Probe(lambda: raw_roundtrip(client, N_ROUNDTRIP), "roundtrip", N_ROUNDTRIP),
            "gb_roundtrip": Probe(lambda: gb_roundtrip(grid, N_ROUNDTRIP), "roundtrip", N_ROUNDTRIP),
        }
        return await _measure(probes, reps)


async def run_trio(reps: int) -> dict[str, Any]:
    async with gridboost.Grid("dask") as grid:
        probes = {
            "gb_throughput": Probe(lambda: gb_throughput(grid, N_THROUGHPUT), "throughput", N_THROUGHPUT),
            "gb_roundtrip": Probe(lambda: gb_roundtrip(grid, N_ROUNDTRIP), "roundtrip", N_ROUNDTRIP),
        }
        return await _measure(probes, reps)


async def _measure(probes: dict[str, Probe], reps: int) -> dict[str, Any]:
    keys = list(probes)
    for key in keys:  # warm-up: workers' caches, the client's batched stream, code paths hot
        await probes[key].measure()
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for rep in range(reps):
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:
            gc.collect()
            samples[key].append(to_figure(probes[key], await probes[key].measure()))
    return {
        key: {
            "unit": "tasks/s" if probes[key].kind == "throughput" else "ms/call",
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "samples": values,
        }
        for key, values in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7 (CI smoke)")
    parser.add_argument("--reps", type=int, help="repetitions (overrides --quick)")
    parser.add_argument("--trio", action="store_true", help="also measure gridboost on trio")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    print(
        f"gridboost {gridboost.__version__}, distributed {version('distributed')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; throughput: {N_THROUGHPUT} concurrent no-ops, round trip: {N_ROUNDTRIP} sequential"
    )
    probes = anyio.run(run_asyncio, reps, backend="asyncio")
    thr = probes["gb_throughput"]["median"] / probes["raw_throughput"]["median"]
    rt = probes["gb_roundtrip"]["median"] / probes["raw_roundtrip"]["median"]
    each = probes["gb_throughput"]["median"] / probes["raw_await_each"]["median"]
    rows = {
        "throughput": {"raw": probes["raw_throughput"]["median"], "gridboost": probes["gb_throughput"]["median"]},
        "thr per-task": {"raw": probes["raw_await_each"]["median"], "gridboost": probes["gb_throughput"]["median"]},
        "round trip": {"raw": probes["raw_roundtrip"]["median"], "gridboost": probes["gb_roundtrip"]["median"]},
    }
    rows["throughput"].update(ratio=thr, target=f">= {TARGET_THROUGHPUT}", ok=thr >= TARGET_THROUGHPUT)
    rows["thr per-task"].update(ratio=each, target=f">= {TARGET_THROUGHPUT}", ok=each >= TARGET_THROUGHPUT)
    rows["round trip"].update(ratio=rt, target=f"<= {TARGET_ROUNDTRIP}", ok=rt <= TARGET_ROUNDTRIP)
    print(f"\n== asyncio, {reps} repetitions, medians ==")
    print(f"{'benchmark':<12} {'unit':<8} {'raw':>10} {'gridboost':>10} {'ratio':>7}  target")
    for name, row in rows.items():
        unit = "ms/call" if name == "round trip" else "tasks/s"
        print(
            f"{name:<12} {unit:<8} {row['raw']:>10.2f} {row['gridboost']:>10.2f} {row['ratio']:>7.3f}  {row['target']}"
            + ("" if row["ok"] else "  MISSED")
        )
    report: dict[str, Any] = {"reps": reps, "asyncio": probes, "rows": rows}
    if args.trio:
        trio_probes = anyio.run(run_trio, reps, backend="trio")
        report["trio"] = trio_probes
        print(
            f"\n== trio (client in a thread's loop) ==\nthroughput {trio_probes['gb_throughput']['median']:.2f} tasks/s "
            f"({trio_probes['gb_throughput']['median'] / probes['raw_throughput']['median']:.3f} x raw asyncio), "
            f"round trip {trio_probes['gb_roundtrip']['median']:.2f} ms "
            f"({trio_probes['gb_roundtrip']['median'] / probes['raw_roundtrip']['median']:.3f} x raw asyncio)"
        )
    report["ok"] = all(row["ok"] for row in rows.values())
    print(
        "\nthroughput: raw = 2000 client.submit, then one client.gather; thr per-task: raw = each submission awaited in "
        "a task of its own (gridboost's shape)\nratios: gridboost / raw tasks/s (higher is better); gridboost / raw ms"
    )
    print("RESULT " + json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
