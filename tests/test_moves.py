"""Queued work moves onto a boost when the boost becomes active, through the ``gridboost_offload_candidates`` hook."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import anyio
import pytest

import gridboost as gb
from gridboost._local import LocalBackend

pytestmark = pytest.mark.anyio


class Lab(LocalBackend):
    """A stand-in cluster for this test: local accounting, but reported as remote, so the host is a separate machine."""

    name = "lab"

    @property
    def capabilities(self) -> gb.abc.Capabilities:
        return gb.abc.Capabilities(remote=True)


class LabPlugin:
    @gb.hookimpl
    def gridboost_backends(self) -> Iterator[gb.BackendSpec]:
        yield gb.BackendSpec("lab", Lab, options={"capacity": "the lab's capacity"})


def hold(gate: threading.Event) -> str:
    gate.wait(20)
    return threading.current_thread().name


async def burst(grid: gb.Grid, gate: threading.Event, extra: int) -> list[gb.TaskHandle[str]]:
    """More cpu=1 tasks than the host holds: all are placed local in one step, so the surplus queues there."""
    slots = int(grid.local_available.cpu)
    handles = [grid.submit(hold, gate, resources="cpu=1") for _ in range(slots + extra)]
    with anyio.fail_after(5):
        while grid.local_available.cpu >= 1:  # the first ones have taken the host's capacity
            await anyio.sleep(0.01)
    return handles


def moved(handles: Sequence[gb.TaskHandle[str]]) -> list[gb.TaskHandle[str]]:
    return [h for h in handles if h.placement is not None and h.placement.kind == "boost"]


async def test_activation_moves_at_most_the_limit_of_queued_work() -> None:
    """A boost that becomes active takes up to ``auto_offload_limit`` queued tasks; started ones stay put."""
    gate = threading.Event()
    async with gb.Grid("lab", plugins=[LabPlugin()], capacity="cpu=8") as grid:
        handles = await burst(grid, gate, extra=8)
        started = [h for h in handles if h._run.started]
        async with grid.boost("cpu=4", ttl=30) as boost:
            gate.set()
            with anyio.fail_after(20):
                for handle in handles:
                    await handle
            assert len(moved(handles)) == 5
            assert all(h.placement.boost is boost for h in moved(handles))  # type: ignore[union-attr]
            assert all("moved onto boost" in h.placement.reason for h in moved(handles))  # type: ignore[union-attr]
            assert not set(moved(handles)) & set(started)
        assert grid.stats()["moves"] == 5
        assert grid.stats()["placed.boost"] == 5


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
    async with gb.Grid("lab", plugins=[LabPlugin(), OnlyTheNewest()], capacity="cpu=8") as grid:
        handles = await burst(grid, gate, extra=6)
        async with grid.boost("cpu=4", ttl=30):
            gate.set()
            with anyio.fail_after(20):
                for handle in handles:
                    await handle
            assert len(chosen) == 2
            assert sorted(h.id for h in moved(handles)) == sorted(chosen)
        # The hook was offered the six tasks that were still waiting, and chose among them.
        assert len(offered) == 6
        assert set(chosen) <= set(offered)


async def test_the_switch_takes_effect_at_once() -> None:
    """With ``grid.auto_offload = False`` nothing moves; switched back on, the next activation moves work again."""
    gate = threading.Event()
    async with gb.Grid("lab", plugins=[LabPlugin()], capacity="cpu=8") as grid:
        handles = await burst(grid, gate, extra=4)
        grid.auto_offload = False
        boost = await grid.request_boost("cpu=2", ttl=30)
        assert moved(handles) == []
        grid.auto_offload = True
        await grid.request_boost("cpu=2", ttl=30)
        assert grid.stats()["moves"] == 4
        gate.set()
        with anyio.fail_after(20):
            for handle in handles:
                await handle
        assert boost.is_active


async def test_a_failing_candidates_hook_leaves_the_boost_granted() -> None:
    """An exception in the candidates hook is logged; the boost is still granted and the queued work runs locally."""

    class Broken:
        @gb.hookimpl
        def gridboost_offload_candidates(self) -> None:
            raise RuntimeError("policy service down")

    gate = threading.Event()
    async with gb.Grid("lab", plugins=[LabPlugin(), Broken()], capacity="cpu=8") as grid:
        handles = await burst(grid, gate, extra=2)
        boost = await grid.request_boost("cpu=2", ttl=30)
        assert boost.is_active
        gate.set()
        with anyio.fail_after(20):
            for handle in handles:
                await handle
        assert moved(handles) == []
        assert grid.stats()["errors"] == 1
