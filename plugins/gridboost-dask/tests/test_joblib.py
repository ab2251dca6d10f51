"""joblib's ``"gridboost"`` backend on the Dask cluster: a ``Parallel`` call inside a boost runs inside the lease.

What runs in the lease is read from Dask's own state: the scheduler's resource restrictions of each task the call
submits (the lease's resource on its worker), and ``gridboost.current_lease()`` on the worker that ran each item.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from distributed import Client

import gridboost as gb
from conftest import SETTLE, eventually
from gridboost import Grid

pytest.importorskip("joblib")

from joblib import Parallel, delayed, parallel_config

from gridboost.joblib import NAME

# Dask's workers run what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.anyio


def lease_when(path: str, item: int) -> tuple[int, Any, str]:
    """Run on a worker: hold its thread until ``path`` exists (bounded), then the item, the lease it ran in, where."""
    import os
    import time

    from distributed import get_worker

    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return item, gb.current_lease(), str(get_worker().address)


def _restrictions_on_scheduler(prefix: str, dask_scheduler: Any = None) -> dict[str, dict[str, float]]:
    """On the scheduler: each task whose key starts with ``prefix``, with the resources it is restricted to."""
    return {
        str(key): dict(ts.resource_restrictions or {})
        for key, ts in dask_scheduler.tasks.items()
        if str(key).startswith(prefix)
    }


async def test_a_parallel_call_in_a_boost_runs_every_batch_in_its_lease(
    grid: Grid, dask_client: Client, tmp_path: Path
) -> None:
    """Through ``grid.executor()`` in a boost block, ``Parallel(n_jobs=-1)`` has the boost's CPUs; each batch the
    scheduler holds is restricted to the lease's resource, and each item runs on the lease's worker, in its lease."""
    go = tmp_path / "go"
    items = 6
    async with grid.boost("cpu=2", ttl=60) as boost:
        expected = gb.CurrentLease(boost.id, boost.token)
        lease_resource = f"{grid.backend.lease_prefix}{boost.id}"  # type: ignore[attr-defined]
        executor = grid.executor()
        prefix = grid.task_prefix
        assert prefix is not None and boost.token > 0
        out: list[Any] = []

        def search() -> None:
            with parallel_config(backend=NAME, executor=executor):
                out.append(Parallel(n_jobs=-1, batch_size=1)(delayed(lease_when)(str(go), i) for i in range(items)))

        async def held() -> dict[str, dict[str, float]]:
            found: dict[str, dict[str, float]] = await anyio.to_thread.run_sync(
                dask_client.run_on_scheduler, _restrictions_on_scheduler, prefix
            )
            return found

        async def two_batches_held() -> bool:
            return len(await held()) >= 2  # n_jobs=-1: the boost's two CPUs, two batches at once

        with anyio.fail_after(SETTLE * 3):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(anyio.to_thread.run_sync, search)
                try:
                    await eventually(two_batches_held, "the scheduler never held the call's batches")
                    restrictions = await held()
                    assert all(lease_resource in each for each in restrictions.values()), restrictions
                finally:
                    go.touch()  # the batches end, and the call with them
        [results] = out
        assert [(i, lease) for i, lease, _ in results] == [(i, expected) for i in range(items)]
        assert {where for _, _, where in results} <= set(boost.placements)
        assert not grid.closed
