"""Closing a grid with work in flight: at the moment ``async with`` returns, Dask shows nothing of the grid.

Every check reads Dask's own state: the scheduler's tasks, its books of worker resources (lease marks) and the lease
registry's records, and each worker's own tasks and resources.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import cloudpickle
import pytest
from distributed import Client

import gridboost as gb
from conftest import SETTLE, DaskProbe, eventually
from gridboost import Grid

# Dask's workers run what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def pause(seconds: float) -> None:
    time.sleep(seconds)


def _ours_on_scheduler(prefix: str, lease_prefix: str, session: str, dask_scheduler: Any = None) -> list[str]:
    """On the scheduler: its tasks, lease marks (any amount) and lease records of one backend, by Dask's own books."""
    registry = dask_scheduler.plugins.get("gridboost-leases")
    records = registry.leases.values() if registry is not None else []
    return [
        *(f"task {key}" for key in dask_scheduler.tasks if str(key).startswith(prefix)),
        *(
            f"mark {name} on {addr}"
            for addr, ws in dask_scheduler.workers.items()
            for name in ws.resources
            if name.startswith(lease_prefix)
        ),
        *(f"record {r['id']}" for r in records if r["session"] == session),
    ]


def _ours_on_worker(prefix: str, lease_prefix: str, dask_worker: Any = None) -> list[str]:
    """On a worker: its tasks (cancelled ones still running included) and lease marks of one backend."""
    state = dask_worker.state
    return [
        *(f"task {key} ({ts.state})" for key, ts in state.tasks.items() if str(key).startswith(prefix)),
        *(f"mark {name}" for name in state.total_resources if name.startswith(lease_prefix)),
    ]


def engine_shows(client: Client, backend: Any) -> list[str]:
    """Everything the scheduler and every worker show of ``backend``, read from their own state."""
    found = client.run_on_scheduler(_ours_on_scheduler, backend.prefix, backend.lease_prefix, backend.session)
    for addr, items in client.run(_ours_on_worker, backend.prefix, backend.lease_prefix).items():
        found += [f"{addr}: {item}" for item in items]
    return list(found)


@pytest.mark.anyio
class TestTeardown:
    async def test_a_grid_closing_with_work_in_flight_leaves_the_engine_showing_nothing_of_it(
        self, cluster_address: str, probe: DaskProbe, dask_client: Client
    ) -> None:
        """With 1000 tasks in flight and 3 boosts, at the moment ``async with`` returns neither the scheduler nor any
        worker shows a task, a lease mark or a lease record of the grid."""
        async with Grid("dask", address=cluster_address) as grid:
            boosts = [await grid.request_boost("cpu=1", ttl=60) for _ in range(3)]
            places = [*boosts, "cluster"]
            handles = [grid.submit(pause, 0.2, where=places[i % len(places)]) for i in range(1000)]

            async def some_run() -> bool:
                return bool(await probe.running(grid))

            await eventually(some_run, "none of the 1000 tasks started")
        assert sum(handle.done() for handle in handles) == len(handles)
        assert await anyio.to_thread.run_sync(engine_shows, dask_client, grid.backend) == []

    async def test_a_boost_release_returns_once_no_worker_shows_its_lease(
        self, grid: Grid, probe: DaskProbe, dask_client: Client
    ) -> None:
        """Released while its cancelled task still runs on a worker thread, a boost's release returns only once the
        scheduler and every worker have let its mark go."""
        boost = await grid.request_boost("cpu=1", ttl=60)
        handle = grid.submit(pause, 2.0, where=boost)

        async def running() -> bool:
            return handle.id in await probe.running(grid)

        await eventually(running, "the boost's task never started")
        handle.cancel()
        with anyio.fail_after(SETTLE), pytest.raises(gb.TaskCancelled):
            await handle
        await boost.release()
        shown = await anyio.to_thread.run_sync(engine_shows, dask_client, grid.backend)
        assert not [item for item in shown if "mark" in item or "record" in item]
