"""``gridboost.Executor`` over Dask keeps the ``concurrent.futures`` contract (the core's ``ExecutorSuite``)."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import WORKER_THREADS, WORKERS
from gridboost.testing import ExecutorSuite


class TestDaskExecutor(ExecutorSuite):
    ENGINE_THREADS = ("Dask-Offload",)  # distributed's process-wide pool, started once, kept for good

    @pytest.fixture
    def backend_name(self) -> str:
        return "dask"

    @pytest.fixture
    def grid_options(self, cluster_address: str) -> dict[str, Any]:
        # One CPU here and no queue at the engine beyond its threads: work past that waits here, pending.
        return {"address": cluster_address, "local_capacity": "cpu=1", "cluster_queue": 0, "grace": 1.0}

    @pytest.fixture
    def capacity_units(self) -> int:
        return 1 + WORKER_THREADS * len(WORKERS)
