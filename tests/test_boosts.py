"""Boosts: real reservations on the backend, priority order, TTL, renewal and release."""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.from_thread
import pytest

import gridboost as gb
from gridboost.testing import nap  # sleeps, but stops at a cancel, as thread code should

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=4GiB"


async def held(grid: gb.Grid) -> set[str]:
    """The ids of the reservations the backend itself reports."""
    return {r.id for r in await grid.backend.reservations()}


async def test_boost_is_held_by_the_backend_until_released() -> None:
    """A granted boost is a reservation the backend holds and takes from free capacity; release gives it back."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        boost = await grid.request_boost("cpu=1.5,memory=1GiB", ttl=60)
        assert boost.state is gb.BoostState.ACTIVE
        assert await held(grid) == {boost.id}
        node = (await grid.snapshot()).nodes[0]
        assert boost.placements == (node.id,)
        assert node.available == gb.Resources.parse("cpu=0.5,memory=3GiB")
        assert boost.expires_at is not None and 59 < boost.expires_at - time.time() <= 60
        await boost.release()
        await boost.release()  # idempotent
        assert boost.state is gb.BoostState.RELEASED
        assert await held(grid) == set()
        assert (await grid.snapshot()).available == gb.Resources.parse(CAPACITY)
        assert grid.boosts == ()


async def test_boost_block_places_auto_work_inside_and_releases_on_exit() -> None:
    """Work submitted inside ``async with grid.boost`` runs in the boost; the block's end releases it."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        async with grid.boost("cpu=1", ttl=60) as boost:
            assert gb.current_boost() is boost
            handle = grid.submit(pow, 2, 10)
            assert await handle == 1024
            assert handle.placement is not None and handle.placement.boost is boost
            assert handle.placement.kind == "boost"
            assert await held(grid) == {boost.id}
        assert gb.current_boost() is None
        assert boost.state is gb.BoostState.RELEASED
        assert await held(grid) == set()
        outside = grid.submit(pow, 2, 3)
        assert await outside == 8
        assert outside.placement is not None and outside.placement.kind == "local"


async def test_explicit_where_boost_runs_inside_the_reservation() -> None:
    """``where=boost`` takes the task's resources from the boost, not from free machine capacity."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        boost = await grid.request_boost("cpu=2", ttl=60)
        # the machine has nothing free now; only the boost can hold this task
        assert await grid.offload(sum, [1, 2], resources="cpu=2", where=boost) == 3
        await boost.release()
        with pytest.raises(gb.BoostExpired, match="released"):
            await grid.offload(sum, [1], where=boost)


async def test_ttl_expiry_cancels_work_releases_and_fires_the_hook() -> None:
    """At its TTL a boost's work is cancelled with BoostExpired, its reservation released, and observers told."""
    expired: list[str] = []

    class Observer:
        @gb.hookimpl
        def gridboost_boost_expired(self, boost: gb.Boost) -> None:
            expired.append(boost.id)

    async with gb.Grid(capacity=CAPACITY, plugins=[Observer()]) as grid:
        boost = await grid.request_boost("cpu=1", ttl=0.3)
        handle = grid.submit(nap, 15.0, where=boost)
        with anyio.fail_after(5), pytest.raises(gb.BoostExpired, match=boost.id):
            await handle
        assert boost.state is gb.BoostState.EXPIRED
        with anyio.fail_after(5):
            while not expired:  # the release is awaited after the work is cancelled
                await anyio.sleep(0.01)
        assert expired == [boost.id]
        assert await held(grid) == set()
        assert grid.stats()["boosts.expired"] == 1
        await boost.release()  # a no-op on an expired boost
        with pytest.raises(gb.BoostExpired):
            await boost.renew(10)


async def test_an_owner_stalled_past_the_ttl_finds_its_lease_fenced_when_it_wakes() -> None:
    """An owner whose event loop stalled past a boost's TTL wakes to a boost that refuses work and renewal at once."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        boost = await grid.request_boost("cpu=1", ttl=2.0)  # long enough that the expiry loop cannot come first
        time.sleep(2.3)  # noqa: ASYNC251 - the whole owner stalls, its expiry loop too, as a SIGSTOP would
        assert boost.state is gb.BoostState.ACTIVE  # nothing of the grid ran meanwhile
        with pytest.raises(gb.BoostExpired, match="ran out at its TTL"):
            grid.submit(nap, 0, where=boost)
        with pytest.raises(gb.BoostExpired, match="ran out at its TTL"):
            await boost.renew(10)
        with pytest.raises(gb.BoostExpired, match="ran out at its TTL"):
            await grid.put(b"data", boost=boost)
        with anyio.fail_after(5):
            while boost.state is gb.BoostState.ACTIVE:
                await anyio.sleep(0.01)
        assert boost.state is gb.BoostState.EXPIRED
        assert await held(grid) == set()


async def test_renew_moves_the_deadline() -> None:
    """A renewed boost outlives its first TTL, then expires at the new one."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        boost = await grid.request_boost("cpu=1", ttl=0.3)
        await boost.renew(0.8)
        await anyio.sleep(0.5)
        assert boost.state is gb.BoostState.ACTIVE
        assert 0 < boost.ttl_left <= 0.3
        with anyio.fail_after(5):
            while boost.state is gb.BoostState.ACTIVE:
                await anyio.sleep(0.02)
        assert boost.state is gb.BoostState.EXPIRED
        with pytest.raises(gb.InvalidRequest, match="ttl"):
            await (await grid.request_boost("cpu=1", ttl=5)).renew(0)


async def test_pending_boosts_are_granted_in_priority_order() -> None:
    """When capacity frees up, the highest-priority pending request is granted first, then the oldest of equals."""
    granted: list[str] = []

    async with gb.Grid(capacity=CAPACITY) as grid:
        blocker = await grid.request_boost("cpu=2", ttl=60)

        async def ask(name: str, priority: gb.Priority) -> None:
            boost = await grid.request_boost("cpu=2", ttl=60, priority=priority, wait=20)
            granted.append(name)
            await anyio.sleep(0.05)
            await boost.release()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for name, priority in [
                    ("low", gb.Priority.LOW),
                    ("normal-1", gb.Priority.NORMAL),
                    ("critical", gb.Priority.CRITICAL),
                    ("normal-2", gb.Priority.NORMAL),
                    ("high", gb.Priority.HIGH),
                ]:
                    tg.start_soon(ask, name, priority)
                    await anyio.sleep(0.02)  # a known arrival order
                assert granted == []
                assert sum(b.state is gb.BoostState.PENDING for b in grid.boosts) == 5
                await blocker.release()
    assert granted == ["critical", "high", "normal-1", "normal-2", "low"]


async def test_higher_priority_request_that_fits_is_not_blocked_by_a_waiting_one() -> None:
    """A low-priority request waiting for capacity does not hold back a higher one that fits now."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        await grid.request_boost("cpu=1", ttl=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: grid.request_boost("cpu=2", ttl=60, priority=gb.Priority.LOW, wait=0.5))
            await anyio.sleep(0.05)
            with anyio.fail_after(2):
                quick = await grid.request_boost("cpu=1", ttl=60, priority=gb.Priority.HIGH)
            assert quick.is_active
            tg.cancel_scope.cancel()


async def test_wait_timeout_says_what_was_missing() -> None:
    """A boost that does not fit within ``wait`` raises BoostUnavailable naming the shortfall, and the grid stays usable."""
    failed: list[BaseException] = []

    class Observer:
        @gb.hookimpl
        def gridboost_boost_failed(self, error: BaseException) -> None:
            failed.append(error)

    async with gb.Grid(capacity=CAPACITY, plugins=[Observer()]) as grid:
        await grid.request_boost("cpu=1.5", ttl=60)
        started = anyio.current_time()
        with pytest.raises(gb.BoostUnavailable, match=r"within 0.2s: missing cpu=0.5") as info:
            await grid.request_boost("cpu=1", ttl=60, wait=0.2)
        assert anyio.current_time() - started < 5
        assert failed == [info.value]
        assert len(await held(grid)) == 1
        assert await grid.offload(max, 1, 2) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resources": "cpu=64"}, r"more than the whole cluster has .*missing cpu=62"),
        ({"resources": "gpu=1"}, r"missing gpu=1"),
        ({"resources": "cpu=1", "labels": {"zone": "mars"}}, r"no live node matches"),
        ({"resources": "cpu=1", "nodes": ["elsewhere"]}, r"no live node matches"),
    ],
    ids=["too-many-cpus", "no-gpu", "labels-match-nothing", "nodes-match-nothing"],
)
async def test_impossible_boosts_fail_at_once(kwargs: dict[str, Any], message: str) -> None:
    """A boost no node set can ever hold fails immediately, not after ``wait``."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        kwargs = dict(kwargs)
        resources = kwargs.pop("resources")
        with anyio.fail_after(2), pytest.raises(gb.BoostUnavailable, match=message):
            await grid.request_boost(resources, ttl=60, wait=600, **kwargs)
        assert grid.boosts == ()
        assert (await grid.request_boost("cpu=1", ttl=60)).is_active


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ttl": 0}, gb.InvalidRequest, "ttl must be > 0"),
        ({"ttl": -5}, gb.InvalidRequest, "ttl must be > 0"),
        ({"ttl": float("nan")}, gb.InvalidRequest, "ttl must be a finite"),
        ({"ttl": "10"}, gb.InvalidRequest, "ttl must be a finite"),
        ({"ttl": 10, "wait": -1}, gb.InvalidRequest, "wait must be >= 0"),
        ({"ttl": 10, "wait": float("inf")}, gb.InvalidRequest, "wait must be a finite"),
        ({"ttl": 10, "strategy": "scatter"}, gb.InvalidRequest, "strategy must be one of"),
        ({"ttl": 10, "priority": 9}, gb.InvalidRequest, "priority must be"),
        ({"ttl": 10, "nodes": "node-1"}, gb.InvalidRequest, "nodes must be a list"),
        ({"ttl": 10, "labels": {"zone": 1}}, gb.InvalidRequest, "labels must map strings"),
        ({"ttl": 10, "preemptible": 1}, gb.InvalidRequest, "preemptible must be True or False"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
async def test_bad_boost_arguments_are_refused_at_the_boundary(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Bad boost arguments raise a typed error that names the problem, and nothing reaches the backend."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(error, match=message):
            await grid.request_boost("cpu=1", **kwargs)
        with pytest.raises(gb.InvalidResources, match="cpu must not be negative"):
            await grid.request_boost({"cpu": -1}, ttl=10)
        with pytest.raises(gb.InvalidRequest, match="some resources"):
            await grid.request_boost(gb.Resources(), ttl=10)
        assert await held(grid) == set()
        assert (await grid.request_boost("cpu=1", ttl=10)).is_active


async def test_every_grant_carries_a_larger_fencing_token() -> None:
    """Each grant's token is larger than the one before, and the lease listing shows it with tenant and flag."""
    async with gb.Grid(capacity=CAPACITY, tenant="team-a") as grid:
        tokens = []
        for preemptible in (False, True, False):
            async with grid.boost("cpu=1", ttl=10, preemptible=preemptible) as boost:
                assert boost.tenant == "team-a" and boost.preemptible is preemptible
                [lease] = await grid.leases()
                assert (lease.token, lease.tenant, lease.preemptible) == (boost.token, "team-a", preemptible)
                assert lease.state == "active" and lease.waited == 0.0
                tokens.append(boost.token)
            assert boost.token == tokens[-1]  # kept after the end, for the records
        assert tokens == sorted(set(tokens)) and tokens[0] > 0


@pytest.mark.parametrize("tenant", ["", "two words", "x" * 101, 7, "tab\there"])
async def test_a_bad_tenant_is_refused_when_the_grid_is_made(tenant: object) -> None:
    with pytest.raises(gb.InvalidRequest, match="tenant is a short name without spaces"):
        gb.Grid(tenant=tenant)  # type: ignore[arg-type]


async def test_the_default_tenant_is_user_at_host_and_the_local_backend_keeps_no_quotas() -> None:
    """Quotas need a cluster's lease registry: the local backend says so in a typed error, and lists none."""
    import getpass
    import socket

    async with gb.Grid(capacity=CAPACITY) as grid:
        assert grid.tenant == f"{getpass.getuser()}@{socket.gethostname()}"
        with pytest.raises(gb.InvalidRequest, match="keeps no lease registry: it cannot keep quotas"):
            await grid.set_quota("team-a", "cpu=1")
        with pytest.raises(gb.InvalidRequest, match="tenant is a short name"):
            await grid.set_quota("", "cpu=1")
        assert await grid.quotas() == ()
        assert (await grid.request_boost("cpu=1", ttl=10)).is_active


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_work_under_a_boost_reads_its_lease_and_token(executor: str) -> None:
    """Inside a boost's work ``current_lease()`` names the lease and its token; outside it is ``None``."""
    async with gb.Grid(capacity=CAPACITY, executor=executor) as grid:
        async with grid.boost("cpu=1", ttl=30) as boost:
            inside = await grid.offload(gb.current_lease, where=boost)
            assert inside == gb.CurrentLease(boost.id, boost.token) and inside.token > 0
        assert await grid.offload(gb.current_lease, where="local") is None
    assert gb.current_lease() is None


async def test_wait_zero_grants_what_fits_now_and_refuses_what_does_not_within_a_second() -> None:
    """``wait=0`` is one look: a boost that fits is granted; one that does not fails within about a second."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        boost = await grid.request_boost("cpu=2", ttl=10, wait=0)
        assert boost.is_active
        started = time.monotonic()
        with pytest.raises(gb.BoostUnavailable, match="was not granted within 0s"):
            await grid.request_boost("cpu=1", ttl=10, wait=0)
        assert time.monotonic() - started < 5
