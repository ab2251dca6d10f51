"""What is specific to the Ray backend, checked against Ray's own tables: targeting, bundles, bad input, connecting."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

import gridboost as gb
from conftest import WORKER_CPUS, WORKERS, RayProbe, _task_states, whereami, zone_node
from gridboost import Command, Grid, Resources
from gridboost.testing import nap
from gridboost.testing._work import nap_then_size

HERE = Path(__file__).parent
SETTLE = 20.0

# Ray's workers cannot import this module (see conftest): what they run of it travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]


class Refused(Exception):
    """The test's own exception."""


def refuse(code: int) -> None:
    raise Refused(code)


def group_row(grid: Grid, boost_id: str) -> dict[str, Any]:
    """Ray's placement group table row of a boost."""
    name = grid.backend.prefix + boost_id  # type: ignore[attr-defined]
    return next(row for row in placement_group_table().values() if row["name"] == name and row["state"] != "REMOVED")


async def eventually(check: Any, what: str) -> None:
    with anyio.move_on_after(SETTLE):
        while not await check():
            await anyio.sleep(0.05)
        return
    pytest.fail(f"after {SETTLE:g}s: {what}")


@pytest.fixture
async def grid(cluster_address: str, probe: RayProbe) -> AsyncIterator[Grid]:
    """A grid joined to the session's cluster; afterwards Ray must hold and run nothing of it."""
    async with Grid("ray", address=cluster_address, grace=1.0) as grid:
        yield grid

    async def clean() -> bool:
        return not await probe.reservations(grid) and not await probe.running(grid)

    await eventually(clean, "Ray still holds or runs something of the closed grid")


@pytest.mark.anyio
class TestOnTheCluster:
    async def test_snapshot_shows_nodes_labels_custom_resources_and_the_local_node(self, grid: Grid) -> None:
        """Every live node is listed with its labels, CPUs, byte-sized memory and custom resources; the head is local."""
        snapshot = await grid.snapshot()
        by_zone = {node.labels.get("zone"): node for node in snapshot.alive}
        assert set(by_zone) == {None, "a", "b"}
        assert by_zone[None].is_local and by_zone[None].total.cpu == 0
        assert by_zone["a"].total.custom == {"accel": 1} and by_zone["b"].total.custom == {}
        for zone in ("a", "b"):
            node = by_zone[zone]
            assert node.id == zone_node(zone) and node.labels["ray.io/node-id"] == node.id
            assert node.total.cpu == WORKER_CPUS and isinstance(node.total.memory, int) and node.total.memory > 2**20
            assert not node.is_local

    async def test_a_task_is_named_in_rays_task_table_with_the_grids_task_prefix_and_its_function(
        self, grid: Grid
    ) -> None:
        """Ray's own task table lists each offloaded task as ``grid.task_prefix`` then the function's name (one name
        per function: Ray keeps a metric series per name), in the row of the Ray task id the backend gives for it."""
        assert grid.task_prefix is not None and grid.task_prefix.startswith("gridboost:")
        handles = [grid.submit(whereami, where="cluster") for _ in range(3)]
        for handle in handles:
            await handle
        ray_ids = grid.backend.ray_task_ids()  # type: ignore[attr-defined]
        mine = [ray_ids[handle.id] for handle in handles]
        assert len(set(mine)) == 3

        def names() -> dict[str, str]:  # Ray's task events arrive a report interval late
            from ray._private.state import state

            return {event.task_id.hex(): event.task_info.name for event in state._get_all_task_events()}

        async def listed() -> bool:
            return set(mine) <= set(await anyio.to_thread.run_sync(names))

        await eventually(listed, f"Ray's task table never listed the tasks {mine} of {grid.task_prefix}")
        table = await anyio.to_thread.run_sync(names)
        assert [table[ray_id] for ray_id in mine] == [grid.task_prefix + "whereami"] * 3
        assert {task for task, _ in _task_states(grid.backend)} >= {handle.id for handle in handles}

    async def test_a_boost_aimed_at_a_label_is_placed_there_and_its_work_runs_there(
        self, grid: Grid, probe: RayProbe
    ) -> None:
        """A boost for zone=b is a placement group on the zone-b node, and its offloads run on that node."""
        target = zone_node("b")
        async with grid.boost("cpu=1", ttl=60, labels={"zone": "b"}) as boost:
            row = group_row(grid, boost.id)
            assert row["state"] == "CREATED" and set(row["bundles_to_node_id"].values()) == {target}
            assert boost.placements == (target,)
            ran_on = [await grid.offload(whereami, where=boost) for _ in range(4)]
            assert set(ran_on) == {target}

        async def gone() -> bool:  # once its linger time is up
            return boost.id not in await probe.reservations(grid)

        await eventually(gone, f"released boost {boost.id} is still held")

    async def test_strict_spread_puts_one_bundle_on_each_of_distinct_nodes(self, grid: Grid) -> None:
        """strict_spread splits a boost into one-CPU bundles, each on a different node."""
        async with grid.boost("cpu=2", ttl=60, strategy="strict_spread") as boost:
            row = group_row(grid, boost.id)
            assert row["strategy"] == "STRICT_SPREAD"
            assert [bundle["CPU"] for bundle in row["bundles"].values()] == [1.0, 1.0]
            assert set(row["bundles_to_node_id"].values()) == {zone_node("a"), zone_node("b")}

    async def test_pack_takes_one_node_when_one_can_hold_it_and_spans_nodes_otherwise(self, grid: Grid) -> None:
        """pack holds a boost one node can hold in one bundle, and splits one that no node can hold."""
        async with grid.boost("cpu=2,memory=3MiB", ttl=60) as boost:
            row = group_row(grid, boost.id)
            assert list(row["bundles"].values()) == [{"CPU": 2.0, "memory": 3.0 * 2**20}]
        async with grid.boost("cpu=3", ttl=60) as boost:
            row = group_row(grid, boost.id)
            nodes = set(row["bundles_to_node_id"].values())
            assert len(row["bundles"]) == 3 and nodes == {zone_node("a"), zone_node("b")}
            assert await grid.offload(whereami, where=boost) in {zone_node("a"), zone_node("b")}

    async def test_a_boost_that_cannot_be_granted_in_time_leaves_no_group(
        self, grid: Grid, probe: RayProbe, unit: Resources
    ) -> None:
        """A boost still pending at its wait bound raises BoostUnavailable, and its placement group is removed."""
        blockers = [await grid.request_boost(unit, ttl=60) for _ in range(WORKER_CPUS * len(WORKERS))]
        with anyio.fail_after(SETTLE), pytest.raises(gb.BoostUnavailable, match="not granted within 1s"):
            await grid.request_boost(unit, ttl=60, wait=1)
        assert set(await probe.reservations(grid)) == {b.id for b in blockers}
        for blocker in blockers:
            await blocker.release()

    async def test_a_task_larger_than_its_boost_holds_on_a_node_is_refused(self, grid: Grid, probe: RayProbe) -> None:
        """Work that cannot fit its boost on any one node raises CapacityUnavailable instead of waiting forever."""
        async with grid.boost("cpu=1", ttl=60) as boost:
            with pytest.raises(gb.CapacityUnavailable, match="most boost"):
                await grid.offload(nap, 0.1, resources="cpu=2", where=boost)
        assert not await probe.running(grid)

    async def test_the_users_exception_carries_the_remote_traceback(self, grid: Grid) -> None:
        """The user's exception keeps its type and arguments, and notes where in Ray it was raised."""
        with pytest.raises(Refused) as info:
            await grid.offload(refuse, 3, where="cluster")
        assert info.value.args == (3,)
        assert any("raised in Ray" in note and "refuse" in note for note in info.value.__notes__)

    async def test_a_command_that_ignores_sigterm_is_killed_after_grace(
        self, grid: Grid, probe: RayProbe, tmp_path: Path
    ) -> None:
        """Cancelling a command that ignores SIGTERM kills it with SIGKILL once the grace period is over."""
        pid_file = tmp_path / "pid"
        script = (
            "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
        )
        handle = grid.submit(Command([sys.executable, "-c", script]), where="cluster")
        with anyio.fail_after(SETTLE):
            while not pid_file.exists() or not pid_file.read_text():
                await anyio.sleep(0.02)
        pid = int(pid_file.read_text())
        handle.cancel()
        with anyio.fail_after(SETTLE), pytest.raises(gb.TaskCancelled):
            await handle

        async def gone() -> bool:
            return _process_gone(pid)

        await eventually(gone, f"command pid {pid} survived its cancellation: {_describe_process(pid)}")

    async def test_a_callable_blocked_in_c_is_stopped_by_force(self, grid: Grid, probe: RayProbe) -> None:
        """A callable that never returns to Python (time.sleep) is stopped by killing its worker after grace."""
        handle = grid.submit(time.sleep, 60, where="cluster")

        async def running() -> bool:
            return handle.id in await probe.running(grid)

        await eventually(running, "the sleeper never started")
        started = time.monotonic()
        handle.cancel()
        with anyio.fail_after(SETTLE), pytest.raises(gb.TaskCancelled):
            await handle
        assert time.monotonic() - started < 1.0 + 5.0  # grace, then force

        async def stopped() -> bool:
            return handle.id not in await probe.running(grid)

        await eventually(stopped, "Ray still runs the force-cancelled sleeper")

    async def test_what_names_and_tells_apart_a_long_runs_tasks_stays_bounded(
        self, cluster_address: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """However many tasks a grid runs, Ray sees one task name per function and the backend remembers the Ray
        ids of its tasks in flight and a bounded number of ended ones (here 4): the host's memory stays flat."""
        import gridboost_ray._backend

        monkeypatch.setattr(gridboost_ray._backend, "_ENDED_KEPT", 4)
        async with Grid("ray", address=cluster_address) as grid:
            handles = [grid.submit(whereami, where="cluster") for _ in range(10)]
            commands = [grid.submit(Command([sys.executable, "-c", "pass"]), where="cluster") for _ in range(2)]
            for handle in [*handles, *commands]:
                await handle
            ray_ids = grid.backend.ray_task_ids()  # type: ignore[attr-defined]
            assert len(ray_ids) == 4 and set(ray_ids) <= {handle.id for handle in [*handles, *commands]}

            def names() -> set[str]:
                from ray._private.state import state

                return {
                    event.task_info.name
                    for event in state._get_all_task_events()
                    if event.task_info.name.startswith(grid.task_prefix or "")
                }

            async def both() -> bool:
                return len(await anyio.to_thread.run_sync(names)) == 2

            await eventually(both, "Ray's table never showed the grid's two task names")
            command = "command:" + os.path.basename(sys.executable)
            assert await anyio.to_thread.run_sync(names) == {grid.task_prefix + "whereami", grid.task_prefix + command}

    async def test_data_shipped_with_each_task_is_stored_per_task_and_parked_data_once(
        self, grid: Grid, probe: RayProbe
    ) -> None:
        """Ray's object directory holds a large argument once per task in flight, and a parked one once in all."""
        size = 4 * 2**20
        data = os.urandom(size)

        async def all_running() -> bool:
            return len(await probe.running(grid)) == 3

        shipped = [grid.submit(nap_then_size, data, 2.0, where="cluster") for _ in range(3)]
        await eventually(all_running, "the 3 tasks did not all start")
        assert await probe.big_objects(grid, size) == 3  # each argument is stored until its task ends
        assert [await h for h in shipped] == [size] * 3
        handle = await grid.put(data)
        parked = [grid.submit(nap_then_size, handle, 2.0, where="cluster") for _ in range(3)]
        await eventually(all_running, "the 3 tasks did not all start")
        assert await probe.big_objects(grid, size) == 1
        assert [await h for h in parked] == [size] * 3

    async def test_work_placed_here_gets_parked_data_from_the_object_store(self, grid: Grid) -> None:
        """A Ray handle given to work that runs on this machine is fetched here, and the task gets the object."""
        handle = await grid.put(b"abc" * 1000)
        assert await grid.offload(len, handle, where="local") == 3000
        assert [n async for n in grid.map(len, [handle, b"x"], where="local")] == [3000, 1]

    async def test_two_grids_share_the_process_connection(self, cluster_address: str) -> None:
        """Grids of one process share its Ray connection; closing one leaves the other working, and the driver's."""
        async with Grid("ray", address=cluster_address) as first:
            async with Grid("ray", address=cluster_address) as second:
                assert second.backend.connection is first.backend.connection  # type: ignore[attr-defined]
                assert first.backend.connection.users == 2  # type: ignore[attr-defined]
            assert await first.offload(whereami, where="cluster") in {zone_node("a"), zone_node("b")}
        assert ray.is_initialized()  # the application's own connection (the session's) is never shut down

    async def test_auto_joins_the_cluster_ray_address_names(
        self, cluster_address: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """address='auto' joins the cluster that RAY_ADDRESS names."""
        monkeypatch.setenv("RAY_ADDRESS", cluster_address)
        async with Grid("ray", address="auto") as grid:
            assert grid.backend.connection.gcs_address == cluster_address  # type: ignore[attr-defined]
            assert await grid.offload(whereami, where="cluster") in {zone_node("a"), zone_node("b")}


@pytest.mark.anyio
class TestBadInput:
    async def test_labels_matching_no_node_raise_boost_unavailable(self, grid: Grid, probe: RayProbe) -> None:
        """A boost whose labels match no node fails at once, and no placement group is left."""
        with anyio.fail_after(5), pytest.raises(gb.BoostUnavailable, match="no live node matches"):
            await grid.request_boost("cpu=1", ttl=60, labels={"zone": "moon"}, wait=60)
        assert not await probe.reservations(grid)
        assert await grid.offload(whereami, where="cluster")

    async def test_labels_matching_no_node_name_the_labels_the_cluster_has(self, grid: Grid, probe: RayProbe) -> None:
        """The Ray backend itself refuses a reservation whose labels match no live node in one short line that lists
        the labels Ray's node table has (zone=a, zone=b), and makes no placement group."""
        from gridboost.abc import ReservationRequest

        request = ReservationRequest(id="moon-1", resources=Resources(cpu=1), labels={"zone": "moon"})
        with anyio.fail_after(30), pytest.raises(gb.BoostUnavailable) as caught:
            await grid.backend.reserve(request)
        message = str(caught.value)
        assert "zone=moon" in message and "zone=a" in message and "zone=b" in message, message
        assert "\n" not in message and len(message) < 300, message
        assert not await probe.reservations(grid)

    async def test_a_gpu_memory_boost_is_refused_with_invalid_resources_naming_it(
        self, grid: Grid, probe: RayProbe
    ) -> None:
        """A boost asking for ``gpu_memory``, which Ray cannot reserve, raises InvalidResources naming it (not a
        BoostUnavailable that blames the cluster's size), from the grid and from the backend, and Ray gets no
        placement group."""
        from gridboost.abc import ReservationRequest

        with anyio.fail_after(30), pytest.raises(gb.InvalidResources, match="gpu_memory"):
            await grid.request_boost(Resources(cpu=1, gpu_memory=2**30), ttl=60, wait=5)
        request = ReservationRequest(id="vram-1", resources=Resources(cpu=1, gpu_memory=2**30))
        with anyio.fail_after(30), pytest.raises(gb.InvalidResources, match="gpu_memory"):
            await grid.backend.reserve(request)
        assert not await probe.reservations(grid)

    async def test_a_function_ray_cannot_serialise_is_refused_before_submission(
        self, grid: Grid, probe: RayProbe
    ) -> None:
        """A function that cannot be pickled raises NotSerializable naming it, as offload is called."""
        lock = threading.Lock()

        def holds_a_lock() -> bool:
            return lock.locked()

        with pytest.raises(gb.NotSerializable, match="holds_a_lock"):
            grid.offload(holds_a_lock, where="cluster").close()  # raises as it is called: no coroutine to close
        assert not await probe.running(grid)
        assert await grid.offload(whereami, where="cluster")

    async def test_an_async_function_is_refused_as_offload_is_called(self, grid: Grid) -> None:
        """An async function raises InvalidTask at once: a Ray task runs plain functions."""

        async def later() -> None:
            pass

        with pytest.raises(gb.InvalidTask, match="async function"):
            grid.offload(later, where="cluster").close()

    async def test_an_argument_ray_cannot_serialise_raises_not_serializable(self, grid: Grid) -> None:
        """An argument that cannot be pickled raises NotSerializable naming the function and the argument."""
        with pytest.raises(gb.NotSerializable, match=r"nap.*lock"):
            await grid.offload(nap, threading.Lock(), where="cluster")

    @pytest.mark.parametrize(
        ("resources", "match"),
        [({"gpu_memory": 2**30}, "gpu_memory"), ({"custom": {"CPU": 1}}, "Ray's own name")],
        ids=["gpu_memory", "ray-name"],
    )
    async def test_resources_ray_cannot_express_are_refused(
        self, grid: Grid, resources: dict[str, Any], match: str
    ) -> None:
        """A resource Ray has no name for is refused with InvalidResources before anything is submitted."""
        with pytest.raises(gb.InvalidResources, match=match):
            grid.offload(whereami, resources=resources, where="cluster").close()

    @pytest.mark.parametrize(
        ("address", "match"),
        [
            ("127.0.0.1:1", "cannot reach Ray"),
            ("no-such-host.invalid:6379", "cannot resolve"),
            (None, "not a Ray GCS port"),
        ],
        ids=["refused", "unknown-host", "not-a-gcs"],
    )
    async def test_an_unreachable_address_raises_backend_error_in_bounded_time(
        self, address: str | None, match: str
    ) -> None:
        """An address that is not a reachable Ray GCS raises BackendError within connect_timeout, never hangs."""
        with socket.socket() as listener:  # accepts TCP connections, speaks no gRPC
            listener.bind(("0.0.0.0", 0))  # Ray resolves 127.0.0.1 to this machine's address
            listener.listen()
            where = address or f"127.0.0.1:{listener.getsockname()[1]}"
            started = time.monotonic()
            with anyio.fail_after(10), pytest.raises(gb.BackendError, match=match):
                async with Grid("ray", address=where, connect_timeout=1):
                    pass
            assert time.monotonic() - started < 5
        assert ray.is_initialized()  # the session's connection is untouched


def _process_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _describe_process(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        parent = process.parent()
        return f"status {process.status()}, parent {parent.pid if parent else None} ({parent.name() if parent else ''})"
    except psutil.Error as exc:
        return repr(exc)


# -- a node that dies mid-task (added to the session's cluster for this test only) ------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_node_dying_mid_task_raises_backend_error(
    grid: Grid, probe: RayProbe, cluster: Cluster, doomed_node: Any
) -> None:
    """Work on a node that dies fails with a BackendError that says so, and the grid stays usable."""
    handle = grid.submit(nap, 60, resources={"doomed": 1}, where="cluster")

    async def running() -> bool:
        return handle.id in await probe.running(grid)

    await eventually(running, "the task never started on the doomed node")
    await anyio.to_thread.run_sync(cluster.remove_node, doomed_node)
    with anyio.fail_after(60), pytest.raises(gb.BackendError, match="died"):
        await handle
    assert await grid.offload(whereami, where="cluster") in {zone_node("a"), zone_node("b")}


# -- in a process of their own ------------------------------------------------------------------------------------


def _fresh(tmp_path: Path, *args: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(HERE / "_fresh_process.py"), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(line.removeprefix("REPORT "))
    return report


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_TMPDIR=str(tmp_path))
    return env


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        with_text = " ".join(process.info["cmdline"] or ())
        if text in with_text:
            found.append(f"{process.info['pid']}: {with_text[:120]}")
    return found


def test_the_embedded_default_is_private_shared_and_leaves_nothing(tmp_path: Path) -> None:
    """With no address, grids of a process share one private Ray (namespace and runtime_env passed through), which
    uses token auth with a token of the process's own (never written to ~/.ray) and is gone, processes and
    directory, once the last grid closes."""
    report = _fresh(tmp_path, "embedded", env=_clean_env(tmp_path))
    assert report["nodes"] == 1 and report["shared"]
    assert report["env_var"] == "yes" and report["namespace"] == "gbtest"
    assert not report["initialized_after"]
    assert report["pids"] and report["alive_after"] == []
    assert not report["temp_dir_after"]
    assert not (tmp_path / ".ray" / "auth_token").exists()  # Ray alone would write one there
    assert _processes_mentioning(report["temp_dir"]) == []


def test_joining_a_token_cluster_without_a_token_fails_fast_with_advice(tmp_path: Path, cluster_address: str) -> None:
    """Joining the session's token-protected cluster with no token configured says what to set, within seconds."""
    report = _fresh(tmp_path, "join", cluster_address, env=_clean_env(tmp_path))
    assert report["error"] == "BackendError"
    assert "RAY_AUTH_MODE=token" in report["message"] and report["seconds"] < 10
