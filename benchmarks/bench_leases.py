"""Does a shared cluster's lease registry keep up with many small leases of many owners?

etcd's lease keepalives became the bottleneck at 40-60k leases. This holds ``N`` live leases (``--sizes``, default
100, 1,000 and 10,000) taken by ``--owners`` simulated owners (each a grid of its own, default 100) spread over
``--procs`` processes (default 4), on Ray (the lease keeper actor) or on Dask (the scheduler plugin):

* every lease is one unit of a custom resource (``slot``) that the cluster's nodes have plenty of, so the cluster
  never runs out and what is measured is the registry, not capacity;
* every owner takes its share of the leases (each ``request_boost`` timed: the grant latency), then renews each lease
  every TTL/3 for ``--window`` seconds (each ``renew`` timed, and how late it was sent: renewals fall behind when
  the registry cannot keep up);
* meanwhile the registry's process is sampled: the keeper actor's process on Ray (and the GCS beside it), the
  scheduler on Dask (a process of its own here).

Goals (issue 15): grant p99 <= 50 ms at 10,000 live leases; renewal without backlog; the registry's CPU <= 10 % of a
core. On two loaded cores the owners' own processes compete with the registry for the CPU, so read the figures as
upper bounds.

    python benchmarks/bench_leases.py --engine dask
    python benchmarks/bench_leases.py --engine ray --sizes 100,1000
    python benchmarks/bench_leases.py --engine dask --quick      # 50 and 200 leases, 10 owners, a short window

The last line of output is ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack, ExitStack, contextmanager
from typing import Any

import anyio
import psutil
from _common import positive, private_ray_cluster, version

import gridboost

SLOTS = 50_000.0  # of the custom resource on each node: far more than any size asks
TTL = 60.0
TARGET_GRANT_P99 = 0.050
TARGET_CPU = 0.10
DASK = os.path.join(os.path.dirname(sys.executable), "dask")  # the CLI of the environment running this


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- an owner process -------------------------------------------------------------------------------------------------


async def _owner(grid: gridboost.Grid, leases: int, window: float, stats: dict[str, list[float]], granted: Any) -> None:
    """Take ``leases`` one after another, renewing each every TTL/3 from its grant on; hold them all for ``window``."""
    boosts: list[gridboost.Boost] = []
    due: list[float] = []
    period = TTL / 3
    done = anyio.Event()

    async def renew_each_at_its_time() -> None:
        while True:
            soonest = min(range(len(due)), key=due.__getitem__, default=None)
            wake = math.inf if soonest is None else due[soonest]
            with anyio.move_on_after(max(0.0, wake - anyio.current_time()) if soonest is not None else 0.05):
                await done.wait()
            if done.is_set():
                return
            if soonest is None:
                continue
            stats["late"].append(max(0.0, anyio.current_time() - due[soonest]))
            begun = time.perf_counter()
            await boosts[soonest].renew()
            stats["renew"].append(time.perf_counter() - begun)
            due[soonest] += period

    async with anyio.create_task_group() as tg:
        tg.start_soon(renew_each_at_its_time)
        for _ in range(leases):
            started = time.perf_counter()
            boosts.append(await grid.request_boost(gridboost.Resources(custom={"slot": 1}), ttl=TTL, wait=300))
            stats["grant"].append(time.perf_counter() - started)
            due.append(anyio.current_time() + period)
        granted()
        await anyio.sleep(window)
        done.set()
    for boost in boosts:
        await boost.release()


async def owner_process(engine: str, address: str, owners: int, leases: int, window: float) -> dict[str, Any]:
    stats: dict[str, list[float]] = {"grant": [], "renew": [], "late": []}
    shares = [leases // owners + (1 if i < leases % owners else 0) for i in range(owners)]
    left = [owners]

    def granted() -> None:
        left[0] -= 1
        if not left[0]:
            print("GRANTED", flush=True)  # the main process measures the registry at steady load from here

    async with AsyncExitStack() as stack:
        grids = [await stack.enter_async_context(gridboost.Grid(engine, address=address)) for _ in range(owners)]
        async with anyio.create_task_group() as tg:
            for grid, share in zip(grids, shares, strict=True):
                tg.start_soon(_owner, grid, share, window, stats, granted)
    return stats


# -- the registry's process -----------------------------------------------------------------------------------------


def registry_processes(engine: str, scheduler_pid: int | None) -> dict[str, psutil.Process]:
    """The processes whose CPU is the registry's: the keeper actor and the GCS (Ray), the scheduler (Dask)."""
    if engine == "dask":
        assert scheduler_pid is not None
        return {"scheduler": psutil.Process(scheduler_pid)}
    found: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if "LeaseKeeper" in line and "keeper" not in found:
            found["keeper"] = proc
        elif "gcs_server" in line and "gcs" not in found:
            found["gcs"] = proc
    return found


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        try:
            times = proc.cpu_times()
            out[name] = times.user + times.system
        except psutil.NoSuchProcess:
            out[name] = math.nan
    return out


@contextmanager
def dask_cluster(workers: int) -> Any:
    """A scheduler and ``workers`` workers, each a process of its own started by pid, ended by pid."""
    port = _free_port()
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [
        subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    ]
    address = f"tcp://127.0.0.1:{port}"
    try:
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [DASK, "worker", address, "--nthreads", "1", "--no-dashboard", "--resources", f"slot={SLOTS:g}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
            )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address, procs[0].pid
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_size(
    engine: str, address: str, scheduler_pid: int | None, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    procs = min(args.procs, args.owners)
    owners = [args.owners // procs + (1 if i < args.owners % procs else 0) for i in range(procs)]
    leases = [size // procs + (1 if i < size % procs else 0) for i in range(procs)]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "owner",
                "--engine",
                engine,
                "--address",
                address,
                "--owners",
                str(o),
                "--leases",
                str(n),
                "--window",
                str(args.window),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for o, n in zip(owners, leases, strict=True)
    ]
    outputs = []
    try:
        for child in children:  # every lease granted: the registry holds them all, and renewals begin
            assert child.stdout is not None
            if child.stdout.readline().strip() != "GRANTED":
                raise SystemExit(f"an owner process failed before its leases were granted ({size} leases)")
        # The registry's CPU at steady load: every lease held and renewed, for most of the window.
        steady = args.window * 0.8
        registry = registry_processes(engine, scheduler_pid)  # now: Ray starts the keeper at the first lease
        before = cpu_seconds(registry)
        time.sleep(steady)
        after = cpu_seconds(registry)
        for child in children:
            out, _ = child.communicate(timeout=args.window + 600)
            outputs.append(out)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    stats: dict[str, list[float]] = {"grant": [], "renew": [], "late": []}
    for out in outputs:
        line = next((x for x in out.splitlines() if x.startswith("STATS ")), None)
        if line is None:
            raise SystemExit(f"an owner process failed:\n{out[-2000:]}")
        for key, values in json.loads(line[6:]).items():
            stats[key].extend(values)
    return {
        "leases": size,
        "owners": args.owners,
        "grant_p50": percentile(stats["grant"], 0.5),
        "grant_p99": percentile(stats["grant"], 0.99),
        "renewals": len(stats["renew"]),
        "renew_p50": percentile(stats["renew"], 0.5),
        "renew_p99": percentile(stats["renew"], 0.99),
        "renew_late_p99": percentile(stats["late"], 0.99),
        # CPU while every lease was held and renewed, as a share of one core.
        "registry_cpu": {name: (after[name] - before[name]) / steady for name in registry},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ray", "dask"], required=True)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--owners", type=positive, default=100)
    parser.add_argument("--procs", type=positive, default=4)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of renewals at each size")
    parser.add_argument("--quick", action="store_true", help="50 and 200 leases, 10 owners, a 10 s window")
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--leases", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "owner":
        stats = anyio.run(owner_process, args.engine, args.address, args.owners, args.leases, args.window)
        print("STATS " + json.dumps(stats), flush=True)
        return
    if args.quick:
        args.sizes, args.owners, args.window = "50,200", 10, 10.0
    sizes = [int(x) for x in args.sizes.split(",")]
    with ExitStack() as stack:
        if args.engine == "ray":
            address = stack.enter_context(
                private_ray_cluster(
                    2, 1, prefix="gb-bench-leases-", ships=sys.modules[__name__], resources={"slot": SLOTS}
                )
            )
            scheduler_pid = None
        else:
            address, scheduler_pid = stack.enter_context(dask_cluster(2))
        rows = [run_size(args.engine, address, scheduler_pid, size, args) for size in sizes]
    print(f"\n{args.engine}: {args.owners} owners over {args.procs} processes, TTL {TTL:g}s, renewed every TTL/3")
    print(
        f"{'leases':>8} {'grant p50':>10} {'grant p99':>10} {'renew p50':>10} {'renew p99':>10} {'late p99':>9}  registry CPU"
    )
    for row in rows:
        cpu = ", ".join(f"{name} {share:.1%}" for name, share in row["registry_cpu"].items())
        print(
            f"{row['leases']:>8} {row['grant_p50'] * 1e3:>8.1f}ms {row['grant_p99'] * 1e3:>8.1f}ms "
            f"{row['renew_p50'] * 1e3:>8.1f}ms {row['renew_p99'] * 1e3:>8.1f}ms {row['renew_late_p99'] * 1e3:>7.0f}ms  {cpu}"
        )
    largest = rows[-1]
    print(
        f"goal at {largest['leases']} leases: grant p99 <= {TARGET_GRANT_P99 * 1e3:g} ms "
        f"({'met' if largest['grant_p99'] <= TARGET_GRANT_P99 else 'missed'}); registry CPU <= {TARGET_CPU:.0%} "
        f"({'met' if max(largest['registry_cpu'].values(), default=0) <= TARGET_CPU else 'missed'})"
    )
    result = {
        "engine": args.engine,
        "python": platform.python_version(),
        "gridboost": version("gridboost"),
        "engine_version": version("ray" if args.engine == "ray" else "distributed"),
        "rows": rows,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
