"""Tools that prove gridboost and its backends keep async resources honest. Needs pytest.

- :class:`BackendSuite`: the conformance suite every backend's tests subclass;
- :class:`EngineProbe` (and :class:`LocalProbe`): how a test reads the *engine's* state;
- :class:`FaultyBackend` with :class:`FaultPlan`/:class:`Fault`, and :class:`FaultyPlugin`:
  fault injection around any backend;
- the pytest plugin (``gridboost.testing.pytest_plugin``, loaded through the
  ``pytest11`` entry point): the ``grid``, ``grid_factory`` and ``no_leaks`` fixtures.
"""

from __future__ import annotations

from ._faulty import Fault, FaultPlan, FaultyBackend, FaultyPlugin, InjectedFault
from ._probe import EngineProbe, LocalProbe
from ._suite import BackendSuite, SuiteError

__all__ = [
    "BackendSuite",
    "EngineProbe",
    "Fault",
    "FaultPlan",
    "FaultyBackend",
    "FaultyPlugin",
    "InjectedFault",
    "LocalProbe",
    "SuiteError",
]
