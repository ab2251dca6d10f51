"""Reservations the engine loses on its own, and the lease registry the engine keeps."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import anyio
import pytest

import gridboost as gb
from gridboost import _plugins
from gridboost._local import LocalBackend
from gridboost.testing import FaultPlan, FaultyBackend, FaultyPlugin, HookLog, nap

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=4GiB"


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load no entry-point plugins, so what is installed in the venv cannot interfere."""
    monkeypatch.setenv(_plugins.LOAD_ENV, "")


def faulty_grid(*plugins: Any) -> gb.Grid:
    return gb.Grid("faulty", plugins=[FaultyPlugin(FaultPlan([])), *plugins], capacity=CAPACITY)


def parts(grid: gb.Grid) -> tuple[FaultyBackend, LocalBackend]:
    backend = grid.backend
    assert isinstance(backend, FaultyBackend)
    assert isinstance(backend.inner, LocalBackend)
    return backend, backend.inner


async def test_lost_reservation_fails_the_boost_and_its_work() -> None:
    """A reservation the engine reports lost fails its boost, stops its work with BoostLost, and fires the hook."""
    failures = HookLog()
    async with faulty_grid(failures) as grid:
        backend, engine = parts(grid)
        boost = await grid.request_boost("cpu=1", ttl=60)
        handle = grid.submit(nap, 30, where=boost)
        with anyio.fail_after(10):
            while not engine.running_tasks():
                await anyio.sleep(0.01)
        await backend.lose_reservation(boost.id, "node n1 died")
        assert boost.state is gb.BoostState.FAILED
        assert isinstance(boost.error, gb.BoostLost)
        assert "node n1 died" in str(boost.error)
        with pytest.raises(gb.BoostLost, match=f"boost {boost.id} lost its reservation"):
            await handle
        assert await engine.reservations() == []
        assert grid.boosts == ()
        assert grid.stats()["boosts.failed"] == 1
        with anyio.fail_after(5):
            while not failures.failed:
                await anyio.sleep(0.01)
        assert [(b.id, e) for b, e in failures.failed] == [(boost.id, boost.error)]
        assert await grid.offload(sum, [1, 2], where="cluster") == 3  # the grid is still usable


async def test_loss_of_an_ended_boost_is_ignored() -> None:
    """A loss reported for a boost already released changes nothing and fires no hook."""
    failures = HookLog()
    async with faulty_grid(failures) as grid:
        backend, _ = parts(grid)
        boost = await grid.request_boost("cpu=1", ttl=60)
        await boost.release()
        await backend.lose_reservation(boost.id)
        await backend.lose_reservation("boost-not-ours")
        assert boost.state is gb.BoostState.RELEASED
        assert grid.stats()["boosts.failed"] == 0
    assert failures.failed == []


async def test_lose_reservation_needs_a_watching_grid() -> None:
    """Without a grid watching it, the fault backend refuses to report a loss, by name."""
    backend = FaultyBackend(LocalBackend(capacity=CAPACITY), plan=FaultPlan([]))
    with pytest.raises(gb.InvalidRequest, match="no grid is watching"):
        await backend.lose_reservation("boost-1")


async def test_local_leases_are_the_grids_active_boosts() -> None:
    """The local engine lists each held boost as a lease owned by this process, with its TTL, until released."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        before = time.time()
        boost = await grid.request_boost("cpu=1", ttl=60, priority=gb.Priority.HIGH)
        (lease,) = await grid.leases()
        assert (lease.id, lease.backend, lease.state, lease.priority) == (boost.id, "local", "active", gb.Priority.HIGH)
        assert lease.resources == gb.Resources(cpu=1)
        assert lease.owner == f"{socket.gethostname()}:{os.getpid()}"
        assert before + 60 <= lease.expires_at <= time.time() + 60
        assert 0 < lease.ttl_left <= 60
        await boost.renew(600)
        (renewed,) = await grid.leases()
        assert renewed.expires_at >= before + 600
        await boost.release()
        assert await grid.leases() == []


async def test_leases_of_a_closed_grid_are_refused() -> None:
    """Asking a closed grid for leases raises GridClosed."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        pass
    with pytest.raises(gb.GridClosed):
        await grid.leases()


async def preemptible_with_work(grid: gb.Grid, seconds: float) -> tuple[gb.Boost, gb.TaskHandle[Any]]:
    """A preemptible boost and a task napping ``seconds`` inside it, once the engine runs the task."""
    _, engine = parts(grid)
    boost = await grid.request_boost("cpu=1", ttl=60, preemptible=True)
    handle = grid.submit(nap, seconds, where=boost)
    with anyio.fail_after(10):
        while not engine.running_tasks():
            await anyio.sleep(0.01)
    return boost, handle


class SeesTheNotice:
    """A plugin that reads, at the notice, what a preempted boost says of itself."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, gb.BoostState, float]] = []

    @gb.hookimpl
    def gridboost_boost_preempted(self, boost: gb.Boost, grace: float) -> None:
        self.seen.append((boost.id, boost.state, grace))


async def test_a_preempted_boost_refuses_new_work_lets_work_finish_within_its_grace_then_ends() -> None:
    """At the notice the hook fires and new work is refused; work that ends within the grace keeps its result."""
    log, notice = HookLog(), SeesTheNotice()
    async with faulty_grid(log, notice) as grid:
        backend, engine = parts(grid)
        boost, quick = await preemptible_with_work(grid, 0.3)
        await backend.preempt_reservation(boost.id, grace=5.0, reason="taken for a CRITICAL request")
        assert boost.state is gb.BoostState.PREEMPTED
        assert [(a["boost"], a["grace"]) for a in log.of("boost_preempted")] == [(boost, 5.0)]
        assert notice.seen == [(boost.id, gb.BoostState.PREEMPTED, 5.0)]
        with pytest.raises(gb.BoostPreempted, match=f"boost {boost.id} was preempted"):
            await grid.offload(nap, 0, where=boost)
        with pytest.raises(gb.BoostPreempted):
            await boost.renew(30)
        await quick  # finished inside the grace: its result stands
        with anyio.fail_after(5):  # its work is done, so the boost ends before the grace is over
            while grid.boosts:
                await anyio.sleep(0.01)
        assert await engine.reservations() == []
        assert grid.stats()["boosts.preempted"] == 1
        assert log.of("boost_released") == [] and log.failed == []


async def test_work_still_running_when_the_grace_ends_gets_boost_preempted() -> None:
    """What has not finished when the grace is over is stopped with BoostPreempted, and the reservation goes."""
    async with faulty_grid() as grid:
        backend, engine = parts(grid)
        boost, slow = await preemptible_with_work(grid, 30)
        started = time.monotonic()
        await backend.preempt_reservation(boost.id, grace=0.5)
        with pytest.raises(gb.BoostPreempted) as caught:
            await slow
        assert caught.value.grace == 0.5 and time.monotonic() - started >= 0.45
        assert boost.error is caught.value
        with anyio.fail_after(5):  # the release follows the work's end
            while grid.boosts:
                await anyio.sleep(0.01)
        assert await engine.reservations() == []
        assert await grid.offload(sum, [1, 2], where="cluster") == 3


async def test_releasing_a_preempted_boost_during_its_grace_ends_it_at_once() -> None:
    """A release during the grace stops the work at once (BoostPreempted) and the boost ends as preempted."""
    async with faulty_grid() as grid:
        backend, engine = parts(grid)
        boost, slow = await preemptible_with_work(grid, 30)
        await backend.preempt_reservation(boost.id, grace=30)
        started = time.monotonic()
        await boost.release()  # its end is shielded: a deadline around it could not cut it short, so time it
        assert time.monotonic() - started < 10, "the release waited for the grace"
        assert boost.state is gb.BoostState.PREEMPTED
        with pytest.raises(gb.BoostPreempted):
            await slow
        assert await engine.reservations() == [] and grid.stats()["boosts.preempted"] == 1


def test_boost_preempted_pickles_with_its_grace() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(gb.BoostPreempted("taken back", grace=2.5)))
    assert isinstance(error, gb.BoostLost) and str(error) == "taken back" and error.grace == 2.5


async def test_work_waiting_for_a_slot_in_a_preempted_boost_moves_and_runs_elsewhere() -> None:
    """At the notice, work of the boost the engine does not have yet is placed again and runs; the engine's stops."""
    async with faulty_grid() as grid:
        backend, engine = parts(grid)
        async with grid.boost("cpu=1", ttl=60, preemptible=True) as boost:
            handles = [grid.submit(nap, 2, resources="cpu=1") for _ in range(3)]
            with anyio.fail_after(10):
                while not engine.running_tasks():
                    await anyio.sleep(0.01)
            assert len(boost.work) == 3  # a slot for one (whichever started first): two wait in the grid
            (running,) = [h for h in handles if h.id in engine.running_tasks()]
            queued = [h for h in handles if h is not running]
            assert all(h.placement is not None and h.placement.boost is boost for h in handles)
            await backend.preempt_reservation(boost.id, grace=0.2)
            assert [h.placement is not None and h.placement.boost for h in queued] == [None, None]
            assert grid.stats()["moves"] == 2
            with anyio.fail_after(10):
                assert [await h for h in queued] == [2, 2]
            with pytest.raises(gb.BoostPreempted):
                await running
        with anyio.fail_after(5):  # the release follows the work's end
            while grid.boosts:
                await anyio.sleep(0.01)
        assert boost.state is gb.BoostState.PREEMPTED and grid.stats()["boosts.preempted"] == 1


async def test_work_pinned_to_a_preempted_boost_stays_and_gets_boost_preempted() -> None:
    """Work submitted with where=boost is not placed again at the notice: it ends with BoostPreempted after the grace."""
    async with faulty_grid() as grid:
        backend, engine = parts(grid)
        boost = await grid.request_boost("cpu=1", ttl=60, preemptible=True)
        slow, pinned = (grid.submit(nap, 30, resources="cpu=1", where=boost) for _ in range(2))
        with anyio.fail_after(10):
            while not engine.running_tasks():
                await anyio.sleep(0.01)
        await backend.preempt_reservation(boost.id, grace=0.3)
        for handle in (slow, pinned):
            with pytest.raises(gb.BoostPreempted):
                await handle
        assert pinned.placement is not None and pinned.placement.boost is boost
        assert grid.stats()["moves"] == 0
