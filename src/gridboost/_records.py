"""The frozen records that cross gridboost's seams: specs, snapshots, decisions, results."""

from __future__ import annotations

import enum
import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from attrs import field, frozen

from ._kit import did_you_mean, finite, shown
from ._resources import Resources
from .exceptions import InvalidRequest, InvalidTask

if TYPE_CHECKING:
    from ._boost import Boost

__all__ = [
    "BoostState",
    "ClusterSnapshot",
    "Command",
    "CommandResult",
    "Lease",
    "NodeSnapshot",
    "Placement",
    "Priority",
    "Strategy",
    "TaskOutcome",
    "TaskSpec",
]

Strategy = Literal["pack", "spread", "strict_pack", "strict_spread"]
STRATEGIES: tuple[str, ...] = ("pack", "spread", "strict_pack", "strict_spread")

_ids = itertools.count(1)


def _process_tag() -> str:
    # The pid, and 16 random bits: lease ids meet in a cluster-wide registry, where two hosts' pids may clash.
    return f"{os.getpid():x}{secrets.token_hex(2)}"


_pid = _process_tag()


def _forked() -> None:
    global _pid
    _pid = _process_tag()


os.register_at_fork(after_in_child=_forked)


def owner_name() -> str:
    """Who owns the leases this process takes, as lease registries record it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
    """Where a boost is in its life: ``pending → active → released / expired / failed``."""

    PENDING = "pending"
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    FAILED = "failed"


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


def _resources(value: Resources | str | Mapping[str, Any] | None) -> Resources:
    return Resources.coerce(value)


def _tags(value: Iterable[str]) -> frozenset[str]:
    return value if type(value) is frozenset else frozenset(value)


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


def _where(value: object) -> object:
    if value in ("auto", "local", "cluster"):
        return value
    from ._boost import Boost  # a Boost is the one non-string placement

    if isinstance(value, Boost):
        return value
    raise InvalidRequest(f"where must be 'auto', 'local', 'cluster' or a Boost, got {shown(value)}")


def _retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"retries must be a whole number >= 0, got {shown(value)}")
    return value


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    number = finite(value)
    if number is None or not number > 0:
        raise InvalidRequest(f"timeout must be a finite number of seconds > 0 or None, got {shown(value)}")
    return number


def _target(value: object) -> object:
    if isinstance(value, Command) or callable(value):
        return value
    raise InvalidTask(f"expected a callable or a Command, got {shown(value)} of type {type(value).__name__}")


def _name(target: object) -> str:
    if isinstance(target, Command):
        return " ".join(target.argv)[:80]
    return getattr(target, "__qualname__", None) or type(target).__qualname__


@frozen
class TaskSpec:
    """One unit of work as the grid received it: what to run, with what, and where."""

    target: Callable[..., Any] | Command = field(validator=lambda _s, _a, v: _target(v))
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(factory=dict)
    resources: Resources = field(default=Resources(), converter=_resources)
    where: Literal["auto", "local", "cluster"] | Boost = field(default="auto", validator=lambda _s, _a, v: _where(v))
    retries: int = field(default=0, validator=lambda _s, _a, v: _retries(v))
    timeout: float | None = field(default=None, converter=_timeout)
    priority: Priority = field(default=Priority.NORMAL, converter=priority_of)
    tags: frozenset[str] = field(factory=frozenset, converter=_tags)
    id: str = field(factory=lambda: new_id("task"))
    submitted_at: float = field(factory=time.monotonic)

    @property
    def name(self) -> str:
        """A human name for the work: the function's qualified name or the command line."""
        return _name(self.target)

    @property
    def is_command(self) -> bool:
        return isinstance(self.target, Command)


@frozen
class Placement:
    """The decision for one task: run it locally, on the cluster, or inside a boost, and why.

    ``waiting`` marks a local placement made only because there was no room anywhere:
    the task waits for local capacity, and moves to the first room that frees on the
    cluster or in a boost before then (while ``grid.auto_offload`` is on).
    """

    kind: Literal["local", "cluster", "boost"]
    reason: str
    boost: Boost | None = None
    waiting: bool = False

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("local", "cluster", "boost"):
            raise InvalidRequest(f"placement kind must be local, cluster or boost, got {shown(self.kind)}")
        if (self.kind == "boost") != (self.boost is not None):
            raise InvalidRequest("a placement names a boost exactly when its kind is 'boost'")
        if self.waiting and self.kind != "local":
            raise InvalidRequest(f"only a local placement waits for local capacity, not a {self.kind} one")


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

    ``owner`` says who took it (``host:pid``); ``state`` is ``active``, or ``lingering``
    for capacity a backend keeps a moment after release to serve the next request fast.
    ``expires_at`` is wall-clock time: past it (plus the backend's grace) the engine
    removes the lease even when its owner died without releasing it.
    """

    id: str
    backend: str
    resources: Resources
    owner: str
    state: Literal["active", "lingering"]
    priority: Priority
    expires_at: float
    placements: tuple[str, ...] = ()

    @property
    def ttl_left(self) -> float:
        """Seconds until the lease expires (0 when it has)."""
        return max(0.0, self.expires_at - time.time())


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
