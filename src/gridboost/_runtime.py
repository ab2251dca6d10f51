"""The runtime: what a grid's services share, and nothing more.

Every service (the boost book, dispatch, the pressure monitor, the executor, the
advisor) receives the runtime and the few peers it needs; none of them knows the
:class:`~gridboost.Grid`, which only composes them. The runtime holds the backends,
the settings, the open/closed state, the counters, the task set, error logging, the
observer dispatcher, and the grid's task group (for submitted work, observer
coroutines and the background loops).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

import anyio
from anyio.abc import TaskGroup
from attrs import define

from ._checks import bounded, seconds, tenant, whole
from ._kit import Tracked
from ._observers import Observers
from .exceptions import GridClosed

if TYPE_CHECKING:
    from ._plugins import GridPluginManager
    from ._task import Run
    from .abc import Backend
    from .hookspecs import GridView

__all__ = ["Runtime", "Setting", "Settings"]

T = TypeVar("T")

log = logging.getLogger("gridboost")


@define(eq=False)
class Settings:
    """The grid's tunables that services read as they work (the facade checks each one)."""

    teardown_timeout: float
    auto_offload: bool
    auto_offload_limit: int
    auto_offload_backoff: float
    cluster_queue: float
    tenant: str = ""

    @classmethod
    def checked(
        cls, teardown_timeout: object, auto_offload: bool, limit: object, backoff: object, queue: object, who: object
    ) -> Settings:
        """The grid's options, each checked (an ``InvalidRequest`` naming the first that is not valid)."""
        from ._records import tenant_name

        return cls(
            tenant=tenant_name() if who is None else tenant(who),
            teardown_timeout=seconds("teardown_timeout", teardown_timeout),
            auto_offload=auto_offload,
            auto_offload_limit=whole("auto_offload_limit", limit),
            auto_offload_backoff=bounded("auto_offload_backoff", backoff, "seconds", math.inf),
            cluster_queue=bounded("cluster_queue", queue, "a fraction of the cluster's capacity", 10),
        )


class Runtime:
    """The state a grid's services share."""

    def __init__(self, backend: Backend, host: Backend, settings: Settings, plugins: GridPluginManager) -> None:
        self.backend = backend
        #: Work placed "local" runs here: this machine, which is the backend itself unless the backend is remote.
        self.host = host
        self.remote = host is not backend
        self.settings = settings
        self.plugins = plugins
        self.state: Literal["new", "open", "closing", "closed"] = "new"
        self.counts: Counter[str] = Counter()
        self.runs: Tracked[Run] = Tracked()
        self.grants: Tracked[anyio.CancelScope] = Tracked()
        self.observers = Observers(plugins, self.counts, lambda: settings.teardown_timeout)
        #: The grid as hooks receive it (``grid=``): handed to plugins, never called by a service.
        self.view: GridView | None = None
        self.task_group: TaskGroup | None = None
        self.loops: TaskGroup | None = None

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    def check_open(self) -> None:
        if self.state != "open":
            closed = self.state != "new"
            raise GridClosed(
                "this grid is closed" if closed else "this grid is not open yet: use `async with Grid(...)`"
            )

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` in the grid's task group: teardown waits for it (submitted work, observers)."""
        assert self.task_group is not None
        self.task_group.start_soon(func, *args)

    def spawn(self, loop: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Start a background loop that teardown stops, with the others."""
        assert self.loops is not None
        self.loops.start_soon(loop)

    def log_error(self, message: str, exc: BaseException) -> None:
        self.counts["errors"] += 1
        log.error("%s: %s: %s", message, type(exc).__name__, exc, exc_info=exc)


class Setting(Generic[T]):
    """A grid attribute kept in its runtime's :class:`Settings`, where the services read it.

    ``check`` validates an assignment (an attribute without one is read-only).
    """

    def __init__(self, check: Callable[[Any], T] | None = None) -> None:
        self._check = check
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, grid: None, owner: type | None = None) -> Setting[T]: ...

    @overload
    def __get__(self, grid: object, owner: type | None = None) -> T: ...

    def __get__(self, grid: object, owner: type | None = None) -> Setting[T] | T:
        if grid is None:
            return self
        value: T = getattr(grid._runtime.settings, self._name)  # type: ignore[attr-defined]
        return value

    def __set__(self, grid: object, value: T) -> None:
        if self._check is None:
            raise AttributeError(f"{self._name} is set when the grid is made: Grid({self._name}=...)")
        setattr(grid._runtime.settings, self._name, self._check(value))  # type: ignore[attr-defined]
