"""Leases beyond one call: the scheduler's registry across processes, detached leases, lost workers and growth.

Every check reads Dask's own state: the lease resources on the scheduler's and the workers' books, the scheduler
plugin's records (listed through another client), and the workers the scheduler knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from distributed import Client
from gridboost_dask import LEASE_PREFIX

import gridboost as gb
from conftest import SETTLE, WORKERS, DaskProbe, eventually, held_anywhere, whereami, worker_named
from gridboost import Grid
from gridboost.abc import ReservationRequest
from gridboost.testing import nap

HERE = Path(__file__).parent

# Dask's workers run what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.anyio


def _lease_resources(prefix: str, dask_worker: Any = None) -> list[str]:
    """On a worker: the lease resources in its own books (Dask's), whatever their amount."""
    return [name for name in dask_worker.state.total_resources if name.startswith(prefix)]


def on_workers(client: Client, lease_id: str) -> list[str]:
    """The workers whose own state still has a lease resource of ``lease_id``."""
    found: dict[str, list[str]] = client.run(_lease_resources, LEASE_PREFIX, on_error="ignore")
    return sorted(addr for addr, names in found.items() if any(name.endswith(":" + lease_id) for name in names))


async def lease_named(grid: Grid, lease_id: str) -> gb.Lease | None:
    return next((le for le in await grid.leases() if le.id == lease_id), None)


# -- the registry, seen from another client -------------------------------------------------------------------------


async def test_another_client_lists_the_lease_and_sees_it_renewed(grid: Grid, cluster_address: str) -> None:
    """The scheduler's registry lists a grid's lease to another grid, with owner and expiry; renew moves it."""
    boost = await grid.request_boost("cpu=1", ttl=30)
    async with Grid("dask", address=cluster_address) as other:
        lease = next(le for le in await other.leases() if le.id == boost.id)
        assert lease.owner == f"{socket.gethostname()}:{os.getpid()}" and lease.placements == boost.placements
        assert lease.expires_at < time.time() + 31
        await boost.renew(300)
        lease = next(le for le in await other.leases() if le.id == boost.id)
        assert lease.expires_at > time.time() + 250
    await boost.release()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # two grids in one event loop (trio gives each a loop)
async def test_renewals_of_two_grids_of_a_process_reach_the_scheduler_together_and_each_is_answered(
    grid: Grid, cluster: Any, cluster_address: str
) -> None:
    """Renewals that two grids of one process make at once, and one right after them, reach the scheduler's registry
    in fewer messages than renewals (each message holds what came while the last was on its way), and every boost's
    expiry moves, as a third grid lists it."""
    scheduler = cluster.scheduler
    handler = scheduler.handlers["gridboost_extend"]
    messages: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        messages.append(len(kwargs.get("many") or [None]))
        return handler(*args, **kwargs)

    async with Grid("dask", address=cluster_address) as second:
        boosts = [await g.request_boost("cpu=1", ttl=100) for g in (grid, grid, second, second)]
        scheduler.handlers["gridboost_extend"] = counting
        try:
            async with anyio.create_task_group() as tg:
                for boost in boosts:
                    tg.start_soon(boost.renew, 300)
            await boosts[0].renew(400)
        finally:
            scheduler.handlers["gridboost_extend"] = handler
        assert sum(messages) == 5 and len(messages) <= 3, messages
        async with Grid("dask", address=cluster_address) as third:
            listed = {le.id: le for le in await third.leases()}
        assert all(listed[b.id].expires_at > time.time() + 250 for b in boosts)
        assert listed[boosts[0].id].expires_at > time.time() + 350
        for boost in boosts:
            await boost.release()


async def test_a_lease_released_by_another_grid_fails_its_watched_boost(
    grid: Grid, cluster_address: str, dask_client: Client
) -> None:
    """``release_lease`` from another grid removes a live owner's lease, awaited; the owner's watch sees it gone and
    the grid fails the boost with BoostLost."""
    boost = await grid.request_boost("cpu=1", ttl=60)
    assert held_anywhere(dask_client, boost.id)
    async with Grid("dask", address=cluster_address) as other:
        await other.backend.release_lease(boost.id)
        assert not held_anywhere(dask_client, boost.id) and not on_workers(dask_client, boost.id)
        assert await lease_named(other, boost.id) is None

    async def failed() -> bool:
        return boost.state is gb.BoostState.FAILED

    await eventually(failed, f"boost {boost.id} is {boost.state} after its lease was released elsewhere")
    assert isinstance(boost.error, gb.BoostLost) and "released by another process" in str(boost.error)


async def test_renewing_or_releasing_an_unknown_lease_raises_invalid_request(grid: Grid) -> None:
    """An id the scheduler's registry does not know is refused with InvalidRequest naming it, by both calls."""
    assert grid.backend.capabilities.shared_leases
    with pytest.raises(gb.InvalidRequest, match="no lease 'no-such-lease'"):
        await grid.backend.renew_lease("no-such-lease", 30)
    with pytest.raises(gb.InvalidRequest, match="no lease 'no-such-lease'"):
        await grid.backend.release_lease("no-such-lease")


# -- detached leases: they outlive their owner, until their TTL ---------------------------------------------------


async def _take_detached(cluster_address: str, ttl: float, grace: float) -> dict[str, Any]:
    """Another process takes a detached lease and exits normally; returns its report once it has exited."""
    with anyio.fail_after(90):
        done = await anyio.run_process(
            [sys.executable, str(HERE / "_fresh_process.py"), "detached", cluster_address, str(ttl), str(grace)],
            check=False,
        )
    out = done.stdout.decode()
    line = next((x for x in out.splitlines() if x.startswith("REPORT ")), None)
    assert done.returncode == 0 and line is not None, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]!r}"
    report: dict[str, Any] = json.loads(line.removeprefix("REPORT "))
    assert report["placements"] and report["reservations"] == []  # never among its backend's reservations
    return report


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_detached_lease_outlives_its_owner_and_another_process_renews_and_releases_it(
    grid: Grid, cluster_address: str, dask_client: Client
) -> None:
    """A detached lease taken by a process that then exits is still listed (that process its owner) and held on the
    scheduler past the grace; another grid renews it (its expiry moves), cannot take its id, and releases it (gone
    from the registry, the scheduler's books and the worker's)."""
    grace = 1.0
    report = await _take_detached(cluster_address, ttl=60, grace=grace)
    lease_id = report["id"]
    try:
        await anyio.sleep(grace + 1.5)  # an owned lease of a client gone this long is reaped already
        lease = await lease_named(grid, lease_id)
        assert lease is not None and lease.owner == report["owner"] != f"{socket.gethostname()}:{os.getpid()}"
        assert lease.placements == tuple(report["placements"]) and lease.expires_at < time.time() + 60
        assert held_anywhere(dask_client, lease_id) == report["placements"] == on_workers(dask_client, lease_id)

        renewed = await grid.backend.renew_lease(lease_id, 300)
        assert renewed.id == lease_id and renewed.expires_at > time.time() + 290
        lease = await lease_named(grid, lease_id)
        assert lease is not None and lease.expires_at == renewed.expires_at

        taken = ReservationRequest(id=lease_id, resources=gb.Resources(cpu=1), ttl=30, detached=True)
        with pytest.raises(gb.InvalidRequest, match=re.escape(f"lease {lease_id} is held by {report['owner']}")):
            await grid.backend.reserve(taken)
        assert held_anywhere(dask_client, lease_id) == report["placements"]

        await grid.backend.release_lease(lease_id)
        assert await lease_named(grid, lease_id) is None
        assert not held_anywhere(dask_client, lease_id) and not on_workers(dask_client, lease_id)
    finally:
        with contextlib.suppress(gb.InvalidRequest):  # released above, unless a check failed first
            await grid.backend.release_lease(lease_id)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_detached_lease_is_reaped_at_ttl_plus_grace(
    grid: Grid, cluster_address: str, dask_client: Client
) -> None:
    """A detached lease of a process that exited is held until its TTL, then the scheduler removes it at TTL + grace,
    not before."""
    ttl, grace = 6.0, 1.0
    report = await _take_detached(cluster_address, ttl=ttl, grace=grace)
    lease_id = report["id"]
    lease = await lease_named(grid, lease_id)
    assert lease is not None
    await anyio.sleep(grace + 1.0)  # past the owner's grace: an owned lease would be gone
    if time.time() < lease.expires_at:
        assert held_anywhere(dask_client, lease_id) and await lease_named(grid, lease_id) is not None

    async def reaped() -> bool:
        held = await anyio.to_thread.run_sync(held_anywhere, dask_client, lease_id)
        return not held and await lease_named(grid, lease_id) is None

    await eventually(reaped, f"detached lease {lease_id} outlived its TTL + grace", timeout=ttl + grace + SETTLE)
    assert time.time() >= lease.expires_at + grace - 0.1  # not before its TTL + grace (the scheduler's clock)
    assert not on_workers(dask_client, lease_id)


# -- owners that die or hang ----------------------------------------------------------------------------------------


async def _start_owner(cluster_address: str, ttl: float) -> tuple[anyio.abc.Process, dict[str, Any]]:
    process = await anyio.open_process(
        [sys.executable, str(HERE / "_fresh_process.py"), "owner", cluster_address, str(ttl)], stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    buffer = b""
    with anyio.fail_after(60):
        async for chunk in process.stdout:
            buffer += chunk
            if b"\n" in buffer and buffer.startswith(b"LEASE "):
                break
    return process, json.loads(buffer.split(b"\n")[0].removeprefix(b"LEASE "))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["killed", "stopped"])
async def test_the_lease_of_an_owner_that_died_or_hangs_is_reaped_by_the_scheduler(
    grid: Grid, cluster_address: str, dask_client: Client, how: str
) -> None:
    """Another process takes a lease and is SIGKILLed (its lease goes once the grace after its disconnect passes),
    or SIGSTOPped (still connected: its lease goes at TTL + grace); the scheduler reaps it by itself."""
    ttl, grace = (120.0, 2.0) if how == "killed" else (3.0, 2.0)
    process, lease = await _start_owner(cluster_address, ttl)
    try:
        listed = {le.id: le for le in await grid.leases()}
        assert listed[lease["id"]].owner == lease["owner"] != f"{socket.gethostname()}:{os.getpid()}"
        assert held_anywhere(dask_client, lease["id"])
        started = time.monotonic()
        process.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)

        async def reaped() -> bool:
            held = await anyio.to_thread.run_sync(held_anywhere, dask_client, lease["id"])
            return not held and lease["id"] not in {le.id for le in await grid.leases()}

        await eventually(reaped, f"the {how} owner's lease is still held", timeout=ttl + grace + SETTLE)
        if how == "killed":
            # Long before its TTL; how long after the grace depends on the machine's load, so the bound is the TTL's.
            assert time.monotonic() - started < ttl / 2
        else:
            assert time.monotonic() - started > ttl - 2  # not before its TTL: the owner is still connected
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed already
            process.kill()
            if how == "stopped":
                process.send_signal(signal.SIGCONT)
        with anyio.fail_after(30):
            await process.wait()
        await process.aclose()


# -- a worker that dies under a boost -------------------------------------------------------------------------------


class Observed:
    """Records the boosts the grid reports failed."""

    def __init__(self) -> None:
        self.failed: list[tuple[str, BaseException]] = []

    @gb.hookimpl
    def gridboost_boost_failed(self, boost: Any, error: BaseException) -> None:
        self.failed.append((boost.id, error))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_worker_killed_mid_task_fails_its_boost(cluster_address: str, dask_client: Client) -> None:
    """Killing the worker process under a boost marks the boost failed (BoostLost), stops its work with that error,
    and fires gridboost_boost_failed; the grid stays usable."""
    options = ["--nthreads", "1", "--no-nanny", "--name", "doomed", "--host", "127.0.0.1", "--resources", "doomed=1"]
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, killed by its pid below: no need to await it
        [sys.executable, "-m", "distributed.cli.dask_worker", cluster_address, *options, "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with anyio.fail_after(60):
            while "doomed" not in {
                str(w["name"]) for w in dask_client.scheduler_info(n_workers=-1)["workers"].values()
            }:
                await anyio.sleep(0.1)
        seen = Observed()
        async with Grid("dask", address=cluster_address, watch_interval=0.2, plugins=[seen]) as grid:
            boost = await grid.request_boost("doomed=1", ttl=120, labels={"name": "doomed"})
            handle = grid.submit(nap, 60, where=boost)
            probe = DaskProbe(dask_client)

            async def running() -> bool:
                return handle.id in await probe.running(grid)

            await eventually(running, "the task never started on the doomed worker")
            worker.kill()  # the process this test started, by its pid
            with anyio.fail_after(SETTLE), pytest.raises(gb.BoostLost, match="left the cluster"):
                await handle
            assert boost.state is gb.BoostState.FAILED and isinstance(boost.error, gb.BoostLost)

            async def observed() -> bool:  # observers run in the grid's task group, a moment later
                return [b for b, _ in seen.failed] == [boost.id]

            await eventually(observed, f"gridboost_boost_failed was not fired for {boost.id}: {seen.failed}")
            assert await grid.offload(whereami, where="cluster") in {worker_named(dask_client, n) for n in WORKERS}
        assert not held_anywhere(dask_client, boost.id)
    finally:
        worker.kill()
        worker.wait(30)


# -- growth ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_embedded_cluster_grows_for_a_boost_and_shrinks_back() -> None:
    """A boost larger than the embedded LocalCluster scales it up, and releasing it scales it back, as the scheduler
    reports; one larger than max_workers allows names what is missing."""
    async with Grid("dask", n_workers=1, threads_per_worker=1, max_workers=2, grow_timeout=60) as grid:
        assert grid.backend.capabilities.grow
        client = grid.backend.client  # type: ignore[attr-defined]

        async def workers() -> int:
            return len((await client.scheduler.identity(n_workers=-1))["workers"])

        assert await workers() == 1
        async with grid.boost("cpu=2", ttl=60, wait=90) as boost:
            assert await workers() == 2
            assert len(set(boost.placements)) == 2

        async def shrunk() -> bool:
            return await workers() == 1

        await eventually(shrunk, "the cluster did not shrink back to one worker")
        with anyio.fail_after(30), pytest.raises(gb.BoostUnavailable, match=r"missing cpu=.*max_workers=2"):
            await grid.request_boost("cpu=4", ttl=60, wait=60)
        assert await workers() == 1
