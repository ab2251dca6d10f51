"""A cluster shared by many owners: turns by priority across processes, quotas, fencing tokens, one autoscaler request.

The owners are real processes (``_fresh_process.py serve``), each with its own grid joined to the session's cluster
and driven over stdin, so that one process serves many rounds. Capacity is a custom resource (``slot``) of a node of
this module's own, filled by placement groups the test holds. Every verdict reads Ray's placement group table, the
lease keeper's records or the GCS's autoscaler request, never what an owner says alone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
import ray
from gridboost_ray._leases import KEEPER_NAME, KEEPER_NAMESPACE
from ray.cluster_utils import Cluster
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from test_leases import autoscaler_request

import gridboost as gb
from test_cli import on_ray

HERE = Path(__file__).parent
SLOTS = 4
SETTLE = 30.0
ROUNDS = 20
#: The keeper's arbiter forgets a ticket not asked again for this long (gridboost.worker_leases.STALE).
STALE = 10.0
WORDS = frozenset({"READY", "GRANTED", "FAILED", "RELEASED"})

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


class Owner:
    """A lease owner process, driven over stdin; what it prints is kept by word until a test takes it."""

    def __init__(self, address: str, log: Path) -> None:
        self.log = log
        self._err: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "_fresh_process.py"), "serve", address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            bufsize=0,
        )
        self.said: list[tuple[str, dict[str, Any]]] = []
        self.pid = self.process.pid

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())

    def expect(self, word: str, name: str | None = None, within: float = SETTLE) -> dict[str, Any]:
        """The next ``word`` line (for ``name``) this owner printed, waiting up to ``within`` seconds for it."""
        out = self.process.stdout
        assert out is not None
        deadline = time.monotonic() + within
        while True:
            for i, (said, what) in enumerate(self.said):
                if said == word and (name is None or what.get("name") == name):
                    return self.said.pop(i)[1]
            left = deadline - time.monotonic()
            # select first: a silent owner must not hold readline() past the deadline (it prints whole lines).
            if left <= 0 or not select.select([out], [], [], left)[0]:
                pytest.fail(f"owner {self.pid} never said {word} {name or ''}; it said {self.said}\n{self.tail()}")
            line = out.readline().decode()
            if not line:
                pytest.fail(f"owner {self.pid} exited ({self.process.poll()}) before {word} {name}\n{self.tail()}")
            said, _, rest = line.strip().partition(" ")
            if said in WORDS:
                self.said.append((said, json.loads(rest)))

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # ours, by its pid
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout, self._err):
            if stream is not None:
                stream.close()


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


# -- reading the engine ---------------------------------------------------------------------------------------------


def keeper_all() -> list[dict[str, Any]]:
    """The keeper's records and its waiting tickets (``state`` pending), as the keeper itself holds them (none
    before an owner has started the keeper)."""
    try:
        keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    except ValueError:
        return []
    return list(ray.get(keeper.leases.remote(True), timeout=SETTLE))


def of(owner: Owner, state: str) -> list[dict[str, Any]]:
    """The keeper's entries of ``owner`` in ``state``, oldest grant first."""
    rows = [r for r in keeper_all() if r["owner"].endswith(f":{owner.pid}") and r["state"] == state]
    return sorted(rows, key=lambda r: r.get("token", 0))


def pg_state(pg_id: str) -> str:
    row = placement_group_table().get(pg_id)
    return str(row["state"]) if row else "REMOVED"


async def eventually(check: Callable[[], Any], what: str, within: float = SETTLE) -> Any:
    """Run ``check`` (blocking, in a thread) until it returns something true; return that."""
    with anyio.move_on_after(within):
        while not (found := await anyio.to_thread.run_sync(check)):
            await anyio.sleep(0.02)
        return found
    pytest.fail(f"after {within:g}s: {what}")


def hold_all() -> list[PlacementGroup]:
    """Fill every slot with a group of the test's own (placed before this returns)."""
    groups = [placement_group([{"slot": 1}]) for _ in range(SLOTS)]
    assert all(pg.wait(SETTLE) for pg in groups)
    return groups


def free(groups: list[PlacementGroup]) -> None:
    for pg in groups:
        remove_placement_group(pg)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


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
