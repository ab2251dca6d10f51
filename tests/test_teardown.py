"""The teardown guarantee: leaving ``async with Grid`` stops, releases and closes everything, or says what it could not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import anyio.from_thread
import pytest

import gridboost as gb
from gridboost._local import LocalBackend
from gridboost.testing import nap  # sleeps, but stops at a cancel, as thread code should

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=4GiB"


class BodyFailed(Exception):
    pass


async def test_body_exception_with_200_tasks_in_flight_cancels_and_awaits_all() -> None:
    """An exception in the body leaves 200 in-flight tasks cancelled, the boost released and no reservation held."""
    handles: list[gb.TaskHandle[float]] = []
    with anyio.fail_after(30):
        with pytest.raises(BodyFailed):
            async with gb.Grid(capacity=CAPACITY) as grid:
                backend = grid.backend
                boost = await grid.request_boost("cpu=1", ttl=60)
                handles += [grid.submit(nap, 30.0, resources="cpu=0.5") for _ in range(200)]
                await anyio.sleep(0.1)
                assert len(await backend.reservations()) == 1
                raise BodyFailed
    assert all(h.done() and h.cancelled() for h in handles)
    for handle in handles[:3]:
        with pytest.raises(gb.TaskCancelled, match="grid closed"):
            await handle
    assert boost.state is gb.BoostState.RELEASED
    assert isinstance(backend, LocalBackend)
    assert backend._reserved == {} and backend.running_tasks() == {}
    assert grid.closed


async def test_cancelled_body_with_200_tasks_in_flight_cancels_and_awaits_all() -> None:
    """Cancelling the block that holds the grid tears it down the same way, and the cancellation still propagates."""
    handles: list[gb.TaskHandle[float]] = []
    with anyio.fail_after(30):
        with anyio.move_on_after(0.3) as outer:
            async with gb.Grid(capacity=CAPACITY) as grid:
                backend = grid.backend
                await grid.request_boost("cpu=1", ttl=60)
                handles += [grid.submit(nap, 30.0, resources="cpu=0.5") for _ in range(200)]
                await anyio.sleep(30)
    assert outer.cancelled_caught
    assert all(h.cancelled() for h in handles)
    assert isinstance(backend, LocalBackend)
    assert backend._reserved == {} and backend.running_tasks() == {}
    assert grid.boosts == ()


async def test_inline_offloads_from_other_tasks_are_cancelled_at_teardown() -> None:
    """An ``await grid.offload`` running in a task outside the grid is cancelled when the grid closes."""
    seen: list[BaseException] = []

    async def caller(grid: gb.Grid) -> None:
        try:
            await grid.offload(nap, 30.0)
        except gb.TaskCancelled as exc:
            seen.append(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async with gb.Grid(capacity=CAPACITY) as grid:
                for _ in range(3):
                    tg.start_soon(caller, grid)
                await anyio.sleep(0.1)
    assert len(seen) == 3


async def test_every_method_raises_grid_closed_after_exit() -> None:
    """After the block, every public operation raises GridClosed."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        pass

    async def no_op() -> None:
        pass

    calls = [
        lambda: grid.offload(len, "x"),
        lambda: grid.run_command(["true"]),
        lambda: grid.request_boost("cpu=1", ttl=1),
        lambda: grid.snapshot(),
        lambda: grid.enter_async_context(_app_resource([], "late")),
    ]
    for call in calls:
        with pytest.raises(gb.GridClosed):
            await call()
    with pytest.raises(gb.GridClosed):
        grid.submit(len, "x")
    with pytest.raises(gb.GridClosed):
        grid.map(len, ["x"])
    with pytest.raises(gb.GridClosed):
        grid.push_async_callback(no_op)
    with pytest.raises(gb.GridClosed):
        async with grid:
            pass


async def test_a_grid_not_entered_refuses_work() -> None:
    """A grid used before ``async with`` says so instead of hanging."""
    grid = gb.Grid(capacity=CAPACITY)
    with pytest.raises(gb.GridClosed, match="not open yet"):
        await grid.offload(len, "x")


@asynccontextmanager
async def _app_resource(log: list[str], name: str) -> AsyncIterator[str]:
    log.append(f"enter {name}")
    try:
        yield name
    finally:
        await anyio.sleep(0.01)  # a real await: teardown must drive it, not drop it
        log.append(f"exit {name}")


class AgentRegistry:
    """A host app's registry whose ``unregister`` coroutines must all be awaited."""

    def __init__(self) -> None:
        self.agents: set[str] = set()

    async def register(self, name: str) -> None:
        self.agents.add(name)

    async def unregister(self, name: str) -> None:
        await anyio.sleep(0.01)
        self.agents.discard(name)


async def test_app_resources_close_in_reverse_order_after_work_stops() -> None:
    """Resources handed to the grid are exited in reverse order, awaited, after in-flight work is cancelled."""
    log: list[str] = []
    registry = AgentRegistry()
    with anyio.fail_after(20):
        async with gb.Grid(capacity=CAPACITY) as grid:
            assert await grid.enter_async_context(_app_resource(log, "a")) == "a"
            await grid.enter_async_context(_app_resource(log, "b"))
            for name in ("x", "y", "z"):
                await registry.register(name)
                grid.push_async_callback(registry.unregister, name)
            handle = grid.submit(nap, 30.0)
            await anyio.sleep(0.05)
    assert log == ["enter a", "enter b", "exit b", "exit a"]
    assert registry.agents == set()
    assert handle.cancelled()


async def test_failing_app_callback_is_reported_in_teardown_error() -> None:
    """A host callback that raises at teardown is named in TeardownError; the rest is still closed."""

    async def broken() -> None:
        raise RuntimeError("agent registry unreachable")

    with anyio.fail_after(20), pytest.raises(gb.TeardownError, match="agent registry unreachable") as info:
        async with gb.Grid(capacity=CAPACITY) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60)
            grid.push_async_callback(broken)
    assert boost.state is gb.BoostState.RELEASED
    assert grid.closed
    assert any("callback" in item and "broken" in item and "failed" in item for item in info.value.leftovers)


def _stubborn(seconds: float) -> None:
    time.sleep(seconds)  # ignores cancellation, as plain thread code does


async def test_thread_that_outlives_close_timeout_is_named() -> None:
    """A thread that cannot be interrupted and outlives the close timeout is named in TeardownError."""
    with anyio.fail_after(20), pytest.raises(gb.TeardownError, match="_stubborn") as info:
        async with gb.Grid(capacity=CAPACITY, close_timeout=0.2) as grid:
            grid.submit(_stubborn, 1.0)
            await anyio.sleep(0.05)
    assert any("in a thread is still running" in item for item in info.value.leftovers)
    await anyio.sleep(1.2)  # let the thread end before the next test


class LeakyRelease(LocalBackend):
    """A backend whose release forgets to give the reservation back."""

    name = "leaky"

    async def release(self, reservation: gb.abc.Reservation) -> None:
        pass


class _LeakyPlugin:
    @gb.hookimpl
    def gridboost_backends(self) -> Iterator[gb.BackendSpec]:
        yield gb.BackendSpec("leaky", LeakyRelease, options={"capacity": "capacity"})


async def test_reservation_left_on_the_engine_fails_teardown() -> None:
    """A reservation the engine still holds after release is named: teardown asks the engine, not our books."""
    with anyio.fail_after(20), pytest.raises(gb.TeardownError, match=r"reservation boost-\S+ is still held"):
        async with gb.Grid("leaky", plugins=[_LeakyPlugin()], capacity=CAPACITY) as grid:
            await grid.request_boost("cpu=1", ttl=60)


async def test_pending_boost_request_is_cancelled_at_teardown() -> None:
    """A boost request still waiting for capacity when the grid closes ends with GridClosed, not a hang."""
    outcome: list[BaseException] = []

    async def ask(grid: gb.Grid) -> None:
        try:
            await grid.request_boost("cpu=2", ttl=60, wait=60)
        except gb.GridClosed as exc:
            outcome.append(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async with gb.Grid(capacity=CAPACITY) as grid:
                await grid.request_boost("cpu=2", ttl=60)
                tg.start_soon(ask, grid)
                await anyio.sleep(0.1)
                assert len(grid.boosts) == 2
    assert len(outcome) == 1


async def test_concurrent_use_from_many_tasks() -> None:
    """Many tasks may offload, submit and boost on one grid at once."""
    results: list[int] = []

    async def worker(grid: gb.Grid, i: int) -> None:
        async with grid.boost("cpu=0.5", ttl=30, wait=10):
            results.append(await grid.offload(pow, i, 2))
            results.append(await grid.submit(pow, i, 3))

    with anyio.fail_after(30):
        async with gb.Grid(capacity=CAPACITY) as grid, anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(worker, grid, i)
    assert sorted(results) == sorted([i**2 for i in range(20)] + [i**3 for i in range(20)])


def test_a_grid_can_be_built_outside_an_event_loop() -> None:
    """``Grid()`` needs no running loop; it is entered later, inside one, on either backend."""
    for backend in ("asyncio", "trio"):
        grid = gb.Grid(capacity=CAPACITY)

        async def use(grid: gb.Grid = grid) -> int:
            async with grid:
                return await grid.offload(sum, [1, 2])

        assert anyio.run(use, backend=backend) == 3
        assert grid.closed


async def test_every_waiter_on_a_tracked_set_wakes_when_it_empties() -> None:
    """Two tasks awaiting ``emptied()`` both return when the last item leaves (the second must not orphan the first)."""
    from gridboost._kit import Tracked

    work: Tracked[int] = Tracked()
    work.add(1)
    woke: list[str] = []

    async def wait(name: str) -> None:
        await work.emptied()
        woke.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait, "first")
            await anyio.wait_all_tasks_blocked()
            tasks.start_soon(wait, "second")
            await anyio.wait_all_tasks_blocked()
            work.discard(1)
    assert sorted(woke) == ["first", "second"]
