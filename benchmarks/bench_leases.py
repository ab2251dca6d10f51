"""Does a shared cluster's lease registry keep up with many small leases of many owners?

etcd's lease keepalives became the bottleneck at 40-60k leases. This holds ``N`` live leases (``--sizes``, default
100, 1,000 and 10,000) taken by ``--owners`` simulated owners (each a grid of its own, default 100) spread over
``--procs`` processes (default 4), on Ray (the lease keeper actor) or on Dask (the scheduler plugin):

* every lease is one unit of a custom resource (``slot``) that the cluster's nodes have plenty of, so the cluster
  never runs out and what is measured is the registry, not capacity;
* the ramp: once every owner's grid is up, all owners take their shares of the leases at once, each one lease after
  another (each ``request_boost`` timed). That is 100 requests in flight all the time, so its latency is mostly how
  long a request queues behind the 99 others (Little's law: latency = requests in flight / grants per second); the
  ramp's rate (grants per second) is what it measures. A ramp that runs past ``--ramp-limit`` seconds ends the run:
  its row says how many leases were held by then (Ray at 10,000: see below);
* the steady state: with all ``N`` leases held, each renewed every TTL/3 (``--ttl``) from its grant on (each
  ``renew`` timed, and how late it was sent: renewals fall behind when the registry cannot keep up), every owner
  process also takes a *probe* lease every ``--probe`` seconds (and gives it back): the grant latency of a request
  that comes while the registry holds ``N`` live leases, which is what the goal is about;
* meanwhile the registry's process is sampled (the keeper actor's process on Ray, and the GCS beside it; the
  scheduler on Dask, a process of its own here), and so are the owner processes: on a small machine they compete
  with the registry for the CPU, and when they use it all, the ramp's latency is theirs, not the registry's;
* on Ray, with every lease still held (or where the ramp stopped), Ray alone makes, places and removes one-slot
  placement groups one after another: a grant makes one, and Ray's own cost per group grows with the groups the
  cluster holds (from hundreds a second with a few to a handful with thousands), which bounds any registry on Ray.

Goals (issue 15): grant p99 <= 50 ms at 10,000 live leases; renewal without backlog; the registry's CPU <= 10 % of a
core.

    python benchmarks/bench_leases.py --engine dask
    python benchmarks/bench_leases.py --engine ray --sizes 100,1000
    python benchmarks/bench_leases.py --engine dask --quick      # 50 and 200 leases, 10 owners, 10 s, TTL 12 s

The last line of output is ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack, ExitStack, contextmanager
from typing import Any

import anyio
import psutil
from _common import positive, private_ray_cluster, version

import gridboost

SLOTS = 50_000.0  # of the custom resource on each node: far more than any size asks
TTL = 60.0  # the default of --ttl
QUICK_TTL = 12.0  # --quick: renewed every 4 s, so its 10 s window sees renewals
TARGET_GRANT_P99 = 0.050
TARGET_CPU = 0.10
DASK = os.path.join(os.path.dirname(sys.executable), "dask")  # the CLI of the environment running this


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- an owner process -------------------------------------------------------------------------------------------------


async def _owner(
    grid: gridboost.Grid,
    leases: int,
    steady: anyio.Event,
    stats: dict[str, list[float]],
    granted: Any,
    progress: Any,
    ttl: float,
) -> None:
    """Take ``leases`` one after another, renewing each every TTL/3 from its grant on; hold them all until the steady
    state (``steady``: every process's leases granted) has lasted its window."""
    boosts: list[gridboost.Boost] = []
    due: list[float] = []
    period = ttl / 3
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
            boosts.append(await grid.request_boost(gridboost.Resources(custom={"slot": 1}), ttl=ttl, wait=300))
            stats["grant"].append(time.perf_counter() - started)
            progress(len(stats["grant"]))
            due.append(anyio.current_time() + period)
        granted()
        await steady.wait()
        done.set()
    for boost in boosts:
        await boost.release()


async def _probes(grids: list[gridboost.Grid], every: float, stats: dict[str, list[float]], ttl: float) -> None:
    """Every ``every`` seconds, one of ``grids`` (in turn) takes a lease and gives it back: its grant timed."""
    for n in itertools.count():
        started = time.perf_counter()
        boost = await grids[n % len(grids)].request_boost(gridboost.Resources(custom={"slot": 1}), ttl=ttl, wait=60)
        stats["probe"].append(time.perf_counter() - started)
        await boost.release()
        await anyio.sleep(max(0.0, every - (time.perf_counter() - started)))


async def _line() -> str:
    return (await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)).strip()


async def owner_process(
    engine: str, address: str, owners: int, leases: int, window: float, probe: float, ttl: float
) -> dict[str, Any]:
    """Start ``owners`` grids (READY), take the leases when told (GO; GRANTED once all are held), and when told that
    every process holds its leases (STEADY), probe for ``window`` seconds; then give everything back."""
    stats: dict[str, list[float]] = {"grant": [], "renew": [], "late": [], "probe": []}
    shares = [leases // owners + (1 if i < leases % owners else 0) for i in range(owners)]
    left = [owners]
    steady = anyio.Event()

    began = [0.0]  # when the ramp started
    step = max(1, leases // 10)

    def progress(done: int) -> None:  # so that a ramp that never ends says how far it got
        if done % step == 0:
            took = time.perf_counter() - began[0]
            print(f"owner process {os.getpid()}: {done}/{leases} leases in {took:.0f}s", file=sys.stderr, flush=True)
        if done % max(1, step // 10) == 0:
            print(f"HELD {done}", flush=True)  # for the main process (see Owners)

    def granted() -> None:
        left[0] -= 1
        if not left[0]:
            print("GRANTED", flush=True)  # the main process measures the registry at steady load from here

    async def when_steady() -> None:
        if await _line() != "STEADY":
            raise SystemExit("the main process stopped")
        with anyio.move_on_after(window):
            await _probes(grids, probe, stats, ttl)
        steady.set()

    async with AsyncExitStack() as stack:
        grids = [await stack.enter_async_context(gridboost.Grid(engine, address=address)) for _ in range(owners)]
        print("READY", flush=True)
        if await _line() != "GO":
            raise SystemExit("the main process stopped")
        began[0] = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(when_steady)
            for grid, share in zip(grids, shares, strict=True):
                tg.start_soon(_owner, grid, share, steady, stats, granted, progress, ttl)
    return stats


# -- the registry's process -----------------------------------------------------------------------------------------


def registry_processes(engine: str, scheduler_pid: int | None) -> dict[str, psutil.Process]:
    """The processes whose CPU is the registry's: the keeper actor and the GCS (Ray), the scheduler (Dask)."""
    if engine == "dask":
        assert scheduler_pid is not None
        return {"scheduler": psutil.Process(scheduler_pid)}
    # Among this process's descendants only (the cluster is started from here): another Ray on the machine (a test
    # run beside this one) has a keeper and a GCS of its own.
    found: dict[str, psutil.Process] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
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


class Owners:
    """The owner processes of one size: what is said to them, and what they say (read by a thread each, so that the
    main process can wait with a deadline); ``held`` is how many leases each said it holds (its ``HELD`` lines)."""

    def __init__(self, children: list[subprocess.Popen[str]]) -> None:
        self.children = children
        self.held = [0] * len(children)
        self._lines: list[queue.Queue[str]] = [queue.Queue() for _ in children]
        for child, lines in zip(children, self._lines, strict=True):
            threading.Thread(target=self._read, args=(child, lines), daemon=True).start()

    @staticmethod
    def _read(child: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line.strip())
        lines.put("")  # the end: the process exited

    def say(self, word: str) -> None:
        for child in self.children:
            assert child.stdin is not None
            child.stdin.write(word + "\n")
            child.stdin.flush()

    def hear(self, word: str, size: int, within: float = math.inf) -> bool:
        """Wait for each process's next line that starts with ``word``, noting its ``HELD`` lines meanwhile;
        ``False`` if ``within`` seconds passed first. Returns each such line in ``self.last``."""
        deadline = time.monotonic() + within
        self.last: list[str] = []
        for i, lines in enumerate(self._lines):
            while True:
                try:
                    line = lines.get(timeout=min(3600.0, max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    self._drain()
                    return False
                if line.startswith("HELD "):
                    self.held[i] = int(line.split()[1])
                    continue
                if not line.startswith(word):
                    raise SystemExit(f"an owner process failed before {word} ({size} leases): {line!r}")
                self.last.append(line)
                break
        return True

    def _drain(self) -> None:
        """Note the ``HELD`` lines every process said so far (what a ramp that ran out of time reached)."""
        for i, lines in enumerate(self._lines):
            while True:
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    break
                if line.startswith("HELD "):
                    self.held[i] = int(line.split()[1])

    def end(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()


def raw_ray_groups(seconds: float, most: int) -> float:
    """Ray alone, no gridboost: placement groups of one ``slot`` made, waited for until placed, and removed, one after
    another for up to ``seconds`` (at most ``most``); how many a second. Ray's own cost per group grows with the
    groups the cluster holds, so this says how much of a grant's cost at this size is Ray's."""
    from ray.util.placement_group import placement_group, remove_placement_group

    began, made = time.perf_counter(), 0
    while made < most and time.perf_counter() - began < seconds:
        pg = placement_group([{"slot": 1}])
        if not pg.wait(max(1.0, seconds)):
            remove_placement_group(pg)
            break
        remove_placement_group(pg)
        made += 1
    return made / (time.perf_counter() - began)


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
                "--probe",
                str(args.probe * procs),  # each process probes this often: all together, every --probe seconds
                "--ttl",
                str(args.ttl),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for o, n in zip(owners, leases, strict=True)
    ]
    owner_procs = {f"owner{i}": psutil.Process(child.pid) for i, child in enumerate(children)}
    talk = Owners(children)
    raw = math.nan
    try:
        talk.hear("READY", size)  # every grid is up: the ramp starts from here, in every process at once
        ramp_cpu = cpu_seconds(owner_procs)
        ramp_started = time.perf_counter()
        talk.say("GO")
        # Every lease granted: the registry holds them all, renewals go on. Or the ramp ran past --ramp-limit: what
        # was reached is the row (and, on Ray, how fast Ray alone makes groups at that point).
        if not talk.hear("GRANTED", size, within=args.ramp_limit):
            took = time.perf_counter() - ramp_started
            if engine == "ray":
                raw = raw_ray_groups(30.0, 100)
            return {
                "leases": size,
                "owners": args.owners,
                "stopped": True,
                "reached": sum(talk.held),
                "ramp_seconds": took,
                "ramp_rate": sum(talk.held) / took,
                "raw_groups_per_s": raw,
            }
        ramp_wall = time.perf_counter() - ramp_started
        ramp_owners = _share(ramp_cpu, cpu_seconds(owner_procs), ramp_wall)
        talk.say("STEADY")  # the probes start
        # The registry's CPU at steady load: every lease held and renewed, probes coming, for most of the window.
        steady = args.window * 0.8
        registry = registry_processes(engine, scheduler_pid)  # now: Ray starts the keeper at the first lease
        before, owners_before = cpu_seconds(registry), cpu_seconds(owner_procs)
        time.sleep(steady)
        after, owners_after = cpu_seconds(registry), cpu_seconds(owner_procs)
        if engine == "ray":  # in what is left of the window, every lease still held
            raw = raw_ray_groups(args.window * 0.15, 100)
        talk.hear("STATS ", size, within=args.window + 600)
        outputs = list(talk.last)
    finally:
        talk.end()
    stats: dict[str, list[float]] = {"grant": [], "renew": [], "late": [], "probe": []}
    for line in outputs:
        for key, values in json.loads(line[6:]).items():
            stats[key].extend(values)
    return {
        "leases": size,
        "owners": args.owners,
        "stopped": False,
        "reached": size,
        # The ramp: every owner taking its share at once (100 requests in flight all the time).
        "ramp_seconds": ramp_wall,
        "ramp_rate": size / ramp_wall,
        "ramp_grant_p50": percentile(stats["grant"], 0.5),
        "ramp_grant_p99": percentile(stats["grant"], 0.99),
        "ramp_owners_cpu": ramp_owners,
        # The steady state: probes taken while the registry holds every lease.
        "probes": len(stats["probe"]),
        "grant_p50": percentile(stats["probe"], 0.5),
        "grant_p99": percentile(stats["probe"], 0.99),
        "renewals": len(stats["renew"]),
        "renew_p50": percentile(stats["renew"], 0.5),
        "renew_p99": percentile(stats["renew"], 0.99),
        "renew_late_p99": percentile(stats["late"], 0.99),
        # CPU while every lease was held and renewed, as a share of one core.
        "registry_cpu": {name: (after[name] - before[name]) / steady for name in registry},
        "owners_cpu": _share(owners_before, owners_after, steady),
        # Ray alone (no gridboost), with every lease held: placement groups made and placed per second.
        "raw_groups_per_s": raw,
    }


def _share(before: dict[str, float], after: dict[str, float], seconds: float) -> float:
    """CPU seconds of several processes over ``seconds``, summed, as a share of one core."""
    return sum(after[name] - before[name] for name in before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ray", "dask"], required=True)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--owners", type=positive, default=100)
    parser.add_argument("--procs", type=positive, default=4)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of the steady state at each size")
    parser.add_argument("--probe", type=float, default=0.1, help="seconds between two probe leases (all processes)")
    parser.add_argument("--ttl", type=float, default=None, help=f"each lease's TTL (default {TTL:g} s)")
    parser.add_argument(
        "--ramp-limit",
        type=float,
        default=900.0,
        help="seconds a ramp may take; past it the size's row says how many leases were held, and larger sizes are "
        "not tried (default 900)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"50 and 200 leases, 10 owners, a 10 s window, TTL {QUICK_TTL:g} s"
    )
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--leases", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "owner":
        stats = anyio.run(
            owner_process, args.engine, args.address, args.owners, args.leases, args.window, args.probe, args.ttl
        )
        print("STATS " + json.dumps(stats), flush=True)
        return
    if args.quick:
        args.sizes, args.owners, args.window = "50,200", 10, 10.0
        args.ttl = args.ttl or QUICK_TTL
    args.ttl = args.ttl or TTL
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
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
        for size in sizes:
            rows.append(run_size(args.engine, address, scheduler_pid, size, args))
            if rows[-1]["stopped"]:
                break  # a larger size would not get further
    report(args, rows)


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{args.engine}: {args.owners} owners over {args.procs} processes, TTL {args.ttl:g}s, renewed every TTL/3; "
        f"steady state: a probe lease every {args.probe:g}s"
    )
    raw = args.engine == "ray"
    print(
        f"{'':>8} {'ramp (all owners at once)':^36}  {'steady state (every lease held)':^76}\n"
        f"{'leases':>8} {'grants/s':>9} {'p50':>8} {'p99':>8} {'owners':>7}  {'grant p50':>10} {'grant p99':>10} "
        f"{'renew p50':>10} {'renew p99':>10} {'late p99':>9} {'owners':>7}  "
        + (f"{'raw Ray':>8}  " if raw else "")
        + "registry CPU"
    )
    for row in rows:
        if row["stopped"]:
            print(
                f"{row['leases']:>8} {row['ramp_rate']:>9.0f}  stopped: {row['reached']} of {row['leases']} leases "
                f"held after {row['ramp_seconds']:.0f}s (--ramp-limit)"
                + (f"; Ray alone then made {row['raw_groups_per_s']:.1f} groups/s (the ramp going on)" if raw else "")
            )
            continue
        cpu = ", ".join(f"{name} {share:.1%}" for name, share in row["registry_cpu"].items())
        print(
            f"{row['leases']:>8} {row['ramp_rate']:>9.0f} {row['ramp_grant_p50'] * 1e3:>6.0f}ms "
            f"{row['ramp_grant_p99'] * 1e3:>6.0f}ms {row['ramp_owners_cpu']:>7.0%}  "
            f"{row['grant_p50'] * 1e3:>8.1f}ms {row['grant_p99'] * 1e3:>8.1f}ms "
            f"{row['renew_p50'] * 1e3:>8.1f}ms {row['renew_p99'] * 1e3:>8.1f}ms {row['renew_late_p99'] * 1e3:>7.0f}ms "
            f"{row['owners_cpu']:>7.0%}  " + (f"{row['raw_groups_per_s']:>6.1f}/s  " if raw else "") + cpu
        )
    print(f"owners: the owner processes' CPU, summed, as a share of one core (this machine has {os.cpu_count()} cores)")
    if raw:
        print("raw Ray: Ray alone (no gridboost) making a placement group of one slot, placed, removed, one after")
        print("another, with every lease still held: groups per second (a grant makes one)")
    largest = rows[-1]
    if largest["stopped"]:
        print(f"goal at {largest['leases']} leases: not reached ({largest['reached']} held at the ramp limit)")
    else:
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
        "ttl": args.ttl,
        "rows": rows,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
