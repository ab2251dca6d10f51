"""Queued work moves: onto a boost as it becomes active (limit, backoff, live switch, the candidates hook), and into room that frees."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import anyio
import pytest

import gridboost as gb
from _lab import WAIT, QueueHere, hold, lab_grid, settle

pytestmark = pytest.mark.anyio


async def burst(grid: gb.Grid, gate: threading.Event, n: int) -> list[gb.TaskHandle[str]]:
    """``n`` cpu=1 tasks that all wait for local capacity (QueueHere); the host's two slots start two of them."""
    handles = [grid.submit(hold, gate, resources="cpu=1") for _ in range(n)]
    await settle(lambda: sum(h._run.started for h in handles) == 2, "the host did not start its two tasks")
    return handles


def moved(handles: Sequence[gb.TaskHandle[str]]) -> list[gb.TaskHandle[str]]:
    return [h for h in handles if h.placement is not None and h.placement.kind == "boost"]


async def finish(gate: threading.Event, handles: Sequence[gb.TaskHandle[str]]) -> None:
    gate.set()
    with anyio.fail_after(WAIT):
        for handle in handles:
            await handle


async def test_activation_moves_at_most_the_limit_of_queued_work() -> None:
    """A boost that becomes active takes up to ``auto_offload_limit`` queued tasks, oldest first; started ones stay put."""
    gate = threading.Event()
    async with lab_grid("cpu=16", plugins=[QueueHere()]) as grid:
        handles = await burst(grid, gate, 10)
        started = [h for h in handles if h._run.started]
        boost = await grid.request_boost("cpu=8", ttl=30)
        assert grid.stats()["moves"] == 5 and grid.stats()["moves.boost"] == 5
        assert moved(handles) == [h for h in handles if not h._run.started][:5]  # the oldest five
        assert all(h.placement.boost is boost for h in moved(handles))  # type: ignore[union-attr]
        assert all("moved onto boost" in h.placement.reason for h in moved(handles))  # type: ignore[union-attr]
        assert not set(moved(handles)) & set(started)
        assert all(h.placement.kind == "local" for h in started)  # type: ignore[union-attr]
        await finish(gate, handles)
    assert grid.stats()["placed.boost"] >= 5


async def test_moves_respect_the_boosts_room() -> None:
    """A boost never takes more queued work than it has room for, whatever the limit."""
    gate = threading.Event()
    async with lab_grid("cpu=16", plugins=[QueueHere()], auto_offload_limit=10) as grid:
        handles = await burst(grid, gate, 10)
        boost = await grid.request_boost("cpu=3", ttl=30)
        assert len(moved(handles)) == 3
        assert boost.available == gb.Resources()
        await finish(gate, handles)


async def test_moves_follow_the_plugin_choice() -> None:
    """A plugin implementing ``gridboost_offload_candidates`` decides which queued tasks move."""
    chosen: list[str] = []
    offered: list[str] = []

    class OnlyTheNewest:
        @gb.hookimpl
        def gridboost_offload_candidates(self, queued: Sequence[gb.TaskSpec], limit: int) -> list[gb.TaskSpec]:
            offered.extend(t.id for t in queued)
            newest = sorted(queued, key=lambda t: t.submitted_at)[-2:]
            chosen.extend(t.id for t in newest)
            return newest

    gate = threading.Event()
    async with lab_grid("cpu=16", plugins=[QueueHere(), OnlyTheNewest()]) as grid:
        handles = await burst(grid, gate, 8)
        await grid.request_boost("cpu=4", ttl=30)
        assert len(chosen) == 2
        assert sorted(h.id for h in moved(handles)) == sorted(chosen)
        # The hook was offered the six tasks that were still waiting, and chose among them.
        assert len(offered) == 6
        assert set(chosen) <= set(offered)
        await finish(gate, handles)


async def test_activations_in_a_burst_back_off() -> None:
    """Each activation within ``auto_offload_backoff`` of the one before gets half its budget: 4, 2, 1, 1."""
    gate = threading.Event()
    async with lab_grid("cpu=32", plugins=[QueueHere()], auto_offload_limit=4, auto_offload_backoff=60) as grid:
        handles = await burst(grid, gate, 14)
        counts = []
        for _ in range(4):
            before = grid.stats()["moves"]
            await grid.request_boost("cpu=4", ttl=30)
            counts.append(grid.stats()["moves"] - before)
        assert counts == [4, 2, 1, 1]
        await finish(gate, handles)


async def test_a_quiet_spell_resets_the_backoff() -> None:
    """Once ``auto_offload_backoff`` seconds pass without a move, an activation gets the whole limit again."""
    gate = threading.Event()
    async with lab_grid("cpu=32", plugins=[QueueHere()], auto_offload_limit=3, auto_offload_backoff=0.05) as grid:
        handles = await burst(grid, gate, 10)
        await grid.request_boost("cpu=4", ttl=30)
        await anyio.sleep(0.1)
        await grid.request_boost("cpu=4", ttl=30)
        assert grid.stats()["moves"] == 6
        await finish(gate, handles)


async def test_the_switch_takes_effect_at_once() -> None:
    """With ``grid.auto_offload = False`` nothing moves; switched back on, the next activation moves work again."""
    gate = threading.Event()
    async with lab_grid("cpu=16", plugins=[QueueHere()], auto_offload_backoff=0) as grid:
        handles = await burst(grid, gate, 6)
        grid.auto_offload = False
        boost = await grid.request_boost("cpu=2", ttl=30)
        assert moved(handles) == []
        grid.auto_offload = True
        await grid.request_boost("cpu=2", ttl=30)
        assert grid.stats()["moves"] == 2
        await finish(gate, handles)
        assert boost.is_active


async def test_a_failing_candidates_hook_leaves_the_boost_granted() -> None:
    """An exception in the candidates hook is logged; the boost is still granted and the queued work runs locally."""

    class Broken:
        @gb.hookimpl
        def gridboost_offload_candidates(self) -> None:
            raise RuntimeError("policy service down")

    gate = threading.Event()
    async with lab_grid("cpu=16", plugins=[QueueHere(), Broken()]) as grid:
        handles = await burst(grid, gate, 4)
        boost = await grid.request_boost("cpu=2", ttl=30)
        assert boost.is_active
        grid.auto_offload = False  # no refill into the boost either: the work stays here
        await finish(gate, handles)
        assert moved(handles) == []
        assert grid.stats()["errors"] == 1


async def test_waiting_work_moves_into_cluster_room_that_frees() -> None:
    """When a cluster task ends, the oldest task waiting for local capacity takes its room, before it starts here."""
    gates = [threading.Event() for _ in range(4)]
    async with lab_grid("cpu=2", "cpu=1") as grid:
        handles = [grid.submit(hold, gate, resources="cpu=1") for gate in gates]
        kinds = [(h.placement.kind, h.placement.waiting) for h in handles]  # type: ignore[union-attr]
        assert kinds == [("local", False), ("cluster", False), ("cluster", False), ("local", True)]
        assert "waiting for local capacity" in handles[3].placement.reason  # type: ignore[union-attr]
        # Of the two placed here, one took the host's slot; the other waits (which one is the event loop's choice).
        await settle(lambda: handles[0]._run.started or handles[3]._run.started, "the host started nothing")
        waiting = handles[3] if handles[0]._run.started else handles[0]
        gates[1].set()
        with anyio.fail_after(WAIT):
            await handles[1]
        assert waiting.placement.kind == "cluster"  # type: ignore[union-attr]
        assert "room freed" in waiting.placement.reason  # type: ignore[union-attr]
        assert grid.stats()["moves.cluster"] == 1
        for gate in gates:
            gate.set()
        with anyio.fail_after(WAIT):
            for handle in handles:
                await handle


async def test_work_that_started_never_moves() -> None:
    """Tasks already running here stay here whatever room appears elsewhere."""
    gate = threading.Event()
    async with lab_grid("cpu=16", plugins=[QueueHere()], auto_offload_limit=10) as grid:
        handles = await burst(grid, gate, 2)
        await grid.request_boost("cpu=4", ttl=30)
        assert moved(handles) == [] and grid.stats()["moves"] == 0
        await finish(gate, handles)
    assert all(h.placement.kind == "local" for h in handles)  # type: ignore[union-attr]


async def test_bad_backoff_is_refused() -> None:
    """A negative or non-numeric ``auto_offload_backoff`` is refused with a typed error naming it."""
    for bad in (-1, "soon", float("nan")):
        with pytest.raises(gb.InvalidRequest, match="auto_offload_backoff"):
            lab_grid(auto_offload_backoff=bad)
