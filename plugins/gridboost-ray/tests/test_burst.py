"""The burst, end to end on a real Ray cluster: 200 short tasks, 2 slots on the host, 8 on the cluster; all run, both places used."""

from __future__ import annotations

import os
import sys
import time

import anyio
import pytest
import ray

import gridboost as gb
from conftest import WORKER_CPUS, RayProbe, zone_node

# Ray's workers cannot import this module (see conftest): what they run of it travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]

TASKS = 200
SECONDS = 0.05
SLOT = gb.Resources(cpu=0.5)  # the session's cluster has two 2-CPU workers: 8 slots of half a CPU
HOST = "cpu=1"  # 2 slots on the host


class Calm(gb.Probe):
    """A quiet host, so that the placement under test depends on capacity alone, not on this shared machine's load."""

    def read(self) -> gb.Reading:
        return gb.Reading(cpu=0.1, memory=0.2)


def nap_where(seconds: float, driver: int) -> tuple[str, str | None]:
    """Run as a task: sleep, then say where it ran: the host (this test's process) or a Ray node, by its id."""
    time.sleep(seconds)
    if os.getpid() == driver:
        return "host", None
    return "ray", str(ray.get_runtime_context().get_node_id())


@pytest.mark.anyio
async def test_a_burst_uses_the_host_and_the_cluster(cluster_address: str, probe: RayProbe) -> None:
    """Every task completes; the host ran some (in this process), and Ray ran the rest on both worker nodes."""
    assert WORKER_CPUS * 2 / SLOT.cpu == 8
    with anyio.fail_after(180):
        async with gb.Grid("ray", address=cluster_address, grace=1.0, local_capacity=HOST, probe=Calm()) as grid:
            assert grid.cluster_available is not None and grid.cluster_available.cpu == 2 * WORKER_CPUS
            handles = [grid.submit(nap_where, SECONDS, os.getpid(), resources=SLOT) for _ in range(TASKS)]
            # Decided one by one as submitted: the host's 2 slots, the cluster's 8 and half as many again to queue
            # there (cluster_queue=0.5), then the rest waits here and moves to the first room that frees.
            kinds = [h.placement.kind for h in handles[:15]]  # type: ignore[union-attr]
            assert kinds == ["local"] * 2 + ["cluster"] * 12 + ["local"]
            results = [await h for h in handles]
            stats = grid.stats()
            # Everything given back: the books are whole again.
            assert grid.local_available == gb.Resources.parse(HOST)
            assert grid.cluster_available.cpu == 2 * WORKER_CPUS
    assert len(results) == TASKS and stats["tasks.succeeded"] == TASKS
    on_host = [r for r in results if r[0] == "host"]
    on_ray = [r for r in results if r[0] == "ray"]
    assert len(on_host) >= 2 and len(on_ray) >= 8 and len(on_host) + len(on_ray) == TASKS
    assert {node for _, node in on_ray} == {zone_node("a"), zone_node("b")}
    # Each task's final placement says where it ran.
    assert sum(h.placement.kind == "cluster" for h in handles) == len(on_ray)  # type: ignore[union-attr]
    assert stats["moves.cluster"] == len(on_ray) - 12  # beyond the first twelve, each took a freed cluster slot
    with anyio.fail_after(30):
        while await probe.reservations(grid) or await probe.running(grid):
            await anyio.sleep(0.1)
