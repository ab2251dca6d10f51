"""One real Dask cluster for the whole test session, and a probe that reads the scheduler's and workers' own state.

The cluster is a ``SpecCluster`` — the class ``LocalCluster`` is built on — with two worker processes (nannies) of
different resources: ``a`` with 2 threads and one ``accel``, ``b`` with 2 threads and nothing else
(``LocalCluster`` gives every worker the same options). The scheduler runs in this process, in the cluster's own
loop thread; every test's grid joins it by address, over TCP, like any other client. Closing it ends only the
processes its nannies started, and the session checks at its end that none of them survived.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from typing import Any

import anyio
import cloudpickle
import psutil
import pytest
from distributed import Client, Nanny, Scheduler, SpecCluster, get_worker
from gridboost_dask import LEASE_PREFIX

from gridboost import Grid, Parked, Resources
from gridboost.testing import EngineProbe

# Dask's workers run what the tests send; the functions defined here travel by value, so the workers need not import
# the test modules.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: The workers' names, threads and custom resources.
WORKERS = {"a": {"nthreads": 2, "resources": {"accel": 1}}, "b": {"nthreads": 2, "resources": {}}}
WORKER_THREADS = 2
#: How long the tests give Dask to settle: workers report what they hold and run a moment after the fact.
SETTLE = 20.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _children() -> set[int]:
    # multiprocessing's resource tracker is this process's for life (it ends with it), not the cluster's.
    return {p.pid for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(_cmdline(p))}


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def alive(pids: set[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.fixture(scope="session")
def cluster() -> Iterator[SpecCluster]:
    """Two heterogeneous worker processes and a scheduler, all of this session; none survives it."""
    before = _children()
    workers = {
        name: {
            "cls": Nanny,
            "options": {**spec, "host": "127.0.0.1", "dashboard": False, "dashboard_address": None, "name": name},
        }
        for name, spec in WORKERS.items()
    }
    # The scheduler's HTTP endpoint on a free port: Dask's default 8787 would collide with the grids' own clusters.
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": ":0"}}
    cluster = SpecCluster(workers=workers, scheduler=scheduler, asynchronous=False, name="gridboost-dask-tests")
    started = _children() - before
    try:
        cluster.wait_for_workers(len(WORKERS), timeout=60)
        yield cluster
    finally:
        cluster.close(timeout=60)
        deadline = time.monotonic() + 15
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = alive(started)
        assert not survivors, f"processes the test cluster started survived it: {survivors}"


@pytest.fixture(scope="session")
def cluster_address(cluster: SpecCluster) -> str:
    return str(cluster.scheduler_address)


@pytest.fixture(scope="session")
def dask_client(cluster: SpecCluster) -> Iterator[Client]:
    """The test's own (synchronous) client: how the probe reads the engine."""
    with Client(cluster.scheduler_address, set_as_default=False, timeout=30) as client:
        yield client


def whereami() -> str:
    """Run as a task: the address of the worker it runs on."""
    return str(get_worker().address)


def worker_named(client: Client, name: str) -> str:
    """The address of the worker called ``name``, from the scheduler."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return next(addr for addr, info in workers.items() if str(info["name"]) == name)


def _leases_on_scheduler(prefix: str, dask_scheduler: Any = None) -> dict[str, list[str]]:
    """On the scheduler: the lease resources (by boost id) that workers hold, and where — Dask's own books."""
    held: dict[str, list[str]] = {}
    for addr, ws in dask_scheduler.workers.items():
        for name, amount in ws.resources.items():
            if name.startswith(prefix) and amount > 0:
                held.setdefault(name.removeprefix(prefix), []).append(addr)
    return held


def _executing(prefix: str, dask_worker: Any = None) -> list[str]:
    """On a worker: the keys of ours its threads are executing (cancelled ones that still run included)."""
    state = dask_worker.state
    return [str(ts.key) for ts in state.executing | state.long_running if str(ts.key).startswith(prefix)]


def _holders_on_scheduler(key: str, dask_scheduler: Any = None) -> list[str]:
    """On the scheduler: the workers holding ``key`` in memory; none once it is freed (or forgotten)."""
    ts = dask_scheduler.tasks.get(key)
    if ts is None or ts.state != "memory":
        return []
    return sorted(ws.address for ws in ts.who_has or ())


def _big_on_scheduler(prefix: str, size: int, dask_scheduler: Any = None) -> int:
    """On the scheduler: how many keys starting with ``prefix`` are held in memory with at least ``size`` bytes."""
    return sum(
        str(key).startswith(prefix) and ts.state == "memory" and ts.nbytes >= size
        for key, ts in dask_scheduler.tasks.items()
    )


def _backend(grid: Grid) -> Any:
    backend = grid.backend
    while not hasattr(backend, "lease_prefix") and hasattr(backend, "inner"):  # a wrapper: FaultyBackend
        backend = backend.inner
    assert hasattr(backend, "lease_prefix"), f"DaskProbe needs a Dask backend, got {grid.backend!r}"
    return backend


def held_anywhere(client: Client, boost_id: str) -> list[str]:
    """The workers the scheduler says hold a lease resource of ``boost_id``, whoever's it is."""
    held: dict[str, list[str]] = client.run_on_scheduler(_leases_on_scheduler, LEASE_PREFIX)
    return sorted(addr for name, addrs in held.items() if name.endswith(":" + boost_id) for addr in addrs)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = SETTLE) -> None:
    with anyio.move_on_after(timeout):
        while not await check():
            await anyio.sleep(0.05)
        return
    pytest.fail(f"after {timeout:g}s: {what}")


class DaskProbe(EngineProbe):
    """Dask's own state: the scheduler's worker resources (leases) and keys in memory (parked data), the workers'
    executing tasks (running)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def held(self, grid: Grid) -> dict[str, list[str]]:
        result: dict[str, list[str]] = self.client.run_on_scheduler(_leases_on_scheduler, _backend(grid).lease_prefix)
        return result

    async def reservations(self, grid: Grid) -> Collection[str]:
        return set(await anyio.to_thread.run_sync(self.held, grid))

    async def reservation_nodes(self, grid: Grid, reservation_id: str) -> Collection[str]:
        return set((await anyio.to_thread.run_sync(self.held, grid)).get(reservation_id, ()))

    async def running(self, grid: Grid) -> Collection[str]:
        prefix = _backend(grid).prefix

        def read() -> set[str]:
            keys = self.client.run(_executing, prefix, on_error="ignore")
            return {key.removeprefix(prefix) for found in keys.values() for key in found}

        return await anyio.to_thread.run_sync(read)

    def parked_key(self, grid: Grid, handle: Parked) -> str:
        """The scheduler's key of a handle's object: the backend scatters it under its own prefix."""
        return f"{_backend(grid).prefix}{handle.id}"

    def holders(self, grid: Grid, handle: Parked) -> list[str]:
        """The workers the scheduler says hold the handle's object now."""
        held: list[str] = self.client.run_on_scheduler(_holders_on_scheduler, self.parked_key(grid, handle))
        return held

    async def parked_nodes(self, grid: Grid, handle: Parked) -> Collection[str]:
        return set(await anyio.to_thread.run_sync(self.holders, grid, handle))

    async def big_objects(self, grid: Grid, size: int) -> int:
        # Dask ships a task's arguments inside the task, never as keys: what the grid holds in memory is what it
        # parked (and its results, small in the suite), all under its prefix.
        prefix = _backend(grid).prefix

        def read() -> int:
            count: int = self.client.run_on_scheduler(_big_on_scheduler, prefix, size)
            return count

        return await anyio.to_thread.run_sync(read)

    @property
    def whereami(self) -> Callable[[], str]:
        return whereami


@pytest.fixture
def probe(dask_client: Client) -> DaskProbe:
    return DaskProbe(dask_client)


@pytest.fixture
async def grid(cluster_address: str, probe: DaskProbe) -> AsyncIterator[Grid]:
    """A grid joined to the session's cluster; afterwards Dask must hold and run nothing of it."""
    async with Grid("dask", address=cluster_address, grace=1.0, watch_interval=0.2) as grid:
        yield grid

    async def clean() -> bool:
        return not await probe.reservations(grid) and not await probe.running(grid)

    await eventually(clean, "Dask still holds or runs something of the closed grid")


@pytest.fixture
def unit() -> Resources:
    return Resources(cpu=1)


@pytest.fixture(autouse=True, scope="session")
def _no_stray_environment() -> None:
    # A DASK_* variable of the developer's could point the grids elsewhere; the tests mean this session's cluster.
    for key in [k for k in os.environ if k.startswith("DASK_SCHEDULER")]:
        del os.environ[key]
