"""``gridboost.Executor`` and ``grid.executor()``: the ``concurrent.futures`` contract on the local backend, and what
only the core can check (the loop thread refused, a bound executor leaving its grid open, capacity)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any

import anyio
import pytest

import gridboost as gb
from gridboost.testing import ExecutorSuite, add, nap

pytestmark = pytest.mark.timeout(120)


class TestLocalExecutor(ExecutorSuite):
    @pytest.fixture
    def backend_name(self) -> str:
        return "local"

    @pytest.fixture
    def grid_options(self) -> dict[str, Any]:
        return {"capacity": "cpu=2"}

    @pytest.fixture
    def capacity_units(self) -> int:
        return 2


def test_an_executor_is_a_standard_one() -> None:
    """Both executors are ``concurrent.futures.Executor`` subclasses, the owning one a ``GridExecutor``."""
    assert issubclass(gb.Executor, gb.GridExecutor)
    assert issubclass(gb.GridExecutor, cf.Executor)


def test_capacity_is_the_grid_cpus() -> None:
    """``capacity()`` is the CPUs the local grid has; with a boost, the boost's."""
    with gb.Executor(capacity="cpu=3") as executor:
        assert executor.capacity() == 3
    with gb.Executor(capacity="cpu=3", boost="cpu=2") as executor:
        assert executor.capacity() == 2


def test_call_runs_in_the_loop_and_awaits() -> None:
    """``call`` runs a plain function or a coroutine function in the grid's loop and returns its result."""
    with gb.Executor(capacity="cpu=1") as executor:
        assert executor.call(lambda: threading.current_thread() is not threading.main_thread()) is True
        snapshot = executor.call(executor.grid.snapshot)
        assert snapshot.total.cpu == 1
    with pytest.raises(gb.GridClosed):
        executor.call(executor.grid.snapshot)


@pytest.mark.anyio
async def test_a_bound_executor_serves_threads_and_leaves_the_grid_open() -> None:
    """``grid.executor()`` serves sync code in other threads; its shutdown leaves the grid running."""
    async with gb.Grid(capacity="cpu=2") as grid:
        executor = grid.executor()

        def sync_code() -> list[int]:
            with executor:
                return list(executor.map(add, range(5), range(5)))

        assert await anyio.to_thread.run_sync(sync_code) == [0, 2, 4, 6, 8]
        assert not grid.closed
        assert await grid.offload(add, 1, 2) == 3
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(add, 1)


@pytest.mark.anyio
async def test_a_bound_executor_refuses_the_loop_thread() -> None:
    """Submitting from the grid's own loop thread, where it would wait on itself, is a typed error."""
    async with gb.Grid(capacity="cpu=1") as grid:
        executor = grid.executor()
        with pytest.raises(gb.InvalidRequest, match="own event loop thread"):
            executor.submit(add, 1)


@pytest.mark.anyio
async def test_a_bound_executor_in_a_boost_block_runs_in_the_boost() -> None:
    """An executor taken inside a boost block places its work in that boost."""
    async with gb.Grid(capacity="cpu=2") as grid, grid.boost("cpu=1", ttl=30) as boost:
        executor = grid.executor()
        future = await anyio.to_thread.run_sync(executor.submit, gb.current_lease)
        lease = await anyio.to_thread.run_sync(future.result, 10)
        assert (lease.id, lease.token) == (boost.id, boost.token)
        assert grid.stats()["placed.boost"] == 1
        assert await anyio.to_thread.run_sync(executor.capacity) == 1


@pytest.mark.anyio
async def test_closing_the_grid_fails_the_bound_executors_running_futures() -> None:
    """A grid that closes under a bound executor cancels its work; the futures end, none hangs."""
    async with gb.Grid(capacity="cpu=1") as grid:
        executor = grid.executor()
        running = await anyio.to_thread.run_sync(executor.submit, nap, 30.0)
        queued = await anyio.to_thread.run_sync(executor.submit, nap, 30.0)
        with anyio.fail_after(10):
            while not running.running():
                await anyio.sleep(0.02)
    assert queued.cancelled()
    with pytest.raises(gb.TaskCancelled):
        running.result(timeout=10)


def _interrupt() -> None:
    raise KeyboardInterrupt("raised by the work")


def test_a_keyboard_interrupt_of_the_work_is_its_futures() -> None:
    """A ``KeyboardInterrupt`` the work raises is its future's exception; the executor goes on, as a pool's does."""
    with gb.Executor(capacity="cpu=1") as executor:
        error = executor.submit(_interrupt).exception(timeout=10)
        assert isinstance(error, KeyboardInterrupt)
        assert executor.submit(add, 2, 2).result(timeout=10) == 4


async def _unreachable() -> None:
    raise ConnectionError("agent registry unreachable")


def test_shutdown_raises_what_the_grid_could_not_close() -> None:
    """A teardown step that fails makes ``shutdown`` raise the grid's ``TeardownError``; the thread still ends."""
    before = set(threading.enumerate())
    executor = gb.Executor(capacity="cpu=1")
    executor.call(executor.grid.push_async_callback, _unreachable)
    with pytest.raises(gb.TeardownError, match="agent registry unreachable"):
        executor.shutdown()
    assert executor.grid.closed
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
