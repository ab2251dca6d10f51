"""Closing a grid with work in flight: at the moment ``async with`` returns, Ray shows nothing of the grid.

Every check reads Ray's own state: its task table (the task events the GCS keeps), its placement group table, and
the lease keeper actor's records.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import pytest
import ray
from gridboost_ray._leases import KEEPER_NAME, KEEPER_NAMESPACE
from ray.util.placement_group import placement_group_table

from conftest import RayProbe, unended
from gridboost import Grid

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]

pytestmark = pytest.mark.anyio

# Many more than the cluster runs at once (four CPUs): most wait in Ray's queue, a few run, blocked in C.
IN_FLIGHT = 500
SETTLE = 30.0


def sleeper() -> None:
    time.sleep(600)  # blocked in C: a polite cancel cannot reach it, only the force can


def held_groups(prefix: str) -> set[str]:
    return {row["name"] for row in placement_group_table().values() if row["name"].startswith(prefix)} - {
        row["name"] for row in placement_group_table().values() if row["state"] == "REMOVED"
    }


def keeper_ids() -> set[str]:
    try:
        keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    except ValueError:  # no keeper runs: it holds nothing
        return set()
    return {record["id"] for record in ray.get(keeper.leases.remote(), timeout=SETTLE)}


async def test_exit_with_many_tasks_in_flight_and_boosts_leaves_nothing_in_ray(
    cluster_address: str, probe: RayProbe
) -> None:
    """With hundreds of tasks in flight (some running, blocked in C) and three boosts held, the grid's exit returns
    only once Ray's task table shows every task of it ended, its groups removed and the keeper without its records."""
    async with Grid("ray", address=cluster_address) as grid:
        backend, prefix = grid.backend, grid.task_prefix
        assert prefix
        boosts = [await grid.request_boost("cpu=0.25", ttl=600) for _ in range(3)]
        handles = [grid.submit(sleeper, where="cluster") for _ in range(IN_FLIGHT)]
        with anyio.move_on_after(SETTLE):
            while not await probe.running(grid):
                await anyio.sleep(0.05)
        assert await probe.running(grid), f"no task of the grid started running within {SETTLE:g}s"
    # Read at once, in this thread: nothing may run between the exit and these reads.
    left: dict[str, Any] = {
        "tasks not ended": unended(backend),
        "groups": held_groups(prefix),
        "keeper records": keeper_ids() & {b.id for b in boosts},
    }
    assert not any(left.values()), left
    assert all(handle.done() for handle in handles)


async def test_a_running_callable_blocked_in_c_is_forced_after_cancel_grace_not_grace(
    cluster_address: str, probe: RayProbe
) -> None:
    """With a commands' ``grace`` of a minute, a task blocked in C still ends within seconds of the grid's exit:
    callables get ``cancel_grace`` (default 0.5 s) between the polite cancel and the force."""
    async with Grid("ray", address=cluster_address, grace=60) as grid:
        backend = grid.backend
        grid.submit(sleeper, where="cluster")
        with anyio.move_on_after(SETTLE):
            while not await probe.running(grid):
                await anyio.sleep(0.05)
        assert await probe.running(grid), f"the task did not start running within {SETTLE:g}s"
        started = time.monotonic()
    took = time.monotonic() - started
    assert not unended(backend)
    # Far below the minute of grace, whatever the machine's load: the force came after cancel_grace.
    assert took < 30, took
