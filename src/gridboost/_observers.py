"""Observer hooks: each implementation called on its own, async ones awaited in the grid's task group.

An observer that raises is logged and counted (``observer_errors``); it never breaks the
operation, and never keeps the other observers from being called. That isolation is why
observers are called one implementation at a time rather than through one pluggy call
(where the first exception would end the call), and why a *wrapper* implementation of an
observer hook is refused when its plugin is registered (see ``_plugins``): it would wrap
nothing. Decision hooks, which want pluggy's semantics, are called through pluggy.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ._kit import Tracked
from .exceptions import GridClosed
from .hookspecs import OBSERVERS

if TYPE_CHECKING:
    from ._plugins import GridPluginManager

__all__ = ["Observers"]

log = logging.getLogger("gridboost")

_Impl = tuple[Callable[..., Any], tuple[str, ...], str]


class Observers:
    """Calls the observer hooks of one grid's plugins; ``wanted(hook)`` is cheap enough for the hot path."""

    def __init__(self, plugins: GridPluginManager, counts: Counter[str], timeout: Callable[[], float]) -> None:
        self._plugins = plugins
        self._counts = counts
        self._timeout = timeout
        self._impls: dict[str, list[_Impl]] = {}
        self._version = -1
        self._task_group: TaskGroup | None = None
        self._grid: object = None
        self.running: Tracked[Awaitable[Any]] = Tracked()

    def open(self, task_group: TaskGroup, grid: object) -> None:
        """From now on async observers run in ``task_group``; ``grid`` is what hooks receive as ``grid``."""
        self._task_group, self._grid = task_group, grid

    def close(self) -> None:
        """No more observer coroutines: one that arrives later is closed and counted."""
        self._task_group = None

    def wanted(self, hook: str) -> list[_Impl]:
        """The implementations of ``hook`` (empty when none: callers skip building the arguments)."""
        if self._version != self._plugins.version:
            self._impls = {name: self._plugins.observer_impls(name) for name in OBSERVERS}
            self._version = self._plugins.version
        return self._impls[hook]

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call each observer of ``hook`` on its own; start what they return to await in the task group."""
        impls = self.wanted(hook)
        if not impls:
            return
        kwargs["grid"] = self._grid
        for function, argnames, plugin in impls:
            try:
                result = function(*[kwargs[name] for name in argnames])
            except Exception as exc:
                self.failed(plugin, hook, exc)
                continue
            if inspect.isawaitable(result):
                if self._task_group is None:
                    if inspect.iscoroutine(result):
                        result.close()
                    self.failed(plugin, hook, GridClosed("observer coroutine after teardown"))
                    continue
                self.running.add(result)
                self._task_group.start_soon(self._observe, result, plugin, hook)

    async def _observe(self, awaitable: Awaitable[Any], plugin: str, hook: str) -> None:
        # Shielded but bounded: an observer is awaited even while the host block is
        # being cancelled, and one that hangs is cut off (and counted) at the timeout.
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self._timeout()):
                await awaitable
        except Exception as exc:
            self.failed(plugin, hook, exc)
        finally:
            self.running.discard(awaitable)

    def failed(self, plugin: str, hook: str, exc: BaseException) -> None:
        self._counts["observer_errors"] += 1
        log.error("observer %s of plugin %s failed: %s: %s", hook, plugin, type(exc).__name__, exc, exc_info=exc)
