"""How does gridboost compare with what a Ray, Dask or thread-pool user would write instead?

``bench_ray.py`` and ``bench_dask.py`` price gridboost's overhead per task against the raw engine. This script puts
gridboost beside its peers on the commonest job, mapping a function over many items, on the same engine, the same
slots and the same batch, in one run:

* Ray (a private ``ray.cluster_utils.Cluster``: a head of 0 CPUs and one 2-CPU worker node, started as
  ``bench_ray.py`` starts it): ``grid.map`` against joblib with Ray's backend (``ray.util.joblib.register_ray()``),
  ``ray.util.multiprocessing.Pool.map``, and raw tasks (``fn.remote(item)`` each, then ``ray.get`` of them all);
* Dask (a ``LocalCluster`` of 2 worker processes x 1 thread): ``grid.map`` against joblib with Dask's backend
  (``joblib.parallel_config(backend="dask")`` on a ``distributed.Client``), ``client.map`` + ``client.gather``, and
  raw tasks (``client.submit(fn, item)`` each, then ``client.gather``);
* local (gridboost's thread backend): ``grid.map`` against ``concurrent.futures.ThreadPoolExecutor.map`` with as
  many threads, and ``grid.offload`` of each item against ``anyio.to_thread.run_sync`` with as many.

Batches: 2000 items of a 1 ms sleep (all overhead: the slot limit is 2 slots / 1 ms = 2000 items/s), and 200 items
of about 20 ms of pure-Python CPU work (calibrated on this machine at the start). Parked data: 20 offloads, one after
the other, each reading one 100 MB ``bytes`` object passed as the argument every time, against the same with the
object parked once (``grid.put``, where the installed gridboost has it), and the raw engine's own two ways (Ray:
the bytes each call, or ``ray.put`` once; Dask: the bytes each call, or ``client.scatter`` once).

Fair play: every engine, grid, client and pool is started before its timer starts, and every pool (Ray's Pool,
joblib's) has run one small call first, as the grid has had its warm-up; a Ray pool's actors hold the node's CPUs, so
each pool lives only for its own run. ``grid.map`` gets ``max_in_flight`` = the whole batch (``--max-in-flight`` to
change it): each peer hands the engine the whole batch too, and the engine's slots are the bound for everyone.
Where the installed ``Grid.map`` takes ``batch_size``, both its default and ``batch_size=1`` (one engine task per
item) are measured. Every figure is the median of interleaved repetitions in an order that rotates each round.

    python benchmarks/bench_peers.py --engine ray --quick     # CI smoke: 3 repetitions
    python benchmarks/bench_peers.py                           # every engine installed here, 5 repetitions
    python benchmarks/bench_peers.py --engine dask --only sleep --only gb_map --only joblib

The last line of output is ``RESULT {json}`` for machines to read. The script always exits 0.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple

import anyio
from _common import half_range, interleaved, positive, private_ray_cluster, version

import gridboost

N_SLEEP = 2000
SLEEP_S = 0.001
N_CPU = 200
CPU_S = 0.020  # the target; the work is calibrated to it on this machine
N_PARKED = 20
PARKED_BYTES = 100_000_000
RAY_WORKER_CPUS = 2
DASK_WORKERS = 2
DASK_THREADS = 1
LOCAL_WORKERS = max(4, 2 * (os.cpu_count() or 1))  # the local backend's own default, passed to both sides
TEMP_PREFIX = "gridboost-bench-peers-"
ENGINES = ("ray", "dask", "local")
BATCHES = ("sleep", "cpu", "parked")
PROBES = (
    "gb_map",
    "gb_map_b1",
    "gb_offload",
    "joblib",
    "pool_map",
    "client_map",
    "raw_tasks",
    "tpe_map",
    "to_thread",
    "gb_ship",
    "gb_park",
    "raw_ship",
    "raw_park",
)
# (engine, batch): (gridboost probe, what it is compared with, the least ratio), from issue 14. "slot_limit" is the
# engine's ideal rate, "best_peer" the fastest peer measured in the run.
GOALS: dict[tuple[str, str], tuple[tuple[str, str, float], ...]] = {
    ("ray", "sleep"): (("gb_map", "pool_map", 1.0), ("gb_map", "slot_limit", 0.9), ("gb_map", "joblib", 1.5)),
    ("ray", "cpu"): (("gb_map", "best_peer", 1.0),),
    ("dask", "sleep"): (("gb_map", "joblib", 1.0), ("gb_map", "client_map", 2.0)),
    ("dask", "cpu"): (("gb_map", "best_peer", 1.0),),
    ("local", "sleep"): (("gb_map", "tpe_map", 1.0), ("gb_offload", "to_thread", 0.9)),
    ("local", "cpu"): (("gb_map", "tpe_map", 1.0), ("gb_offload", "to_thread", 0.9)),
    ("ray", "parked"): (("gb_park", "gb_ship", 5.0),),
    ("dask", "parked"): (("gb_park", "gb_ship", 5.0),),
}
SHORT = {
    "gb_map": "map",
    "gb_map_b1": "map b=1",
    "gb_executor": "exec",
    "gb_executor_c": "exec c=20",
    "gb_offload": "offload",
    "gb_ship": "shipped",
    "gb_park": "parked",
}


# -- the work: module-level functions, shipped to the engines' workers by value ------------------------------------


def nap(item: int) -> int:
    time.sleep(SLEEP_S)
    return item


def spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def read(blob: bytes) -> int:
    return len(blob) + blob[0] + blob[-1]


def pause() -> None:
    time.sleep(0.01)


def calibrate(seconds: float) -> int:
    """How many iterations of ``spin`` take ``seconds`` here (the fastest of a few tries: noise only slows)."""
    probe = 50_000
    best = min(_timed(spin, probe) for _ in range(5))
    return max(1, round(probe * seconds / best))


def _timed(fn: Callable[[int], Any], arg: int) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


# -- what the installed gridboost offers ----------------------------------------------------------------------------


def map_batches() -> bool:
    """Whether ``Grid.map`` takes ``batch_size`` (issue 14's batching has landed)."""
    return "batch_size" in inspect.signature(gridboost.Grid.map).parameters


def has_put() -> bool:
    """Whether ``Grid.put`` exists (issue 14's parked data has landed)."""
    return hasattr(gridboost.Grid, "put")


# -- one run of a batch: each measure takes the number of items (fewer for the warm-up), returns elapsed seconds ----


class Probe(NamedTuple):
    label: str
    side: str  # "gridboost" (a ratio column) or "peer"
    measure: Callable[[int], Awaitable[float]]


class Batch(NamedTuple):
    name: str
    title: str
    fn: Callable[[Any], Any]
    items: list[Any]
    unit: str  # "items/s" (higher is better) or "ms/call" (lower is better)
    per_item_s: float | None  # for the slot limit; None: no limit row
    slots: int  # what runs at once: the engine's slots, or 1 for Python CPU work on threads (the GIL)


def checked(out: list[Any], n: int, start: float) -> float:
    elapsed = time.perf_counter() - start
    if len(out) != n:
        raise RuntimeError(f"expected {n} results, got {len(out)}")
    return elapsed


def gridboost_probes(grid: gridboost.Grid, batch: Batch, where: str, max_in_flight: int | None) -> dict[str, Probe]:
    fn, items = batch.fn, batch.items

    async def run_map(n: int, batch_size: int | None) -> float:
        options: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
        bound = max_in_flight or n
        start = time.perf_counter()
        out = [r async for r in grid.map(fn, items[:n], max_in_flight=bound, where=where, **options)]
        return checked(out, n, start)

    def executor_map(executor: Any, chunksize: int, n: int) -> float:
        start = time.perf_counter()
        out = list(executor.map(fn, items[:n], chunksize=chunksize))
        return checked(out, n, start)

    probes: dict[str, Probe] = {}
    if hasattr(grid, "executor"):  # concurrent.futures over the grid, from a thread as sync code calls it
        executor = grid.executor()
        probes["gb_executor"] = Probe("grid.executor().map", "gridboost", in_thread(executor_map, executor, 1))
        probes["gb_executor_c"] = Probe(
            "grid.executor().map, chunksize=20", "gridboost", in_thread(executor_map, executor, 20)
        )
    if map_batches():
        return {
            "gb_map": Probe("grid.map, default batch_size", "gridboost", functools.partial(run_map, batch_size=None)),
            "gb_map_b1": Probe("grid.map, batch_size=1", "gridboost", functools.partial(run_map, batch_size=1)),
            **probes,
        }
    return {"gb_map": Probe("grid.map (no batch_size yet)", "gridboost", functools.partial(run_map, batch_size=None))}


def in_thread(sync: Callable[..., float], *args: Any) -> Callable[[int], Awaitable[float]]:
    """A measure that runs ``sync(*args, n)`` in a worker thread: the peers' calls block."""

    async def measure(n: int) -> float:
        return await anyio.to_thread.run_sync(sync, *args, n)

    return measure


# -- Ray's peers ------------------------------------------------------------------------------------------------------


def ray_settle(pause_remote: Any) -> None:
    # A Ray pool's actors die with it, and their worker processes with them: bring task workers back before the next
    # probe, untimed, so that it does not pay for their start.
    import ray

    ray.get([pause_remote.remote() for _ in range(2 * RAY_WORKER_CPUS)])


def ray_raw(remote: Any, items: list[Any], n: int) -> float:
    import ray

    start = time.perf_counter()
    out = ray.get([remote.remote(item) for item in items[:n]])
    return checked(out, n, start)


def ray_pool(fn: Callable[[Any], Any], items: list[Any], pause_remote: Any, n: int) -> float:
    from ray.util.multiprocessing import Pool

    with Pool(processes=RAY_WORKER_CPUS) as pool:
        pool.map(fn, items[:RAY_WORKER_CPUS])  # the actors up and the function shipped, untimed
        start = time.perf_counter()
        out = pool.map(fn, items[:n])
        elapsed = checked(out, n, start)
    ray_settle(pause_remote)
    return elapsed


def ray_joblib(fn: Callable[[Any], Any], items: list[Any], pause_remote: Any, n: int) -> float:
    import joblib
    from ray.util.joblib import register_ray

    register_ray()
    # joblib hands Ray's Pool a multiprocessing context, which Ray ignores with a warning on every pool: known, mute.
    logging.getLogger("ray.util.multiprocessing.pool").setLevel(logging.ERROR)
    # n_jobs=-1: as many of Ray's pool actors as the cluster has CPUs. The pool lives for this run only (its actors
    # hold the CPUs); it has run a small call before the timer starts.
    with joblib.parallel_config(backend="ray"), joblib.Parallel(n_jobs=-1) as parallel:
        parallel(joblib.delayed(fn)(item) for item in items[:RAY_WORKER_CPUS])
        start = time.perf_counter()
        out = parallel(joblib.delayed(fn)(item) for item in items[:n])
        elapsed = checked(out, n, start)
    ray_settle(pause_remote)
    return elapsed


def ray_peers(batch: Batch) -> dict[str, Probe]:
    import ray

    fn, items = batch.fn, batch.items
    pause_remote = ray.remote(pause)
    return {
        "joblib": Probe("joblib, Ray's backend", "peer", in_thread(ray_joblib, fn, items, pause_remote)),
        "pool_map": Probe("ray.util.multiprocessing Pool.map", "peer", in_thread(ray_pool, fn, items, pause_remote)),
        "raw_tasks": Probe("raw fn.remote(item) each + ray.get", "peer", in_thread(ray_raw, ray.remote(fn), items)),
    }


def ray_parked(blob: bytes) -> dict[str, Probe]:
    import ray

    remote = ray.remote(read)

    def ship(n: int) -> float:
        start = time.perf_counter()
        out = [ray.get(remote.remote(blob)) for _ in range(n)]
        return checked(out, n, start)

    def park(n: int) -> float:
        start = time.perf_counter()
        ref = ray.put(blob)
        out = [ray.get(remote.remote(ref)) for _ in range(n)]
        elapsed = checked(out, n, start)
        del ref
        return elapsed

    return {
        "raw_ship": Probe("raw fn.remote(blob) each", "peer", in_thread(ship)),
        "raw_park": Probe("raw ray.put once, fn.remote(ref)", "peer", in_thread(park)),
    }


# -- Dask's peers -----------------------------------------------------------------------------------------------------


def dask_raw(client: Any, fn: Callable[[Any], Any], items: list[Any], n: int) -> float:
    start = time.perf_counter()
    out = client.gather([client.submit(fn, item, pure=False) for item in items[:n]])
    return checked(out, n, start)


def dask_map(client: Any, fn: Callable[[Any], Any], items: list[Any], n: int) -> float:
    start = time.perf_counter()
    out = client.gather(client.map(fn, items[:n], pure=False))
    return checked(out, n, start)


def dask_joblib(client: Any, fn: Callable[[Any], Any], items: list[Any], n: int) -> float:
    import joblib

    # n_jobs=-1: every worker thread of the cluster. The backend has run a small call before the timer starts.
    with joblib.parallel_config(backend="dask", client=client), joblib.Parallel(n_jobs=-1) as parallel:
        parallel(joblib.delayed(fn)(item) for item in items[: DASK_WORKERS * DASK_THREADS])
        start = time.perf_counter()
        out = parallel(joblib.delayed(fn)(item) for item in items[:n])
        return checked(out, n, start)


def dask_peers(client: Any, batch: Batch) -> dict[str, Probe]:
    fn, items = batch.fn, batch.items
    return {
        "joblib": Probe("joblib, Dask's backend", "peer", in_thread(dask_joblib, client, fn, items)),
        "client_map": Probe("client.map + client.gather", "peer", in_thread(dask_map, client, fn, items)),
        "raw_tasks": Probe("raw client.submit each + gather", "peer", in_thread(dask_raw, client, fn, items)),
    }


def dask_parked(client: Any, blob: bytes) -> dict[str, Probe]:
    def ship(n: int) -> float:
        start = time.perf_counter()
        out = [client.submit(read, blob, pure=False).result() for _ in range(n)]
        return checked(out, n, start)

    def park(n: int) -> float:
        start = time.perf_counter()
        future = client.scatter(blob, hash=False)
        out = [client.submit(read, future, pure=False).result() for _ in range(n)]
        elapsed = checked(out, n, start)
        future.release()
        return elapsed

    return {
        "raw_ship": Probe("raw client.submit(fn, blob) each", "peer", in_thread(ship)),
        "raw_park": Probe("raw client.scatter once, submit(future)", "peer", in_thread(park)),
    }


# -- local peers ------------------------------------------------------------------------------------------------------


def tpe_map(fn: Callable[[Any], Any], items: list[Any], n: int) -> float:
    with ThreadPoolExecutor(LOCAL_WORKERS) as pool:
        list(pool.map(time.sleep, [0.01] * LOCAL_WORKERS))  # every thread started, untimed
        start = time.perf_counter()
        out = list(pool.map(fn, items[:n]))
        return checked(out, n, start)


def local_probes(grid: gridboost.Grid, batch: Batch) -> dict[str, Probe]:
    fn, items = batch.fn, batch.items
    limiter = anyio.CapacityLimiter(LOCAL_WORKERS)

    async def each(call: Callable[[Any], Awaitable[Any]], n: int) -> float:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for item in items[:n]:
                tg.start_soon(call, item)
        return time.perf_counter() - start

    def offload(item: Any) -> Awaitable[Any]:
        return grid.offload(fn, item, where="local")

    def to_thread(item: Any) -> Awaitable[Any]:
        return anyio.to_thread.run_sync(fn, item, limiter=limiter)

    return {
        "gb_offload": Probe("grid.offload each, in a task group", "gridboost", functools.partial(each, offload)),
        "tpe_map": Probe(f"ThreadPoolExecutor({LOCAL_WORKERS}).map", "peer", in_thread(tpe_map, fn, items)),
        "to_thread": Probe(
            f"anyio.to_thread.run_sync each, {LOCAL_WORKERS} threads", "peer", functools.partial(each, to_thread)
        ),
    }


def local_parked(blob: bytes) -> dict[str, Probe]:
    async def ship(n: int) -> float:
        start = time.perf_counter()
        out = [await anyio.to_thread.run_sync(read, blob) for _ in range(n)]
        return checked(out, n, start)

    return {"raw_ship": Probe("raw anyio.to_thread.run_sync(fn, blob)", "peer", ship)}


def gridboost_parked(grid: gridboost.Grid, blob: bytes, where: str) -> dict[str, Probe]:
    async def ship(n: int) -> float:
        start = time.perf_counter()
        out = [await grid.offload(read, blob, where=where) for _ in range(n)]
        return checked(out, n, start)

    async def park(n: int) -> float:
        start = time.perf_counter()
        handle = await grid.put(blob)  # type: ignore[attr-defined]
        out = [await grid.offload(read, handle, where=where) for _ in range(n)]
        elapsed = checked(out, n, start)
        await handle.release()
        return elapsed

    probes = {"gb_ship": Probe("grid.offload(fn, blob) each", "gridboost", ship)}
    if has_put():
        probes["gb_park"] = Probe("grid.put once, offload(fn, handle)", "gridboost", park)
    return probes


# -- running a batch and reading its figures --------------------------------------------------------------------------


class Plan(NamedTuple):
    engine: str
    slots: int
    reps: int
    batches: set[str]
    probes: set[str] | None  # None: all
    max_in_flight: int | None


def make_batches(plan: Plan, iterations: int, blob: bytes | None) -> list[Batch]:
    batches = []
    if "sleep" in plan.batches:
        title = f"{N_SLEEP} x 1 ms sleep"
        batches.append(Batch("sleep", title, nap, list(range(N_SLEEP)), "items/s", SLEEP_S, plan.slots))
    if "cpu" in plan.batches:
        title = f"{N_CPU} x ~{CPU_S * 1e3:.0f} ms pure-Python CPU ({iterations:,} iterations)"
        # Threads of one process run Python code one at a time: locally the limit is one slot, whatever the pool.
        slots = 1 if plan.engine == "local" else plan.slots
        batches.append(Batch("cpu", title, spin, [iterations] * N_CPU, "items/s", CPU_S, slots))
    if "parked" in plan.batches and blob is not None:
        title = f"{N_PARKED} sequential offloads reading one {PARKED_BYTES / 1e6:.0f} MB bytes object"
        batches.append(Batch("parked", title, read, [blob] * N_PARKED, "ms/call", None, plan.slots))
    return batches


async def run_batch(plan: Plan, batch: Batch, probes: dict[str, Probe]) -> dict[str, Any]:
    chosen = {k: p for k, p in probes.items() if plan.probes is None or k in plan.probes}
    n = len(batch.items)
    warm = 2 if batch.name == "parked" else max(4 * plan.slots, n // 10)
    seconds = await interleaved({k: p.measure for k, p in chosen.items()}, n, warm, plan.reps)
    result = summarize(plan, batch, chosen, seconds)
    print_batch(plan, batch, result)
    return result


def summarize(plan: Plan, batch: Batch, probes: dict[str, Probe], seconds: dict[str, list[float]]) -> dict[str, Any]:
    n = len(batch.items)
    per_item = batch.unit == "items/s"
    figures = {k: [n / s if per_item else s / n * 1e3 for s in runs] for k, runs in seconds.items()}
    out: dict[str, Any] = {"title": batch.title, "unit": batch.unit, "n": n, "probes": {}, "ratios": {}}
    for key, values in figures.items():
        out["probes"][key] = {
            "label": probes[key].label,
            "side": probes[key].side,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "spread": half_range(values),
            "samples": values,
        }
    medians = {k: p["median"] for k, p in out["probes"].items()}
    if batch.per_item_s is not None:
        out["slot_limit"] = batch.slots / batch.per_item_s
        medians["slot_limit"] = out["slot_limit"]

    def better(mine: float, theirs: float) -> float:
        # Oriented so that higher is better for gridboost and 1.00 is parity.
        return mine / theirs if per_item else theirs / mine

    for col, probe in probes.items():
        if probe.side != "gridboost":
            continue
        ratios: dict[str, Any] = {}
        for row, median in medians.items():
            if row == col:
                continue
            entry: dict[str, Any] = {"ratio": better(medians[col], median)}
            if row in figures:
                # Median of the per-repetition ratios: runs taken moments apart, so it shrugs off slow drifts.
                pairs = zip(figures[col], figures[row], strict=True)
                entry["paired"] = statistics.median(better(mine, theirs) for mine, theirs in pairs)
            ratios[row] = entry
        out["ratios"][col] = ratios
    out["goals"] = goals(plan.engine, batch.name, out)
    return out


def goals(engine: str, batch: str, out: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    peers = {k: p["median"] for k, p in out["probes"].items() if p["side"] == "peer"}
    for mine, theirs, least in GOALS.get((engine, batch), ()):
        if theirs == "best_peer" and peers:
            per_item = out["unit"] == "items/s"
            theirs = (max if per_item else min)(peers, key=lambda k: peers[k])
        ratio = out["ratios"].get(mine, {}).get(theirs, {}).get("ratio")
        found.append(
            {
                "gridboost": mine,
                "against": theirs,
                "least": least,
                "ratio": ratio,
                "ok": ratio is not None and ratio >= least,
            }
        )
    return found


def print_batch(plan: Plan, batch: Batch, out: dict[str, Any]) -> None:
    probes = out["probes"]
    columns = [k for k, p in probes.items() if p["side"] == "gridboost"]
    slots = f", {batch.slots} slot{'s' if batch.slots > 1 else ''}" if batch.per_item_s is not None else ""
    print(f"\n== {plan.engine}: {batch.title}{slots}, {plan.reps} repetitions, medians ==")
    header = f"{'':<44} {batch.unit:>10} {'±':>4}  " + " ".join(f"{SHORT[c] + ' ÷':>11}" for c in columns)
    print(header)
    print("-" * len(header))
    digits = 1 if batch.unit == "items/s" else 2
    rows = [(k, p["label"], f"{p['median']:>10,.{digits}f}", f"{p['spread']:.0%}") for k, p in probes.items()]
    if batch.name == "parked" and "gb_park" not in probes and (plan.probes is None or "gb_park" in plan.probes):
        rows.insert(len(columns), ("gb_park", "grid.put once: not available yet", "—", ""))
    if "slot_limit" in out:
        limit = f"{out['slot_limit']:>10,.{digits}f}"
        rows.append(("slot_limit", f"slot limit ({batch.slots} / the item's time)", limit, ""))
    for key, label, figure, spread in rows:
        cells = " ".join(f"{_ratio(out, col, key):>11}" for col in columns)
        print(f"{label:<44} {figure:>10} {spread:>4}  {cells}")
    for goal in out["goals"]:
        against = probes.get(goal["against"], {}).get("label", goal["against"].replace("_", " "))
        mine = SHORT[goal["gridboost"]]
        if goal["ratio"] is None:
            absent = goal["gridboost"] == "gb_park" and not has_put()
            print(f"goal: {mine} >= {goal['least']:g} x {against}: {'not available yet' if absent else 'not measured'}")
        else:
            mark = "met" if goal["ok"] else "MISSED"
            print(f"goal: {mine} >= {goal['least']:g} x {against}: {goal['ratio']:.2f}, {mark}")


def _ratio(out: dict[str, Any], col: str, row: str) -> str:
    entry = out["ratios"][col].get(row)
    return "—" if entry is None else f"{entry['ratio']:.2f}"


# -- the engines ------------------------------------------------------------------------------------------------------


def make_blob(plan: Plan) -> bytes | None:
    # Random bytes: Dask compresses what it sends, and zeros would make shipping nearly free.
    return random.Random(0).randbytes(PARKED_BYTES) if "parked" in plan.batches else None


async def run_grid(
    plan: Plan,
    iterations: int,
    make_grid: Callable[[], gridboost.Grid],
    where: str,
    peers: Callable[[gridboost.Grid, Batch], dict[str, Probe]],
    parked: Callable[[bytes], dict[str, Probe]],
) -> dict[str, Any]:
    """Every batch of ``plan`` on an engine: gridboost's probes on a grid made here beside the engine's peers."""
    blob = make_blob(plan)
    results: dict[str, Any] = {}
    async with make_grid() as grid:
        for batch in make_batches(plan, iterations, blob):
            if batch.name == "parked":
                probes = {**gridboost_parked(grid, batch.items[0], where), **parked(batch.items[0])}
            else:
                probes = {**gridboost_probes(grid, batch, where, plan.max_in_flight), **peers(grid, batch)}
            results[batch.name] = await run_batch(plan, batch, probes)
    return results


@contextmanager
def dask_cluster() -> Iterator[tuple[str, Any]]:
    """A LocalCluster of this process (worker processes, one thread each) and a client of it for the peers."""
    import cloudpickle
    from distributed import Client, LocalCluster

    # The work functions travel by value: a benchmark script is not importable on the workers.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Passing 100 MB in a task is what the parked-data rows measure; Dask's advice against it is known.
    warnings.filterwarnings("ignore", message="Large object of size", category=UserWarning)
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    with (
        LocalCluster(
            n_workers=DASK_WORKERS,
            threads_per_worker=DASK_THREADS,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster.scheduler_address, set_as_default=False) as client,
    ):
        yield cluster.scheduler_address, client


def run_engine(plan: Plan, iterations: int) -> dict[str, Any]:
    if plan.engine == "ray":
        module = sys.modules[__name__]
        with private_ray_cluster(1, RAY_WORKER_CPUS, prefix=TEMP_PREFIX, ships=module) as address:
            grid = functools.partial(gridboost.Grid, "ray", address=address)
            return anyio.run(run_grid, plan, iterations, grid, "cluster", lambda _, b: ray_peers(b), ray_parked)
    if plan.engine == "dask":
        with dask_cluster() as (address, client):
            grid = functools.partial(gridboost.Grid, "dask", address=address)
            peers = functools.partial(dask_peers, client)
            parked = functools.partial(dask_parked, client)
            return anyio.run(run_grid, plan, iterations, grid, "cluster", lambda _, b: peers(b), parked)
    grid = functools.partial(gridboost.Grid, "local", max_workers=LOCAL_WORKERS)
    return anyio.run(run_grid, plan, iterations, grid, "local", local_probes, local_parked)


def available(engine: str) -> str | None:
    """Why ``engine`` cannot run here, or None."""
    needs = {"ray": ("gridboost-ray", "ray", "joblib"), "dask": ("gridboost-dask", "distributed", "joblib")}
    missing = [dist for dist in needs.get(engine, ()) if version(dist) is None]
    return f"not installed here: {', '.join(missing)}" if missing else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 5 (CI smoke)")
    parser.add_argument("--reps", type=positive, help="repetitions (overrides --quick)")
    parser.add_argument(
        "--engine", action="append", choices=ENGINES, help="repeatable; default: every engine installed here"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BATCHES + PROBES,
        metavar="NAME",
        help=f"repeatable: only these batches ({', '.join(BATCHES)}) and/or probes ({', '.join(PROBES)})",
    )
    parser.add_argument(
        "--max-in-flight", type=positive, help="grid.map's max_in_flight (default: the whole batch, as the peers)"
    )
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    only = set(args.only or ())
    batches = (only & set(BATCHES)) or set(BATCHES)
    probes = (only & set(PROBES)) or None
    iterations = calibrate(CPU_S) if "cpu" in batches else 0
    print(
        f"gridboost {gridboost.__version__}, gridboost-ray {version('gridboost-ray')}, ray {version('ray')}, "
        f"gridboost-dask {version('gridboost-dask')}, distributed {version('distributed')}, "
        f"joblib {version('joblib')}, anyio {version('anyio')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; Grid.map batch_size: {'yes' if map_batches() else 'not yet'}, "
        f"Grid.put: {'yes' if has_put() else 'not yet'}; grid.map max_in_flight: "
        f"{args.max_in_flight or 'the whole batch'}"
    )
    report: dict[str, Any] = {
        "gridboost": gridboost.__version__,
        "gridboost_ray": version("gridboost-ray"),
        "gridboost_dask": version("gridboost-dask"),
        "ray": version("ray"),
        "distributed": version("distributed"),
        "joblib": version("joblib"),
        "anyio": version("anyio"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "map_batch_size": map_batches(),
        "grid_put": has_put(),
        "max_in_flight": args.max_in_flight,
        "cpu_iterations": iterations,
        "reps": reps,
        "engines": {},
        "skipped": {},
    }
    slots = {"ray": RAY_WORKER_CPUS, "dask": DASK_WORKERS * DASK_THREADS, "local": LOCAL_WORKERS}
    for engine in args.engine or ENGINES:
        why = available(engine)
        if why is not None:
            print(f"\n== {engine}: skipped, {why} ==")
            report["skipped"][engine] = why
            continue
        started = time.monotonic()
        plan = Plan(engine, slots[engine], reps, batches, probes, args.max_in_flight)
        report["engines"][engine] = {
            "slots": slots[engine],
            "batches": run_engine(plan, iterations),
            "elapsed_s": time.monotonic() - started,
        }
    found = [g for e in report["engines"].values() for b in e["batches"].values() for g in b["goals"]]
    report["ok"] = all(g["ok"] for g in found if g["ratio"] is not None)
    print(
        "\nitems/s: the batch's items over the wall time of the whole map (results collected); ms/call: per offload\n"
        "X ÷: gridboost's X against the row, from the medians, oriented so that higher is better for gridboost "
        "(1.00 = parity); the paired ratios are in the JSON\n"
        "±: half the min-max range of the repetitions, relative to the median"
    )
    print("RESULT " + json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
