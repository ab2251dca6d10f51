"""The frozen records that cross gridboost's seams: commands, snapshots, leases, reservations, outcomes.

A leaf of the import graph: it imports no service module (the task spec and placement, which name a
:class:`~gridboost.Boost`, are in ``_spec``)."""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

from attrs import field, frozen

from ._resources import Resources
from ._text import did_you_mean, shown
from .exceptions import InvalidRequest, InvalidTask

__all__ = [
    "BoostState",
    "ClusterSnapshot",
    "Command",
    "CommandResult",
    "Lease",
    "NodeSnapshot",
    "Priority",
    "Quota",
    "Reservation",
    "ReservationRequest",
    "Strategy",
    "TaskOutcome",
]

Strategy = Literal["pack", "spread", "strict_pack", "strict_spread"]
STRATEGIES: tuple[str, ...] = ("pack", "spread", "strict_pack", "strict_spread")

_ids = itertools.count(1)


def _process_tag() -> str:
    # The pid, and 16 random bits: lease ids meet in a cluster-wide registry, where two hosts' pids may clash.
    # os.urandom, which secrets.token_hex reads too: importing secrets (hmac, OpenSSL) costs ms at `import gridboost`.
    return f"{os.getpid():x}{os.urandom(2).hex()}"


_pid = _process_tag()


def _forked() -> None:
    global _pid
    _pid = _process_tag()


os.register_at_fork(after_in_child=_forked)


def owner_name() -> str:
    """Who owns the leases this process takes, as lease registries record it: ``host:pid``."""
    import socket  # here, not at the top: the first lease pays for it, not `import gridboost`

    return f"{socket.gethostname()}:{os.getpid()}"


def tenant_name() -> str:
    """The tenant a grid's leases count against unless it names one: ``user@host``."""
    import getpass  # here, not at the top: `import gridboost` does not pay for it
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (a container): the uid says who
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def new_id(prefix: str) -> str:
    """A short id, unique on a cluster and readable in logs: ``task-1f3a9c2e-17`` (pid, a random tag, a count)."""
    return f"{prefix}-{_pid}-{next(_ids)}"


class Priority(enum.IntEnum):
    """Order in which pending boost requests (and queued work) are served; higher first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


class BoostState(enum.StrEnum):
    """Where a boost is in its life: ``pending → active → released / expired / failed / preempted``.

    A preempted boost takes no new work from the notice on; its running work has the grace the
    notice gave, then the boost ends (``BoostPreempted`` for what had not finished)."""

    PENDING = "pending"
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    FAILED = "failed"
    PREEMPTED = "preempted"


def _argv(value: object) -> tuple[str, ...]:
    # A string would be split by a shell somewhere; refusing it is the whole point.
    if isinstance(value, str | bytes):
        raise InvalidTask(f"argv must be a list of strings, not a string: {shown(value)} (no shell is used)")
    if not isinstance(value, Sequence) or not value:
        raise InvalidTask(f"argv must be a non-empty list of strings, got {shown(value)}")
    argv = tuple(_os_string("argv item", item) for item in value)
    if not argv[0]:
        raise InvalidTask("argv[0] must name a program, got ''")
    return argv


def _os_string(what: str, value: object) -> str:
    # The OS takes C strings: a NUL would end one early (Python refuses it only at exec, far from the call).
    if isinstance(value, os.PathLike):
        try:
            value = os.fspath(value)
        except Exception as exc:
            raise InvalidTask(f"{what} {shown(value)} has no usable path: {type(exc).__name__}") from None
    if not isinstance(value, str):
        raise InvalidTask(f"{what} must be a string, got {shown(value)}")
    if "\0" in value:
        raise InvalidTask(f"{what} must not contain a NUL character, got {shown(value)}")
    return value


def frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy, so a frozen record stays frozen."""
    return MappingProxyType(dict(value))


def optional_frozen_map(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    return None if value is None else frozen_map(value)


def _cwd(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else _os_string("cwd", value)


def priority_of(value: object) -> Priority:
    """A ``Priority``, its value (0..3) or its name in any case (``"high"``); else ``InvalidRequest``."""
    if type(value) is Priority:
        return value
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and value in Priority._value2member_map_:
        return Priority(value)
    names = ", ".join(p.name.lower() for p in Priority)
    hint = did_you_mean(value, [p.name.lower() for p in Priority]) if isinstance(value, str) else ""
    raise InvalidRequest(f"priority must be a Priority or one of {names}, got {shown(value)}{hint}")


def _nodes(value: Iterable[NodeSnapshot]) -> tuple[NodeSnapshot, ...]:
    return tuple(value)


def _env(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidTask(f"env must map strings to strings, got {shown(value)}")
    env: dict[str, str] = {}
    for key, item in value.items():
        name = _os_string("an env name", key) if isinstance(key, str) else None
        if not name or "=" in name:
            raise InvalidTask(f"env names must be non-empty strings without '=', got {shown(key)}")
        if not isinstance(item, str):
            raise InvalidTask(f"env must map strings to strings, got {shown(item)} for {shown(key)}")
        env[name] = _os_string(f"env value of {shown(key, 30)}", item)
    return MappingProxyType(env)


@frozen
class Command:
    """A program to run: ``argv`` is executed directly, never through a shell.

    ``env`` is laid over the environment of the machine the command runs on, so
    ``PATH`` and friends still hold there.
    """

    argv: tuple[str, ...] = field(converter=_argv)
    env: Mapping[str, str] | None = field(default=None, converter=_env)
    cwd: str | None = field(default=None, converter=_cwd)


@frozen
class CommandResult:
    """What a finished command left: exit status, captured output, and the node it ran on."""

    returncode: int
    stdout: bytes
    stderr: bytes
    node: str


@frozen
class TaskOutcome:
    """How a task ended, as told to the ``gridboost_task_finished`` observers."""

    status: Literal["succeeded", "failed", "cancelled", "timed_out"]
    attempts: int
    duration: float
    error: BaseException | None = None


@frozen
class Lease:
    """A boost as the engine's lease registry records it, readable from any process on the cluster.

    ``owner`` says who took it (``host:pid``) and ``tenant`` whose quota it counts against;
    ``state`` is ``active``, ``pending`` for a request that waits for its turn (``requested_at``
    says since when), ``preempting`` for a lease being taken back for another owner (its work's
    grace runs), or ``lingering`` for capacity a backend keeps a moment after release to serve
    the next request fast. ``expires_at`` is wall-clock time: past it (plus the backend's
    grace) the engine removes the lease even when its owner died without releasing it.
    ``token`` is the grant's fencing token: every grant on a cluster gets a larger one (0 while
    pending). ``preemptible``: a higher-priority request of another owner may take it back.
    """

    id: str
    backend: str
    resources: Resources
    owner: str
    state: Literal["active", "pending", "preempting", "lingering"]
    priority: Priority
    expires_at: float
    placements: tuple[str, ...] = ()
    token: int = 0
    tenant: str = ""
    preemptible: bool = False
    requested_at: float = 0.0

    @property
    def ttl_left(self) -> float:
        """Seconds until the lease expires (0 when it has, or is still pending)."""
        return max(0.0, self.expires_at - time.time())

    @property
    def waited(self) -> float:
        """Seconds a pending request has waited for its turn (0 once granted)."""
        return max(0.0, time.time() - self.requested_at) if self.state == "pending" else 0.0


@frozen
class Quota:
    """A tenant's cap on what its granted leases may hold together, and what they hold now."""

    tenant: str
    limit: Resources
    used: Resources


@frozen
class NodeSnapshot:
    """One node at an instant: identity, capacity, what is free, and whether it is alive."""

    id: str
    address: str
    total: Resources
    available: Resources
    labels: Mapping[str, str] = field(factory=dict, converter=frozen_map)
    usage: Resources | None = None
    alive: bool = True
    is_local: bool = False


@frozen
class ClusterSnapshot:
    """Every node the backend knows, at one instant."""

    backend: str
    nodes: tuple[NodeSnapshot, ...] = field(converter=_nodes)
    taken_at: float = field(factory=time.time)

    @property
    def alive(self) -> tuple[NodeSnapshot, ...]:
        return tuple(n for n in self.nodes if n.alive)

    @property
    def total(self) -> Resources:
        """The capacity of every live node, added up."""
        return sum((n.total for n in self.alive), Resources())

    @property
    def available(self) -> Resources:
        """What is free on every live node, added up."""
        return sum((n.available for n in self.alive), Resources())

    @property
    def local(self) -> NodeSnapshot | None:
        """The node this process runs on, when the cluster includes it."""
        return next((n for n in self.nodes if n.is_local), None)

    def matching(self, nodes: Sequence[str] | None, labels: Mapping[str, str] | None) -> tuple[NodeSnapshot, ...]:
        """Live nodes whose id or address is in ``nodes`` and whose labels include ``labels``."""
        chosen = []
        for node in self.alive:
            if nodes is not None and node.id not in nodes and node.address not in nodes:
                continue
            if labels and any(node.labels.get(k) != v for k, v in labels.items()):
                continue
            chosen.append(node)
        return tuple(chosen)


@frozen
class ReservationRequest:
    """What the grid asks the engine to hold for one boost.

    ``detached``: a lease that outlives this process, until its TTL; the engine's lease
    registry, not the grid, ends it (only asked of backends with ``shared_leases``).
    ``tenant`` names whose quota it counts against; ``preemptible``: a higher-priority
    request of another owner may take it back; ``wait``: how long the grid waits for it
    (0: a request its tenant's quota holds back fails at once with ``QuotaExceeded``).
    """

    id: str
    resources: Resources
    strategy: Strategy = "pack"
    priority: Priority = Priority.NORMAL
    ttl: float = 60.0
    nodes: tuple[str, ...] | None = None
    labels: Mapping[str, str] | None = field(default=None, converter=optional_frozen_map)
    detached: bool = False
    tenant: str = ""
    preemptible: bool = False
    wait: float = 30.0


@frozen(eq=False)
class Reservation:
    """Capacity the engine really holds for a boost.

    ``placements`` are the ids of the nodes it landed on (one per bundle for Ray);
    ``handle`` is the engine's own object (a placement group, a lease key), opaque to
    the core. ``token`` is the grant's fencing token, from the engine's lease registry:
    every grant on the cluster gets a larger one.
    """

    request: ReservationRequest
    placements: tuple[str, ...]
    handle: Any = None
    token: int = 0

    @property
    def id(self) -> str:
        return self.request.id
