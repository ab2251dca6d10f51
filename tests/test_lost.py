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
