"""What to run and where: the task spec the grid receives, and the placement decided for it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from attrs import field, frozen

from ._boost import Boost
from ._checks import optional_seconds, whole
from ._records import Command, Priority, new_id, priority_of
from ._resources import Resources
from ._text import shown
from .exceptions import InvalidRequest, InvalidTask

__all__ = ["Placement", "TaskSpec", "check_target"]


def _where(value: object) -> object:
    # A str first: `in` would call a hostile value's own __eq__. A Boost is the one place that is not a string.
    if isinstance(value, Boost) or (isinstance(value, str) and value in ("auto", "local", "cluster")):
        return value
    raise InvalidRequest(f"where must be 'auto', 'local', 'cluster' or a Boost, got {shown(value)}")


def _timeout(value: object) -> float | None:
    return optional_seconds("timeout", value)


def _resources(value: Resources | str | Mapping[str, Any] | None) -> Resources:
    return Resources.coerce(value)


# Shared by every task without tags: an empty frozenset per task is one more object for the garbage collector.
_NO_TAGS: frozenset[str] = frozenset()


def _tags(value: Iterable[str]) -> frozenset[str]:
    return value if type(value) is frozenset else frozenset(value)


def check_target(value: object) -> object:
    """``value`` if it can be run (a callable or a ``Command``); else ``InvalidTask``."""
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

    target: Callable[..., Any] | Command = field(validator=lambda _s, _a, v: check_target(v))
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(factory=dict)
    resources: Resources = field(default=Resources(), converter=_resources)
    where: Literal["auto", "local", "cluster"] | Boost = field(default="auto", validator=lambda _s, _a, v: _where(v))
    retries: int = field(default=0, validator=lambda _s, _a, v: whole("retries", v))
    timeout: float | None = field(default=None, converter=_timeout)
    priority: Priority = field(default=Priority.NORMAL, converter=priority_of)
    tags: frozenset[str] = field(default=_NO_TAGS, converter=_tags)
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
