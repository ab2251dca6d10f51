"""The Dask backend passes the conformance suite every backend must pass, checked against Dask's own state."""

from __future__ import annotations

from typing import Any

import pytest
from distributed import Client

from conftest import WORKER_THREADS, WORKERS, DaskProbe
from gridboost.testing import BackendSuite, EngineProbe


class TestDaskBackend(BackendSuite):
    # Workers report what they run through the scheduler's heartbeat and the run RPC, a moment after the fact.
    SETTLE = 20.0

    @pytest.fixture
    def backend_name(self) -> str:
        return "dask"

    @pytest.fixture
    def grid_options(self, cluster_address: str) -> dict[str, Any]:
        return {"address": cluster_address, "grace": 1.0, "watch_interval": 0.5}

    @pytest.fixture
    def probe(self, dask_client: Client) -> EngineProbe:
        return DaskProbe(dask_client)

    @pytest.fixture
    def capacity_units(self) -> int:
        return WORKER_THREADS * len(WORKERS)
