"""The built-in decision hooks. Registered ``trylast``, so every other plugin is asked first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._boost import current_boost
from ._plugins import hookimpl
from ._records import Placement, TaskSpec

if TYPE_CHECKING:
    from ._boost import Boost
    from ._grid import Grid

__all__ = ["default_offload_candidates", "default_placement"]

_IN_BOOST = "inside the enclosing `async with grid.boost(...)` block"
_LOCAL_IS_CLUSTER = "the backend is this machine"
_FITS_LOCALLY = "fits in free local capacity"
_HERE_IS_THE_CLUSTER = Placement("local", _LOCAL_IS_CLUSTER)
_FITS_HERE = Placement("local", _FITS_LOCALLY)


def default_placement(grid: Grid, task: TaskSpec) -> Placement:
    """The boost of the enclosing block, else local while it fits, else the cluster."""
    boost = current_boost()
    if boost is not None and boost.is_active and boost.grid is grid:
        return Placement("boost", _IN_BOOST, boost)
    if not grid.backend.capabilities.remote:
        return _HERE_IS_THE_CLUSTER
    if task.resources.fits_in(grid.local_available):
        return _FITS_HERE
    return Placement("cluster", f"local capacity is short of {task.resources.shortfall(grid.local_available)}")


@hookimpl(trylast=True)
def gridboost_choose_placement(grid: Grid, task: TaskSpec) -> Placement:
    return default_placement(grid, task)


def default_offload_candidates(queued: Sequence[TaskSpec], limit: int) -> list[TaskSpec]:
    """Highest priority first, then the oldest."""
    return sorted(queued, key=lambda t: (-t.priority, t.submitted_at))[:limit]


@hookimpl(trylast=True)
def gridboost_offload_candidates(grid: Grid, boost: Boost, queued: Sequence[TaskSpec], limit: int) -> list[TaskSpec]:
    return default_offload_candidates(queued, limit)
