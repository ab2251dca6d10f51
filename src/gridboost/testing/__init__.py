"""Tools that prove gridboost and its backends keep async resources honest. Needs pytest.

- :class:`BackendSuite`: the conformance suite every backend's tests subclass;
- :class:`EngineProbe` (and :class:`LocalProbe`): how a test reads the *engine's* state;
- :class:`HookLog`: an observer that records every observer hook call;
- :class:`FaultyBackend` with :class:`FaultPlan`/:class:`Fault`, and :class:`FaultyPlugin`:
  fault injection around any backend;
- :func:`no_leaks`, :func:`snapshot`/:func:`find_leaks` and :class:`LeakError`: the leak
  check, usable without pytest;
- the pytest plugin (``gridboost.testing.pytest_plugin``, loaded through the
  ``pytest11`` entry point): the ``grid``, ``grid_factory`` and ``no_leaks`` fixtures.

Names are imported on first use: the pytest plugin loads in every pytest run of an
environment that has gridboost, and must not make them slower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._faulty import Fault, FaultPlan, FaultyBackend, FaultyPlugin, InjectedFault
    from ._hooklog import HookLog
    from ._leaks import LeakError, find_leaks, no_leaks, snapshot
    from ._probe import EngineProbe, LocalProbe
    from ._suite import BackendSuite, SuiteError

_WHERE = {
    "BackendSuite": "_suite",
    "EngineProbe": "_probe",
    "Fault": "_faulty",
    "FaultPlan": "_faulty",
    "FaultyBackend": "_faulty",
    "FaultyPlugin": "_faulty",
    "HookLog": "_hooklog",
    "InjectedFault": "_faulty",
    "LeakError": "_leaks",
    "LocalProbe": "_probe",
    "SuiteError": "_suite",
    "find_leaks": "_leaks",
    "no_leaks": "_leaks",
    "snapshot": "_leaks",
}

__all__ = [
    "BackendSuite",
    "EngineProbe",
    "Fault",
    "FaultPlan",
    "FaultyBackend",
    "FaultyPlugin",
    "HookLog",
    "InjectedFault",
    "LeakError",
    "LocalProbe",
    "SuiteError",
    "find_leaks",
    "no_leaks",
    "snapshot",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gridboost.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return __all__
