"""Leases beyond one call: lingering groups, the cluster's lease keeper, lost nodes and the autoscaler request.

Every check reads Ray's own state: the GCS's placement group table, its node table, the keeper actor's registry and
the autoscaler request the GCS stores.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import ray
from gridboost_ray._leases import KEEPER_NAME, KEEPER_NAMESPACE
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

import gridboost as gb
from conftest import RayProbe
from gridboost import Grid
from gridboost.testing import HookLog, nap

HERE = Path(__file__).parent
SETTLE = 20.0

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]

pytestmark = pytest.mark.anyio


def pg_state(pg_id: str) -> str:
    """The group's state in Ray's table (REMOVED when Ray no longer has it)."""
    row = placement_group_table().get(pg_id)
    return str(row["state"]) if row else "REMOVED"


def pg_of(boost: gb.Boost) -> str:
    assert boost.reservation is not None
    return str(boost.reservation.handle.pg.id.hex())


def keeper_records() -> dict[str, dict[str, Any]]:
    """The keeper actor's own records, by lease id: what every process's listing reads."""
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    return {record["id"]: record for record in ray.get(keeper.leases.remote(), timeout=SETTLE)}


def keeper_ids() -> set[str]:
    return set(keeper_records())


def autoscaler_request() -> list[dict[str, float]]:
    """The resource request the GCS keeps for the autoscaler (one per cluster; the last call wins)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(GcsClient(address=ray.get_runtime_context().gcs_address))
        return [
            dict(request.resources_bundle)
            for constraint in state.cluster_resource_constraints
            for by_count in constraint.resource_requests
            for request in [by_count.request] * by_count.count
        ]
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("autoscaler_resource_request")
    return list(json.loads(raw)) if raw else []


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = SETTLE) -> None:
    with anyio.move_on_after(within):
        while not await check():
            await anyio.sleep(0.05)
        return
    pytest.fail(f"after {within:g}s: {what}")


async def until_state(pg_id: str, state: str, within: float = SETTLE) -> float:
    """Wait until Ray reports the group in ``state``; return how long that took."""
    started = time.monotonic()

    async def reached() -> bool:
        return await anyio.to_thread.run_sync(pg_state, pg_id) == state

    await eventually(reached, f"placement group {pg_id} never became {state}", within)
    return time.monotonic() - started


async def until_unlisted(grid: Grid, lease_id: str) -> None:
    async def unlisted() -> bool:
        return lease_id not in {le.id for le in await grid.leases()}

    await eventually(unlisted, f"the keeper still lists lease {lease_id}", within=5)


@pytest.fixture
async def grid_factory(cluster_address: str, probe: RayProbe) -> AsyncIterator[Callable[..., Grid]]:
    """Makes grids joined to the session's cluster; afterwards Ray must hold nothing of any of them."""
    made: list[Grid] = []

    def make(**options: Any) -> Grid:
        made.append(Grid("ray", address=cluster_address, grace=1.0, **options))
        return made[-1]

    yield make

    async def clean() -> bool:
        for g in made:
            if await probe.reservations(g):
                return False
        return True

    await eventually(clean, "Ray still holds groups of a closed grid")


# -- lingering ----------------------------------------------------------------------------------------------------


async def test_a_released_boost_lingers_for_its_linger_time_then_is_removed(grid_factory: Any) -> None:
    """A released boost's group stays in Ray, listed as lingering, until its linger runs out; then Ray removes it."""
    linger = 1.5
    async with grid_factory(linger=linger) as grid:
        boost = await grid.request_boost("cpu=1", ttl=60)
        pg = pg_of(boost)
        await boost.release()
        released = time.time()
        assert await anyio.to_thread.run_sync(pg_state, pg) == "CREATED"
        (lease,) = [le for le in await grid.leases() if le.id == boost.id]
        assert lease.state == "lingering" and lease.expires_at <= released + linger
        assert boost.id not in {r.id for r in await grid.backend.reservations()}
        await until_state(pg, "REMOVED")
        # Not before its time: what the keeper said it lingers until had passed when Ray removed it.
        assert time.time() >= lease.expires_at
        await until_unlisted(grid, boost.id)  # the record goes with the group


@pytest.mark.parametrize("linger", [30, 0])
async def test_release_and_grant_are_listed_by_the_keeper_before_they_return(grid_factory: Any, linger: float) -> None:
    """The keeper lists a granted boost active, and a released one lingering (or not at all), as soon as the call
    returns: never the old state."""
    async with grid_factory(linger=linger) as grid:
        replaced = None
        for _ in range(4):  # the first grant makes a group; with linger, the next ones reuse it
            boost = await grid.request_boost("cpu=1", ttl=60)
            records = await anyio.to_thread.run_sync(keeper_records)
            assert records[boost.id]["state"] == "active" and replaced not in records
            await boost.release()
            records = await anyio.to_thread.run_sync(keeper_records)
            if linger:
                assert records[boost.id]["state"] == "lingering"
            else:
                assert boost.id not in records
            replaced = boost.id


async def test_a_request_that_lingering_groups_keep_out_removes_them_first(grid_factory: Any) -> None:
    """A boost that fits only without a lingering group of another shape has that group removed before Ray places
    its own, not after the linger."""
    async with grid_factory(linger=600) as grid:
        first = await grid.request_boost("cpu=1", ttl=60, labels={"zone": "a"})
        old = pg_of(first)
        await first.release()
        assert await anyio.to_thread.run_sync(pg_state, old) == "CREATED"
        prefix = grid.backend.prefix
        # Ray's table, read over and over while the request runs: no read may show a new group of this grid while
        # the lingering one is still held (the removal comes first, not after the linger or a failed placement).
        seen: list[tuple[str, set[str]]] = []

        def look() -> None:
            rows = placement_group_table()
            others = {
                k for k, r in rows.items() if k != old and r["name"].startswith(prefix) and r["state"] != "REMOVED"
            }
            seen.append((str(rows[old]["state"]), others))

        async def watch(done: anyio.Event) -> None:
            while not done.is_set():
                await anyio.to_thread.run_sync(look)

        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, done)
            # zone a has two CPUs: a cpu=2 boost there fits only once the lingering cpu=1 group is gone.
            second = await grid.request_boost("cpu=2", ttl=60, labels={"zone": "a"})
            done.set()
        new = pg_of(second)
        rows = await anyio.to_thread.run_sync(placement_group_table)
        assert rows[old]["state"] == "REMOVED" and rows[new]["state"] == "CREATED"
        assert seen and not [others for state, others in seen if state != "REMOVED" and others]
        assert first.id not in await anyio.to_thread.run_sync(keeper_ids)
        await second.release()


async def test_a_matching_request_reuses_the_lingering_group_and_another_shape_does_not(grid_factory: Any) -> None:
    """The next boost of the same shape gets the lingering group itself; a different shape gets a new group."""
    async with grid_factory(linger=30) as grid:
        first = await grid.request_boost("cpu=1", ttl=60, labels={"zone": "a"})
        pg = pg_of(first)
        await first.release()
        second = await grid.request_boost("cpu=1", ttl=60, labels={"zone": "a"})
        assert pg_of(second) == pg and pg_state(pg) == "CREATED"
        held = {r.id: r for r in await grid.backend.reservations()}
        assert set(held) == {second.id}
        (lease,) = [le for le in await grid.leases() if le.id == second.id]
        assert lease.state == "active"
        other = await grid.request_boost("cpu=1", ttl=60, labels={"zone": "b"})
        assert pg_of(other) != pg
        await second.release()
        await other.release()
    assert pg_state(pg) == "REMOVED"  # closing the grid removes lingering groups at once


async def test_linger_zero_removes_at_release(grid_factory: Any) -> None:
    """With ``linger=0`` a released boost's group is removed before release returns."""
    async with grid_factory(linger=0) as grid:
        boost = await grid.request_boost("cpu=1", ttl=60)
        pg = pg_of(boost)
        await boost.release()
        assert pg_state(pg) == "REMOVED"


# -- the lease keeper ---------------------------------------------------------------------------------------------


def _owner(cluster_address: str, ttl: float, grace: float) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """A separate process that takes a lease on the cluster and waits; returns it with the ids it printed."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_fresh_process.py"), "lease", cluster_address, str(ttl), str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,  # unbuffered: readline() takes one line, so select() sees what is left
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while (left := deadline - time.monotonic()) > 0:
        # select first: a silent child must not hold readline() past the deadline (it prints whole lines).
        if not select.select([process.stdout], [], [], left)[0]:
            break
        line = process.stdout.readline().decode()
        if line.startswith("READY "):
            return process, json.loads(line.removeprefix("READY "))
        if not line and process.poll() is not None:
            break
    process.kill()
    process.wait(10)
    process.stdout.close()
    pytest.fail("the lease owner process never took its lease")


@pytest.fixture
def owners() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Lease owner processes started by a test; any still alive at the end is killed, by pid."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()  # a stopped process dies of SIGKILL too
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


async def test_another_process_lists_a_lease_and_its_owner_killed_takes_it_away(
    grid_factory: Any, cluster_address: str, owners: list[subprocess.Popen[bytes]]
) -> None:
    """A lease taken by another process is listed here with that owner; SIGKILL the owner and Ray removes it in TTL + grace."""
    ttl, grace = 6.0, 2.0
    process, ids = await anyio.to_thread.run_sync(_owner, cluster_address, ttl, grace)
    owners.append(process)
    async with grid_factory() as grid:
        leases = {le.id: le for le in await grid.leases()}
        assert ids["boost"] in leases
        assert leases[ids["boost"]].owner.endswith(f":{ids['pid']}") and leases[ids["boost"]].state == "active"
        assert pg_state(ids["pg"]) == "CREATED"
        os.kill(process.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(process.wait, 30)
        await until_state(ids["pg"], "REMOVED", within=ttl + grace + 2)
        await until_unlisted(grid, ids["boost"])


async def test_the_keeper_removes_the_lease_of_a_stuck_owner_at_ttl_plus_grace(
    cluster_address: str, owners: list[subprocess.Popen[bytes]]
) -> None:
    """An owner that stops (alive, but never renews nor releases) loses its lease at TTL + grace, by the keeper."""
    ttl, grace = 3.0, 1.0
    process, ids = await anyio.to_thread.run_sync(_owner, cluster_address, ttl, grace)
    owners.append(process)
    os.kill(process.pid, signal.SIGSTOP)
    took = await until_state(ids["pg"], "REMOVED", within=ttl + grace + 5)
    assert took >= grace  # not before its expiry (the lease was taken under a second ago, with ttl 3)
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    assert ids["boost"] in await anyio.to_thread.run_sync(ray.get, keeper.reaped_ids.remote())
    assert ids["boost"] not in keeper_ids()


async def test_renewal_moves_the_keepers_expiry(grid_factory: Any) -> None:
    """``renew`` tells the keeper, which then lists the lease with the new expiry."""
    async with grid_factory() as grid:
        boost = await grid.request_boost("cpu=1", ttl=5)
        await boost.renew(300)
        (lease,) = [le for le in await grid.leases() if le.id == boost.id]
        assert lease.expires_at >= time.time() + 290
        await boost.release()


async def test_renewals_made_together_reach_the_keeper_together_and_each_moves_its_expiry(grid_factory: Any) -> None:
    """Four renewals a grid makes at once reach the keeper in fewer calls than renewals (those that come while one
    is on its way go together, in the next call), and the keeper lists every lease with its new expiry."""
    async with grid_factory() as grid:
        boosts = [await grid.request_boost("cpu=1", ttl=100) for _ in range(4)]
        backend = grid.backend
        keeper = backend._keeper
        calls: list[int] = []

        async def counting(method: str, *args: Any) -> Any:
            if method == "renew_many":
                calls.append(len(args[0]))
            return await keeper(method, *args)

        backend._keeper = counting
        try:
            async with anyio.create_task_group() as tg:
                for n, boost in enumerate(boosts):
                    tg.start_soon(boost.renew, 300 + n)
        finally:
            del backend._keeper
        assert sum(calls) == 4 and len(calls) < 4, calls
        listed = {le.id: le for le in await grid.leases()}
        assert all(listed[b.id].expires_at >= time.time() + 290 + n for n, b in enumerate(boosts))
        for boost in boosts:
            await boost.release()


# -- a node that dies under a boost -------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_node_dying_under_a_boost_fails_it_and_fires_the_hook(
    cluster: Cluster, cluster_address: str, probe: RayProbe, doomed_node: Any
) -> None:
    """The boost on a node that dies is marked failed with BoostLost, its work stops, and ``boost_failed`` fires."""
    failures = HookLog()
    async with Grid("ray", address=cluster_address, grace=1.0, plugins=[failures]) as grid:
        boost = await grid.request_boost("cpu=1,doomed=1", ttl=120)
        pg = pg_of(boost)
        handle = grid.submit(nap, 60, where=boost)

        async def running() -> bool:
            return handle.id in await probe.running(grid)

        await eventually(running, "the task never started in the boost")
        await anyio.to_thread.run_sync(cluster.remove_node, doomed_node)
        with anyio.fail_after(60), pytest.raises((gb.BoostLost, gb.BackendError)):
            await handle

        async def failed() -> bool:
            return boost.state is gb.BoostState.FAILED and bool(failures.failed)

        await eventually(failed, f"boost {boost.id} is {boost.state}; hook calls: {failures.failed}")
        assert isinstance(boost.error, gb.BoostLost) and "died" in str(boost.error)
        assert [(b.id, e) for b, e in failures.failed] == [(boost.id, boost.error)]
        await until_state(pg, "REMOVED")
        assert grid.boosts == ()
        assert await grid.offload(sum, [1, 2], where="cluster") == 3


# -- growth -------------------------------------------------------------------------------------------------------


async def test_growth_keeps_one_combined_autoscaler_request_and_clears_it(grid_factory: Any) -> None:
    """With ``grow=True`` the autoscaler request holds the bundles of every live lease, and is empty after the last."""
    async with grid_factory(grow=True, linger=0) as grid:
        assert grid.backend.capabilities.grow
        held = await grid.request_boost("cpu=1", ttl=60)
        assert autoscaler_request() == [{"CPU": 1.0}]
        # Larger than the cluster: with growth it waits for the autoscaler (none here) instead of being refused.
        async with anyio.create_task_group() as tg:
            seen: list[list[dict[str, float]]] = []

            async def too_big() -> None:
                with pytest.raises(gb.BoostUnavailable, match="not granted within"):
                    await grid.request_boost("cpu=8", ttl=60, wait=3)

            tg.start_soon(too_big)

            async def combined() -> bool:
                seen.append(autoscaler_request())
                return len(seen[-1]) == 9

            await eventually(combined, f"the autoscaler request never combined both leases: {seen[-1:]}")
            assert sorted(b["CPU"] for b in seen[-1]) == [1.0] * 9
        assert autoscaler_request() == [{"CPU": 1.0}]
        await held.release()
        assert autoscaler_request() == []


def test_the_fake_autoscaler_grows_the_cluster_for_a_boost_and_the_request_clears(tmp_path: Path) -> None:
    """On a cluster of its own whose autoscaler adds nodes (Ray's fake provider), a boost for a node type not yet
    running is granted on a new node, its work runs there, and the autoscaler request is cleared on release."""
    done = subprocess.run(
        [sys.executable, str(HERE / "_fresh_process.py"), "grow"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(line.removeprefix("REPORT "))
    (grown, labels), *others = report["new_nodes"].items()
    assert not others and labels["zone"] == "grown"
    assert set(report["placements"]) == {grown} and report["ran_on"] == grown
    assert sum(b["CPU"] for b in report["request_while_held"]) == 2
    assert report["request_after"] == []
    assert report["alive_after"] == []
    assert not [p for p in psutil.process_iter(["cmdline"]) if report["temp_dir"] in " ".join(p.info["cmdline"] or ())]


# -- leases that outlive their process: grid.request_lease ----------------------------------------------------------


def keeper_record(lease_id: str) -> dict[str, Any] | None:
    """The keeper's record of ``lease_id`` (``None`` when it has none)."""
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    record: dict[str, Any] | None = ray.get(keeper.get.remote(lease_id), timeout=SETTLE)
    return record


def lease_group(lease_id: str) -> dict[str, Any] | None:
    """Ray's table row of the placement group named for the detached lease ``lease_id``, if Ray has one."""
    rows = [row for row in placement_group_table().values() if row["name"] == f"gridboost:lease:{lease_id}"]
    return rows[0] if rows else None


def remove_leftover(lease_id: str) -> None:
    """Remove a lease's group and record straight from Ray, if a failed check left them behind."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    row = lease_group(lease_id)
    if row is not None and row["state"] != "REMOVED":
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(row["placement_group_id"]))))
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    ray.get(keeper.drop.remote(lease_id), timeout=SETTLE)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_lease_requested_by_a_process_that_exits_is_held_listed_renewed_and_released_elsewhere(
    grid_factory: Any, cluster_address: str
) -> None:
    """``request_lease`` in a process that then exits leaves its group CREATED in Ray and listed with that owner;
    another grid renews it (the keeper's expiry moves) and releases it (Ray removes the group)."""
    with anyio.fail_after(90):
        done = await anyio.run_process(
            [sys.executable, str(HERE / "_fresh_process.py"), "detached", cluster_address, "60"], check=False
        )
    out = done.stdout.decode()
    line = next((x for x in out.splitlines() if x.startswith("REPORT ")), None)
    assert done.returncode == 0 and line is not None, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]!r}"
    report = json.loads(line.removeprefix("REPORT "))
    lease_id = report["id"]
    try:
        assert report["state"] == "active" and report["reservations"] == []  # never its grid's own reservation
        record = keeper_record(lease_id)
        assert record is not None and record["owner"] == report["owner"]
        assert report["owner"].endswith(f":{report['pid']}")
        assert pg_state(record["pg_id"]) == "CREATED"
        row = lease_group(lease_id)
        assert row is not None and row["placement_group_id"] == record["pg_id"]
        assert set(row["bundles_to_node_id"].values()) == set(report["placements"])

        async with grid_factory() as grid:
            (lease,) = [le for le in await grid.leases() if le.id == lease_id]
            assert lease.owner == report["owner"] and lease.state == "active"
            assert lease.expires_at == pytest.approx(report["expires_at"])

            renewed = await grid.renew_lease(lease_id, 300)
            assert renewed.id == lease_id and renewed.expires_at >= time.time() + 290
            record = keeper_record(lease_id)
            assert record is not None and record["expires_at"] == renewed.expires_at
            assert pg_state(record["pg_id"]) == "CREATED"

            await grid.release_lease(lease_id)
            assert pg_state(record["pg_id"]) == "REMOVED"  # awaited: removed before release_lease returns
            assert keeper_record(lease_id) is None
            assert lease_id not in {le.id for le in await grid.leases()}
    finally:
        await anyio.to_thread.run_sync(remove_leftover, lease_id)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_keeper_removes_a_detached_lease_at_ttl_plus_grace(grid_factory: Any) -> None:
    """A lease from ``request_lease`` with ttl 2 and ``lease_grace`` 1 is not the grid's to end: the keeper removes
    its group in Ray after ttl + grace, not before, and within a few seconds more."""
    ttl, grace = 2.0, 1.0
    async with grid_factory(lease_grace=grace) as grid:
        started = time.monotonic()
        lease = await grid.request_lease("cpu=1", ttl=ttl)
        try:
            record = keeper_record(lease.id)
            assert record is not None and record["grace"] == grace
            assert pg_state(record["pg_id"]) == "CREATED"
            assert lease.id not in {b.id for b in grid.boosts}
            await until_state(record["pg_id"], "REMOVED", within=ttl + grace + 5)
            assert time.monotonic() - started >= ttl + grace - 0.5  # the keeper's tick, and clocks, aside
            keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
            assert lease.id in await anyio.to_thread.run_sync(ray.get, keeper.reaped_ids.remote())
            await until_unlisted(grid, lease.id)
        finally:
            await anyio.to_thread.run_sync(remove_leftover, lease.id)


async def test_request_lease_on_a_closed_grid_is_refused(grid_factory: Any) -> None:
    """A closed grid refuses ``request_lease`` with GridClosed, and Ray gets no new lease group."""
    async with grid_factory() as grid:
        pass
    before = {row["placement_group_id"] for row in placement_group_table().values()}
    with pytest.raises(gb.GridClosed):
        await grid.request_lease("cpu=1", ttl=5)
    assert {row["placement_group_id"] for row in placement_group_table().values()} == before


async def test_renewing_or_releasing_an_unknown_lease_raises_invalid_request(grid_factory: Any) -> None:
    """``renew_lease`` and ``release_lease`` of an id the keeper does not know raise InvalidRequest naming it."""
    async with grid_factory() as grid:
        with pytest.raises(gb.InvalidRequest, match="no lease 'nope'"):
            await grid.renew_lease("nope", 5)
        with pytest.raises(gb.InvalidRequest, match="no lease 'nope'"):
            await grid.release_lease("nope")
