"""The Ray backend passes the conformance suite every backend must pass, checked against Ray's own state."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import WORKER_CPUS, WORKERS, RayProbe
from gridboost.testing import BackendSuite, EngineProbe


class TestRayBackend(BackendSuite):
    # Ray reports task ends and group removals through its GCS, a little after the fact.
    SETTLE = 20.0

    @pytest.fixture
    def backend_name(self) -> str:
        return "ray"

    @pytest.fixture
    def grid_options(self, cluster_address: str) -> dict[str, Any]:
        return {"address": cluster_address, "grace": 1.0}

    @pytest.fixture
    def probe(self) -> EngineProbe:
        return RayProbe()

    @pytest.fixture
    def capacity_units(self) -> int:
        return WORKER_CPUS * len(WORKERS)
