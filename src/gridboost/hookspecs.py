"""Hook specifications: every way a plugin can extend gridboost.

Plugins implement these with :data:`gridboost.hookimpl` and are found through the
entry-point group ``gridboost``, or registered on one grid with
``Grid(plugins=[...])`` / ``grid.plugins.register(obj)``. An implementation may
accept any subset of a hook's arguments, by name.

Hooks come in two kinds:

* **Decision hooks** are ``firstresult``: the first implementation that returns
  something other than ``None`` decides. Built-in defaults are registered
  ``trylast``, so any plugin of yours is asked first. An exception raised here
  fails the operation with :class:`~gridboost.exceptions.PolicyError`, chained to it.
* **Observer hooks** return nothing that matters. They may be plain functions or
  ``async def``; the grid awaits coroutines inside its own task group, so they are
  finished before the grid closes. An exception in an observer is logged and counted
  in ``grid.stats()["observer_errors"]``; it never breaks the operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from ._boost import Boost
    from ._pressure import Pressure, Threshold
    from ._records import TaskOutcome
    from ._resources import Resources
    from ._spec import Placement, TaskSpec
    from .abc import Backend, BackendSpec

PROJECT = "gridboost"

#: The observer hooks: each implementation is called on its own (one that fails does not stop the others).
OBSERVERS = (
    "gridboost_boost_activated",
    "gridboost_boost_released",
    "gridboost_boost_expired",
    "gridboost_boost_failed",
    "gridboost_boost_preempted",
    "gridboost_task_placed",
    "gridboost_task_finished",
    "gridboost_pressure_changed",
)

hookspec = pluggy.HookspecMarker(PROJECT)

__all__ = [
    "OBSERVERS",
    "PROJECT",
    "GridView",
    "gridboost_backends",
    "gridboost_boost_activated",
    "gridboost_boost_expired",
    "gridboost_boost_failed",
    "gridboost_boost_preempted",
    "gridboost_boost_released",
    "gridboost_choose_placement",
    "gridboost_offload_candidates",
    "gridboost_pressure_changed",
    "gridboost_task_finished",
    "gridboost_task_placed",
    "hookspec",
]


class GridView(Protocol):
    """The grid as a hook receives it (``grid``): what a decision may read cheaply, on the hot path.

    A :class:`~gridboost.Grid` is one; hooks may also call its other public methods.
    """

    @property
    def backend(self) -> Backend: ...

    @property
    def boosts(self) -> tuple[Boost, ...]: ...

    @property
    def local_available(self) -> Resources: ...

    @property
    def cluster_available(self) -> Resources | None: ...

    @property
    def latest_pressure(self) -> Pressure: ...

    @property
    def pressure_thresholds(self) -> Mapping[str, Threshold]: ...

    @property
    def auto_offload_limit(self) -> int: ...

    def stats(self) -> dict[str, int]: ...


# -- registration ---------------------------------------------------------------------


@hookspec
def gridboost_backends() -> Iterable[BackendSpec] | None:
    """Yield a :class:`~gridboost.abc.BackendSpec` for each backend this plugin provides.

    Called once per grid; the results of all plugins are flattened and a name given
    twice raises :class:`~gridboost.exceptions.PluginError`.

    Example::

        @gridboost.hookimpl
        def gridboost_backends():
            yield BackendSpec(name="slurm", factory=SlurmBackend, options={"partition": "queue to use"})
    """


# -- decisions (firstresult) ----------------------------------------------------------


@hookspec(firstresult=True)
def gridboost_choose_placement(grid: GridView, task: TaskSpec) -> Placement | None:
    """Decide where a ``where="auto"`` task runs; return ``None`` to let the next plugin decide.

    Asked once per task, when it is submitted (or when an ``offload`` coroutine starts),
    on the hot path: keep it cheap, and read what the grid knows rather than ask an
    engine: ``grid.local_available``, ``grid.cluster_available``, ``boost.available``,
    ``grid.latest_pressure``. The built-in default runs the task in the boost of
    the enclosing ``async with grid.boost(...)`` block; else here while local capacity
    fits and local pressure is not high; else in an active boost with room; else on the
    cluster while it has room; else here, waiting for local capacity
    (``Placement(..., waiting=True)``: it moves to the first remote room that frees).

    Example::

        @gridboost.hookimpl
        def gridboost_choose_placement(task):
            if "gpu-heavy" in task.tags:
                return Placement("cluster", reason="gpu-heavy work always leaves the host")
    """


@hookspec(firstresult=True)
def gridboost_offload_candidates(
    grid: GridView, boost: Boost, queued: Sequence[TaskSpec], limit: int
) -> Sequence[TaskSpec] | None:
    """Choose which queued tasks (not started yet) move onto a boost that just became active.

    Return at most ``limit`` items of ``queued``; ``None`` defers to the next plugin.
    ``limit`` is ``grid.auto_offload_limit``, halved for each activation that follows
    the previous one within ``grid.auto_offload_backoff`` seconds (never below one).
    The built-in default takes the highest priority first, then the oldest.

    Example::

        @gridboost.hookimpl
        def gridboost_offload_candidates(queued, limit):
            return [t for t in queued if "movable" in t.tags][:limit]
    """


# -- observers: boosts -------------------------------------------------------------


@hookspec
def gridboost_boost_activated(grid: GridView, boost: Boost) -> Any:
    """A boost was granted: the engine now holds its reservation.

    Example::

        @gridboost.hookimpl
        async def gridboost_boost_activated(boost):
            await metrics.gauge("boost.active", 1, tags={"id": boost.id})
    """


@hookspec
def gridboost_boost_released(grid: GridView, boost: Boost) -> Any:
    """A boost was released by its owner (explicitly, by its ``async with`` block, or at teardown).

    Example::

        @gridboost.hookimpl
        def gridboost_boost_released(boost):
            log.info("released %s after %.1fs", boost.id, boost.held_for)
    """


@hookspec
def gridboost_boost_expired(grid: GridView, boost: Boost) -> Any:
    """A boost reached its TTL; its work was cancelled and its reservation released.

    Example::

        @gridboost.hookimpl
        def gridboost_boost_expired(boost):
            alerts.warn(f"lease {boost.id} ran out; renew earlier")
    """


@hookspec
def gridboost_boost_failed(grid: GridView, boost: Boost, error: BaseException) -> Any:
    """A boost could not be granted, or the engine lost it (a node died under it).

    Example::

        @gridboost.hookimpl
        def gridboost_boost_failed(boost, error):
            log.error("boost %s failed: %s", boost.id, error)
    """


@hookspec
def gridboost_boost_preempted(grid: GridView, boost: Boost, grace: float) -> Any:
    """Another owner's request of higher priority takes this preemptible boost back.

    Called at the notice: the boost takes no new work from now on, its running work has
    ``grace`` seconds to finish, then what is left is stopped with
    :class:`~gridboost.exceptions.BoostPreempted` and the engine's reservation goes. Move or
    checkpoint your work here (``grid.boost(...)`` again, at a priority that may win).

    Example::

        @gridboost.hookimpl
        def gridboost_boost_preempted(boost, grace):
            log.warning("lease %s is taken back in %.0fs", boost.id, grace)
    """


# -- observers: tasks ---------------------------------------------------------------


@hookspec
def gridboost_task_placed(grid: GridView, task: TaskSpec, placement: Placement) -> Any:
    """A task's placement was decided, just before it is handed to a backend.

    Example::

        @gridboost.hookimpl
        def gridboost_task_placed(task, placement):
            counts[placement.kind] += 1
    """


@hookspec
def gridboost_task_finished(grid: GridView, task: TaskSpec, placement: Placement, outcome: TaskOutcome) -> Any:
    """A task ended: succeeded, failed, was cancelled or timed out.

    Example::

        @gridboost.hookimpl
        def gridboost_task_finished(task, outcome):
            histogram.observe(outcome.duration, status=outcome.status)
    """


# -- observers: pressure ------------------------------------------------------------


@hookspec
def gridboost_pressure_changed(grid: GridView, old: Pressure, new: Pressure) -> Any:
    """Local pressure changed: its level, or which dimensions are high (with hysteresis).

    Not called for every reading, only for changes; the first reading counts as one only
    when it is already high (``old`` is then the empty ``Pressure()``). A grid with an
    observer of this hook starts its monitor as it opens.

    Example::

        @gridboost.hookimpl
        def gridboost_pressure_changed(old, new):
            if new.level == "high":
                log.warning("host under pressure: %s (was %s)", new, old)
    """
