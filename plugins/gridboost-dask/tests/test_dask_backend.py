"""What is specific to the Dask backend, checked against the scheduler's and workers' own state."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from distributed import Client, LocalCluster
from distributed.security import Security
from gridboost_dask import DaskBackend

import gridboost as gb
from conftest import (
    SETTLE,
    WORKER_THREADS,
    WORKERS,
    DaskProbe,
    eventually,
    held_anywhere,
    whereami,
    worker_named,
)
from gridboost import Grid
from gridboost.testing import nap

HERE = Path(__file__).parent
CONNECT_TIMEOUT = inspect.signature(DaskBackend).parameters["connect_timeout"].default

# Dask's workers run what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def echo_key(*, key: int) -> int:
    return key


def wait_for(path: str) -> str:
    """Run as a task: hold a worker thread until ``path`` exists (bounded), then say where it ran."""
    import os
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return whereami()


def size_when(data: bytes, path: str) -> int:
    """Run as a task: hold a worker thread until ``path`` exists (bounded), then return ``len(data)``."""
    wait_for(path)
    return len(data)


def kind_and_size(data: bytes) -> tuple[str, int]:
    return type(data).__name__, len(data)


def _dependencies_on_scheduler(prefix: str, dask_scheduler: Any = None) -> dict[str, list[str]]:
    """On the scheduler: every key starting with ``prefix``, with the keys it depends on."""
    return {
        str(key): sorted(str(dep.key) for dep in ts.dependencies)
        for key, ts in dask_scheduler.tasks.items()
        if str(key).startswith(prefix)
    }


def _tasks_on_scheduler(dask_scheduler: Any = None) -> dict[str, dict[str, float]]:
    """On the scheduler: every task's key, with the resources the scheduler restricts it to."""
    return {str(key): dict(ts.resource_restrictions or {}) for key, ts in dask_scheduler.tasks.items()}


@pytest.mark.anyio
class TestOnTheCluster:
    async def test_snapshot_shows_workers_threads_memory_resources_and_labels(
        self, grid: Grid, dask_client: Client
    ) -> None:
        """Every worker is a node: threads as cpu, memory_limit as bytes, its resources, labels name/host/resource."""
        snapshot = await grid.snapshot()
        by_name = {node.labels["name"]: node for node in snapshot.alive}
        assert set(by_name) == set(WORKERS)
        assert by_name["a"].total.custom == {"accel": 1} and by_name["b"].total.custom == {}
        assert by_name["a"].labels["resource:accel"] == "1"
        for name, node in by_name.items():
            assert node.id == worker_named(dask_client, name) == node.address
            assert node.total.cpu == WORKER_THREADS and isinstance(node.total.memory, int) and node.total.memory > 0
            assert node.labels["host"] == "127.0.0.1" and node.labels["local"] == "true"
        assert sum(node.is_local for node in snapshot.nodes) == 1

    async def test_a_boost_aimed_at_a_worker_is_marked_there_and_its_work_runs_there(
        self, grid: Grid, probe: DaskProbe, dask_client: Client
    ) -> None:
        """A boost for name=b holds its lease resource on worker b only, and its offloads run on b."""
        target = worker_named(dask_client, "b")
        async with grid.boost("cpu=1", ttl=60, labels={"name": "b"}) as boost:
            assert set(await probe.reservation_nodes(grid, boost.id)) == {target}
            assert boost.placements == (target,)
            ran_on = [await grid.offload(whereami, where=boost) for _ in range(4)]
            assert set(ran_on) == {target}
            snapshot = await grid.snapshot()
            assert next(n for n in snapshot.nodes if n.id == target).available.cpu == WORKER_THREADS - 1
        assert boost.id not in await probe.reservations(grid)

    async def test_leases_never_share_a_workers_threads(
        self, grid: Grid, probe: DaskProbe, dask_client: Client
    ) -> None:
        """Two 2-CPU boosts take both workers; a third waits and is refused at its bound; Dask holds exactly two."""
        first = await grid.request_boost("cpu=2", ttl=60, nodes=[worker_named(dask_client, "a")])
        second = await grid.request_boost("cpu=2", ttl=60)
        assert set(first.placements) != set(second.placements)
        with anyio.fail_after(SETTLE), pytest.raises(gb.BoostUnavailable, match="not granted within 1s"):
            await grid.request_boost("cpu=1", ttl=60, wait=1)
        assert set(await probe.reservations(grid)) == {first.id, second.id}
        await first.release()
        await second.release()

    async def test_a_task_larger_than_its_boost_holds_on_a_worker_is_refused(self, grid: Grid) -> None:
        """Work that needs more CPUs than its boost holds on any one worker raises CapacityUnavailable at once."""
        async with grid.boost("cpu=1", ttl=60) as boost:
            with pytest.raises(gb.CapacityUnavailable, match="most boost"):
                await grid.offload(nap, 0.1, resources="cpu=2", where=boost)

    async def test_a_tasks_key_on_the_scheduler_starts_with_the_grids_task_prefix(
        self, grid: Grid, dask_client: Client, tmp_path: Path
    ) -> None:
        """While a task runs, the scheduler has a key that is ``grid.task_prefix`` then the task's id, and it asks
        Dask for no ``memory`` counter: memory in a task's resources is accepted, and not a Dask resource."""
        assert grid.task_prefix is not None and grid.task_prefix.startswith("gridboost:")
        go = tmp_path / "go"
        handle = grid.submit(wait_for, str(go), resources="cpu=1,memory=1GiB", where="cluster")

        async def listed() -> bool:
            return grid.task_prefix + handle.id in await anyio.to_thread.run_sync(
                dask_client.run_on_scheduler, _tasks_on_scheduler
            )

        try:
            await eventually(listed, f"the scheduler never had the key {grid.task_prefix + handle.id}")
            tasks = await anyio.to_thread.run_sync(dask_client.run_on_scheduler, _tasks_on_scheduler)
            assert tasks[grid.task_prefix + handle.id] == {}
            assert [key for key in tasks if key.endswith(handle.id)] == [grid.task_prefix + handle.id]
        finally:
            go.touch()
        assert await handle in {worker_named(dask_client, name) for name in WORKERS}

    async def test_keywords_named_like_submits_own_reach_the_function(self, grid: Grid) -> None:
        """A keyword argument called ``key`` (a Client.submit parameter) reaches the user's function."""
        assert await grid.offload(echo_key, key=7, where="cluster") == 7


@pytest.mark.anyio
class TestParkedData:
    async def test_tasks_given_a_handle_depend_on_its_one_key_on_the_scheduler(
        self, grid: Grid, probe: DaskProbe, dask_client: Client, tmp_path: Path
    ) -> None:
        """Three offloads given one handle each depend on the single key it was scattered as, which alone holds it."""
        size = 2**20
        handle = await grid.put(os.urandom(size))
        parked = probe.parked_key(grid, handle)
        go = tmp_path / "go"
        tasks = [grid.submit(size_when, handle, str(go), where="cluster") for _ in range(3)]
        assert grid.task_prefix is not None
        keys = {grid.task_prefix + task.id for task in tasks}

        async def graph() -> dict[str, list[str]]:
            found: dict[str, list[str]] = await anyio.to_thread.run_sync(
                dask_client.run_on_scheduler, _dependencies_on_scheduler, grid.task_prefix
            )
            return found

        async def submitted() -> bool:
            return keys <= set(await graph())

        try:
            await eventually(submitted, "the scheduler never had all three tasks")
            dependencies = await graph()
            assert {key: dependencies[key] for key in keys} == {key: [parked] for key in keys}
            assert await probe.big_objects(grid, size) == 1
        finally:
            go.touch()
        assert [await task for task in tasks] == [size] * 3
        await handle.release()

    @pytest.mark.parametrize("name", sorted(WORKERS))
    async def test_a_handle_put_under_a_boost_is_held_by_its_lease_worker(
        self, grid: Grid, probe: DaskProbe, dask_client: Client, name: str
    ) -> None:
        """Under a boost aimed at one worker, the scheduler says that worker, and no other, holds the parked key."""
        target = worker_named(dask_client, name)
        async with grid.boost("cpu=1", ttl=60, labels={"name": name}) as boost:
            handle = await grid.put(os.urandom(2**20), boost=boost)
            assert await anyio.to_thread.run_sync(probe.holders, grid, handle) == [target]
            assert await grid.offload(len, handle, where=boost) == 2**20

        async def freed() -> bool:
            return not await probe.parked_nodes(grid, handle)

        await eventually(freed, f"{target} still holds {handle.id} after its boost ended")

    async def test_work_placed_on_the_host_gets_the_parked_object(self, grid: Grid, probe: DaskProbe) -> None:
        """An offload placed on this machine gets the object fetched from Dask, which still stores it once."""
        data = os.urandom(2**20)
        handle = await grid.put(data)
        assert await grid.offload(kind_and_size, handle, where="local") == ("bytes", len(data))
        assert await grid.offload(bytes.__eq__, handle, data, where="local") is True
        assert await probe.big_objects(grid, len(data)) == 1
        await handle.release()


@pytest.mark.anyio
class TestBadInput:
    async def test_labels_matching_no_worker_raise_boost_unavailable(self, grid: Grid, probe: DaskProbe) -> None:
        """A boost whose labels match no worker fails at once; nothing is held; the grid stays usable."""
        # At once: well inside the request's own wait of 60 s, however loaded the machine.
        with anyio.fail_after(SETTLE), pytest.raises(gb.BoostUnavailable, match="no live node matches"):
            await grid.request_boost("cpu=1", ttl=60, labels={"name": "moon"}, wait=60)
        assert not await probe.reservations(grid)
        assert await grid.offload(whereami, where="cluster")

    async def test_a_boost_no_worker_set_can_hold_names_the_shortfall(self, grid: Grid, probe: DaskProbe) -> None:
        """Without a cluster manager to grow: too much raises BoostUnavailable naming what is missing, at once."""
        with anyio.fail_after(SETTLE), pytest.raises(gb.BoostUnavailable, match=r"missing cpu=96"):
            await grid.request_boost("cpu=100", ttl=60, wait=60)
        with anyio.fail_after(SETTLE), pytest.raises(gb.BoostUnavailable, match="could ever hold"):
            await grid.request_boost("cpu=3", ttl=60, strategy="strict_spread", wait=60)
        assert not await probe.reservations(grid)
        assert await grid.offload(whereami, where="cluster")

    @pytest.mark.parametrize(
        ("resources", "match"),
        [({"gpu_memory": 2**30}, "gpu_memory"), ({"custom": {"GPU": 1}}, "gridboost's own")],
        ids=["gpu_memory", "own-name"],
    )
    async def test_resources_dask_cannot_express_are_refused(
        self, grid: Grid, resources: dict[str, Any], match: str
    ) -> None:
        """A resource Dask has no counter for is refused with InvalidResources before anything is submitted."""
        with pytest.raises(gb.InvalidResources, match=match):
            await grid.offload(whereami, resources=resources, where="cluster")

    async def test_a_boost_the_grid_cannot_place_is_refused_naming_why(self, grid: Grid, probe: DaskProbe) -> None:
        """Through the grid: gpu_memory raises InvalidResources at the call, and labels no worker carries raise
        BoostUnavailable listing the labels there, each in one line; nothing is held."""
        with pytest.raises(gb.InvalidResources, match="gpu_memory"):
            await grid.request_boost("gpu_memory=1GiB", ttl=30)
        with anyio.fail_after(SETTLE), pytest.raises(gb.BoostUnavailable) as info:
            await grid.request_boost("cpu=1", ttl=30, labels={"name": "moon"})
        message = str(info.value)
        assert "\n" not in message and len(message) < 300, message
        assert "labels there: " in message and "name=a|b" in message, message
        assert not await probe.reservations(grid)

    async def test_an_async_function_is_refused_as_offload_is_called(self, grid: Grid) -> None:
        """An async function is refused with InvalidTask before anything is submitted: a Dask task runs plain ones."""

        async def later() -> None:
            pass

        with pytest.raises(gb.InvalidTask, match="async function"):
            await grid.offload(later, where="cluster")

    async def test_a_refused_address_fails_within_the_default_connect_timeout(self) -> None:
        """With default options, a refused address raises BackendError naming it and connect_timeout, well before the
        30 s it took when one timeout bounded both joining and starting a cluster."""
        where = "tcp://127.0.0.1:1"
        with anyio.fail_after(3 * CONNECT_TIMEOUT + 5), pytest.raises(gb.BackendError) as info:
            async with Grid("dask", address=where):
                pass
        assert where in str(info.value) and f"connect_timeout={CONNECT_TIMEOUT:g}s" in str(info.value)

    async def test_a_silent_scheduler_raises_backend_error_in_bounded_time(self) -> None:
        """An address that accepts TCP but never speaks Dask raises BackendError naming it; the join never hangs."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            where = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
            # Dask's own timeout, then our outer cut 5 s later, then closing the half-made client: 5 s more at most.
            with anyio.fail_after(3 * (1 + 5 + 5)), pytest.raises(gb.BackendError, match="Dask scheduler at") as info:
                async with Grid("dask", address=where, connect_timeout=1):
                    pass
        assert where in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("asked", "error", "named"),
    [
        ({"resources": gb.Resources(gpu=1, gpu_memory=2**30)}, gb.InvalidResources, ["gpu_memory=1073741824"]),
        (
            {"resources": gb.Resources(cpu=1), "labels": {"name": "moon"}},
            gb.BoostUnavailable,
            ["labels={'name': 'moon'}", "labels there: ", "name=a|b", "resource:accel=1"],
        ),
    ],
    ids=["gpu_memory", "labels"],
)
async def test_a_lease_dask_cannot_place_is_refused_in_one_short_line(
    cluster_address: str, dask_client: Client, asked: dict[str, Any], error: type[Exception], named: list[str]
) -> None:
    """The backend refuses gpu_memory (Dask has no counter for it) with InvalidResources, and labels no worker carries
    with BoostUnavailable listing each label key the workers have and its values; the scheduler holds nothing."""
    # The backend's own answer: a grid asks the backend only once its own check (the cluster's total, the nodes the
    # labels match) has passed, which on a cluster that cannot grow refuses both first.
    backend = DaskBackend(address=cluster_address)
    await backend.start()
    try:
        request = gb.abc.ReservationRequest(id="boost-unplaceable", **asked)
        with anyio.fail_after(SETTLE), pytest.raises(error) as info:
            await backend.reserve(request)
        message = str(info.value)
        assert "\n" not in message and len(message) < 300, message
        assert all(part in message for part in named), message
        assert not await anyio.to_thread.run_sync(held_anywhere, dask_client, "boost-unplaceable")
    finally:
        await backend.aclose()


# -- a cluster of its own: TLS -----------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_tls_with_temporary_certificates() -> None:
    """A TLS scheduler is joined with security= passed through; without it, joining fails with BackendError."""
    security = Security.temporary()
    async with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tls://",
        host="127.0.0.1",
        security=security,
        dashboard_address=None,
        asynchronous=True,
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        async with Grid("dask", address=address, security=security) as grid:
            async with grid.boost("cpu=1", ttl=30) as boost:
                assert await grid.offload(whereami, where=boost) == boost.placements[0]
            assert (await grid.snapshot()).nodes[0].id.startswith("tls://")
        with anyio.fail_after(20), pytest.raises(gb.BackendError, match="Dask scheduler"):
            async with Grid("dask", address=address, connect_timeout=2):
                pass


# -- in a process of their own -----------------------------------------------------------------------------------------


def test_the_embedded_default_is_a_local_cluster_that_leaves_nothing(tmp_path: Path) -> None:
    """With no address, a grid starts its own LocalCluster (worker processes, can grow), and closing the grid ends
    every process it started."""
    done = subprocess.run(
        [sys.executable, str(HERE / "_fresh_process.py"), "embedded"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(line.removeprefix("REPORT "))
    assert report["nodes"] == 1 and report["local"] == [True] and report["grow"]
    assert report["ran"] == socket.gethostname()
    assert report["pids"] and report["alive_after"] == []


@pytest.mark.parametrize("quiet", [False, True], ids=["as-dask-leaves-it", "quiet_engine_logs"])
def test_quiet_engine_logs_keeps_dask_warnings_of_host_and_workers_off_stderr(quiet: bool, tmp_path: Path) -> None:
    """A warning on a worker process's Dask logger and one on the host's Dask client reach stderr as Dask leaves
    them, and neither does after ``gridboost.quiet_engine_logs()``, from what the plugin's BackendSpec declares."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_LOGGING")}
    done = subprocess.run(
        [sys.executable, str(HERE / "_fresh_process.py"), "chatter", *(["quiet"] if quiet else [])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0 and 'REPORT {"said": "said"}' in done.stdout, (
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    said = [line for line in done.stderr.splitlines() if "CHATTER" in line]
    if quiet:
        assert said == [], done.stderr[-3000:]
    else:  # the check can see them: both reach stderr when nothing quiets them
        assert len(said) == 2 and any("worker process" in x for x in said) and any("client" in x for x in said), said


def lease_here(item: int) -> tuple[int, Any, str]:
    """Run as a task (or a map item): the lease ``gridboost.current_lease()`` names on the worker, and where it ran."""
    from distributed import get_worker

    return item, gb.current_lease(), str(get_worker().address)


@pytest.mark.anyio
async def test_work_under_a_boost_reads_its_lease_and_token_on_the_worker(grid: Grid) -> None:
    """``gridboost.current_lease`` offloaded under a boost returns the boost's id and token on a Dask worker (a map
    chunk's items too, and keywords named like Client.submit's go through); without a boost, None."""
    async with grid.boost("cpu=1", ttl=60) as boost:
        expected = gb.CurrentLease(boost.id, boost.token)
        assert boost.token > 0
        assert await grid.offload(gb.current_lease, where=boost) == expected
        items = [item async for item in grid.map(lease_here, range(6), where=boost, batch_size=3)]
        assert [(i, lease) for i, lease, _ in items] == [(i, expected) for i in range(6)]
        assert {where for _, _, where in items} <= set(boost.placements)
        assert await grid.offload(lambda key: (key, gb.current_lease()), key="k", where=boost) == ("k", expected)
        assert await grid.offload(gb.current_lease, where="cluster") is None
        assert (await grid.offload(lease_here, 1, where="cluster"))[1] is None
    assert gb.current_lease() is None
