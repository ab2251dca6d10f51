"""One real multi-node Ray cluster for the whole test session, and a probe that reads Ray's own state.

The cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes, each a raylet of its own) lives in a
temporary directory of this session and runs with token authentication, the token given through the environment;
the test process is its driver, connected once. ``Cluster.shutdown()`` kills only the processes its nodes started
(it never runs ``ray stop``), and every test's grid joins this cluster by address, so nothing here touches another
Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator
from typing import Any

# Set before ray is imported, for the whole session (the nodes inherit them):
# - RAY_TMPDIR: Cluster records its address in, and at shutdown deletes, "ray_current_cluster" in Ray's *default*
#   temp dir; with this it is our own directory, not the machine's /tmp/ray, and address="auto" finds only ours.
# - RAY_AUTH_*: token authentication, Ray's default since 2.60, with a token that never touches ~/.ray.
_SESSION_DIR = tempfile.mkdtemp(prefix="gbr-")
os.environ["RAY_TMPDIR"] = _SESSION_DIR
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.pop("RAY_ADDRESS", None)

import anyio  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from gridboost import Grid, Resources  # noqa: E402
from gridboost.testing import EngineProbe  # noqa: E402

# Ray's workers cannot import the test modules (pytest put their directory on sys.path; Ray does not): the
# functions defined here travel by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]

# Ray's TaskStatus numbers (ray.core.generated.common_pb2.TaskStatus): handed to a worker, running, and ended.
_STARTED = frozenset({5, 8, 9, 10})  # SUBMITTED_TO_WORKER, RUNNING, RUNNING_IN_RAY_GET, RUNNING_IN_RAY_WAIT
_ENDED = frozenset({11, 12})  # FINISHED, FAILED

#: The worker nodes' labels and custom resources; the head holds no CPU, so work lands on the workers.
WORKERS = ({"zone": "a"}, {"zone": "b"})
WORKER_CPUS = 2


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A head (no CPUs) and two 2-CPU workers labelled zone=a (with one ``accel``) and zone=b; the driver joins."""
    temp_dir = os.path.join(_SESSION_DIR, "ray")
    os.makedirs(temp_dir, exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "dashboard_agent_listen_port": None,  # a free port, not the default one another Ray may hold
            "temp_dir": temp_dir,
            # Task events reach the GCS every 20 ms instead of every second: the probe reads them.
            "_system_config": {"task_events_report_interval_ms": 20},
        },
    )
    try:
        cluster.add_node(num_cpus=WORKER_CPUS, labels=WORKERS[0], resources={"accel": 1})
        cluster.add_node(num_cpus=WORKER_CPUS, labels=WORKERS[1])
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        started = psutil.Process().children(recursive=True)  # every Ray process of the session is one of these
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
        _, alive = psutil.wait_procs(started, timeout=20)
        alive = [p for p in alive if _running(p)]
        if alive:
            names = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive]
            for process in alive:  # ours, by pid: the session must not leave them to the machine
                process.kill()
            pytest.fail(f"Ray processes of the test session survived its shutdown: {names}")


@pytest.fixture
def doomed_node(cluster: Cluster) -> Iterator[Any]:
    """A third node (for one test only) with a resource no other node has; started here, in the main thread (Ray ties a node's
    processes to the thread that starts them)."""
    node = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    cluster.wait_for_nodes()
    try:
        yield node
    finally:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)


@pytest.fixture(scope="session")
def cluster_address(cluster: Cluster) -> str:
    return str(cluster.address)


def whereami() -> str:
    """Run as a task: the id of the node it runs on."""
    return str(ray.get_runtime_context().get_node_id())


def zone_node(zone: str) -> str:
    """The id of the worker node labelled ``zone``, from Ray's node table."""
    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return next(str(n["NodeID"]) for n in nodes if n["Alive"] and (n.get("Labels") or {}).get("zone") == zone)


def _prefix(grid: Grid) -> str:
    prefix = getattr(grid.backend, "prefix", None)
    assert isinstance(prefix, str), f"RayProbe needs a Ray backend, got {grid.backend!r}"
    return prefix


def _groups(prefix: str) -> dict[str, dict[str, Any]]:
    from ray.util.placement_group import placement_group_table

    return {
        str(row["name"]).removeprefix(prefix): row
        for row in placement_group_table().values()
        if str(row["name"]).startswith(prefix) and row["state"] != "REMOVED"
    }


def _task_states(backend: Any) -> list[tuple[str, set[int]]]:
    """Each task of ``backend`` in Ray's table (named with its task prefix, then the function): its gridboost id,
    found by its Ray task id through ``backend.ray_task_ids()``, and the states of its latest attempt. A task the
    backend no longer knows shows as ``ray:<Ray task id>``: a check that nothing of the grid runs still sees it."""
    from ray._private.state import state

    prefix = backend.task_prefix
    ours = {ray_id: task_id for task_id, ray_id in backend.ray_task_ids().items()}
    latest: dict[bytes, tuple[int, set[int]]] = {}
    for event in state._get_all_task_events():
        if not event.task_info.name.startswith(prefix):
            continue
        seen = latest.get(event.task_id)
        states = set(event.state_updates.state_ts_ns)
        if seen is None or event.attempt_number > seen[0]:
            latest[event.task_id] = (event.attempt_number, states)
        elif event.attempt_number == seen[0]:
            seen[1].update(states)
    return [(ours.get(ray_id.hex(), f"ray:{ray_id.hex()}"), states) for ray_id, (_, states) in latest.items()]


def _running_tasks(backend: Any) -> set[str]:
    return {task for task, states in _task_states(backend) if states & _STARTED and not states & _ENDED}


def unended(backend: Any) -> set[str]:
    """The tasks of ``backend`` whose latest attempt Ray's task table does not show ended."""
    return {task for task, states in _task_states(backend) if not states & _ENDED}


def _references() -> set[str]:
    """The ids of the objects this process (the driver, which owns what the grids put) still references in Ray."""
    core_worker = ray._private.worker.global_worker.core_worker
    return {key.decode() if isinstance(key, bytes) else str(key) for key in core_worker.get_all_reference_counts()}


def _sizes() -> dict[str, int]:
    """The size of every object the driver references, as Ray's object directory reports it."""
    refs = [ray.ObjectRef(bytes.fromhex(object_id)) for object_id in _references()]
    found = ray.experimental.get_object_locations(refs, timeout_ms=10_000)
    return {ref.hex(): int(where.get("object_size") or 0) for ref, where in found.items()}


class RayProbe(EngineProbe):
    """Ray's own state: the GCS's placement group table, its task events (read without a dashboard), and the
    driver's reference table and Ray's object directory for parked data.

    A grid's placement groups and tasks are those named with its backend's prefix (``gridboost:<session>:``).
    """

    def __init__(self) -> None:
        #: Each parked handle's Ray object id, learnt while it was live (kept as text: a ref would keep it alive).
        self._object_ids: dict[str, str] = {}

    async def parked_nodes(self, grid: Grid, handle: Any) -> Collection[str]:
        ref = grid.backend._parked.get(handle.id)  # type: ignore[attr-defined]
        if ref is not None:
            self._object_ids[handle.id] = ref.hex()
            found = await anyio.to_thread.run_sync(lambda: ray.experimental.get_object_locations([ref], 10_000))
            return set(found[ref]["node_ids"]) if ref in found else set()
        object_id = self._object_ids.get(handle.id)
        assert object_id is not None, f"the probe never saw {handle.id} live"
        if object_id not in await anyio.to_thread.run_sync(_references):
            return set()
        return {f"referenced: {object_id}"}

    async def big_objects(self, grid: Grid, size: int) -> int:
        return sum(n >= size for n in (await anyio.to_thread.run_sync(_sizes)).values())

    async def reservations(self, grid: Grid) -> Collection[str]:
        return set(await anyio.to_thread.run_sync(_groups, _prefix(grid)))

    async def reservation_nodes(self, grid: Grid, reservation_id: str) -> Collection[str]:
        rows = await anyio.to_thread.run_sync(_groups, _prefix(grid))
        return set(rows[reservation_id]["bundles_to_node_id"].values()) if reservation_id in rows else set()

    async def running(self, grid: Grid) -> Collection[str]:
        return await anyio.to_thread.run_sync(_running_tasks, grid.backend)

    @property
    def whereami(self) -> Callable[[], str]:
        return whereami


@pytest.fixture
def probe() -> RayProbe:
    return RayProbe()


@pytest.fixture
def unit() -> Resources:
    return Resources(cpu=1)
