"""One cluster, many owners: turns across processes, quotas per tenant, fencing tokens, preemption, fencing.

The owners are processes of their own (``_fresh_process.py serve`` or ``chaos``, see ``_owners.py``); every verdict
reads the scheduler's own state: the lease registry plugin's records (and their tokens), its arbiter's line, the
workers' lease marks and the tasks in the scheduler's books.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from _owners import (
    REGISTRY,
    Owner,
    _registry,
    engine_leases,
    fill,
    leases_of,
    pending_of,
    registry,
    release_all,
    until,
)
from distributed import Client

import gridboost as gb
from conftest import SETTLE, eventually
from gridboost import Grid
from gridboost.worker_leases import STALE

#: Rounds of the priority test: each one frees three slots one at a time for three owners.
ROUNDS = 20
#: Seconds one ``gridboost`` command may take (Python and distributed start on a loaded 2-core machine).
COMMAND_TIMEOUT = 90

# The scheduler runs what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


@pytest.fixture(scope="module")
def owners(cluster_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Owner]]:
    """Three owner processes for the whole module, started together."""
    logs = tmp_path_factory.mktemp("owners")
    started = [Owner(cluster_address, logs / f"owner-{i}.log") for i in range(3)]
    try:
        for owner in started:
            anyio.run(owner.start)
        yield started
    finally:
        for owner in started:
            owner.stop()


# -- turns across owners ---------------------------------------------------------------------------------------------


async def test_three_owners_are_served_by_priority_whatever_the_order_they_asked_in(
    grid: Grid, owners: list[Owner], dask_client: Client
) -> None:
    """On a full cluster, LOW, NORMAL and CRITICAL requests of three processes (asked in that order) get the slots
    freed one at a time in the order CRITICAL, NORMAL, LOW, the registry's line and tokens say, round after round."""
    held = await fill(grid)
    order = list(zip(owners, ("low", "normal", "critical"), strict=True))
    served = [owners[2], owners[1], owners[0]]
    try:
        for round_ in range(ROUNDS):
            for owner, priority in order:
                owner.send(op="request", ref=f"{round_}", resources="cpu=1", priority=priority, ttl=120, wait=60)
                await until(lambda s, o=owner: bool(pending_of(s, o)), dask_client, f"{priority} is not in line")
            state = await registry(dask_client)
            assert [t["owner"] for t in state["pending"]] == [o.owner for o in served], state["pending"]
            for n, owner in enumerate(served):
                await held.pop().release()
                await until(lambda s, o=owner: bool(leases_of(s, o)), dask_client, f"round {round_}: no grant #{n}")
                state = await registry(dask_client)
                # The others still wait, in their order: the slot went to the first in line, and only to it.
                assert [t["owner"] for t in state["pending"]] == [o.owner for o in served[n + 1 :]], state
                assert not any(leases_of(state, o) for o in served[n + 1 :]), state
            state = await registry(dask_client)
            granted = sorted((r for o in served for r in leases_of(state, o)), key=lambda r: r["token"])
            assert [r["owner"] for r in granted] == [o.owner for o in served]
            for owner in served:
                event = await owner.expect("granted", f"{round_}")
                assert event["token"] == next(r["token"] for r in granted if r["id"] == event["id"])
                owner.send(op="release", ref=f"{round_}")
            for owner in served:
                await owner.expect("released", f"{round_}")
            held += [await grid.request_boost("cpu=1", ttl=120) for _ in range(len(served))]
    finally:
        await release_all(held)


async def test_another_process_lists_a_pending_request_with_owner_tenant_priority_and_wait(
    grid: Grid, owners: list[Owner], dask_client: Client
) -> None:
    """A request waiting on a full cluster is listed by another process as pending, with its owner, tenant,
    priority, the time it has waited, and no token or expiry yet; once granted, as active with its token."""
    held = await fill(grid)
    asker, lister = owners[0], owners[1]
    try:
        asker.send(
            op="request", ref="listed", resources="cpu=1", priority="high", tenant="team-x", wait=60, preemptible=True
        )
        await until(lambda s: bool(pending_of(s, asker)), dask_client, "the request is not in line")
        await anyio.sleep(0.2)  # so that it has waited a measurable time
        lister.send(op="leases", ref="listed")
        leases = (await lister.expect("leases", "listed"))["leases"]
        mine = [le for le in leases if le["owner"] == asker.owner]
        assert len(mine) == 1, leases
        (lease,) = mine
        assert lease["state"] == "pending" and lease["tenant"] == "team-x" and lease["priority"] == "HIGH"
        assert lease["waited"] > 0 and lease["token"] == 0 and lease["expires_at"] == 0 and lease["preemptible"]
        (ticket,) = pending_of(await registry(dask_client), asker)
        assert ticket["lease"] == lease["id"] and ticket["requested_at"] == pytest.approx(lease["requested_at"])
        await held.pop().release()
        granted = await asker.expect("granted", "listed")
        lister.send(op="leases", ref="granted")
        (lease,) = [le for le in (await lister.expect("leases", "granted"))["leases"] if le["owner"] == asker.owner]
        assert lease["state"] == "active" and lease["tenant"] == "team-x" and lease["preemptible"]
        assert lease["token"] == granted["token"] > 0 and lease["expires_at"] > 0
        asker.send(op="release", ref="listed")
        await asker.expect("released", "listed")
    finally:
        await release_all(held)


# -- quotas ----------------------------------------------------------------------------------------------------------


async def test_a_quota_holds_back_its_tenants_third_request_but_not_another_tenants(
    grid: Grid, owners: list[Owner], dask_client: Client
) -> None:
    """With team-a capped at cpu=2 and holding two 1-CPU leases, its third request waits (the registry says quota)
    while team-b's is granted; it is granted once one of team-a's leases ends. wait=0 over the quota, or a wait that
    runs out while the quota holds it back, ends in QuotaExceeded naming the quota and the use."""
    team_a, team_b = owners[0], owners[1]
    await grid.set_quota("team-a", "cpu=2")
    refs: list[tuple[Owner, str]] = []
    try:
        assert (await registry(dask_client))["quotas"]["team-a"] == {"cpu": 2.0}
        for ref in ("a1", "a2"):
            team_a.send(op="request", ref=ref, resources="cpu=1", tenant="team-a", wait=60)
            await team_a.expect("granted", ref)
            refs.append((team_a, ref))
        team_a.send(op="request", ref="a3", resources="cpu=1", tenant="team-a", wait=60)
        await until(
            lambda s: any("quota cpu=2" in (t["held_back"] or "") for t in pending_of(s, team_a)),
            dask_client,
            "team-a's third request is not held back by its quota",
        )
        team_b.send(op="request", ref="b1", resources="cpu=1", tenant="team-b", wait=60)
        await team_b.expect("granted", "b1")
        refs.append((team_b, "b1"))
        state = await registry(dask_client)
        assert len(pending_of(state, team_a)) == 1 and len(leases_of(state, team_a)) == 2, state
        assert [q.tenant for q in await grid.quotas()] == ["team-a"]
        (quota,) = await grid.quotas()
        assert quota.limit == gb.Resources(cpu=2) and quota.used == gb.Resources(cpu=2)

        team_a.send(op="release", ref="a1")
        await team_a.expect("released", "a1")
        refs.remove((team_a, "a1"))
        await team_a.expect("granted", "a3")
        refs.append((team_a, "a3"))
        state = await registry(dask_client)
        assert not pending_of(state, team_a) and len(leases_of(state, team_a)) == 2, state

        team_a.send(op="request", ref="now", resources="cpu=1", tenant="team-a", wait=0)
        failed = await team_a.expect("failed", "now")
        assert failed["error"] == "QuotaExceeded", failed
        assert "quota cpu=2" in failed["message"] and "in use cpu=2" in failed["message"], failed
        team_a.send(op="request", ref="later", resources="cpu=1", tenant="team-a", wait=1)
        failed = await team_a.expect("failed", "later")
        assert failed["error"] == "QuotaExceeded" and "quota cpu=2" in failed["message"], failed
        await until(lambda s: not pending_of(s, team_a), dask_client, "a request given up is still in line")
    finally:
        for owner, ref in refs:
            owner.send(op="release", ref=ref)
            await owner.expect("released", ref)
        await grid.set_quota("team-a", None)
    assert "team-a" not in (await registry(dask_client))["quotas"]


# -- fencing tokens --------------------------------------------------------------------------------------------------


async def test_tokens_grow_across_grants_of_two_processes_and_match_the_registrys(
    owners: list[Owner], dask_client: Client
) -> None:
    """Grants that alternate between two processes get strictly growing tokens; each boost's token is the one its
    record in the registry carries."""
    tokens = []
    for n in range(6):
        owner = owners[n % 2]
        owner.send(op="request", ref=f"t{n}", resources="cpu=1", wait=60)
        event = await owner.expect("granted", f"t{n}")
        record = next(r for r in (await registry(dask_client))["leases"] if r["id"] == event["id"])
        assert event["token"] == record["token"] > 0
        tokens.append(event["token"])
        owner.send(op="release", ref=f"t{n}")
        await owner.expect("released", f"t{n}")
    assert tokens == sorted(set(tokens)), tokens


# -- an owner that dies in line --------------------------------------------------------------------------------------


async def test_the_request_of_a_killed_owner_stops_holding_back_those_behind_it(
    grid: Grid, owners: list[Owner], cluster_address: str, dask_client: Client, tmp_path: Path
) -> None:
    """A CRITICAL request whose process is SIGKILLed leaves the line as soon as the scheduler sees its client go
    (well before a ticket goes stale), and the LOW request behind it gets the freed slot."""
    held = await fill(grid)
    doomed = Owner(cluster_address, tmp_path / "doomed.log")
    behind = owners[0]
    try:
        await doomed.start()
        doomed.send(op="request", ref="first", resources="cpu=1", priority="critical", wait=60)
        await until(lambda s: bool(pending_of(s, doomed)), dask_client, "the doomed request is not in line")
        behind.send(op="request", ref="behind", resources="cpu=1", priority="low", wait=60)
        await until(lambda s: bool(pending_of(s, behind)), dask_client, "the low request is not in line")
        assert [t["owner"] for t in (await registry(dask_client))["pending"]] == [doomed.owner, behind.owner]
        os.kill(doomed.process.pid, signal.SIGKILL)  # the process this test started, by its pid
        await until(lambda s: not pending_of(s, doomed), dask_client, "the killed owner is in line", STALE / 2)
        await held.pop().release()
        await behind.expect("granted", "behind")
        behind.send(op="release", ref="behind")
        await behind.expect("released", "behind")
    finally:
        doomed.stop()
        await release_all(held)


# -- the command line ------------------------------------------------------------------------------------------------


def gridboost(address: str, *args: str) -> Any:
    """Run ``python -m gridboost --backend dask --address ADDRESS --json ARGS``; it must succeed; its JSON."""
    env = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}}
    done = subprocess.run(
        [sys.executable, "-m", "gridboost", "--backend", "dask", "--address", address, "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"gridboost {' '.join(args)} exited {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


async def cli(address: str, *args: str) -> Any:
    return await anyio.to_thread.run_sync(lambda: gridboost(address, *args))


async def test_the_cli_sets_lists_and_clears_quotas_and_lists_pending_requests(
    grid: Grid, owners: list[Owner], cluster_address: str, dask_client: Client
) -> None:
    """``quota set/list/clear`` change and show the registry's quotas (with the use of granted leases); ``boost list
    --json`` shows a waiting request as pending with its tenant, priority and no token, and each grant's token as
    the registry records it."""
    held = await fill(grid)
    asker = owners[0]
    granted = False
    try:
        set_ = await cli(cluster_address, "quota", "set", "team-cli", "cpu=3")
        assert any(q["tenant"] == "team-cli" and q["limit"] == "cpu=3" for q in set_), set_
        assert (await registry(dask_client))["quotas"]["team-cli"] == {"cpu": 3.0}

        asker.send(op="request", ref="cli", resources="cpu=1", priority="high", tenant="team-cli", wait=60)
        await until(lambda s: bool(pending_of(s, asker)), dask_client, "the request is not in line")
        listed = await cli(cluster_address, "boost", "list")
        (pending,) = [le for le in listed if le["owner"] == asker.owner]
        assert pending["state"] == "pending" and pending["tenant"] == "team-cli" and pending["priority"] == "HIGH"
        assert pending["token"] == 0 and pending["waited"] > 0
        state = await registry(dask_client)
        tokens = {r["id"]: r["token"] for r in state["leases"]}
        for boost in held:
            (mine,) = [le for le in listed if le["id"] == boost.id]
            assert mine["state"] == "active" and mine["token"] == tokens[boost.id] == boost.token > 0

        await held.pop().release()
        await asker.expect("granted", "cli")
        granted = True
        (row,) = [q for q in await cli(cluster_address, "quota", "list") if q["tenant"] == "team-cli"]
        assert row == {"tenant": "team-cli", "limit": "cpu=3", "used": "cpu=1"}

        cleared = await cli(cluster_address, "quota", "clear", "team-cli")
        assert not any(q["tenant"] == "team-cli" for q in cleared)
        assert "team-cli" not in (await registry(dask_client))["quotas"]
    finally:
        if granted:
            asker.send(op="release", ref="cli")
            await asker.expect("released", "cli")
        await grid.set_quota("team-cli", None)
        await release_all(held)


# -- growth: only the cluster manager's owner, only in its turn ------------------------------------------------------


async def test_the_cluster_managers_owner_grows_the_cluster_only_when_it_is_its_turn() -> None:
    """On a full embedded cluster, the owner of its LocalCluster does not grow it while another owner's HIGH request
    is ahead in line (its NORMAL boost times out, one worker still); that request cannot grow it and gets the slot
    once it is released; then the manager's owner, first in line, grows the cluster for its own boost."""
    async with Grid("dask", n_workers=1, threads_per_worker=1, max_workers=2, grow_timeout=60) as manager:
        client = manager.backend.client  # type: ignore[attr-defined]

        async def workers() -> int:
            return len((await client.scheduler.identity(n_workers=-1))["workers"])

        async def line() -> list[dict[str, Any]]:
            state: dict[str, Any] = await client.run_on_scheduler(_registry)
            return list(state["pending"])

        held = await manager.request_boost("cpu=1", ttl=120)
        address = client.scheduler.address
        async with Grid("dask", address=address) as other, anyio.create_task_group() as tasks:
            assert not other.backend.capabilities.grow
            granted: list[gb.Boost] = []

            async def ask() -> None:
                granted.append(await other.request_boost("cpu=1", ttl=120, priority=gb.Priority.HIGH, wait=60))

            tasks.start_soon(ask)

            async def waiting() -> bool:
                return len(await line()) == 1

            await eventually(waiting, "the other owner's request is not in line")
            with pytest.raises(gb.BoostUnavailable):
                await manager.request_boost("cpu=1", ttl=120, wait=2)
            assert await workers() == 1
            await held.release()

            async def served() -> bool:
                return bool(granted)

            await eventually(served, "the other owner's request was not granted")
            assert await workers() == 1 and not await line()
            async with manager.boost("cpu=1", ttl=120, wait=90) as grown:
                assert await workers() == 2 and grown.token > granted[0].token
            await granted[0].release()


# -- a scheduler that runs an older registry ------------------------------------------------------------------------


async def test_a_scheduler_with_an_older_registry_fails_a_boost_with_backend_error_saying_so() -> None:
    """A registry registered by an older gridboost-dask (its reserve takes no ticket) stays on the scheduler; a boost
    there fails with BackendError naming the older registry, not a bare TypeError."""
    from distributed import Scheduler, Worker
    from gridboost_dask import _worker

    class Older(_worker.LeaseRegistry):  # type: ignore[misc]  # distributed has no types here
        async def reserve(self, lease: dict[str, Any], candidates: list[str] | None = None) -> dict[str, Any]:
            return await self._reserve(lease, candidates, None)

    async with (
        Scheduler(host="127.0.0.1", dashboard_address=":0") as scheduler,
        Worker(scheduler.address, nthreads=1),
    ):
        await scheduler.register_scheduler_plugin(cloudpickle.dumps(Older()), name=REGISTRY, idempotent=True)
        async with Grid("dask", address=scheduler.address) as grid:
            with pytest.raises(gb.BackendError, match="older gridboost-dask"):
                await grid.request_boost("cpu=1", ttl=30, wait=10)
            assert not scheduler.plugins[REGISTRY].leases


# -- preemption ------------------------------------------------------------------------------------------------------

PREEMPT_GRACE = 3.0


@pytest.fixture
async def graceful(cluster_address: str, tmp_path: Path) -> AsyncIterator[list[Owner]]:
    """Two owner processes whose grids give a preempted boost PREEMPT_GRACE seconds."""
    options = json.dumps({"preempt_grace": PREEMPT_GRACE, "lease_grace": 1.0})
    started = [Owner(cluster_address, tmp_path / f"graceful-{i}.log", options) for i in range(2)]
    try:
        for owner in started:
            await owner.start()
        yield started
    finally:
        for owner in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner.process.pid, signal.SIGCONT)  # ours, by pid: a test may have stopped it
            await anyio.to_thread.run_sync(owner.stop)


async def test_a_critical_request_takes_a_preemptible_low_lease_of_another_process_back_after_its_grace(
    grid: Grid, graceful: list[Owner], dask_client: Client
) -> None:
    """On a full cluster a CRITICAL request of B marks A's preemptible LOW lease preempting; A's hook fires with the
    grace, A's running work fails with BoostPreempted once the grace is over, and the scheduler then shows A's mark
    and record gone and B's granted; a non-preemptible LOW lease is never taken (B times out, BoostUnavailable)."""
    a, b = graceful
    held = await fill(grid, leave=1)
    try:
        a.send(op="request", ref="low", resources="cpu=1", priority="low", preemptible=True, wait=30)
        victim = await a.expect("granted", "low")
        a.send(op="work", ref="low", count=1, seconds=60)
        await a.expect("submitted", "low")
        asked = time.time()
        b.send(op="request", ref="urgent", resources="cpu=1", priority="critical", wait=30)
        notice = await a.expect("preempted", "low")
        assert 0 < notice["grace"] <= PREEMPT_GRACE and notice["at"] - asked < PREEMPT_GRACE
        state = await registry(dask_client)
        (record,) = [r for r in state["leases"] if r["id"] == victim["id"]]
        assert record["state"] == "preempting", state
        assert victim["id"] in (await engine_leases(dask_client))["marks"]  # still held within the grace
        b.send(op="leases", ref="during")
        listed = {le["id"]: le for le in (await b.expect("leases", "during"))["leases"]}
        assert listed[victim["id"]]["state"] == "preempting", listed
        failed = await a.expect("error", "low#0")
        assert failed["error"] == "BoostPreempted", failed
        assert failed["at"] - notice["at"] >= notice["grace"] - 0.5, (failed, notice)
        granted = await b.expect("granted", "urgent")
        latency = time.time() - asked
        marks = (await engine_leases(dask_client))["marks"]
        assert victim["id"] not in marks and granted["id"] in marks, marks
        taken = (await registry(dask_client))["preempted"]
        assert taken[victim["id"]]["preempted_for"] == granted["id"], taken
        print(f"preemption latency request->grant {latency:.2f}s with preempt_grace={PREEMPT_GRACE:g}s")
        assert PREEMPT_GRACE - 0.5 <= latency <= PREEMPT_GRACE + 5, latency
        b.send(op="release", ref="urgent")
        await b.expect("released", "urgent")

        a.send(op="request", ref="kept", resources="cpu=1", priority="low", preemptible=False, wait=30)
        kept = await a.expect("granted", "kept")
        b.send(op="request", ref="refused", resources="cpu=1", priority="critical", wait=3)
        failed = await b.expect("failed", "refused", timeout=30)
        assert failed["error"] == "BoostUnavailable", failed
        (record,) = [r for r in (await registry(dask_client))["leases"] if r["id"] == kept["id"]]
        assert record["state"] == "active" and kept["id"] in (await engine_leases(dask_client))["marks"]
        a.send(op="release", ref="kept")
        await a.expect("released", "kept")
    finally:
        await release_all(held)


def _restricted_to(lease_id: str, dask_scheduler: Any = None) -> list[str]:
    """On the scheduler: the keys of the tasks it holds that only a worker with ``lease_id``'s mark may run."""

    def under(names: Any) -> bool:  # a lease's mark is gridboost-lease:<session>:<boost id>
        return any(n.startswith("gridboost-lease:") and n.endswith(f":{lease_id}") for n in names or ())

    return sorted(key for key, ts in dask_scheduler.tasks.items() if under(ts.resource_restrictions))


async def test_work_queued_in_a_preempted_boost_moves_and_runs_and_the_schedulers_share_gets_boost_preempted(
    grid: Grid, graceful: list[Owner], dask_client: Client
) -> None:
    """A's preemptible boost holds one CPU, so of three one-CPU tasks placed in it the scheduler gets one (with the
    lease's restriction) and two wait in A's grid; at B's preemption those two are placed again and run without ever
    reaching the scheduler under the lease, and the first gets BoostPreempted after the grace."""
    a, b = graceful
    held = await fill(grid, leave=1)
    try:
        a.send(op="request", ref="prey", resources="cpu=1", priority="low", preemptible=True, wait=30)
        victim = await a.expect("granted", "prey")
        a.send(op="work", ref="prey", auto=True, resources="cpu=1", seconds=[60, 0.5, 0.5])
        keys = (await a.expect("submitted", "prey"))["keys"]

        async def under_lease() -> list[str]:
            return await anyio.to_thread.run_sync(dask_client.run_on_scheduler, _restricted_to, victim["id"])

        async def first_only() -> bool:
            return await under_lease() == keys[:1]

        await eventually(first_only, "the scheduler to hold A's first task, and only it, under the lease")
        b.send(op="request", ref="urgent", resources="cpu=1", priority="critical", wait=30)
        notice = await a.expect("preempted", "prey")
        moved = [await a.expect("done", f"prey#{i}") for i in (1, 2)]
        assert {m["where"] for m in moved} <= {"local", "cluster"}, moved
        assert await under_lease() == keys[:1]  # the moved two never reached the engine under the lease
        failed = await a.expect("error", "prey#0")
        assert failed["error"] == "BoostPreempted", failed
        assert failed["at"] - notice["at"] >= notice["grace"] - 0.5, (failed, notice)
        granted = await b.expect("granted", "urgent")
        marks = (await engine_leases(dask_client))["marks"]
        assert victim["id"] not in marks and granted["id"] in marks, marks
        b.send(op="release", ref="urgent")
        await b.expect("released", "urgent")
    finally:
        await release_all(held)


# -- fencing ---------------------------------------------------------------------------------------------------------


async def test_a_stopped_owners_lease_is_reaped_its_queued_work_cancelled_and_its_boost_refuses_work_after(
    graceful: list[Owner], dask_client: Client
) -> None:
    """An owner SIGSTOPped past TTL + grace loses its lease on the scheduler (mark and record gone, its queued and
    running tasks cancelled there), another owner gets the slot with a larger token; woken, a submit under its boost
    raises BoostExpired."""
    stopped, other = graceful
    stopped.send(op="request", ref="short", resources="cpu=2", ttl=3, wait=30)
    lease = await stopped.expect("granted", "short")
    stopped.send(op="work", ref="short", count=4, seconds=60)
    keys = (await stopped.expect("submitted", "short"))["keys"]

    async def queued() -> bool:
        return len(await call(dask_client.run_on_scheduler, _live_keys, keys)) == len(keys)

    await eventually(queued, "the stopped owner's work is not on the scheduler")
    os.kill(stopped.process.pid, signal.SIGSTOP)  # the process this test started, by its pid
    try:

        async def reaped() -> bool:
            return lease["id"] not in (await engine_leases(dask_client))["marks"]

        await eventually(reaped, "the stopped owner's lease is still marked", 3 + 1 + SETTLE)
        assert not [r for r in (await registry(dask_client))["leases"] if r["id"] == lease["id"]]
        assert not await call(dask_client.run_on_scheduler, _live_keys, keys)  # cancelled on the scheduler
        other.send(op="request", ref="next", resources="cpu=2", wait=30)
        granted = await other.expect("granted", "next")
        assert granted["token"] > lease["token"]
    finally:
        os.kill(stopped.process.pid, signal.SIGCONT)
    stopped.send(op="work", ref="short", count=1, seconds=1)
    refused = await stopped.expect("error", "short")
    assert refused["error"] == "BoostExpired", refused
    other.send(op="release", ref="next")
    await other.expect("released", "next")


def _live_keys(keys: list[str], dask_scheduler: Any = None) -> list[str]:
    """On the scheduler: those of ``keys`` it still means to run or holds (not released, forgotten or erred)."""
    live = []
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        if ts is not None and ts.state not in ("released", "forgotten", "erred"):
            live.append(key)
    return live


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


# -- no double booking -----------------------------------------------------------------------------------------------

#: Steps of each chaos owner: with one killed a third of the way, about 200 in all.
CHAOS_OPS = 90


def _sampling(dask_scheduler: Any = None) -> None:
    """On the scheduler: check :func:`_booked` every millisecond in its own event loop (between any two of its steps,
    so between a release and a grant too), keeping the count and what was over capacity on the scheduler object."""
    import asyncio

    found: dict[str, Any] = {"samples": 0, "over": []}

    async def loop() -> None:
        while True:
            over = _booked(dask_scheduler)
            found["samples"] += 1
            if over and len(found["over"]) < 10:
                found["over"].append(over)
            await asyncio.sleep(0.001)

    dask_scheduler.gridboost_sampler = (found, asyncio.get_running_loop().create_task(loop()))


def _sampled(dask_scheduler: Any = None) -> dict[str, Any]:
    """On the scheduler: stop :func:`_sampling`; what it found."""
    found, task = dask_scheduler.gridboost_sampler
    task.cancel()
    del dask_scheduler.gridboost_sampler
    return dict(found)


def _booked(dask_scheduler: Any = None) -> list[str]:
    """On the scheduler: each worker whose lease marks (Dask's own resource books) or whose registry leases (those
    being released included) hold more threads than it has, named; empty when everything fits."""
    plugin = dask_scheduler.plugins[REGISTRY]
    over = []
    for addr, ws in dask_scheduler.workers.items():
        marked = sum(v for k, v in ws.resources.items() if k.startswith("gridboost-lease:") and v > 0)
        booked = sum(
            r["amounts"].get(addr, {}).get("cpu", 0.0) for r in [*plugin.leases.values(), *plugin._releasing.values()]
        )
        if marked > ws.nthreads + 1e-9 or booked > ws.nthreads + 1e-9:
            over.append(f"{addr}: {ws.nthreads} threads, marks {marked:g}, leases {booked:g}")
    return over


async def test_no_two_leases_ever_share_a_thread_under_random_requests_kills_and_stops(
    cluster_address: str, dask_client: Client, tmp_path: Path
) -> None:
    """Three processes make seeded random requests, releases, renewals and works (one SIGKILLed, one SIGSTOPped and
    woken midway); at every sampled instant the scheduler's lease marks and the registry's leases fit in every
    worker's threads, and at the end the scheduler holds no lease and no mark."""
    chaotic = [
        Owner(cluster_address, tmp_path / f"chaos-{seed}.log", str(seed), str(CHAOS_OPS), action="chaos")
        for seed in (1, 2, 3)
    ]
    samples = 0
    overbooked: list[list[str]] = []
    stop = anyio.Event()

    async def sample() -> None:
        nonlocal samples
        while not stop.is_set():
            over = await call(dask_client.run_on_scheduler, _booked)
            samples += 1
            if over:
                overbooked.append(over)
            await anyio.sleep(0.01)

    try:
        for owner in chaotic:
            await owner.start()
        killed, stopped, steady = chaotic
        await call(dask_client.run_on_scheduler, _sampling)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sample)
            await killed.expect("step", str(CHAOS_OPS // 3), timeout=60)
            os.kill(killed.process.pid, signal.SIGKILL)  # ours, by pid
            await stopped.expect("step", str(CHAOS_OPS // 3), timeout=60)
            os.kill(stopped.process.pid, signal.SIGSTOP)
            await anyio.sleep(6)  # past the longest TTL plus lease_grace: its leases are reaped meanwhile
            os.kill(stopped.process.pid, signal.SIGCONT)
            for owner in (stopped, steady):
                report = await owner.expect("report", timeout=90)
                assert sum(report["counts"].values()) >= CHAOS_OPS - CHAOS_OPS // 3, report
                print(f"chaos owner {owner.owner}: {report['counts']}")

            async def empty() -> bool:
                return not (await registry(dask_client))["leases"] and not (await engine_leases(dask_client))["marks"]

            await eventually(empty, "a lease or a mark is left on the scheduler")
            stop.set()
        inside = await call(dask_client.run_on_scheduler, _sampled)
        assert samples > 50 and not overbooked, (samples, overbooked[:3])
        assert inside["samples"] > 1000 and not inside["over"], inside
        taken = (await registry(dask_client))["preempted"]
        print(
            f"chaos: {samples} samples from the test, {inside['samples']} on the scheduler, none over capacity; {len(taken)} lease(s) preempted so far"
        )
    finally:
        for owner in chaotic:
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner.process.pid, signal.SIGCONT)
            owner.stop()
