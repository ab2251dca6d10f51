"""An observer plugin that records every observer hook call, for tests that assert what a grid told its observers."""

from __future__ import annotations

from typing import Any

from .._boost import Boost
from .._plugins import hookimpl
from .._records import TaskOutcome
from .._spec import Placement, TaskSpec

__all__ = ["HookLog"]


class HookLog:
    """Register it with ``Grid(plugins=[log])``; ``log.calls`` lists ``(hook name, arguments)`` in call order.

    ::

        log = HookLog()
        async with Grid(plugins=[log]) as grid:
            ...
        assert [boost.id for boost, _ in log.failed] == [...]
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def of(self, hook: str) -> list[dict[str, Any]]:
        """The arguments of every call of ``hook`` (its name without the ``gridboost_`` prefix)."""
        return [args for name, args in self.calls if name == hook]

    @property
    def failed(self) -> list[tuple[Boost, BaseException]]:
        """``(boost, error)`` of every ``gridboost_boost_failed`` call."""
        return [(args["boost"], args["error"]) for args in self.of("boost_failed")]

    @hookimpl
    def gridboost_boost_activated(self, boost: Boost) -> None:
        self.calls.append(("boost_activated", {"boost": boost}))

    @hookimpl
    def gridboost_boost_released(self, boost: Boost) -> None:
        self.calls.append(("boost_released", {"boost": boost}))

    @hookimpl
    def gridboost_boost_expired(self, boost: Boost) -> None:
        self.calls.append(("boost_expired", {"boost": boost}))

    @hookimpl
    def gridboost_boost_failed(self, boost: Boost, error: BaseException) -> None:
        self.calls.append(("boost_failed", {"boost": boost, "error": error}))

    @hookimpl
    def gridboost_boost_preempted(self, boost: Boost, grace: float) -> None:
        self.calls.append(("boost_preempted", {"boost": boost, "grace": grace}))

    @hookimpl
    def gridboost_task_placed(self, task: TaskSpec, placement: Placement) -> None:
        self.calls.append(("task_placed", {"task": task, "placement": placement}))

    @hookimpl
    def gridboost_task_finished(self, task: TaskSpec, placement: Placement, outcome: TaskOutcome) -> None:
        self.calls.append(("task_finished", {"task": task, "placement": placement, "outcome": outcome}))
