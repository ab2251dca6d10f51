"""Where ``where="auto"`` work goes: the default policy's decisions, table-driven, and a burst that really spreads."""

from __future__ import annotations

import functools
import threading
from typing import Any

import anyio
import pytest

import gridboost as gb
from _lab import WAIT, ScriptedProbe, hold, lab_grid, quick

pytestmark = pytest.mark.anyio

CALM = gb.Reading(cpu=0.1, memory=0.2)
BUSY_CPU = gb.Reading(cpu=0.95, memory=0.2)
SWAPPING = gb.Reading(cpu=0.1, memory=0.5, swap=0.97)
BUSY_GPU = gb.Reading(
    cpu=0.1, memory=0.2, gpus=[gb.GpuReading(0, "test GPU", utilization=0.99, memory_used=1, memory_total=10)]
)

# (case, reading, host claimed, cluster claimed, boost (size, claimed) or None, task, expected kind, waiting, reason)
CASES: list[tuple[str, gb.Reading, str, str, tuple[str, str] | None, str, str, bool, str]] = [
    ("fits here", CALM, "", "", None, "cpu=1", "local", False, "fits in free local capacity"),
    ("fits exactly", CALM, "cpu=1", "", None, "cpu=1", "local", False, "fits in free local capacity"),
    ("host full", CALM, "cpu=2", "", None, "cpu=1", "cluster", False, "local capacity is short of cpu=1"),
    ("too big for the host", CALM, "", "", None, "cpu=3", "cluster", False, "short of cpu=1"),
    ("cpu pressure", BUSY_CPU, "", "", None, "cpu=1", "cluster", False, "local pressure is high (cpu"),
    ("memory incl. swap", SWAPPING, "", "", None, "cpu=1", "cluster", False, "local pressure is high (memory"),
    ("busy GPU, CPU work", BUSY_GPU, "", "", None, "cpu=1", "local", False, "fits in free local capacity"),
    ("busy GPU, GPU work", BUSY_GPU, "", "", None, "cpu=1,gpu=1", "cluster", False, "high (gpu"),
    ("boost with room", CALM, "cpu=2", "", ("cpu=2", ""), "cpu=1", "boost", False, "has room"),
    ("boost full, cluster room", CALM, "cpu=2", "", ("cpu=2", "cpu=2"), "cpu=1", "cluster", False, "cluster has"),
    ("pressure, boost room", BUSY_CPU, "", "", ("cpu=2", "cpu=1"), "cpu=1", "boost", False, "has room"),
    ("no room anywhere", CALM, "cpu=2", "cpu=6", None, "cpu=1", "local", True, "waiting for local capacity"),
    ("pressure, no room", BUSY_CPU, "", "cpu=6", None, "cpu=1", "local", True, "waiting for local capacity"),
    ("boost and cluster full", CALM, "cpu=2", "cpu=4", ("cpu=2", "cpu=2"), "cpu=1", "local", True, "waiting"),
    ("nothing declared", BUSY_CPU, "cpu=2", "cpu=6", None, "", "cluster", False, "cluster has room"),
]


def default_placement(grid: gb.Grid, task: gb.TaskSpec) -> gb.Placement:
    """The grid's own default policy's decision (the hook's last resort), asked directly."""
    return grid._policy.place(task)


@pytest.mark.parametrize(
    ("reading", "host", "cluster", "boost", "task", "kind", "waiting", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_default_placement(
    reading: gb.Reading,
    host: str,
    cluster: str,
    boost: tuple[str, str] | None,
    task: str,
    kind: str,
    waiting: bool,
    reason: str,
) -> None:
    """The default policy, given the host's and the cluster's room, a boost's, and the pressure, decides as the table says."""
    async with lab_grid("cpu=6,gpu=1", "cpu=2,gpu=1", probe=ScriptedProbe([reading])) as grid:
        await grid.pressure()
        dispatch = grid._dispatch
        dispatch.local.take(gb.Resources.parse(host or "nothing"))
        dispatch.cluster.take(gb.Resources.parse(cluster or "nothing"))
        held = None
        if boost is not None:
            held = await grid.request_boost(boost[0], ttl=30)
            held._ledger.take(gb.Resources.parse(boost[1] or "nothing"))
        placement = default_placement(grid, gb.TaskSpec(abs, resources=task or None))
        assert (placement.kind, placement.waiting) == (kind, waiting)
        assert reason in placement.reason
        assert placement.boost is (held if kind == "boost" else None)


async def test_the_enclosing_boost_block_comes_first() -> None:
    """Inside ``async with grid.boost(...)`` automatic work goes into that boost, whatever the host's room."""
    async with lab_grid() as grid, grid.boost("cpu=1", ttl=30) as boost:
        placement = default_placement(grid, gb.TaskSpec(abs, resources="cpu=1"))
        assert placement.kind == "boost" and placement.boost is boost and "enclosing" in placement.reason


async def test_a_backend_that_is_this_machine_runs_everything_here() -> None:
    """With the local backend there is nowhere else: the policy says so, and pressure is never needed."""
    async with gb.Grid(capacity="cpu=2") as grid:
        placement = default_placement(grid, gb.TaskSpec(abs, resources="cpu=1"))
        assert placement == gb.Placement("local", "the backend is this machine")
        assert not grid._monitor.started


async def test_every_decision_reaches_the_observer_with_its_reason() -> None:
    """Each placement, moves included, is told to ``gridboost_task_placed``; every one carries a reason."""
    seen: list[gb.Placement] = []

    class Watcher:
        @gb.hookimpl
        def gridboost_task_placed(self, placement: gb.Placement) -> None:
            seen.append(placement)

    gates = [threading.Event() for _ in range(4)]
    async with lab_grid("cpu=2", "cpu=1", plugins=[Watcher()]) as grid:
        handles = [grid.submit(hold, gate, resources="cpu=1") for gate in gates]
        gates[1].set()
        for gate in gates:
            gate.set()
        with anyio.fail_after(WAIT):
            for handle in handles:
                await handle
        stats = grid.stats()
    assert all(p.reason for p in seen)
    assert {p.kind for p in seen} == {"local", "cluster"}
    assert len(seen) == 4 + stats["moves"]
    assert stats["placed.local"] + stats["placed.cluster"] == len(seen)


async def test_a_burst_spreads_over_host_and_cluster() -> None:
    """200 tasks with 2 host slots and 8 on the cluster: decided one by one as submitted, all run, both places used."""
    async with lab_grid("cpu=8", "cpu=2") as grid:
        handles = [grid.submit(quick, 0.002, resources="cpu=1") for _ in range(200)]
        first = [(h.placement.kind, h.placement.waiting) for h in handles[:11]]  # type: ignore[union-attr]
        assert first == [("local", False)] * 2 + [("cluster", False)] * 8 + [("local", True)]
        with anyio.fail_after(60):
            results = [await h for h in handles]
        stats = grid.stats()
    assert results == [0.002] * 200
    final: dict[str, int] = {}
    for handle in handles:
        final[handle.placement.kind] = final.get(handle.placement.kind, 0) + 1  # type: ignore[union-attr]
    assert final.get("local", 0) >= 2 and final.get("cluster", 0) >= 8 and sum(final.values()) == 200
    assert stats["tasks.succeeded"] == 200
    assert stats["placed.waiting"] == 190
    assert grid.local_available == gb.Resources(cpu=2)


async def test_the_cluster_gets_a_short_queue_beyond_its_room() -> None:
    """With ``cluster_queue=0.5`` the engine is handed half its capacity again to queue; beyond that, work waits here."""
    async with lab_grid("cpu=4", "cpu=1", cluster_queue=0.5) as grid:
        gate = threading.Event()
        handles = [grid.submit(hold, gate, resources="cpu=1") for _ in range(9)]
        kinds = [(h.placement.kind, h.placement.waiting) for h in handles]  # type: ignore[union-attr]
        assert kinds == [("local", False)] + [("cluster", False)] * 6 + [("local", True)] * 2
        assert grid.cluster_available == gb.Resources()  # the queue is never counted as free
        gate.set()
        with anyio.fail_after(WAIT):
            for handle in handles:
                await handle


@pytest.mark.parametrize("bad", [-0.1, 11, "half", True])
def test_a_bad_cluster_queue_is_refused(bad: Any) -> None:
    """``cluster_queue`` is a fraction of the cluster's capacity, 0..10; anything else is refused naming it."""
    with pytest.raises(gb.InvalidRequest, match="cluster_queue"):
        lab_grid(cluster_queue=bad)


async def test_offload_bursts_are_accounted_one_by_one() -> None:
    """``await grid.offload`` from many tasks at once: each is placed as it starts, so the host's two slots are not oversold."""
    placed: list[gb.Placement] = []

    class Watcher:
        @gb.hookimpl
        def gridboost_task_placed(self, placement: gb.Placement) -> None:
            placed.append(placement)

    async with lab_grid("cpu=8", "cpu=2", plugins=[Watcher()]) as grid, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(functools.partial(grid.offload, quick, 0.01, resources="cpu=1"))
    first = placed[:10]
    assert [p.kind for p in first].count("local") == 2 and [p.kind for p in first].count("cluster") == 8


@pytest.mark.parametrize(("local", "message"), [("cpu=-1", "cpu must not be negative"), (7, "resources must be")])
def test_bad_local_capacity_is_refused(local: Any, message: str) -> None:
    """A bad ``local_capacity`` is a typed error naming the problem."""
    with pytest.raises(gb.InvalidRequest, match=message):
        lab_grid(local=local)


def test_local_capacity_is_for_remote_backends() -> None:
    """The local backend is this machine: ``local_capacity`` there is refused, pointing at its own option."""
    with pytest.raises(gb.InvalidRequest, match="local_capacity is for remote backends"):
        gb.Grid(local_capacity="cpu=1")


async def test_a_bad_placement_from_a_plugin_leaves_the_ledgers_clean() -> None:
    """A placement hook that fails claims nothing: the host's room is whole afterwards."""

    class Broken:
        @gb.hookimpl
        def gridboost_choose_placement(self) -> None:
            raise RuntimeError("no")

    async with lab_grid(plugins=[Broken()]) as grid:
        with pytest.raises(gb.PolicyError):
            grid.submit(abs, 1, resources="cpu=1")
        with pytest.raises(gb.PolicyError):
            await grid.offload(abs, 1, resources="cpu=1")
        assert grid.local_available == gb.Resources(cpu=2)
        assert grid.cluster_available == gb.Resources(cpu=8)
