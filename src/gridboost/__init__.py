"""gridboost: see pressure, boost capacity, offload work — and tear it all down for sure.

>>> import gridboost as gb
>>> async def main():                                  # doctest: +SKIP
...     async with gb.Grid() as grid:
...         async with grid.boost(gb.Resources(cpu=1), ttl=60):
...             return await grid.offload(sum, [1, 2, 3])
"""

from __future__ import annotations

from . import abc, exceptions, hookspecs
from ._boost import Boost, current_boost
from ._grid import Grid
from ._plugins import PluginLoadWarning, hookimpl
from ._records import (
    BoostState,
    ClusterSnapshot,
    Command,
    CommandResult,
    Lease,
    NodeSnapshot,
    Placement,
    Priority,
    TaskOutcome,
    TaskSpec,
)
from ._resources import Resources
from ._task import TaskHandle, TaskMap
from .abc import BackendSpec
from .exceptions import (
    BackendError,
    BoostExpired,
    BoostLost,
    BoostUnavailable,
    CapacityUnavailable,
    CommandFailed,
    GridboostError,
    GridClosed,
    InvalidRequest,
    InvalidResources,
    InvalidTask,
    NotSerializable,
    PluginError,
    PolicyError,
    TaskCancelled,
    TeardownError,
    UnknownBackend,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendSpec",
    "Boost",
    "BoostExpired",
    "BoostLost",
    "BoostState",
    "BoostUnavailable",
    "CapacityUnavailable",
    "ClusterSnapshot",
    "Command",
    "CommandFailed",
    "CommandResult",
    "Grid",
    "GridClosed",
    "GridboostError",
    "InvalidRequest",
    "InvalidResources",
    "InvalidTask",
    "Lease",
    "NodeSnapshot",
    "NotSerializable",
    "Placement",
    "PluginError",
    "PluginLoadWarning",
    "PolicyError",
    "Priority",
    "Resources",
    "TaskCancelled",
    "TaskHandle",
    "TaskMap",
    "TaskOutcome",
    "TaskSpec",
    "TeardownError",
    "UnknownBackend",
    "__version__",
    "abc",
    "current_boost",
    "exceptions",
    "hookimpl",
    "hookspecs",
]
