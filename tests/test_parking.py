"""Parked data on the local backend: what it costs a boost, what it refuses, what teardown and the leak check see."""

from __future__ import annotations

import pickle

import anyio
import pytest

import gridboost as gb
from gridboost._parking import nbytes
from gridboost.testing import Hostile, LeakError, no_leaks
from gridboost.testing._faulty import Fault, FaultPlan, FaultyPlugin

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=1GiB"


def size_of(data: bytes, *more: bytes, extra: bytes = b"") -> int:
    return len(data) + sum(map(len, more)) + len(extra)


async def test_data_put_under_a_memory_boost_counts_against_its_memory() -> None:
    """A handle's size is taken from its boost's memory while it lives; more than is left is refused, typed."""
    async with gb.Grid(capacity=CAPACITY) as grid, grid.boost("cpu=1,memory=10KB", ttl=30) as boost:
        handle = await grid.put(b"x" * 4_000, boost=boost)
        assert (handle.size, boost.available.memory) == (4_000, 6_000)
        with pytest.raises(gb.CapacityUnavailable, match=r"cannot park 8KB in boost .*: 6KB of its memory"):
            await grid.put(b"y" * 8_000, boost=boost)
        assert boost.available.memory == 6_000
        await handle.release()
        assert boost.available.memory == 10_000
        again = await grid.put(b"y" * 8_000, boost=boost)
        assert boost.available.memory == 2_000 and again.boost is boost


async def test_a_boost_without_memory_takes_no_claim_and_its_end_releases_its_data() -> None:
    """Under a CPU-only boost a handle claims nothing; it is released, on the engine too, when the boost ends."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        async with grid.boost("cpu=1", ttl=30) as boost:
            handle = await grid.put(b"x" * 1_000, boost=boost)
            assert boost.available == gb.Resources(cpu=1)
            assert grid.backend.parked() == [handle.id]
        assert handle.released
        assert grid.backend.parked() == []


async def test_a_handle_is_resolved_wherever_it_sits_among_the_arguments() -> None:
    """Positional, variadic and keyword handles all arrive as their objects; ``async with`` releases the handle."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        async with await grid.put(b"abc") as first, await grid.put(b"de") as second:
            assert await grid.offload(size_of, first, second, b"f", extra=second) == 8
            assert "bytes" in repr(first) and "released" not in repr(first)
        assert first.released and second.released and "released" in repr(first)


async def test_bad_put_requests_are_refused_and_the_grid_stays_usable() -> None:
    """A boost that is not one, is another grid's or has ended, and a handle of another grid, raise typed errors."""
    async with gb.Grid(capacity=CAPACITY) as grid, gb.Grid(capacity=CAPACITY) as other:
        for bad in (Hostile(), "boost", 3, float("nan")):
            with pytest.raises(gb.InvalidRequest, match="boost must be a Boost or None"):
                await grid.put(b"x", boost=bad)  # type: ignore[arg-type]
        async with other.boost("cpu=1", ttl=30) as theirs:
            with pytest.raises(gb.InvalidRequest, match="belongs to another grid"):
                await grid.put(b"x", boost=theirs)
        with pytest.raises(gb.BoostExpired):
            await other.put(b"x", boost=theirs)
        handle = await other.put(b"x")
        with pytest.raises(gb.InvalidRequest, match="was put by another grid"):
            grid.submit(len, handle)
        assert await grid.offload(len, b"ok") == 2
    with pytest.raises(gb.GridClosed):
        await grid.put(b"x")


async def test_a_handle_inside_another_value_cannot_be_sent() -> None:
    """Only a whole argument is resolved: a handle pickled inside a list says so in one line."""
    async with gb.Grid(capacity=CAPACITY, executor="process") as grid:
        handle = await grid.put(b"abc")
        assert await grid.offload(len, handle) == 3  # resolved, then sent to the process
        with pytest.raises(TypeError, match="parked-data handle: pass it as an argument of its own"):
            pickle.dumps([handle])
        with pytest.raises(gb.InvalidTask):
            grid.submit(len, [handle])


async def test_teardown_names_a_handle_the_engine_would_not_free_and_the_leak_check_sees_it() -> None:
    """An unpark that fails leaves the object on the engine: teardown raises naming it, and the leak check too."""
    plan = FaultPlan([Fault("unpark_failure")])
    with pytest.raises(LeakError, match=r"local engine still holds parked object parked-"):
        with no_leaks():
            with pytest.raises(gb.TeardownError, match=r"parked-\S+ \(bytes\) was not released: BackendError"):
                async with gb.Grid("faulty", plugins=[FaultyPlugin(plan)], capacity=CAPACITY) as grid:
                    await grid.put(b"x" * 100)
            leftover = grid.backend.inner  # type: ignore[attr-defined]
    assert len(leftover.parked()) == 1


async def test_a_put_cancelled_while_stored_leaves_nothing_parked() -> None:
    """A put cancelled while the engine stores the object frees it again: nothing stays parked."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with anyio.move_on_after(0):
            await grid.put(b"x")
        assert grid.backend.parked() == []  # type: ignore[attr-defined]


def test_sizes_are_measured_without_copying_buffers() -> None:
    """Buffers count their bytes; other values what pickling writes; what cannot be pickled, its own size."""
    assert nbytes(b"x" * 1000) == 1000
    assert nbytes(memoryview(bytearray(64))) == 64
    assert 1000 < nbytes([b"x" * 1000, "y"]) < 1100
    assert nbytes(lambda: None) > 0
