"""The local backend passes the conformance suite every backend must pass."""

from __future__ import annotations

from typing import Any

import pytest

import gridboost as gb
from gridboost.testing import BackendSuite, EngineProbe, LocalProbe


class TestLocalBackend(BackendSuite):
    @pytest.fixture
    def backend_name(self) -> str:
        return "local"

    @pytest.fixture
    def grid_options(self) -> dict[str, Any]:
        return {"capacity": "cpu=2,memory=4GiB", "grace": 0.5}

    @pytest.fixture
    def probe(self) -> EngineProbe:
        return LocalProbe()

    @pytest.fixture
    def unit(self) -> gb.Resources:
        return gb.Resources(cpu=1)

    @pytest.fixture
    def capacity_units(self) -> int:
        return 2


class TestLocalBackendProcessExecutor(TestLocalBackend):
    """The process executor interrupts running callables, so the suite checks that too."""

    @pytest.fixture
    def grid_options(self) -> dict[str, Any]:
        return {"capacity": "cpu=2,memory=4GiB", "grace": 0.5, "executor": "process", "max_workers": 4}
