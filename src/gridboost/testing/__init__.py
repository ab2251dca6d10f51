"""Tools that prove gridboost and its backends keep async resources honest. Needs pytest.

- :class:`BackendSuite`: the conformance suite every backend's tests subclass;
- :class:`ExecutorSuite`: the ``concurrent.futures`` contract of :class:`gridboost.Executor` over a backend;
- :class:`EngineProbe` (and :class:`LocalProbe`): how a test reads the *engine's* state;
- :class:`HookLog`: an observer that records every observer hook call;
- :class:`FaultyBackend` with :class:`FaultPlan`/:class:`Fault`, and :class:`FaultyPlugin`:
  fault injection around any backend;
- :func:`no_leaks`, :func:`snapshot`/:func:`find_leaks` and :class:`LeakError`: the leak
  check, usable without pytest;
- :func:`lease_chaos`: a seeded random owner of leases, for no-double-booking tests of a
  shared cluster's registry run in several processes;
- :func:`nap`, :func:`add`, :func:`fail_with` (raising :class:`SuiteError`): the work the suite
  sends, module-level so that every engine ships it, for your own tests too;
- :class:`Hostile` and :func:`hostile_values` (a hypothesis strategy; needs hypothesis):
  hostile input for property tests of an API's argument checks;
- the pytest plugin (``gridboost.testing.pytest_plugin``, loaded through the
  ``pytest11`` entry point): the ``grid``, ``grid_factory`` and ``no_leaks`` fixtures.

Names are imported on first use: the pytest plugin loads in every pytest run of an
environment that has gridboost, and must not make them slower.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._chaos import lease_chaos
    from ._executor_suite import ExecutorSuite
    from ._faulty import Fault, FaultPlan, FaultyBackend, FaultyPlugin, InjectedFault
    from ._hooklog import HookLog
    from ._hostile import Hostile, hostile_values
    from ._leaks import LeakError, find_leaks, no_leaks, snapshot
    from ._probe import EngineProbe, LocalProbe
    from ._suite import BackendSuite
    from ._work import SuiteError, add, fail_with, nap

_WHERE = {
    "BackendSuite": "_suite",
    "EngineProbe": "_probe",
    "ExecutorSuite": "_executor_suite",
    "Fault": "_faulty",
    "FaultPlan": "_faulty",
    "FaultyBackend": "_faulty",
    "FaultyPlugin": "_faulty",
    "HookLog": "_hooklog",
    "Hostile": "_hostile",
    "InjectedFault": "_faulty",
    "LeakError": "_leaks",
    "LocalProbe": "_probe",
    "SuiteError": "_work",
    "add": "_work",
    "fail_with": "_work",
    "find_leaks": "_leaks",
    "hostile_values": "_hostile",
    "lease_chaos": "_chaos",
    "nap": "_work",
    "no_leaks": "_leaks",
    "snapshot": "_leaks",
}

__all__ = [
    "BackendSuite",
    "EngineProbe",
    "ExecutorSuite",
    "Fault",
    "FaultPlan",
    "FaultyBackend",
    "FaultyPlugin",
    "HookLog",
    "Hostile",
    "InjectedFault",
    "LeakError",
    "LocalProbe",
    "SuiteError",
    "add",
    "fail_with",
    "find_leaks",
    "hostile_values",
    "lease_chaos",
    "nap",
    "no_leaks",
    "snapshot",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gridboost.testing' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    _bind_loaded()
    return globals()[name] if name in globals() else getattr(module, name)


def _bind_loaded() -> None:
    """Bind every name whose module is loaded (once: later lookups are plain attribute reads), and show it here.

    A class or function defined in a private module shows as ``gridboost.testing.X`` (in reprs,
    tracebacks and the API reference), as ``gridboost``'s own names do (see ``gridboost._public``);
    pickle finds it here, through this module's ``__getattr__``. Names of modules a loaded one
    imported are bound too, so a name shows the same whichever was asked for first.
    """
    from .._public import show_as_public

    for each, where in _WHERE.items():
        module = sys.modules.get(f"{__name__}.{where}")
        if module is None or each in globals() or not hasattr(module, each):  # (a module still being imported)
            continue
        globals()[each] = getattr(module, each)
        show_as_public(globals()[each], each, __name__)


def __dir__() -> list[str]:
    return __all__
