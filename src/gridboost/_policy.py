"""The built-in decision hooks, one instance per grid. Registered ``trylast``, so every other plugin is asked first.

Where a ``where="auto"`` task runs, in order:

1. inside the boost of the enclosing ``async with grid.boost(...)`` block;
2. here, when the backend *is* this machine;
3. here, while local capacity (by the grid's books) fits it and local pressure is not
   high on a dimension it uses — CPU and memory always, the GPU's only for work that asks
   for a GPU or GPU memory;
4. inside an active boost of this grid with room for it;
5. on the cluster, while it has room;
6. here, waiting for local capacity (a ``waiting`` placement: it moves to the first
   remote room that frees before it starts).

The policy reads the grid's books (dispatch's ledgers, the pressure monitor) directly:
it is bound to them when the grid is built, and so needs nothing from the ``grid`` a
hook receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._boost import current_boost
from ._dispatch import FITS_HERE
from ._plugins import hookimpl
from ._spec import Placement, TaskSpec

if TYPE_CHECKING:
    from ._book import BoostBook
    from ._dispatch import Dispatch
    from ._pressure import Monitor
    from ._runtime import Runtime

__all__ = ["DefaultPolicy", "default_offload_candidates"]

_IN_BOOST = "inside the enclosing `async with grid.boost(...)` block"
_LOCAL_IS_CLUSTER = "the backend is this machine"
_HERE_IS_THE_CLUSTER = Placement("local", _LOCAL_IS_CLUSTER)
_GPU_DIMENSIONS = frozenset({"gpu", "gpu_memory"})


def default_offload_candidates(queued: Sequence[TaskSpec], limit: int) -> list[TaskSpec]:
    """Highest priority first, then the oldest."""
    return sorted(queued, key=lambda t: (-t.priority, t.submitted_at))[:limit]


class DefaultPolicy:
    """The default placement and choice of work to move, bound to one grid's books."""

    # Made before the grid's books (it is registered first, as the first built-in), bound to them once they exist.
    _runtime: Runtime
    _book: BoostBook
    _dispatch: Dispatch
    _monitor: Monitor

    def bind(self, runtime: Runtime, book: BoostBook, dispatch: Dispatch, monitor: Monitor) -> None:
        self._runtime, self._book, self._dispatch, self._monitor = runtime, book, dispatch, monitor

    @hookimpl(trylast=True)
    def gridboost_choose_placement(self, task: TaskSpec) -> Placement:
        return self.place(task)

    @hookimpl(trylast=True)
    def gridboost_offload_candidates(self, queued: Sequence[TaskSpec], limit: int) -> list[TaskSpec]:
        return default_offload_candidates(queued, limit)

    def place(self, task: TaskSpec) -> Placement:
        """The decision the module docstring describes; every placement says why."""
        boost = current_boost()
        if boost is not None and boost.is_active and self._book.owns(boost):
            return Placement("boost", _IN_BOOST, boost)
        if not self._runtime.remote:  # the backend is this machine
            return _HERE_IS_THE_CLUSTER
        monitor = self._monitor
        if not monitor.started:
            monitor.start()
        hot = monitor.latest.high_dimensions
        if hot and not (task.resources.gpu or task.resources.gpu_memory):
            hot = hot - _GPU_DIMENSIONS  # a busy GPU does not make the host too busy for CPU work
        dispatch = self._dispatch
        fits = dispatch.local.room_for(task.resources)
        if fits and not hot:
            return FITS_HERE
        if hot:
            why = f"local pressure is high ({', '.join(sorted(hot))}: {monitor.latest})"
        else:
            why = f"local capacity is short of {dispatch.local.shortfall(task.resources)}"
        placement = dispatch.remote_room(task, why)
        if placement is not None and dispatch.remote_can_run(task):
            return placement
        return Placement(
            "local", f"{why}; no room in a boost or on the cluster: waiting for local capacity", waiting=True
        )
