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

Teardown: the exit of a grid with 1000 tasks in flight and 3 boosts (default options), on asyncio (and trio with
``--trio``), against a LocalCluster of the benchmark's own that outlives each grid, so that what the scheduler and the
workers still show of the grid is read right after its exit (it must be nothing); beside it, raw Dask's
``client.cancel`` of as many futures in flight, in one call and in one call each.

    python benchmarks/bench_dask.py            # full: 7 repetitions
    python benchmarks/bench_dask.py --quick    # CI smoke: 3 repetitions
    python benchmarks/bench_dask.py --only teardown --trio

The last line of output is ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
import asyncio
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
N_TEARDOWN = 1000
TEARDOWN_BOOSTS = 3
TARGET_TEARDOWN = 1.0  # seconds, median exit of a grid with N_TEARDOWN tasks in flight and TEARDOWN_BOOSTS boosts
# Long enough that the work is still in flight at exit, short enough that a cancelled task's thread is back quickly.
TEARDOWN_TASK = 0.2


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


def pause(seconds: float) -> None:
    time.sleep(seconds)


def _ours_on_scheduler(session: str, dask_scheduler: Any = None) -> dict[str, int]:
    """On the scheduler: what it still holds of a grid's session — task keys, lease marks, lease records."""
    plugin = dask_scheduler.plugins.get("gridboost-leases")
    return {
        "tasks": sum(str(key).startswith(f"gridboost:{session}:") for key in dask_scheduler.tasks),
        "marks": sum(
            name.startswith(f"gridboost-lease:{session}:")
            for ws in dask_scheduler.workers.values()
            for name in ws.resources
        ),
        "records": sum(r["session"] == session for r in plugin.leases.values()) if plugin is not None else 0,
    }


def _ours_on_worker(session: str, dask_worker: Any = None) -> dict[str, int]:
    """On a worker: its lease marks and tasks of a grid's session, in the worker's own state."""
    state = dask_worker.state
    return {
        "marks": sum(name.startswith(f"gridboost-lease:{session}:") for name in state.total_resources),
        "tasks": sum(str(key).startswith(f"gridboost:{session}:") for key in state.tasks),
    }


def engine_leftovers(reader: Any, session: str) -> dict[str, int]:
    """What the scheduler and every worker still show of ``session`` (read with a synchronous client)."""
    left = dict(reader.run_on_scheduler(_ours_on_scheduler, session))
    for found in reader.run(_ours_on_worker, session).values():
        left["worker_marks"] = left.get("worker_marks", 0) + found["marks"]
        left["worker_tasks"] = left.get("worker_tasks", 0) + found["tasks"]
    return {key: value for key, value in left.items() if value}


async def teardown_once(address: str, reader: Any) -> tuple[float, dict[str, int]]:
    """One grid with N_TEARDOWN tasks in flight and TEARDOWN_BOOSTS boosts: its exit time, and what the engine showed
    of it right after."""
    grid = gridboost.Grid("dask", address=address)
    async with grid:
        boosts = [await grid.request_boost("cpu=1", ttl=60) for _ in range(TEARDOWN_BOOSTS)]
        places = [*boosts, "cluster"]
        handles = [grid.submit(pause, TEARDOWN_TASK, where=places[i % len(places)]) for i in range(N_TEARDOWN)]
        backend: Any = grid.backend
        client, session = backend.client, backend.session

        async def counts() -> tuple[int, int]:
            # The client's own loop (a thread's, on trio) asks; tasks already done count as known.
            known, running = await backend._loop.call(client.run_on_scheduler, _counts_on_scheduler, backend.prefix)
            return known + sum(handle.done() for handle in handles), running

        await in_flight(counts, N_TEARDOWN)
        start = time.perf_counter()
    elapsed = time.perf_counter() - start
    left = await anyio.to_thread.run_sync(engine_leftovers, reader, session)
    return elapsed, left


def _counts_on_scheduler(prefix: str, dask_scheduler: Any = None) -> tuple[int, int]:
    """On the scheduler: how many tasks whose key starts with ``prefix`` it knows, and how many of them run."""
    keys = [ts for key, ts in dask_scheduler.tasks.items() if str(key).startswith(prefix)]
    return len(keys), sum(ts.state == "processing" for ts in keys)


async def in_flight(counts: Callable[[], Awaitable[tuple[int, int]]], n: int) -> None:
    """Wait until the scheduler knows all ``n`` tasks and runs some of them."""
    with anyio.fail_after(60):
        while True:
            known, running = await counts()
            if known >= n and running:
                return
            await anyio.sleep(0.02)


async def raw_cancel(client: Any, n: int, bulk: bool) -> float:
    """Raw Dask: ``n`` futures in flight cancelled with one ``client.cancel`` (bulk) or one each, concurrently."""
    prefix = f"raw-{'bulk' if bulk else 'each'}-{time.monotonic_ns()}:"
    futures = [client.submit(pause, TEARDOWN_TASK, key=f"{prefix}{i}", pure=False) for i in range(n)]

    async def counts() -> tuple[int, int]:
        known, running = await client.run_on_scheduler(_counts_on_scheduler, prefix)
        return known + sum(future.done() for future in futures), running

    await in_flight(counts, n)
    start = time.perf_counter()
    if bulk:
        await client.cancel(futures)
    else:
        await asyncio.gather(*(client.cancel([future]) for future in futures))
    return time.perf_counter() - start


async def run_teardown(address: str, reader: Any, reps: int, raw: bool) -> dict[str, Any]:
    """Exit times and engine leftovers of ``reps`` grids; with ``raw``, raw Dask's cancel of as many futures."""
    await teardown_once(address, reader)  # warm-up: the workers' imports, the registry installed
    exits: list[float] = []
    leftovers: list[dict[str, int]] = []
    bulk: list[float] = []
    each: list[float] = []
    for _ in range(reps):
        gc.collect()
        elapsed, left = await teardown_once(address, reader)
        exits.append(elapsed)
        leftovers.append(left)
    if raw:
        from distributed import Client

        async with Client(address, asynchronous=True, set_as_default=False) as client:
            for _ in range(reps):
                bulk.append(await raw_cancel(client, N_TEARDOWN, bulk=True))
                each.append(await raw_cancel(client, N_TEARDOWN, bulk=False))
    report: dict[str, Any] = {
        "exit": {
            "unit": "s",
            "median": statistics.median(exits),
            "min": min(exits),
            "max": max(exits),
            "samples": exits,
        },
        "leftovers": leftovers,
    }
    if raw:
        report["raw_cancel_bulk"] = {"unit": "s", "median": statistics.median(bulk), "samples": bulk}
        report["raw_cancel_each"] = {"unit": "s", "median": statistics.median(each), "samples": each}
    return report


def teardown(reps: int, trio: bool) -> dict[str, Any]:
    """The teardown figures on asyncio (and trio), against a LocalCluster of this process that outlives the grids, so
    that what the engine shows of a grid can be read right after its exit."""
    from distributed import Client, LocalCluster

    results: dict[str, Any] = {}
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None, host="127.0.0.1") as cluster,
        Client(cluster.scheduler_address, set_as_default=False) as reader,
    ):
        address = cluster.scheduler_address
        results["asyncio"] = anyio.run(run_teardown, address, reader, reps, True, backend="asyncio")
        if trio:
            results["trio"] = anyio.run(run_teardown, address, reader, reps, False, backend="trio")
    return results


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
    parser.add_argument(
        "--only", choices=["overhead", "teardown"], help="only the overhead figures, or only the teardown ones"
    )
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
    report: dict[str, Any] = {"reps": reps}
    rows: dict[str, dict[str, Any]] = {}
    if args.only != "teardown":
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
        report.update(asyncio=probes, rows=rows)
        if args.trio:
            trio_probes = anyio.run(run_trio, reps, backend="trio")
            report["trio"] = trio_probes
            print(
                f"\n== trio (client in a thread's loop) ==\nthroughput {trio_probes['gb_throughput']['median']:.2f} tasks/s "
                f"({trio_probes['gb_throughput']['median'] / probes['raw_throughput']['median']:.3f} x raw asyncio), "
                f"round trip {trio_probes['gb_roundtrip']['median']:.2f} ms "
                f"({trio_probes['gb_roundtrip']['median'] / probes['raw_roundtrip']['median']:.3f} x raw asyncio)"
            )
    if args.only != "overhead":
        figures = teardown(reps, args.trio)
        report["teardown"] = figures
        print(
            f"\n== teardown: exit of a grid with {N_TEARDOWN} tasks in flight and {TEARDOWN_BOOSTS} boosts, default "
            f"options, {reps} repetitions, medians =="
        )
        for loop, found in figures.items():
            median = found["exit"]["median"]
            ok = median <= TARGET_TEARDOWN and not any(found["leftovers"])
            rows[f"teardown {loop}"] = {
                "gridboost": median,
                "target": f"<= {TARGET_TEARDOWN} s, engine clean",
                "ok": ok,
            }
            left = [x for x in found["leftovers"] if x]
            print(
                f"{loop:<8} exit {median:.3f} s (min {found['exit']['min']:.3f}, max {found['exit']['max']:.3f}); "
                f"engine at exit: {left or 'clean every time'}" + ("" if ok else "  MISSED")
            )
            if "raw_cancel_bulk" in found:
                print(
                    f"raw Dask: client.cancel of {N_TEARDOWN} futures in flight: one call "
                    f"{found['raw_cancel_bulk']['median']:.3f} s, one call each (concurrently) "
                    f"{found['raw_cancel_each']['median']:.3f} s"
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
