"""gridboost: see pressure, boost capacity, offload work — and tear it all down for sure.

>>> import gridboost as gb
>>> async def main():                                  # doctest: +SKIP
...     async with gb.Grid() as grid:
...         async with grid.boost(gb.Resources(cpu=1), ttl=60):
...             return await grid.offload(sum, [1, 2, 3])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import abc, exceptions, hookspecs
from ._advisor import OffloadRecommendation, ResourceMatch
from ._boost import Boost, current_boost
from ._grid import Grid
from ._parking import Parked
from ._plugins import PluginLoadWarning, hookimpl, quiet_engine_logs
from ._pressure import DEFAULT_THRESHOLDS, Pressure, PressureChanges, Threshold
from ._probes import GpuReading, Probe, Reading, SystemProbe
from ._records import (
    BoostState,
    ClusterSnapshot,
    Command,
    CommandResult,
    Lease,
    NodeSnapshot,
    Priority,
    Quota,
    TaskOutcome,
)
from ._resources import Resources
from ._spec import Placement, TaskSpec
from ._task import TaskHandle, TaskMap
from .abc import BackendSpec
from .exceptions import (
    BackendError,
    BoostExpired,
    BoostLost,
    BoostPreempted,
    BoostUnavailable,
    CapacityUnavailable,
    CommandFailed,
    CommandNotFound,
    GridboostError,
    GridClosed,
    InvalidRequest,
    InvalidResources,
    InvalidTask,
    NotSerializable,
    PluginError,
    PolicyError,
    ProbeError,
    QuotaExceeded,
    TaskCancelled,
    TeardownError,
    UnknownBackend,
)
from .worker_leases import CurrentLease, current_lease

if TYPE_CHECKING:
    from ._futures import GridExecutor
    from ._sync import Executor

#: Names whose modules import ``concurrent.futures``: loaded on first use, as most programs never touch them.
_LAZY = {"Executor": "._sync", "GridExecutor": "._futures"}

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BackendError",
    "BackendSpec",
    "Boost",
    "BoostExpired",
    "BoostLost",
    "BoostPreempted",
    "BoostState",
    "BoostUnavailable",
    "CapacityUnavailable",
    "ClusterSnapshot",
    "Command",
    "CommandFailed",
    "CommandNotFound",
    "CommandResult",
    "CurrentLease",
    "Executor",
    "GpuReading",
    "Grid",
    "GridClosed",
    "GridExecutor",
    "GridboostError",
    "InvalidRequest",
    "InvalidResources",
    "InvalidTask",
    "Lease",
    "NodeSnapshot",
    "NotSerializable",
    "OffloadRecommendation",
    "Parked",
    "Placement",
    "PluginError",
    "PluginLoadWarning",
    "PolicyError",
    "Pressure",
    "PressureChanges",
    "Priority",
    "Probe",
    "ProbeError",
    "Quota",
    "QuotaExceeded",
    "Reading",
    "ResourceMatch",
    "Resources",
    "SystemProbe",
    "TaskCancelled",
    "TaskHandle",
    "TaskMap",
    "TaskOutcome",
    "TaskSpec",
    "TeardownError",
    "Threshold",
    "UnknownBackend",
    "__version__",
    "abc",
    "current_boost",
    "current_lease",
    "exceptions",
    "hookimpl",
    "hookspecs",
    "quiet_engine_logs",
]


def _show_as_public() -> None:
    """Show what the public modules export as theirs: ``gridboost.Grid``, not ``gridboost._grid.Grid`` (``_public``).

    A name both ``gridboost`` and a public submodule export shows as the submodule's (``gridboost.abc.X``).
    """
    from ._public import publish

    for module in (abc, exceptions, hookspecs):
        publish(module.__name__)
    publish(__name__)


_show_as_public()
del _show_as_public


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gridboost' has no attribute {name!r}")
    from ._public import show_as_public

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    show_as_public(value, name, __name__)
    globals()[name] = value
    return value
