"""A cluster shared by many owners: turns by priority across processes, quotas, fencing tokens, one autoscaler request,
preemption, fencing of a stopped owner, and no double booking under chaos.

The owners are real processes (``_fresh_process.py serve``), each with its own grid joined to the session's cluster
and driven over stdin, so that one process serves many rounds. Capacity is a custom resource (``slot``) of a node of
this module's own, filled by placement groups the test holds. Every verdict reads Ray's placement group table, the
lease keeper's records or the GCS's autoscaler request, never what an owner says alone.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import ray
from _owners import (
    RUNNING,
    SETTLE,
    SLOTS,
    Owner,
    all_ended,
    call,
    eventually,
    free,
    gone,
    hold_all,
    keeper_all,
    keeper_call,
    none_left,
    of,
    pg_state,
    preempted_count,
    running_worker,
    sample,
    task_groups,
    task_states,
    until_step,
)
from gridboost_ray._leases import KEEPER_NAME, KEEPER_NAMESPACE
from gridboost_ray._worker import first_fit
from ray.cluster_utils import Cluster
from test_leases import autoscaler_request

import gridboost as gb
from test_cli import on_ray

# Ray's workers cannot import this module (pytest put its directory on sys.path; Ray does not): its functions travel
# by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]

ROUNDS = 20
#: The keeper's arbiter forgets a ticket not asked again for this long (gridboost.worker_leases.STALE).
STALE = 10.0

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the owners are other processes: the test's own event loop is not what is checked


@pytest.fixture(scope="module")
def slots(cluster: Cluster) -> Iterator[None]:
    """A node with ``SLOTS`` of the custom resource ``slot`` and nothing else, for this module only."""
    node = cluster.add_node(num_cpus=0, resources={"slot": SLOTS})
    cluster.wait_for_nodes()
    try:
        yield
    finally:
        cluster.remove_node(node)


@pytest.fixture(scope="module")
def owners(slots: None, cluster_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Owner]]:
    """Three owner processes for the whole module, started together."""
    logs = tmp_path_factory.mktemp("owners")
    started = [Owner(cluster_address, logs / f"owner{i}.log") for i in range(3)]
    try:
        for owner in started:
            owner.expect("READY", within=90)
        yield started
    finally:
        for owner in started:
            owner.close()


@pytest.fixture
def spare(cluster_address: str, tmp_path: Path) -> Iterator[Callable[[], Owner]]:
    """Owner processes of one test (to be killed); whatever is still alive at the end is killed, by pid."""
    made: list[Owner] = []

    def make() -> Owner:
        made.append(Owner(cluster_address, tmp_path / f"spare{len(made)}.log"))
        made[-1].expect("READY", within=90)
        return made[-1]

    yield make
    for owner in made:
        owner.close()


# -- turns ----------------------------------------------------------------------------------------------------------


async def test_freed_capacity_goes_by_priority_across_owners(owners: list[Owner]) -> None:
    """On a full cluster, LOW, NORMAL and CRITICAL requests of three processes are granted CRITICAL, NORMAL, LOW as
    slots free one at a time, in every one of 20 rounds."""
    low, normal, critical = owners
    latencies: list[float] = []
    tokens: list[int] = []
    for round_ in range(ROUNDS):
        name = f"turns{round_}"
        held = await anyio.to_thread.run_sync(hold_all)
        try:
            for owner, priority in ((low, "low"), (normal, "normal"), (critical, "critical")):
                owner.send(op="request", name=name, priority=priority)
                await eventually(lambda o=owner: of(o, "pending"), f"round {round_}: {priority} was never listed")
            for i, owner in enumerate((critical, normal, low)):
                freed = time.monotonic()
                await call(free, [held[i]])
                granted = await eventually(lambda o=owner: of(o, "active"), f"round {round_}: {owner.pid} not granted")
                latencies.append(time.monotonic() - freed)
                (record,) = granted
                assert await call(pg_state, record["pg_id"]) == "CREATED"
                # Nobody else got it: exactly i + 1 of the three hold a grant, and the others still wait.
                active = [r for o in owners for r in await call(of, o, "active")]
                assert len(active) == i + 1, f"round {round_}, slot {i}: {active}"
                said = await call(owner.expect, "GRANTED", name)
                assert said["token"] == record["token"] and said["id"] == record["id"]
                tokens.append(record["token"])
            for owner in owners:
                owner.send(op="release", name=name)
                await call(owner.expect, "RELEASED", name)
        finally:
            await call(free, held[3:])
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    latencies.sort()
    print(
        f"\ngrant latency under contention (slot freed -> keeper lists the grant): p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms, p90 {latencies[int(len(latencies) * 0.9)] * 1e3:.0f} ms, n={len(latencies)}"
    )


async def test_another_process_lists_a_pending_request_with_its_owner_tenant_priority_and_wait(
    owners: list[Owner], cluster_address: str
) -> None:
    """A request waiting on a full cluster is listed pending by another process (its grid, and ``boost list
    --json``) with its owner, tenant, priority and how long it has waited; once a slot frees it is granted."""
    owner = owners[0]
    held = await anyio.to_thread.run_sync(hold_all)
    try:
        owner.send(op="request", name="listed", priority="high", tenant="team-b")
        await eventually(lambda: of(owner, "pending"), "the request was never listed pending")
        async with gb.Grid("ray", address=cluster_address) as grid:
            (lease,) = [le for le in await grid.leases() if le.owner.endswith(f":{owner.pid}")]
        assert lease.state == "pending" and lease.tenant == "team-b" and lease.priority is gb.Priority.HIGH
        assert lease.waited > 0 and lease.token == 0 and lease.expires_at == 0
        listed = await call(on_ray, cluster_address, "boost", "list")
        (shown,) = [le for le in listed if le["id"] == lease.id]
        assert shown["state"] == "pending" and shown["tenant"] == "team-b" and shown["priority"] == "HIGH"
        assert shown["waited"] > 0 and shown["owner"] == lease.owner
        await call(free, held[:1])
        (record,) = await eventually(lambda: of(owner, "active"), "the pending request was never granted")
        assert record["id"] == lease.id and record["tenant"] == "team-b" and record["token"] > 0
        await call(owner.expect, "GRANTED", "listed")
        owner.send(op="release", name="listed")
        await call(owner.expect, "RELEASED", "listed")
    finally:
        await call(free, held[1:])


# -- quotas ---------------------------------------------------------------------------------------------------------


async def test_a_quota_holds_back_its_tenant_only_and_lets_it_go_when_a_lease_ends(
    owners: list[Owner], cluster_address: str
) -> None:
    """team-a (quota slot=2) holds two leases; its third waits, held back by the quota, while team-b is granted;
    when one team-a lease ends the third is granted; with ``wait=0`` a team-a request raises QuotaExceeded."""
    team_a, team_b = owners[0], owners[1]
    async with gb.Grid("ray", address=cluster_address, tenant="team-a") as grid:
        await grid.set_quota("team-a", "slot=2")
        try:
            for name in ("a1", "a2"):
                team_a.send(op="request", name=name, tenant="team-a")
                await call(team_a.expect, "GRANTED", name)
            team_a.send(op="request", name="a3", tenant="team-a")
            (ticket,) = await eventually(lambda: of(team_a, "pending"), "team-a's third request was never listed")
            assert "quota slot=2" in ticket["held_back"] and "in use slot=2" in ticket["held_back"]
            team_b.send(op="request", name="b1", tenant="team-b")
            (granted,) = await eventually(lambda: of(team_b, "active"), "team-b was held back by team-a's quota")
            assert granted["tenant"] == "team-b" and await call(pg_state, granted["pg_id"]) == "CREATED"
            assert len(await call(of, team_a, "active")) == 2 and await call(of, team_a, "pending")
            (quota,) = [q for q in await grid.quotas() if q.tenant == "team-a"]
            assert quota.limit == gb.Resources(custom={"slot": 2}) and quota.used == quota.limit
            with pytest.raises(gb.QuotaExceeded, match=r"quota slot=2, in use slot=2"):
                await grid.request_boost("slot=1", ttl=30, wait=0)
            team_a.send(op="release", name="a1")
            await call(team_a.expect, "RELEASED", "a1")
            said = await call(team_a.expect, "GRANTED", "a3")
            active = await call(of, team_a, "active")
            assert said["id"] in {r["id"] for r in active} and len(active) == 2
            assert not await call(of, team_a, "pending")
            for owner, name in ((team_a, "a2"), (team_a, "a3"), (team_b, "b1")):
                owner.send(op="release", name=name)
                await call(owner.expect, "RELEASED", name)
        finally:
            await grid.set_quota("team-a", None)
        assert "team-a" not in {q.tenant for q in await grid.quotas()}


# -- tokens ---------------------------------------------------------------------------------------------------------


async def test_fencing_tokens_grow_across_the_grants_of_two_processes(owners: list[Owner]) -> None:
    """Grants alternating between two processes get strictly larger tokens, each the one the keeper records."""
    tokens = []
    for i in range(10):
        owner = owners[i % 2]
        owner.send(op="request", name=f"token{i}")
        said = await call(owner.expect, "GRANTED", f"token{i}")
        (record,) = [r for r in await call(of, owner, "active") if r["id"] == said["id"]]
        assert said["token"] == record["token"]
        tokens.append(record["token"])
        owner.send(op="release", name=f"token{i}")
        await call(owner.expect, "RELEASED", f"token{i}")
    assert tokens == sorted(set(tokens)), tokens  # strictly increasing


# -- growth ---------------------------------------------------------------------------------------------------------


async def test_two_processes_growth_is_one_autoscaler_request_of_their_sum(owners: list[Owner]) -> None:
    """Two processes' grow-leases make one autoscaler request in the GCS, the sum of both; it clears when both end."""
    first, second = owners[0], owners[1]
    first.send(op="request", name="grow1", grow=True)
    await call(first.expect, "GRANTED", "grow1")
    assert await call(autoscaler_request) == [{"slot": 1.0}]
    second.send(op="request", name="grow2", resources="slot=2", grow=True)
    await call(second.expect, "GRANTED", "grow2")
    assert sorted(await call(autoscaler_request), key=lambda b: b["slot"]) == [{"slot": 1.0}, {"slot": 2.0}]
    first.send(op="release", name="grow1")
    await call(first.expect, "RELEASED", "grow1")
    assert await call(autoscaler_request) == [{"slot": 2.0}]
    second.send(op="release", name="grow2")
    await call(second.expect, "RELEASED", "grow2")
    assert await call(autoscaler_request) == []


# -- an owner that dies ---------------------------------------------------------------------------------------------


async def test_a_killed_owners_ticket_stops_holding_back_the_others(
    owners: list[Owner], spare: Callable[[], Owner]
) -> None:
    """A CRITICAL request whose process is SIGKILLed while it waits holds back a LOW one only until the keeper
    forgets its ticket (STALE seconds, plus a margin); then the LOW one gets the freed slot."""
    victim, waiter = spare(), owners[0]
    held = await anyio.to_thread.run_sync(hold_all)
    try:
        victim.send(op="request", name="doomed", priority="critical")
        await eventually(lambda: of(victim, "pending"), "the victim's request was never listed")
        waiter.send(op="request", name="survivor", priority="low")
        await eventually(lambda: of(waiter, "pending"), "the survivor's request was never listed")
        os.kill(victim.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(victim.process.wait, 30)
        await call(free, held[:1])
        (record,) = await eventually(lambda: of(waiter, "active"), "the dead owner's ticket held back", STALE + 10)
        assert await call(pg_state, record["pg_id"]) == "CREATED"
        assert not await call(of, victim, "pending") and not await call(of, victim, "active")
        await call(waiter.expect, "GRANTED", "survivor")
        waiter.send(op="release", name="survivor")
        await call(waiter.expect, "RELEASED", "survivor")
    finally:
        await call(free, held[1:])


# -- the command line -----------------------------------------------------------------------------------------------


def keeper_quotas() -> dict[str, dict[str, float]]:
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    return {row["tenant"]: row["quota"] for row in ray.get(keeper.quotas.remote(), timeout=SETTLE)}


def test_the_quota_commands_set_list_and_clear_the_keepers_quotas(owners: list[Owner], cluster_address: str) -> None:
    """``gridboost quota set/list/clear`` change and show the quotas the keeper itself holds."""
    listed = on_ray(cluster_address, "quota", "set", "team-cli", "slot=3")
    assert {"tenant": "team-cli", "limit": str(gb.Resources(custom={"slot": 3})), "used": str(gb.Resources())} in listed
    assert keeper_quotas()["team-cli"] == {"slot": 3.0}
    assert "team-cli" in {q["tenant"] for q in on_ray(cluster_address, "quota", "list")}
    cleared = on_ray(cluster_address, "quota", "clear", "team-cli")
    assert "team-cli" not in {q["tenant"] for q in cleared} and "team-cli" not in keeper_quotas()


async def test_the_demand_of_a_killed_owner_leaves_the_autoscaler_request(
    owners: list[Owner], spare: Callable[[], Owner]
) -> None:
    """When a process holding a grow-lease is SIGKILLed, Ray removes its group and the keeper takes its bundles out
    of the cluster's autoscaler request, leaving the other owner's."""
    victim, survivor = spare(), owners[0]
    victim.send(op="request", name="doomed", grow=True)
    survivor.send(op="request", name="kept", resources="slot=2", grow=True)
    doomed = await call(victim.expect, "GRANTED", "doomed")
    await call(survivor.expect, "GRANTED", "kept")
    assert sorted(await call(autoscaler_request), key=lambda b: b["slot"]) == [{"slot": 1.0}, {"slot": 2.0}]
    os.kill(victim.pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(victim.process.wait, 30)
    await eventually(lambda: pg_state(doomed["pg"]) == "REMOVED", "Ray kept the dead owner's group")
    await eventually(lambda: autoscaler_request() == [{"slot": 2.0}], "the dead owner's demand stayed")
    survivor.send(op="release", name="kept")
    await call(survivor.expect, "RELEASED", "kept")
    assert await call(autoscaler_request) == []


# -- current_lease() on the workers ---------------------------------------------------------------------------------


def lease_of(item: int) -> tuple[int, Any]:
    """Run on a worker: the item and what ``current_lease()`` says there."""
    return item, gb.current_lease()


async def test_work_under_a_boost_sees_its_lease_and_token_on_the_engine_and_none_outside(
    slots: None, cluster_address: str
) -> None:
    """``current_lease()`` in a task, a callable object and every map chunk under a boost is the boost's id and
    token, read on a Ray worker; outside a boost it is ``None``."""
    async with gb.Grid("ray", address=cluster_address, linger=0) as grid:
        async with grid.boost("slot=1", ttl=60) as boost:
            assert boost.token > 0
            expected = gb.CurrentLease(boost.id, boost.token)
            assert await grid.offload(gb.current_lease, where=boost) == expected
            assert await grid.offload(functools.partial(lease_of, 7), where=boost) == (7, expected)
            mapped = [out async for out in grid.map(lease_of, range(20), where=boost, batch_size=4)]
            assert mapped == [(i, expected) for i in range(20)]
            assert await grid.offload(gb.current_lease, where="cluster") is None
            assert await grid.offload(lease_of, 1, where="cluster") == (1, None)
        assert gb.current_lease() is None


# -- preemption -----------------------------------------------------------------------------------------------------


GRACE = 3.0


async def test_a_critical_request_preempts_a_preemptible_low_lease_of_another_process_after_its_grace(
    owners: list[Owner], cluster_address: str
) -> None:
    """On a full cluster, process B's CRITICAL request takes back process A's preemptible LOW lease: A is told
    (its hook, with the grace), A's running work ends with BoostPreempted after the grace, Ray shows A's group
    removed and B's placed; A's non-preemptible LOW lease is never taken, so B's next request times out."""
    a, b = owners[0], owners[1]
    a.send(op="request", name="keep", resources="slot=2", priority="low")
    a.send(op="request", name="prey", resources="slot=2", priority="low", preemptible=True, preempt_grace=GRACE)
    keep, prey = await call(a.expect, "GRANTED", "keep"), await call(a.expect, "GRANTED", "prey")
    a.send(op="work", name="prey", tag="long", seconds=120)
    submitted = await call(a.expect, "SUBMITTED", "prey")
    asked = time.time()
    b.send(op="request", name="crit", resources="slot=2", priority="critical", wait=60)
    notice = await call(a.expect, "NOTICE")
    assert notice["id"] == prey["id"] and notice["state"] == "preempted"
    assert GRACE - 1.5 < notice["grace"] <= GRACE, notice
    (marked,) = [r for r in await call(keeper_all) if r["id"] == prey["id"]]
    assert marked["state"] == "preempting" and marked["preempted_for"] in {
        t["id"] for t in await call(of, b, "pending")
    }
    async with gb.Grid("ray", address=cluster_address, linger=0) as grid:
        listed = {le.id: le.state for le in await grid.leases()}
    assert listed[prey["id"]] == "preempting" and listed[keep["id"]] == "active"
    error = await call(a.expect, "ERROR", "prey", within=GRACE + SETTLE)
    assert error["error"] == "BoostPreempted", error
    assert error["at"] - notice["at"] >= notice["grace"] - 0.25, (error, notice)
    crit = await call(b.expect, "GRANTED", "crit")
    latency = crit["took"]
    assert await call(pg_state, prey["pg"]) == "REMOVED"
    assert await call(pg_state, crit["pg"]) == "CREATED" and await call(pg_state, keep["pg"]) == "CREATED"
    await eventually(lambda: all_ended(submitted["ray_ids"]), "Ray's task table never showed A's work ended")
    assert prey["id"] in await call(keeper_call, "preempted_ids")
    # Only A's non-preemptible lease and B's own are left: B's next CRITICAL request finds nothing to take.
    b.send(op="request", name="crit2", resources="slot=2", priority="critical", wait=4)
    failed = await call(b.expect, "FAILED", "crit2")
    assert failed["error"] == "BoostUnavailable", failed
    (kept,) = [r for r in await call(keeper_all) if r["id"] == keep["id"]]
    assert kept["state"] == "active" and await call(pg_state, keep["pg"]) == "CREATED"
    for owner, name in ((a, "keep"), (b, "crit")):
        owner.send(op="release", name=name)
        await call(owner.expect, "RELEASED", name)
    print(
        f"\npreemption latency (CRITICAL request -> grant): {latency:.2f} s with preempt_grace {GRACE:g} s "
        f"(request -> notice {notice['at'] - asked:.2f} s)"
    )


async def test_work_queued_in_a_preempted_boost_moves_to_a_boost_with_room_and_rays_share_gets_boost_preempted(
    owners: list[Owner],
) -> None:
    """Of five one-slot naps placed in A's preemptible two-slot boost, Ray gets three (its group runs two and queues
    one) and two wait in A's grid. At B's preemption those two move to A's other boost, which has room, and run there,
    in that boost's group by Ray's task table; the three Ray has end with BoostPreempted after the grace."""
    a, b = owners[0], owners[1]
    held: list[tuple[Owner, str]] = []
    try:
        a.send(op="request", name="spare2", resources="slot=2", priority="low", preempt_grace=GRACE)
        a.send(op="request", name="prey2", resources="slot=2", priority="low", preemptible=True, preempt_grace=GRACE)
        spare = await call(a.expect, "GRANTED", "spare2")
        held.append((a, "spare2"))
        prey = await call(a.expect, "GRANTED", "prey2")
        held.append((a, "prey2"))  # released after its preemption, that is a no-op
        naps = [120, 120, 120, 0.5, 0.5]
        a.send(op="work", name="prey2", auto=True, resources="slot=1", seconds=naps, at_engine=3)
        ray_ids = (await call(a.expect, "SUBMITTED", "prey2"))["ray_ids"]
        assert all(ray_ids[:3]) and ray_ids[3:] == [None, None], ray_ids
        b.send(op="request", name="crit2", resources="slot=2", priority="critical", wait=60)
        notice = await call(a.expect, "NOTICE")
        assert notice["id"] == prey["id"]
        moved = [await call(a.expect, "DONE", "prey2", within=GRACE + SETTLE) for _ in range(2)]
        assert [(m["where"], m["result"]) for m in moved] == [("boost", 0.5)] * 2, moved
        moved_ids = [m["ray_id"] for m in moved]
        groups = await eventually(lambda: len(found := task_groups(moved_ids)) == 2 and found, "moved tasks unlisted")
        assert set(groups.values()) == {spare["pg"]}, (groups, spare, prey)
        errors = [await call(a.expect, "ERROR", "prey2", within=GRACE + SETTLE) for _ in range(3)]
        assert {e["error"] for e in errors} == {"BoostPreempted"}, errors
        assert min(e["at"] for e in errors) - notice["at"] >= notice["grace"] - 0.25, (errors, notice)
        await call(b.expect, "GRANTED", "crit2")
        held.append((b, "crit2"))
        assert await call(pg_state, prey["pg"]) == "REMOVED"
        assert set((await call(task_groups, ray_ids[:3])).values()) == {prey["pg"]}
    finally:  # a failure here must not leave slots held for the tests after it
        for owner, name in held:
            owner.send(op="release", name=name)
            await call(owner.expect, "RELEASED", name)


def test_the_keepers_fit_check_places_bundles_as_rays_strategies_do() -> None:
    """``first_fit`` (what the keeper checks victims with) packs STRICT_PACK on one node, spreads STRICT_SPREAD over
    distinct nodes and lets PACK and SPREAD bundles share a node."""
    rooms = {"n1": {"slot": 2.0}, "n2": {"slot": 2.0}}
    two = [{"slot": 1.0}, {"slot": 1.0}]
    assert first_fit(two, "STRICT_PACK", rooms) and not first_fit([*two, {"slot": 1.0}], "STRICT_PACK", rooms)
    assert first_fit([*two, {"slot": 1.0}], "PACK", rooms) and first_fit([{"slot": 2.0}] * 2, "SPREAD", rooms)
    assert first_fit(two, "STRICT_SPREAD", rooms) and not first_fit([*two, {"slot": 0.5}], "STRICT_SPREAD", rooms)
    assert not first_fit([{"slot": 3.0}], "PACK", rooms) and not first_fit([{"cpu": 1.0}], "PACK", rooms)


# -- fencing --------------------------------------------------------------------------------------------------------


#: The fenced lease's TTL: its owner must be stopped before its own grid ends the boost at the TTL, and two of its naps
#: must be running by then (each in a Ray worker that starts for it).
FENCED_TTL = 10.0


async def test_a_stopped_owners_lease_is_reaped_and_its_work_killed_on_the_engine_and_it_is_fenced_when_it_wakes(
    owners: list[Owner], spare: Callable[[], Owner]
) -> None:
    """An owner SIGSTOPped past its lease's TTL plus grace: the keeper removes its group (Ray kills its running and
    queued work), another owner is granted the slots with a larger token; woken, its submit raises BoostExpired."""
    stopped, other = spare(), owners[1]
    stopped.send(op="request", name="fenced", resources=f"slot={SLOTS}", ttl=FENCED_TTL, lease_grace=1.0)
    fenced = await call(stopped.expect, "GRANTED", "fenced")
    granted = time.monotonic()
    # Each nap needs half the slots: two run, and the third queues in the group (a boost hands Ray its capacity and
    # half of it again; what is beyond that waits in the grid).
    stopped.send(op="work", name="fenced", tag="before", seconds=120, count=3, resources=f"slot={SLOTS // 2}")
    submitted = await call(stopped.expect, "SUBMITTED", "fenced")
    ray_ids = submitted["ray_ids"]
    worker = await eventually(lambda: running_worker(ray_ids), "Ray's task table never showed the work running")

    def two_running() -> bool:
        return sum(RUNNING in states for states in task_states(ray_ids).values()) == 2

    await eventually(two_running, "Ray's task table never showed two of the naps running")
    os.kill(stopped.pid, signal.SIGSTOP)
    after: dict[str, Any] | None = None
    try:
        try:
            # Else the owner's grid, not the keeper, ended the lease (at its TTL) and there was nothing to fence.
            assert time.monotonic() - granted < FENCED_TTL, "the owner was stopped only after its lease's TTL"
            other.send(op="request", name="after", resources=f"slot={SLOTS}", wait=60)
            after = await call(other.expect, "GRANTED", "after")
            assert after["token"] > fenced["token"]
            assert await call(pg_state, fenced["pg"]) == "REMOVED" and await call(pg_state, after["pg"]) == "CREATED"
            assert fenced["id"] in await call(keeper_call, "reaped_ids")
            # The owner, stopped, reports nothing to Ray's task table: the running task's worker process is what
            # shows that Ray killed the work when the group went.
            await eventually(lambda: gone(worker), f"Ray's worker {worker} running the stopped owner's work lives on")
            stopped.send(op="work", name="fenced", tag="woken", seconds=0.1)
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        woken = await call(stopped.expect, "ERROR", "fenced", within=SETTLE)
        while woken["tag"] != "woken":  # the work of before the stop fails too, whichever way it learns it
            woken = await call(stopped.expect, "ERROR", "fenced", within=SETTLE)
        assert woken["error"] == "BoostExpired", woken
        # Woken, the owner reports its tasks: all ended, and the one that was queued in the group never ran.
        await eventually(lambda: all_ended(ray_ids), "Ray's task table never showed the stopped owner's work ended")
        assert sum(RUNNING in states for states in (await call(task_states, ray_ids)).values()) == 2
    finally:
        if after is not None:  # a failure here must not leave the slots held for the tests after it
            other.send(op="release", name="after")
            await call(other.expect, "RELEASED", "after")


# -- no double booking ----------------------------------------------------------------------------------------------

CHAOS_OPS = (67, 67, 66)
#: The step of a chaos owner after which it is killed (the first) or stopped (the second).
MIDWAY = 25


async def test_no_double_booking_under_random_requests_releases_renewals_a_kill_and_a_stop(
    slots: None, cluster_address: str, tmp_path: Path
) -> None:
    """200 seeded random requests, releases and renewals (priorities, preemptible or not) by three processes, one
    SIGKILLed and one SIGSTOPped (then woken) midway: at every sampled instant Ray's placed groups and the keeper's
    held leases fit in the slots; at the end no lease of theirs is left, in the keeper or in Ray."""
    chaos = [
        Owner(cluster_address, tmp_path / f"chaos{i}.log", str(i + 1), str(ops), action="chaos")
        for i, ops in enumerate(CHAOS_OPS)
    ]
    samples: list[tuple[float, float, int]] = []
    done = anyio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append(await call(sample))
            await anyio.sleep(0.02)

    started = time.monotonic()
    try:
        for owner in chaos:
            await call(owner.expect, "READY", within=90)
        preempted_before = await call(preempted_count)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            killed, stopped, calm = chaos
            await call(until_step, killed, MIDWAY)
            os.kill(killed.pid, signal.SIGKILL)
            await call(until_step, stopped, MIDWAY)
            os.kill(stopped.pid, signal.SIGSTOP)
            try:
                # Stopped past every TTL plus grace it holds: the keeper reaps its leases.
                await eventually(
                    lambda: not [r for r in keeper_all() if r["owner"].endswith(f":{stopped.pid}")],
                    "the keeper kept the stopped owner's leases",
                )
            finally:
                os.kill(stopped.pid, signal.SIGCONT)
            reports = [await call(owner.expect, "REPORT", within=120) for owner in (stopped, calm)]
            done.set()
        await eventually(lambda: none_left([o.pid for o in chaos]), "a lease of the chaos owners was left")
    finally:
        for owner in chaos:
            owner.close()
    engine = max(s[0] for s in samples)
    keeper = max(s[1] for s in samples)
    assert len(samples) > 50 and engine <= SLOTS and keeper <= SLOTS, (len(samples), engine, keeper)
    assert max(s[2] for s in samples) > 0
    preempted = await call(preempted_count) - preempted_before
    print(
        f"\nchaos: {time.monotonic() - started:.0f} s, {len(samples)} samples, most slots held {engine:g}/{SLOTS}, "
        f"leases taken back {preempted}, outcomes {[r['counts'] for r in reports]}"
    )
