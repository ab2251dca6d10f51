"""``RayBackend``: boosts are placement groups, offloads are Ray tasks (inside the boost's group when given).

Nothing here imports ray until :meth:`RayBackend.start`: the plugin loads with every grid of an environment that has
it installed, and ``import ray`` costs about half a second.

Names in the engine. Every placement group this backend makes is named ``gridboost:<session>:<boost id>``, and every
task ``gridboost:<session>:<function>`` (``<session>`` random per backend). So Ray's own tables say what each one is,
:meth:`RayBackend.reservations` reads this backend's groups back from the engine, and a test (or the CLI) can find a
grid's work in Ray's task events. A task is named after its function, not its id: Ray keeps a metric series per task
name in the submitting process, never freed (a name per task grew the host ~1.7 KiB a task). Which row is which task
is :meth:`RayBackend.ray_task_ids`: Ray's task id by gridboost task id, bounded.

A boost's placement group. ``strict_pack`` holds the boost in one bundle (one node). ``pack`` does too when one
matching node could ever hold it, and is split as below otherwise, so that Ray may pack it onto as few nodes as it
can. ``spread`` and ``strict_spread`` split it into ``k`` equal bundles, ``k`` being its whole CPUs (its whole GPUs
when it has no CPU; at least 1). A task inside a boost must fit into what the boost holds on one node: Ray places it
in any bundle (``placement_group_bundle_index=-1``) and may combine the bundles one node holds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from os import PathLike, fspath
from os.path import basename
from types import FunctionType, ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from attrs import evolve, field, frozen

from gridboost import (
    ClusterSnapshot,
    Command,
    CommandResult,
    Lease,
    NodeSnapshot,
    Quota,
    Resources,
    TaskSpec,
    worker_chunk,
    worker_command,
    worker_leases,
)
from gridboost.abc import Backend, Capabilities, Reservation, ReservationRequest
from gridboost.backend_kit import LRU, SendCheck, amounts, finite, seconds, shown, until_done_on_trio
from gridboost.exceptions import (
    BackendError,
    BoostUnavailable,
    CapacityUnavailable,
    GridClosed,
    InvalidRequest,
    InvalidResources,
    QuotaExceeded,
    TeardownError,
)

from . import _connect, _leases, _worker
from ._errors import map_errors

if TYPE_CHECKING:
    from ray import ObjectRef, TaskID
    from ray.util.placement_group import PlacementGroup

    from ._landing import Landing

__all__ = ["PREFIX", "RayBackend"]

_log = logging.getLogger("gridboost.ray")

#: Every placement group and task gridboost names in Ray starts with this.
PREFIX = "gridboost:"

# Ray's resource names for what Resources calls cpu, gpu and memory; they cannot also be custom names.
_RAY_OWN = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
# What a placement group adds to a node's resources: CPU_group_<pg id>, CPU_group_0_<pg id>, bundle_group_<pg id>.
_GROUP_RESOURCE = re.compile(r"_group_(?:\d+_)?[0-9a-f]{36}$")
# The custom names gridboost.Resources accepts; a Ray resource named otherwise cannot be shown.
_CUSTOM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
# A value Ray's label selectors match literally (anything else is an operator, or refused).
_LABEL_VALUE = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")
_NODE_ID_LABEL = "ray.io/node-id"
# How long one wait for a pending placement group blocks a worker thread; between waits, INFEASIBLE is checked.
_READY_POLL = 0.5
# How long one ask of a waiting request may wait in the keeper for a change (a grant, a release): its owner learns
# of its turn at once, and asks again within this (far inside the keeper's STALE of 10 s, after which it forgets).
_TURN_HOLD = 1.0
# How often watch() looks for lingering groups whose time is up, and asks the keeper about held leases being taken
# back (preemptible ones); about the others (a node died, another process released one) it asks every _WATCH_QUIET.
_WATCH = 0.25
_WATCH_QUIET = 1.0
_EPS = 1e-9
# Ray's TaskStatus numbers (ray.core.generated.common_pb2) of an attempt that ended: FINISHED, FAILED.
_ENDED = frozenset({11, 12})
# How many ended tasks keep their Ray task id known (RayBackend.ray_task_ids): ~1 MiB, reached once and then flat.
_ENDED_KEPT = 10_000

_CAPABILITIES = Capabilities(
    reserve=True,
    grow=False,
    interrupt_running=True,
    commands=True,
    native_retries=True,
    remote=True,
    shared_leases=True,
)


@frozen(eq=False)
class _Group:
    """A boost's placement group, with the bundles asked for and the node each landed on."""

    pg: PlacementGroup
    bundles: tuple[Mapping[str, float], ...]
    nodes: tuple[str, ...]
    #: The label selector every bundle carries (the request's labels and nodes), for the autoscaler too.
    selector: Mapping[str, str] = field(factory=dict)
    #: The ids of the nodes the group may go to (those of the request's nodes and labels), when it was made.
    candidates: tuple[str, ...] = ()
    #: What the group holds on each node: a task placed with bundle index -1 may use all of it.
    rooms: Mapping[str, Mapping[str, float]] = field(init=False)

    @rooms.default
    def _rooms(self) -> Mapping[str, Mapping[str, float]]:
        rooms: dict[str, dict[str, float]] = {}
        for bundle, node in zip(self.bundles, self.nodes, strict=True):
            room = rooms.setdefault(node, {})
            for key, value in bundle.items():
                room[key] = room.get(key, 0) + value
        return rooms


def _fits(amounts: Mapping[str, float], room: Mapping[str, float]) -> bool:
    return all(value <= room.get(key, 0) + _EPS for key, value in amounts.items() if value)


def _to_ray(resources: Resources, what: str) -> dict[str, float]:
    """``Resources`` in Ray's names; what Ray cannot express raises ``InvalidResources``."""
    if resources.gpu_memory:
        raise InvalidResources(
            f"{what} asks for gpu_memory={resources.gpu_memory}, which Ray cannot reserve: ask for (fractions of) GPUs"
        )
    clash = sorted(_RAY_OWN.intersection(resources.custom))
    if clash:
        raise InvalidResources(
            f"{what}: custom resource {shown(clash[0])} is Ray's own name; use cpu=, gpu= or memory="
        )
    amounts: dict[str, float] = {}
    if resources.cpu:
        amounts["CPU"] = resources.cpu
    if resources.gpu:
        amounts["GPU"] = resources.gpu
    if resources.memory:
        amounts["memory"] = resources.memory
    amounts.update(resources.custom)
    return amounts


def _from_ray(raw: Mapping[str, float]) -> Resources:
    """Ray's resource map as ``Resources``: ``node:*`` markers, the object store and group resources are left out."""
    # max(0, ...): Ray's fixed-point bookkeeping is exact, but a negative amount would make Resources raise.
    custom = {
        key: max(0.0, value)
        for key, value in raw.items()
        if key not in _RAY_OWN
        and not key.startswith("node:")
        and not _GROUP_RESOURCE.search(key)
        and _CUSTOM_NAME.match(key)
    }
    return Resources(
        cpu=max(0.0, raw.get("CPU", 0)),
        gpu=max(0.0, raw.get("GPU", 0)),
        memory=max(0, int(raw.get("memory", 0))),
        custom=custom,
    )


def _split(amounts: Mapping[str, float]) -> list[dict[str, float]]:
    """``k`` equal bundles: ``k`` is the whole CPUs (else whole GPUs, else 1); memory stays in whole bytes."""
    cpu, gpu = amounts.get("CPU", 0), amounts.get("GPU", 0)
    k = max(1, int(cpu) if cpu >= 1 else int(gpu))
    bundles: list[dict[str, float]] = [{} for _ in range(k)]
    for key, value in amounts.items():
        if key == "memory":
            base, extra = divmod(int(value), k)
            for i, bundle in enumerate(bundles):
                if base + (i < extra):
                    bundle[key] = base + (i < extra)
        else:
            for bundle in bundles:
                bundle[key] = value / k
    return bundles


def _shape(request: ReservationRequest) -> tuple[Resources, str, Sequence[str] | None, Mapping[str, str] | None]:
    return request.resources, request.strategy, request.nodes, request.labels


def _dumps(value: object) -> object:
    """Ray's own pickler (imported only when a task is checked: Ray's import costs seconds)."""
    import ray.cloudpickle

    return ray.cloudpickle.dumps(value)  # type: ignore[no-untyped-call]


def _path(value: object) -> str | None:
    """``value`` as a non-empty text path without NUL bytes, or ``None``."""
    if not isinstance(value, str | PathLike):
        return None
    try:
        path = fspath(value)
    except Exception:  # a PathLike whose __fspath__ fails is no path
        return None
    return path if isinstance(path, str) and path and "\0" not in path else None


def _ray_name(task: TaskSpec) -> str:
    """What a task is called in Ray's table after the prefix: its function, or ``command:`` and its program.

    Never anything of one task alone (its id, its arguments): Ray keeps a metric series per name.
    """
    target = task.target
    if isinstance(target, Command):
        return "command:" + basename(target.argv[0])
    return task.name


def _runnable(target: FunctionType) -> Any:
    """What Ray is given to run ``target``: itself, or, for a function of a gridboost module shipped by value
    (``gridboost.current_lease``), a call of the worker's installed one by name (see ``_worker.by_name``)."""
    if target.__module__ == worker_leases.__name__:
        return _worker.by_name(target.__module__, target.__qualname__)
    return target


def _on_trio() -> bool:
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


class _SharedRead:
    """Ray's nodes and what each has free, read for every backend of this process together.

    What a node has free comes from the GCS with an entry per bundle of every placement group on it, so a read grows
    with the cluster's groups; every grant and every grid's look at the cluster asks for one. A read asked for while
    another is under way waits for it and then joins the next one, which every caller that asked meanwhile shares: a
    caller always gets a read that began after it asked, and a burst of callers costs two reads, not one each.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done = 0  # reads finished
        self._reading = False
        self._last: tuple[list[dict[str, Any]], dict[str, dict[str, float]]] | BaseException = ([], {})

    def read(self, client_mode: bool) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
        with self._cond:
            wanted = self._done + (2 if self._reading else 1)  # one that begins after now
            while self._done < wanted:
                if self._reading:
                    self._cond.wait()
                    continue
                self._reading = True
                self._cond.release()
                try:
                    last: Any = _read_cluster(client_mode)
                except BaseException as exc:  # every caller of this read gets its error
                    last = exc
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._done += 1
                    self._last = last
                    self._cond.notify_all()
            last = self._last
        if isinstance(last, BaseException):
            raise last
        return last


def _read_cluster(client_mode: bool) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    import ray

    # Ray has no public per-node "available": the GCS keeps it, and this is the accessor ray.available_resources()
    # sums. A Ray Client process has no GCS accessor, and sees only totals.
    available: dict[str, dict[str, float]] = {}
    if not client_mode:
        from ray._private.state import state

        available = state.available_resources_per_node()  # type: ignore[no-untyped-call]
    return list(ray.nodes()), available


_NODES = _SharedRead()
# The notices being asked for, by event loop (see _Notices): there only while some are.
_NOTICES: dict[Any, _Notices] = {}


class _Answer:
    """Where the answer to one request sent to the keeper with others goes (see RayBackend._renew, _Notices)."""

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def give(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Notices:
    """The keeper's notices for every backend of this process that runs in one event loop, asked in one call.

    Every backend's watch looks at the same instants (multiples of ``_WATCH`` on the loop's clock), so their asks come
    together: the first one waits a step of the loop for the others, sends the ids of all, and gives each its own
    notices. An owner process with many grids (a service, or this plugin's benchmark, which runs 25 in a process) then
    makes one keeper call per look, not one per grid.
    """

    def __init__(self, token: Any) -> None:
        self._token = token
        self._asks: list[tuple[list[str], _Answer]] = []
        self._sending = False

    @classmethod
    async def ask(cls, ids: list[str], call: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The notices of ``ids``; ``call(ids)`` asks the keeper (the backend's own call, bounded)."""
        token = anyio.lowlevel.current_token()
        shared = _NOTICES.get(token)
        if shared is None:
            shared = _NOTICES[token] = cls(token)
        return await shared._ask(ids, call)

    async def _ask(self, ids: list[str], call: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        answer = _Answer()
        self._asks.append((ids, answer))
        if not self._sending:
            self._sending = True
            try:
                # Shielded (each call is bounded): the asks that joined this one are answered even if its watch goes.
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()  # the watches that look at this instant join
                    while self._asks:
                        batch, self._asks = self._asks, []
                        try:
                            notices = await call(sorted({i for each, _ in batch for i in each}))
                        except Exception as exc:
                            for _, each in batch:
                                each.fail(exc)
                        else:
                            for wanted, each in batch:
                                each.give({i: notices[i] for i in wanted if i in notices})
            finally:
                self._sending = False
                if not self._asks:
                    _NOTICES.pop(self._token, None)
        result: dict[str, Any] = await answer.wait()
        return result


class RayBackend(Backend):
    """A Ray cluster as a gridboost backend; see the module docstring and the plugin's README."""

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        namespace: str | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        temp_dir: str | PathLike[str] | None = None,
        connect_timeout: float = 30.0,
        grace: float = 2.0,
        cancel_grace: float = 0.5,
        close_timeout: float = 30.0,
        linger: float = 2.0,
        lease_grace: float = 5.0,
        preempt_grace: float = 10.0,
        grow: bool = False,
    ) -> None:
        # Every option is checked here, whatever its type or size: a bad one raises InvalidRequest with a one-line
        # message (shown() quotes any value briefly), never an error from deep inside Ray later.
        self._target = _connect.parse_address(address)
        if namespace is not None and (not isinstance(namespace, str) or not namespace or "\0" in namespace):
            raise InvalidRequest(f"namespace must be a non-empty string, got {shown(namespace)}")
        if runtime_env is not None and not isinstance(runtime_env, Mapping):
            raise InvalidRequest(f"runtime_env must be a mapping (Ray's runtime_env dict), got {shown(runtime_env)}")
        cpus_gpus = []
        for option, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            number = None if value is None else finite(value)
            if value is not None and (number is None or number < 0):
                raise InvalidRequest(f"{option} must be a finite number >= 0, got {shown(value)}")
            if value is not None and self._target.kind != "embedded":
                raise InvalidRequest(f"{option} applies only to a Ray that gridboost starts (no address)")
            cpus_gpus.append(value)
        path = None if temp_dir is None else _path(temp_dir)
        if temp_dir is not None and path is None:
            raise InvalidRequest(f"temp_dir must be a directory path (str or os.PathLike), got {shown(temp_dir)}")
        if temp_dir is not None and self._target.kind != "embedded":
            raise InvalidRequest("temp_dir applies only to a Ray that gridboost starts (no address)")
        self._connect_timeout = seconds("connect_timeout", connect_timeout)
        self._grace = seconds("grace", grace)
        self._cancel_grace = seconds("cancel_grace", cancel_grace, allow_zero=True)
        self._close_timeout = seconds("close_timeout", close_timeout)
        linger_seconds = seconds("linger", linger, allow_zero=True)
        lease_grace_seconds = seconds("lease_grace", lease_grace)
        preempt_grace_seconds = seconds("preempt_grace", preempt_grace, allow_zero=True)
        if not isinstance(grow, bool):
            raise InvalidRequest(f"grow must be True or False, got {shown(grow)}")
        self._namespace = namespace
        self._runtime_env = dict(runtime_env) if runtime_env is not None else None
        self._num_cpus, self._num_gpus = cpus_gpus
        self._temp_dir = path
        self._grow = grow
        self._capabilities = _CAPABILITIES if not grow else evolve(_CAPABILITIES, grow=True)
        self._registry = _leases.Registry(
            grace=lease_grace_seconds, timeout=self._close_timeout, preempt_grace=preempt_grace_seconds
        )
        self._lingering = _leases.Lingering(linger_seconds)
        #: The leases whose bundles this backend added to the cluster's autoscaler request (the keeper's).
        self._demanded: set[str] = set()
        #: The boosts this backend holds now, by id: what ``watch`` checks, and which lease each group serves.
        self._held: dict[str, Reservation] = {}
        #: Renewals waiting for the keeper (lease id, expires_at, where the answer goes), and whether some are on
        #: their way: those that come meanwhile go together, in one call (see _renew).
        self._renewals: list[tuple[str, float, _Answer]] = []
        self._renewing = False
        #: Held boosts whose group Ray lost (a node died) or the keeper takes back: reported to the grid (once),
        #: never kept to linger.
        self._lost: set[str] = set()
        #: Random per backend: the middle part of every name this backend gives in Ray.
        self.session = secrets.token_hex(4)
        #: What this backend's placement groups and tasks are named with (then the boost's or task's id).
        self.prefix = f"{PREFIX}{self.session}:"
        self._conn: _connect.Connection | None = None
        self._ray: ModuleType | None = None
        self._trio = False
        #: Where runs on asyncio await their results (see _landing); None on trio.
        self._landing: Landing | None = None
        self._closed = False
        self._remotes = LRU()
        self._options = LRU()
        self._sendable = SendCheck("Ray", _dumps)
        self._call_remote: Any = None
        self._command_remote: Any = None
        #: What runs a boost's work under its lease (current_lease()): a remote per function, and one for the rest.
        self._leased_remotes = LRU()
        self._lease_call_remote: Any = None
        #: Refs of cancelled runs not yet stopped (with their submission number and polite seconds), and the batch
        #: that will take them.
        self._stopping: dict[ObjectRef[Any], tuple[int, float]] = {}
        self._submissions = 0
        self._batch: anyio.Event | None = None
        #: Whether this backend submitted any task: then closing waits until Ray's task table shows all ended.
        self._submitted = False
        #: Ray's task id of each task in flight, and of the last ones that ended, by gridboost task id: Ray's table
        #: names a task by its function (see ray_task_ids), so this is how its rows are told apart. Both stay
        #: bounded (by the work in flight, and by ``_ENDED_KEPT``) however many tasks a long run submits.
        self._in_flight: dict[str, TaskID] = {}
        #: Parked data, by key: the one reference this process holds to each object (Ray frees it with the last).
        self._parked: dict[str, ObjectRef[Any]] = {}
        self._hold_remote: Any = None
        self._ended: LRU = LRU(_ENDED_KEPT)

    def __repr__(self) -> str:
        return f"<RayBackend {self._target} session={self.session}>"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def task_prefix(self) -> str:
        """Ray's task table names each of this backend's tasks with this, then what it runs: the function's
        qualified name (``gridboost:<session>:train_step``), or ``command:`` and the program's file name.

        One name per function, not per task: Ray keeps a metric series per task name in the submitting process that
        is never freed, which grew the host by ~1.7 KiB a task when each task had a name of its own. The row of one
        task is the one whose Ray task id :meth:`ray_task_ids` gives for it.
        """
        return self.prefix

    def ray_task_ids(self) -> dict[str, str]:
        """Ray's task id (hex, as ``ray list tasks`` and ``ray.util.state`` show it) by gridboost task id, for every
        task of this backend in flight and the last 10,000 that ended (so that a task's row can be found for a while
        after it returns, Ray's table being a report interval late). Still answers once the backend is closed, and
        from any thread: each map is copied in one step (in C, under the GIL) before anything else reads it.
        """
        return {task_id: ray_id.hex() for task_id, ray_id in [*self._ended.items(), *self._in_flight.items()]}

    @property
    def connection(self) -> _connect.Connection | None:
        """This process's Ray connection while this backend uses it."""
        return self._conn

    # -- life cycle ---------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed or self._conn is not None:
            raise GridClosed("a RayBackend starts once; make a new one")
        self._trio = _on_trio()
        # Not abandoned on cancel: a connection made while we were cancelled is recorded (by _connect_now) and then
        # released by aclose, never lost.
        await anyio.to_thread.run_sync(self._connect_now)
        if not self._trio:  # after connecting: ray is imported by then, off the event loop
            import asyncio

            from ._landing import landing

            self._landing = landing(asyncio.get_running_loop())

    def _clear_engine(self, leftovers: list[str], tasks: bool) -> None:
        """Remove this backend's groups and the keeper's records of them, and (with ``tasks``) wait until Ray's task
        table shows each of its tasks ended; each wait bounded by ``close_timeout``, what remains named in
        ``leftovers``."""
        try:
            # The grid has already reported any of these as leaked; removing them keeps the leak from outliving us.
            rows = self._our_groups()
            groups = {row["placement_group_id"] for row in rows}
            self._remove_all([(row["placement_group_id"], str(row["name"])) for row in rows])
        except Exception as exc:
            leftovers.append(f"could not remove this backend's placement groups: {exc}")
            groups = set()
        try:
            # Records of groups that were ours: the keeper would drop them at its next look; closing does it now.
            records = self._registry.records()
            groups |= {record["pg_id"] for record in records if record["id"] in self._held}
            self._registry.drop_all([record["id"] for record in records if record["pg_id"] in groups])
        except Exception as exc:
            leftovers.append(f"could not drop this backend's records from the lease keeper: {exc}")
        if not self._submitted or not tasks:
            return
        deadline = time.monotonic() + self._close_timeout
        pause = 0.005
        while True:
            try:
                running = self._unended()
            except Exception as exc:
                leftovers.append(f"could not read Ray's task table: {exc}")
                return
            if not running:
                return
            if time.monotonic() > deadline:
                shown = ", ".join(sorted(running)[:5]) + (", ..." if len(running) > 5 else "")
                leftovers.append(
                    f"Ray's task table still shows {len(running)} task(s) of this backend not ended "
                    f"{self._close_timeout:g}s into closing: {shown}"
                )
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _unended(self) -> set[str]:
        """This backend's tasks whose latest attempt Ray's task table does not show ended: their gridboost ids (by
        their Ray task ids), or their names and Ray task ids where this backend no longer knows them.

        The table is fed by each worker's task events, sent every ``task_events_report_interval_ms`` (a second by
        default): a task that ended just now shows ended that much later. A Ray without task events shows none.
        """
        assert self._conn is not None
        if self._conn.client_mode:
            return set()  # a Ray Client reads no task table
        latest: dict[bytes, tuple[int, str, set[int]]] = {}
        for event in self._our_task_events():
            name = event.task_info.name
            if not name.startswith(self.prefix):
                continue
            seen = latest.get(event.task_id)
            states = set(event.state_updates.state_ts_ns)
            if seen is None or event.attempt_number > seen[0]:
                latest[event.task_id] = (event.attempt_number, name, states)
            elif event.attempt_number == seen[0]:
                seen[2].update(states)
        ours = {ray_id.binary(): task_id for task_id, ray_id in [*self._ended.items(), *self._in_flight.items()]}
        return {
            ours.get(ray_id) or f"{name.removeprefix(self.prefix)} (Ray task {ray_id.hex()})"
            for ray_id, (_, name, states) in latest.items()
            if not states & _ENDED
        }

    def _our_task_events(self) -> list[Any]:
        """The task events of Ray's table that name this backend's tasks.

        Ray hands the whole table over (up to 100,000 tasks by default; no filter short of a gRPC client): with 25,000
        tasks in it, fetching takes 0.4 s and parsing every event 0.2 s more on a small machine. Only the events whose
        bytes carry this backend's prefix are parsed.
        """
        from ray._private import state as ray_state

        if ray_state._READ_TASK_EVENTS_FROM_DASHBOARD_HEAD:  # Ray's migration path: events come parsed
            return list(ray_state.state._get_all_task_events())  # type: ignore[no-untyped-call]
        from ray.core.generated.gcs_pb2 import TaskEvents

        marker = self.prefix.encode()
        raw = ray_state.state._connect_and_get_accessor().get_task_events()  # type: ignore[no-untyped-call]
        return [TaskEvents.FromString(event) for event in raw if marker in event]

    def _connect_now(self) -> None:
        import ray
        import ray.cloudpickle

        # Workers need not have gridboost-ray (nor gridboost) installed: what they run of it travels with the task.
        ray.cloudpickle.register_pickle_by_value(_worker)  # type: ignore[no-untyped-call]
        ray.cloudpickle.register_pickle_by_value(worker_command)  # type: ignore[no-untyped-call]
        ray.cloudpickle.register_pickle_by_value(worker_leases)  # type: ignore[no-untyped-call]
        ray.cloudpickle.register_pickle_by_value(worker_chunk)  # type: ignore[no-untyped-call]
        self._conn = _connect.connect(
            self._target,
            namespace=self._namespace,
            runtime_env=self._runtime_env,
            num_cpus=self._num_cpus,
            num_gpus=self._num_gpus,
            temp_dir=self._temp_dir,
            timeout=self._connect_timeout,
        )
        self._ray = ray
        self._call_remote = ray.remote(_worker.call)
        self._lease_call_remote = ray.remote(_worker.in_lease)
        self._command_remote = ray.remote(_worker.run_command)
        self._hold_remote = ray.remote(_worker.hold)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._parked.clear()  # the grid released its handles already; what is left goes with this process's refs
        conn = self._conn
        if conn is None:
            return
        leftovers: list[str] = []
        # Lingering groups go with the rest of ours below, and their records with the others of ours.
        self._lingering.drain()
        demanded, self._demanded = sorted(self._demanded), set()
        try:
            for lease_id in demanded:
                await self._keeper("undemand", lease_id)
        except Exception as exc:
            leftovers.append(f"could not take this process's demand out of the autoscaler request: {exc}")
        # A Ray that goes down with this close (its last user, and gridboost started it) takes every task with it:
        # then the task table need not be waited for.
        going = conn.owned and conn.users == 1 and conn.target.kind == "embedded"
        await anyio.to_thread.run_sync(self._clear_engine, leftovers, not going)
        try:
            await anyio.to_thread.run_sync(_connect.release, conn, self._close_timeout)
        except BackendError as exc:
            leftovers.append(str(exc))
        if leftovers:
            raise TeardownError(leftovers)

    def _require(self) -> ModuleType:
        if self._ray is None or self._closed:
            raise GridClosed("the Ray backend is not started" if not self._closed else "the Ray backend is closed")
        return self._ray

    # -- seeing -------------------------------------------------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        self._require()
        with map_errors("reading Ray's nodes"):
            nodes = await anyio.to_thread.run_sync(self._read_nodes)
        return ClusterSnapshot(backend=self.name, nodes=nodes)

    def _read_nodes(self) -> list[NodeSnapshot]:
        ray = self._require()
        assert self._conn is not None
        local = ray.get_runtime_context().get_node_id()
        nodes, available = _NODES.read(self._conn.client_mode)
        snapshot = []
        for node in nodes:
            node_id = node["NodeID"]
            alive = bool(node.get("Alive"))
            total = _from_ray(node.get("Resources") or {})
            free = (
                _from_ray(available.get(node_id, node.get("Resources") or {})).capped(total) if alive else Resources()
            )
            snapshot.append(
                NodeSnapshot(
                    id=node_id,
                    address=node.get("NodeManagerAddress", ""),
                    total=total,
                    available=free,
                    labels=node.get("Labels") or {},
                    alive=alive,
                    is_local=node_id == local,
                )
            )
        return snapshot

    # -- reserving ----------------------------------------------------------------------------------------------------

    def check_reservation(self, request: ReservationRequest) -> None:
        _to_ray(request.resources, f"boost {request.id}")  # gpu_memory, and Ray's own names as custom ones

    async def reserve(self, request: ReservationRequest) -> Reservation:
        """Wait for this request's turn among every owner of the cluster (the keeper's tickets), then place it.

        A lingering group of the same shape is reused when it is our turn (checked in the one keeper call that
        records the grant). Otherwise, once it is our turn, a placement group is made; while Ray has not placed it
        the turn is asked again now and then, and when another owner's request has come first meanwhile (a higher
        priority, or the keeper refuses the grant) the group is removed and the request waits again: capacity that
        frees goes to the request whose turn it is, never to whichever group Ray happens to place first.
        """
        self._require()
        what = f"boost {request.id}"
        ticket = self._registry.ticket(request)
        try:
            idle = None if request.detached else self._lingering.take(_leases.Lingering.key(*_shape(request)))
            if idle is not None:
                reused = await self._reuse(idle, request, ticket)
                if reused is not None:
                    return reused
            while True:
                with map_errors(what):
                    await self._until_turn(ticket, request)
                    if self._lingering.idle:
                        await self._make_room(request)
                placed = await self._place(request, ticket)
                if placed is not None:
                    break
        except BaseException:
            # Its ticket goes now (else it would hold back the requests behind it until the keeper's STALE); a keeper
            # this process never reached has no ticket of it (a wait of 0 ends before the first ask).
            if self._registry.reached:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._keeper("leave", request.id)
            raise
        if not request.detached:  # a detached lease is the keeper's from now on, not this backend's
            self._held[request.id] = placed
        return placed

    async def _reuse(
        self, idle: _leases.Idle, request: ReservationRequest, ticket: dict[str, Any]
    ) -> Reservation | None:
        """Grant ``request`` the lingering group ``idle`` in one keeper call, if it is the request's turn; else the
        group goes (someone else waits for what it holds) and ``None`` comes back."""
        # watch() removes lingering groups Ray no longer holds whole, so this one is whole (as of its last look).
        group = idle.handle
        assert isinstance(group, _Group)
        reservation = Reservation(request=request, placements=group.nodes, handle=group)
        record = self._lease_record(reservation, "active", time.time() + request.ttl)
        try:
            # Awaited: once the grant returns, every process lists the lease active (not the old one lingering).
            with map_errors(f"boost {request.id}"):
                token = await self._keeper("put", record, idle.lease_id, ticket)
        except BaseException:
            # The keeper may hold either record now: the group goes, and with it (at the keeper's next look) the
            # record, rather than a group whose listing is uncertain being kept for reuse.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._remove_now, group.pg.id.hex(), self._name(request))
            raise
        if isinstance(token, dict):  # not our turn: the keeper's answer
            await self._remove_lingering([idle])
            return None
        reservation = evolve(reservation, token=token)
        self._held[request.id] = reservation
        return reservation

    async def _until_turn(self, ticket: dict[str, Any], request: ReservationRequest) -> None:
        """Ask the keeper until it is ``ticket``'s turn; each ask waits (up to ``_TURN_HOLD``) for a change. With
        ``wait=0`` a quota that holds the request back is the answer: ``QuotaExceeded`` at once."""
        while (answer := await self._keeper("ask", ticket, _TURN_HOLD))["status"] != "turn":
            if answer["status"] == "quota" and request.wait == 0:
                raise QuotaExceeded(f"boost {request.id} ({request.resources.human()}) is held back: {answer['why']}")

    async def _place(self, request: ReservationRequest, ticket: dict[str, Any]) -> Reservation | None:
        """Make the request's group, wait until Ray places it, and record the grant; ``None`` (and no group) when
        another request's turn came first."""
        what = f"boost {request.id}"
        made: list[_Group] = []
        demanded = False
        try:
            with map_errors(what):
                # Not abandoned on cancel, and the group is recorded from the thread: a group made while we were
                # cancelled is still removed below.
                await anyio.to_thread.run_sync(self._create_group, request, made)
                group = made[0]
                if self._grow:
                    selectors = [dict(group.selector)] * len(group.bundles)
                    demanded = True
                    await self._keeper(
                        "demand", request.id, group.pg.id.hex(), [dict(b) for b in group.bundles], selectors
                    )
                token: Any = None
                if await self._until_ready(group, request, ticket):
                    nodes = await anyio.to_thread.run_sync(self._bundle_nodes, group.pg, len(group.bundles))
                    held = _Group(pg=group.pg, bundles=group.bundles, nodes=nodes, selector=group.selector)
                    reservation = Reservation(request=request, placements=nodes, handle=held)
                    record = self._lease_record(reservation, "active", time.time() + request.ttl)
                    token = await self._keeper("put", record, None, ticket)
                if token is None or isinstance(token, dict):  # another request's turn: give its capacity back
                    await self._give_back(request, made[0], demanded)
                    return None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._give_back(request, made[0] if made else None, demanded)
            raise
        if demanded:
            self._demanded.add(request.id)
        return evolve(reservation, token=token)

    async def _give_back(self, request: ReservationRequest, group: _Group | None, demanded: bool) -> None:
        if demanded:
            with contextlib.suppress(Exception):  # the request is replaced by the next one anyway
                await self._keeper("undemand", request.id)
        if group is not None:
            await anyio.to_thread.run_sync(self._remove_now, group.pg.id.hex(), self._name(request))

    async def _keeper(self, method: str, *args: Any) -> Any:
        """Call the keeper and await its answer (bounded) on this event loop, with no worker thread when the keeper
        is known: the uncontended grant, and the back-to-back release and reuse of a boost, pay one actor call
        each and no more."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        ref = self._registry.send(method, *args)
        if ref is not None:
            try:
                with anyio.fail_after(self._close_timeout + _TURN_HOLD):
                    return await (self._trio_wait(ref) if self._trio else ref)
            except (ActorDiedError, ActorUnavailableError):
                pass  # the keeper exited while idle: call() starts another and asks it
        return await anyio.to_thread.run_sync(self._registry.call, method, *args)

    def _lease_record(self, reservation: Reservation, state: str, expires_at: float) -> dict[str, Any]:
        group = reservation.handle
        assert isinstance(group, _Group)
        return self._registry.record(
            reservation.request,
            pg_id=group.pg.id.hex(),
            state=state,
            expires_at=expires_at,
            placements=reservation.placements,
            token=reservation.token,
            bundles=group.bundles,
        )

    def _record(self, reservation: Reservation, state: str, expires_at: float, replaces: str | None = None) -> None:
        self._registry.put(self._lease_record(reservation, state, expires_at), replaces)

    async def _record_now(
        self, reservation: Reservation, state: str, expires_at: float, replaces: str | None = None
    ) -> None:
        """Record a lease and await the keeper's answer (bounded) on this event loop (see :meth:`_keeper`)."""
        await self._keeper("put", self._lease_record(reservation, state, expires_at), replaces)

    async def check_quota(self, request: ReservationRequest) -> None:
        self._require()
        with map_errors(f"reading the quota of tenant {request.tenant}"):
            why = await anyio.to_thread.run_sync(self._registry.over_quota, request.tenant, amounts(request.resources))
        if why:
            raise QuotaExceeded(f"boost {request.id} ({request.resources.human()}) is held back: {why}")

    async def set_quota(self, tenant: str, limit: Resources | None) -> None:
        self._require()
        with map_errors(f"setting the quota of tenant {tenant}"):
            await anyio.to_thread.run_sync(self._registry.set_quota, tenant, limit)

    async def quotas(self) -> Sequence[Quota]:
        self._require()
        with map_errors("reading the cluster's quotas"):
            return await anyio.to_thread.run_sync(self._registry.quotas)

    def _name(self, request: ReservationRequest) -> str:
        # A detached lease is named outside this backend's prefix: the backend neither lists nor removes it.
        return f"{PREFIX}lease:{request.id}" if request.detached else self.prefix + request.id

    async def _make_room(self, request: ReservationRequest) -> None:
        """Remove every lingering group when ``request`` does not fit beside them: linger yields to real demand."""
        # What our groups hold, read here in the loop (the thread below must not look at dicts the loop changes).
        if await anyio.to_thread.run_sync(self._fits_now, request, self._rooms_held()):
            return
        await self._remove_lingering(self._lingering.drain())

    async def _remove_lingering(self, gone: Sequence[_leases.Idle]) -> None:
        if gone:
            # Shielded: each one is out of the lingering ones already, so nothing else would remove it.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._remove_all, [(i.pg.id.hex(), i.lease_id) for i in gone])
                await anyio.to_thread.run_sync(self._registry.drop_all, [i.lease_id for i in gone])

    def _candidates(self, request: ReservationRequest) -> list[dict[str, Any]]:
        ray = self._require()
        return [
            node
            for node in ray.nodes()
            if node.get("Alive")
            and (
                request.nodes is None
                or node["NodeID"] in request.nodes
                or node.get("NodeManagerAddress") in request.nodes
            )
            and all((node.get("Labels") or {}).get(k) == v for k, v in (request.labels or {}).items())
        ]

    def _labels_seen(self, most: int = 6) -> str:
        """The labels the cluster's live nodes have, in a few words (Ray's own ``ray.io/`` ones left out)."""
        ray = self._require()
        pairs = sorted(
            {
                f"{key}={value}"
                for node in ray.nodes()
                if node.get("Alive")
                for key, value in (node.get("Labels") or {}).items()
                if not key.startswith("ray.io/")
            }
        )
        if not pairs:
            return "no node has labels of its own (`ray start --labels key=value` gives them)"
        more = f", and {len(pairs) - most} more" if len(pairs) > most else ""
        return f"labels on the cluster's nodes: {', '.join(shown(p) if len(p) > 60 else p for p in pairs[:most])}{more}"

    def _fits_now(self, request: ReservationRequest, ours: Mapping[str, Mapping[str, float]]) -> bool:
        """Whether Ray could place ``request``'s bundles in what its nodes have free now (first fit, largest first);
        ``ours``: what this backend's own groups hold on each node (see _rooms_held)."""
        assert self._conn is not None
        if self._conn.client_mode:
            return False  # a Ray Client sees no per-node availability: assume the lingering groups are in the way
        from ray._private.state import state

        amounts = _to_ray(request.resources, f"boost {request.id}")
        candidates = self._candidates(request)
        available = state.available_resources_per_node()  # type: ignore[no-untyped-call]
        # The GCS's view of what is free lags behind the groups Ray places: it is what the raylets last reported, and
        # a report sent just before a group was committed may arrive after it. What this backend's own groups (held
        # and lingering) hold is certain, so no node is seen with more free than its total less those.
        free = []
        for node in candidates:
            room = dict(available.get(node["NodeID"], {}))
            total = node.get("Resources") or {}
            for key, value in ours.get(node["NodeID"], {}).items():
                room[key] = min(room.get(key, 0.0), total.get(key, 0.0) - value)
            free.append(room)
        strategy = request.strategy
        if strategy == "strict_pack" or (
            strategy == "pack" and any(_fits(amounts, node.get("Resources") or {}) for node in candidates)
        ):
            return any(_fits(amounts, room) for room in free)
        used: set[int] = set()
        distinct = strategy == "strict_spread"
        for bundle in sorted(_split(amounts), key=lambda b: -b.get("CPU", 0)):
            spot = next((i for i, room in enumerate(free) if _fits(bundle, room) and not (distinct and i in used)), -1)
            if spot < 0:
                return False
            used.add(spot)
            for key, value in bundle.items():
                free[spot][key] = free[spot].get(key, 0) - value
        return True

    def _rooms_held(self) -> dict[str, dict[str, float]]:
        """What this backend's placement groups, held and lingering, hold on each node (by node id, Ray's names)."""
        rooms: dict[str, dict[str, float]] = {}
        groups = [r.handle for r in self._held.values()] + [i.handle for i in self._lingering.idle.values()]
        for group in groups:
            if not isinstance(group, _Group):
                continue
            for node, held in group.rooms.items():
                room = rooms.setdefault(node, {})
                for key, value in held.items():
                    room[key] = room.get(key, 0.0) + value
        return rooms

    def _create_group(self, request: ReservationRequest, made: list[_Group]) -> None:
        from ray.util.placement_group import placement_group

        what = f"boost {request.id}"
        amounts = _to_ray(request.resources, what)
        candidates = self._candidates(request)
        if not candidates and (not self._grow or request.nodes is not None):  # the autoscaler may add labelled nodes
            wanted = ", ".join(f"{k}={v}" for k, v in (request.labels or {}).items())
            asked = " and ".join(
                part
                for part in (f"labels {wanted}" if wanted else "", f"nodes={request.nodes}" if request.nodes else "")
                if part
            )
            raise BoostUnavailable(f"{what}: no live Ray node matches {asked}; {self._labels_seen()}")
        selector: dict[str, str] = {}
        for key, value in (request.labels or {}).items():
            if not _LABEL_VALUE.fullmatch(value):
                raise InvalidRequest(f"{what}: label value {shown(value)} cannot be matched by Ray's label selectors")
            selector[key] = value
        if request.nodes is not None:
            ids = sorted(node["NodeID"] for node in candidates)
            selector[_NODE_ID_LABEL] = ids[0] if len(ids) == 1 else f"in({','.join(ids)})"
        one_node = any(_fits(amounts, node.get("Resources") or {}) for node in candidates)
        strategy = request.strategy
        bundles = [amounts] if strategy == "strict_pack" or (strategy == "pack" and one_node) else _split(amounts)
        if strategy == "strict_spread" and len(bundles) > len(candidates) and not self._grow:
            raise BoostUnavailable(
                f"{what} ({request.resources}, strategy strict_spread) needs {len(bundles)} distinct nodes, one per "
                f"bundle; {len(candidates)} match"
            )
        try:
            pg = placement_group(
                bundles,
                strategy=strategy.upper(),
                name=self._name(request),
                bundle_label_selector=[dict(selector) for _ in bundles] if selector else None,
                lifetime="detached" if request.detached else None,
            )
        except ValueError as exc:
            raise InvalidRequest(f"{what}: Ray refused the placement group: {exc}") from exc
        made.append(
            _Group(
                pg=pg,
                bundles=tuple(bundles),
                nodes=("",) * len(bundles),
                selector=selector,
                candidates=tuple(node["NodeID"] for node in candidates),
            )
        )

    async def _until_ready(self, group: _Group, request: ReservationRequest, ticket: dict[str, Any]) -> bool:
        """Wait until Ray places the group (``True``), or until another request's turn comes first (``False``)."""
        candidates = group.candidates if request.nodes is not None or request.labels else None
        busy = _leases.Registry.busy(group.bundles, request.strategy, candidates)
        # pg.wait returns as soon as the group is placed; the thread is given up on if the grid cancels us (it
        # then blocks at most _READY_POLL more seconds, on a group we are removing).
        while not await anyio.to_thread.run_sync(group.pg.wait, _READY_POLL, abandon_on_cancel=True):
            # With growth, INFEASIBLE means "until the autoscaler adds a node": the grid's wait bounds it.
            if not self._grow and await anyio.to_thread.run_sync(self._scheduling_state, group.pg) == "INFEASIBLE":
                raise BoostUnavailable(
                    f"boost {request.id} ({request.resources}, strategy {request.strategy}) can never be placed: Ray "
                    "finds no set of nodes that could hold its bundles "
                    f"{[dict(b) for b in group.bundles]}"
                )
            # Asking again keeps the ticket alive, and says whether a request that came since goes first; saying
            # that Ray has not placed the group lets the keeper take preemptible leases back for it.
            if (await self._keeper("ask", ticket, 0.0, busy))["status"] != "turn":
                return False
        return True

    def _scheduling_state(self, pg: PlacementGroup) -> str:
        from ray.util.placement_group import placement_group_table

        return str(placement_group_table(pg).get("stats", {}).get("scheduling_state", ""))

    def _bundle_nodes(self, pg: PlacementGroup, count: int) -> tuple[str, ...]:
        from ray.util.placement_group import placement_group_table

        placed = placement_group_table(pg).get("bundles_to_node_id", {})
        return tuple(str(placed.get(i, "")) for i in range(count))

    def _our_groups(self) -> list[dict[str, Any]]:
        """This backend's placement groups that Ray has not removed, from Ray's own table."""
        from ray.util.placement_group import placement_group_table

        return [
            row
            for row in placement_group_table().values()
            if str(row.get("name", "")).startswith(self.prefix) and row.get("state") != "REMOVED"
        ]

    def _remove_now(self, pg_id: str, name: str) -> None:
        """Remove a group and wait (bounded) until Ray's table says REMOVED; a group already gone is fine."""
        self._remove_all([(pg_id, name)])

    def _remove_all(self, groups: Sequence[tuple[str, str]]) -> None:
        """Remove groups (pg id, name) together, then wait (bounded) until Ray's table says each is REMOVED."""
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        pgs = {name: PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))) for pg_id, name in groups}
        for pg in pgs.values():
            with contextlib.suppress(Exception):  # already removed, or the table below says what is wrong
                remove_placement_group(pg)
        deadline = time.monotonic() + self._close_timeout
        pause = 0.0005
        while pgs:
            for name, pg in list(pgs.items()):
                row = placement_group_table(pg)
                if not row or row.get("state") == "REMOVED":
                    del pgs[name]
            if not pgs:
                return
            if time.monotonic() > deadline:
                states = ", ".join(f"{name} {placement_group_table(pg).get('state')}" for name, pg in pgs.items())
                raise BackendError(f"placement group(s) still held {self._close_timeout:g}s after removal: {states}")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def release(self, reservation: Reservation) -> None:
        group = reservation.handle
        if not isinstance(group, _Group):
            raise InvalidRequest(f"reservation {reservation.id} was not made by the Ray backend")
        if reservation.request.detached:  # not this backend's to keep: the keeper's, by id
            with contextlib.suppress(InvalidRequest):  # already released, by us or another process
                await self.release_lease(reservation.id)
            return
        if self._held.pop(reservation.id, None) is None:
            return  # released before
        broken = reservation.id in self._lost
        self._lost.discard(reservation.id)
        with map_errors(f"releasing boost {reservation.id}"):
            if reservation.id in self._demanded:
                self._demanded.discard(reservation.id)
                await self._keeper("undemand", reservation.id)
            if self._lingering.seconds > 0 and not self._closed and not broken:
                # Awaited: once release returns, every process lists the lease lingering, never still active.
                await self._record_now(reservation, "lingering", time.time() + self._lingering.seconds)
                key = _leases.Lingering.key(*_shape(reservation.request))
                self._lingering.keep(key, reservation.id, group.pg, group)
                return
            await anyio.to_thread.run_sync(self._remove_now, group.pg.id.hex(), self.prefix + reservation.id)
            await anyio.to_thread.run_sync(self._registry.drop, reservation.id)

    async def extend(self, reservation: Reservation, ttl: float) -> None:
        expires_at = time.time() + ttl
        with map_errors(f"renewing boost {reservation.id}"):
            if not await self._renew(reservation.id, expires_at):  # a keeper that restarted: record it again
                await self._record_now(reservation, "active", expires_at)

    async def _renew(self, lease_id: str, expires_at: float) -> bool:
        """Move a lease's expiry in the keeper; whether the keeper has it. Sent at once when no renewal of this
        backend is on its way; otherwise with every renewal that came meanwhile, in one call when that one is
        answered: an owner renewing many leases makes as many keeper calls as it renews at once, not one each."""
        answer = _Answer()
        self._renewals.append((lease_id, expires_at, answer))
        if not self._renewing:
            self._renewing = True
            try:
                # Shielded (each call is bounded): the renewals that joined ours are sent even if our caller goes.
                with anyio.CancelScope(shield=True):
                    while self._renewals:
                        batch, self._renewals = self._renewals, []
                        try:
                            found = await self._renew_batch([(lid, at) for lid, at, _ in batch])
                        except Exception as exc:
                            for _, _, each in batch:
                                each.fail(exc)
                        else:
                            for (_, _, each), known in zip(batch, found, strict=True):
                                each.give(known)
            finally:
                self._renewing = False
        return bool(await answer.wait())

    async def _notices(self, ids: list[str]) -> dict[str, Any]:
        result: dict[str, Any] = await self._keeper("notices", ids)
        return result

    async def _renew_batch(self, renewals: list[tuple[str, float]]) -> list[bool]:
        try:
            return list(await self._keeper("renew_many", renewals))
        except AttributeError:  # a keeper started by an older gridboost-ray: one call each
            return [await self._keeper("renew", lid, at) is not None for lid, at in renewals]

    async def reservations(self) -> Sequence[Reservation]:
        if self._ray is None or not self._ray.is_initialized():
            return []  # not connected: this backend holds nothing (a closed one's groups died with its Ray)
        with map_errors("listing placement groups"):
            rows = await anyio.to_thread.run_sync(self._our_groups)
        # A group serves the lease that holds it now, whose id its name need not carry (a reused group keeps the
        # name of the boost that made it); a lingering group is this backend's cache, removed when it closes.
        serving = {r.handle.pg.id.hex(): r for r in self._held.values() if isinstance(r.handle, _Group)}
        idle = {i.pg.id.hex() for i in self._lingering.idle.values()}
        held = []
        for row in rows:
            pg_id = row["placement_group_id"]
            if pg_id in idle:
                continue
            bundles = [row["bundles"][i] for i in sorted(row.get("bundles", {}))]
            total = sum((_from_ray(bundle) for bundle in bundles), Resources())
            current = serving.get(pg_id)
            request = ReservationRequest(
                id=current.id if current is not None else str(row["name"]).removeprefix(self.prefix),
                resources=total,
                strategy=str(row.get("strategy", "PACK")).lower(),  # type: ignore[arg-type]
            )
            nodes = row.get("bundles_to_node_id", {})
            held.append(Reservation(request=request, placements=tuple(str(nodes.get(i, "")) for i in sorted(nodes))))
        return held

    async def renew_lease(self, lease_id: str, ttl: float) -> Lease:
        self._require()
        with map_errors(f"renewing lease {lease_id}"):
            lease = await anyio.to_thread.run_sync(self._registry.renew, lease_id, time.time() + ttl)
        if lease is None:
            raise InvalidRequest(f"no lease {shown(lease_id)} on this Ray cluster")
        return lease

    async def release_lease(self, lease_id: str) -> None:
        self._require()
        with map_errors(f"releasing lease {lease_id}"):
            record = await anyio.to_thread.run_sync(self._registry.get, lease_id)
            if record is None:
                raise InvalidRequest(f"no lease {shown(lease_id)} on this Ray cluster")
            # Its owner, if it is alive and watching, sees the group gone and fails the boost (BoostLost).
            await anyio.to_thread.run_sync(self._remove_now, record["pg_id"], lease_id)
            await anyio.to_thread.run_sync(
                self._registry.drop, lease_id, f"another process released it ({self._registry.owner})"
            )

    async def leases(self) -> Sequence[Lease]:
        self._require()
        with map_errors("listing the cluster's leases"):
            return await anyio.to_thread.run_sync(self._registry.leases)

    async def watch(self, lost: Callable[[str, BaseException], Awaitable[None]]) -> None:
        """Every ``_WATCH`` seconds: remove lingering groups whose time is up, and ask the keeper about this backend's
        leases (held and lingering) — every time while it holds preemptible ones, else every ``_WATCH_QUIET``: report
        held ones it takes back for another owner (BoostPreempted, with the grace left), or whose group Ray no longer
        holds whole or that went (BackendError), and remove lingering groups that are not whole.

        The keeper reads Ray's placement group table for every owner at once; an owner reading it itself would read
        every group of the cluster, each time, for a few of its own."""
        asked = -1
        while True:
            # At the same instants as every other backend of this process, so that their asks go together (_Notices).
            now = anyio.current_time()
            at = (math.floor(now / _WATCH) + 1) * _WATCH
            await anyio.sleep(at - now)
            watched = {k: v for k, v in self._held.items() if k not in self._lost}
            idle = {i.lease_id: i for i in self._lingering.idle.values()}
            preemptible = any(r.request.preemptible for r in watched.values())
            notices: dict[str, Any] = {}
            if (watched or idle) and (preemptible or math.floor(at / _WATCH_QUIET) != asked):
                asked = math.floor(at / _WATCH_QUIET)
                with map_errors("reading the lease keeper's notices"):
                    notices = await _Notices.ask(sorted([*watched, *idle]), self._notices)
            broken: dict[str, str] = {}
            for lease_id, notice in notices.items():
                if notice["state"] in ("broken", "gone"):
                    broken[lease_id] = str(notice["why"])
                elif lease_id in self._held and lease_id not in self._lost:
                    self._lost.add(lease_id)  # reported once; the grid releases it within the grace
                    await lost(lease_id, _leases.preempted(lease_id, notice))
            # Taken out of the lingering ones before the first await, so that no reserve can reuse them meanwhile.
            gone = self._lingering.due()
            for lease_id in broken:
                if lease_id in idle and self._lingering.idle.get(lease_id) is idle[lease_id]:
                    gone.append(self._lingering.idle.pop(lease_id))
            with map_errors("removing lingering groups"):
                await self._remove_lingering(gone)
            for lease_id, why in broken.items():
                if lease_id in self._held and lease_id not in self._lost:
                    self._lost.add(lease_id)  # reported once; the grid's release then removes what is left
                    await lost(lease_id, BackendError(why))

    # -- parked data --------------------------------------------------------------------------------------------------

    async def park(self, key: str, value: Any, reservation: Reservation | None) -> Any:
        """``ray.put`` here; inside a boost, the object is made by a task in its placement group, so it is stored on
        the lease's node (a task's return value lives where the task ran), and the copy here is let go."""
        ray = self._require()
        group = None
        if reservation is not None:
            group = reservation.handle
            if not isinstance(group, _Group):
                raise InvalidRequest(f"reservation {reservation.id} was not made by the Ray backend")

        def store() -> ObjectRef[Any]:
            with map_errors(f"parking {key}"):
                ref: ObjectRef[Any] = ray.put(value)
                if group is None:
                    return ref
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                inside = PlacementGroupSchedulingStrategy(group.pg, placement_group_bundle_index=-1)
                held: ObjectRef[Any] = self._hold_remote.options(
                    num_cpus=0, name=f"{self.prefix}park", scheduling_strategy=inside
                ).remote(ref)
                ready, _ = ray.wait([held], timeout=self._close_timeout, fetch_local=False)
            if not ready:
                ray.cancel(held, force=True)
                raise BackendError(f"Ray did not store {key} in boost {reservation.id} within {self._close_timeout:g}s")
            return held

        ref = await anyio.to_thread.run_sync(store)
        self._parked[key] = ref
        return ref

    async def unpark(self, key: str, token: Any) -> None:
        # The last reference of this process goes; Ray frees the object once no task still borrows it.
        self._parked.pop(key, None)

    async def fetch(self, token: Any) -> Any:
        ray = self._require()
        with map_errors("fetching parked data"):
            return await anyio.to_thread.run_sync(ray.get, token)

    # -- running ------------------------------------------------------------------------------------------------------

    def check_task(self, task: TaskSpec) -> None:
        resources = task.resources
        if resources.gpu_memory or (resources.custom and not _RAY_OWN.isdisjoint(resources.custom)):
            _to_ray(resources, f"task {task.name}")
        target = task.target
        if type(target) is FunctionType and target.__module__ == worker_leases.__name__:
            return  # sent by name, called as the worker's own (see _runnable)
        self._sendable(target)

    async def run(
        self, task: TaskSpec, reservation: Reservation | None, *, on_start: Callable[[], None] | None = None
    ) -> Any:
        """Submit ``task`` to Ray and await its result; see :meth:`gridboost.abc.Backend.run`."""
        if self._ray is None or self._closed:
            self._require()
        what = f"task {task.id} ({task.name})"
        remote, args, kwargs, options = self._prepare(task, reservation)
        self._submitted = True
        self._submissions += 1
        number = self._submissions
        # Ray queues work itself and never says when it starts, so nothing we submit may be moved: started now.
        if on_start is not None:
            on_start()
        with map_errors(what):
            ref = remote._remote(
                args=args,
                kwargs=kwargs,
                serialized_runtime_env_info=remote._serialized_base_runtime_env_info,
                name=self.prefix + _ray_name(task),
                **options,
            )
        # The ref is recorded: from here on a cancellation can reach the task.
        self._in_flight[task.id] = ref.task_id()
        try:
            with map_errors(what):
                landing = self._landing
                waited = landing.watch(ref) if landing is not None else self._trio_wait(ref) if self._trio else ref
                result = await waited
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled here (or interrupted): the task must stop too
                # A command stops its process itself within grace (SIGTERM, then SIGKILL): give it that long, and a
                # little more, before the force that would leave the process to its death signal. A callable gets
                # cancel_grace: a polite cancel reaches Python code within a bytecode, and code blocked in C never.
                polite = self._grace + 1.0 if isinstance(task.target, Command) else self._cancel_grace
                with anyio.CancelScope(shield=True):
                    await self._cancel(ref, number, polite)
            raise
        finally:
            # Ray's table shows a task ended a report interval after it did: its id stays known a while longer.
            ray_id = self._in_flight.pop(task.id, None)
            if ray_id is not None:
                self._ended.remember(task.id, ray_id)
        if isinstance(task.target, Command):
            status, out, err, node = result
            return CommandResult(returncode=status, stdout=out, stderr=err, node=node)
        return result

    def _prepare(
        self, task: TaskSpec, reservation: Reservation | None
    ) -> tuple[Any, tuple[Any, ...], Mapping[str, Any], dict[str, Any]]:
        target = task.target
        if isinstance(target, Command):
            remote = self._command_remote
            args: tuple[Any, ...] = (target.argv, dict(target.env) if target.env else None, target.cwd, self._grace)
            kwargs: Mapping[str, Any] = {}
        elif type(target) is FunctionType:
            # Under a boost the function runs inside in_lease (current_lease() names the boost); not otherwise.
            made = self._remotes if reservation is None else self._leased_remotes
            remote = made.get(target)
            if remote is None:
                assert self._ray is not None
                runnable = _runnable(target)
                remote = made.remember(
                    target, self._ray.remote(runnable if made is self._remotes else _worker.leased(runnable))
                )
            args, kwargs = task.args, task.kwargs
            if reservation is not None:
                args = (reservation.id, reservation.token, *args)
        elif reservation is None:  # a builtin, a partial, a callable object: ray.remote takes only functions
            remote = self._call_remote
            args, kwargs = (target, *task.args), task.kwargs
        else:
            remote = self._lease_call_remote
            args, kwargs = (reservation.id, reservation.token, target, *task.args), task.kwargs
        # RemoteFunction.options() validates and builds a wrapper class on every call, a third of what submitting
        # costs: it runs once per remote function and set of options, and each task then goes to what .remote()
        # itself calls (_remote), with the options merged as options() merges them, and its own name.
        key = (remote, task.resources, reservation, task.retries)
        options = self._options.get(key)
        if options is None:
            options = self._task_options(task, reservation)
            remote.options(**options)  # validation only: Ray's own errors, raised here once
            defaults = {k: v for k, v in remote._default_options.items() if k != "max_calls"}
            options = self._options.remember(key, {**defaults, **options})
        return remote, args, kwargs, options

    def _task_options(self, task: TaskSpec, reservation: Reservation | None) -> dict[str, Any]:
        amounts = _to_ray(task.resources, f"task {task.name}")
        group = None
        if reservation is not None:
            group = reservation.handle
            if not isinstance(group, _Group):
                raise InvalidRequest(f"reservation {reservation.id} was not made by the Ray backend")
        if not task.resources:
            # Ray's default of one CPU a task keeps unsized work from starting a worker per task; inside a boost
            # that holds less than a CPU on any node, unsized work takes nothing, as it does locally.
            cpu_room = max((room.get("CPU", 0) for room in group.rooms.values()), default=0) if group else 1
            amounts = {"CPU": 1.0 if cpu_room >= 1 - _EPS else 0.0}
        options: dict[str, Any] = {
            "num_cpus": amounts.pop("CPU", 0),
            "num_gpus": amounts.pop("GPU", 0),
            "max_retries": task.retries,
            "retry_exceptions": task.retries > 0,
        }
        memory = amounts.pop("memory", 0)
        if memory:
            options["memory"] = memory
        if amounts:
            options["resources"] = amounts
        if group is not None and reservation is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            wanted = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], "memory": memory, **amounts}
            if not any(_fits(wanted, room) for room in group.rooms.values()):
                biggest = max(group.rooms.values(), key=lambda room: room.get("CPU", 0))
                raise CapacityUnavailable(
                    f"task {task.name} needs {task.resources or 'one CPU'}; the most boost {reservation.id} holds "
                    f"on one node is {_from_ray(biggest)}"
                )
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group.pg, placement_group_bundle_index=-1)
        return options

    async def _trio_wait(self, ref: ObjectRef[Any]) -> Any:
        """Await a ref on trio: Ray completes its future from its own thread (a cancel is run()'s to handle)."""
        future = ref.future()
        await until_done_on_trio(future)
        return future.result()

    async def _cancel(self, ref: ObjectRef[Any], number: int, polite: float) -> None:
        """Stop the task (see :meth:`_stop_batch`) together with every other one cancelled at the same moment."""
        self._stopping[ref] = (number, polite)
        batch = self._batch
        if batch is not None:  # another cancelled run collects this batch: wait for it
            await batch.wait()
            return
        batch = self._batch = anyio.Event()
        try:
            # A grid's teardown (or a cancelled map) cancels many runs at once: theirs wake in the same turn of
            # the event loop and join this batch before it is taken.
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            taken, self._stopping, self._batch = self._stopping, {}, None
            # In the order submitted: Ray starts work first in, first out, so the running tasks (the ones a polite
            # cancel may not reach) are cancelled first, and their cancel_grace starts first.
            refs = {ref: polite for ref, (_, polite) in sorted(taken.items(), key=lambda item: item[1][0])}
            await anyio.to_thread.run_sync(self._stop_batch, refs)
        finally:
            batch.set()

    def _stop_batch(self, refs: Mapping[ObjectRef[Any], float]) -> None:
        """Ask Ray to stop the tasks; force (kill their workers) those not stopped ``polite`` seconds after their
        polite cancel, then wait ``grace`` more for those. One bounded wait covers the whole batch: no thread or
        grace per task.

        A polite cancel drops queued work and raises KeyboardInterrupt in a running task (a command then stops its
        process: SIGTERM, and SIGKILL after ``grace``); Python delivers that only between bytecodes, so code blocked
        in C needs the force.
        """
        ray = self._ray
        assert ray is not None
        polite: dict[ObjectRef[Any], float] = {}
        for ref, wait in refs.items():
            # Each step on its own: a polite cancel that fails must not keep the force from being tried.
            try:
                ray.cancel(ref)
            except Exception as exc:
                _log.warning("cancelling Ray task %s failed: %s: %s", ref, type(exc).__name__, exc)
            # Counted from this ref's own cancel, not from the last of the batch: a thousand cancels take a tenth of
            # a second, and the first refs (the earliest submitted, the ones running) need not wait for the rest.
            polite[ref] = time.monotonic() + wait
        forced: dict[ObjectRef[Any], float] = {}
        while polite or forced:
            now = time.monotonic()
            for ref in [ref for ref, until in polite.items() if until <= now]:
                del polite[ref]
                forced[ref] = now + self._grace
                try:
                    ray.cancel(ref, force=True)
                except Exception as exc:
                    _log.warning("force-cancelling Ray task %s failed: %s: %s", ref, type(exc).__name__, exc)
            for ref in [ref for ref, until in forced.items() if until <= now]:
                del forced[ref]
                _log.warning("Ray task %s did not stop within %gs of its forced cancel", ref, self._grace)
            left = [*polite, *forced]
            if not left:
                return
            until = min([*polite.values(), *forced.values()])
            try:
                ready, _ = ray.wait(left, num_returns=len(left), timeout=max(0.0, until - now), fetch_local=False)
            except Exception as exc:
                _log.warning("waiting for %d cancelled Ray task(s) failed: %s: %s", len(left), type(exc).__name__, exc)
                return
            for ref in ready:
                polite.pop(ref, None)
                forced.pop(ref, None)


_OPTIONS = {
    "address": "None (default) or 'local': a private Ray on this machine; 'auto', 'host:port' or 'ray://host:port' "
    "joins a running cluster",
    "namespace": "Ray namespace for this process's connection",
    "runtime_env": "Ray runtime_env (dict) for this process's connection",
    "num_cpus": "CPUs of a private Ray instance (default: all)",
    "num_gpus": "GPUs of a private Ray instance (default: all)",
    "temp_dir": "directory of a private Ray instance's sessions and logs (default: a temporary one, removed after)",
    "connect_timeout": "seconds to start or reach Ray before BackendError (default 30)",
    "grace": "seconds a cancelled command's process gets between SIGTERM and SIGKILL (default 2)",
    "cancel_grace": "seconds a cancelled running callable gets after Ray's polite cancel (KeyboardInterrupt) before "
    "its worker is killed (default 0.5; 0: at once)",
    "close_timeout": "seconds to wait for a removal or Ray's shutdown (default 30)",
    "linger": "seconds a released boost's placement group is kept for a matching request to reuse (default 2; 0: "
    "remove at once)",
    "lease_grace": "seconds past a lease's expiry after which the cluster's lease keeper removes it, when its owner "
    "did not (default 5)",
    "preempt_grace": "seconds a preemptible boost of this process's has to finish its work once the cluster's lease "
    "keeper takes it back for another owner's request of higher priority (default 10; 0: at once)",
    "grow": "ask Ray's autoscaler (request_resources) for boosts that do not fit now, instead of refusing them "
    "(default False)",
}
