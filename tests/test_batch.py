"""``grid.map`` in chunks: the size that adapts, the bounds it keeps, the input it refuses."""

from __future__ import annotations

import anyio
import pytest

import gridboost as gb
from gridboost._batch import MOST, PROBES, SLOW, TAPER, TARGET, BatchedMap, Sizer
from gridboost.testing import add, nap
from gridboost.worker_chunk import Chunk

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=4"


def test_the_first_answer_sets_the_size_and_later_ones_grow_it_at_most_twofold() -> None:
    """The first chunk back sizes chunks to ``TARGET`` at once; later fast chunks double it at most, up to ``MOST``."""
    sizer = Sizer()
    assert (sizer.size, sizer.probing) == (1, True)
    sizer.observe(1, TARGET / 50)  # one item takes a fiftieth of the target
    assert (sizer.size, sizer.probing) == (50, False)
    sizer.observe(1, TARGET / 1000)  # a probe sent before that answer, much faster: doubles, no more
    assert sizer.size == 100
    sizer.observe(100, TARGET / 1.5)  # 150 items would take TARGET
    assert sizer.size == 150
    for _ in range(20):
        sizer.observe(sizer.size, 0.0)
    assert sizer.size == MOST


def test_a_slow_chunk_shrinks_the_size_at_once_and_a_fixed_size_stays() -> None:
    """A chunk slower than ``SLOW`` brings the size down to what takes ``TARGET``; a fixed size never moves."""
    sizer = Sizer()
    sizer.observe(512, TARGET)
    assert sizer.size == 512
    sizer.observe(512, TARGET * 2)  # slower than the target, not slow: kept
    assert sizer.size == 512
    sizer.observe(512, SLOW * 2)
    assert sizer.size == int(512 * TARGET / (SLOW * 2))
    fixed = Sizer(8)
    fixed.observe(8, SLOW * 10)
    fixed.observe(8, 0.0)
    assert fixed.size == 8


async def test_fine_grained_items_run_in_far_fewer_tasks_than_items() -> None:
    """2,000 quick items come back in order, item by item, from a small number of engine tasks."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        results = [r async for r in grid.map(add, range(2000))]
        assert results == list(range(2000))
        tasks = grid.stats()["tasks.succeeded"]
        assert 0 < tasks < 200, f"{tasks} tasks for 2,000 items"


async def test_only_a_few_probes_go_out_before_the_size_is_known() -> None:
    """Even with room for a thousand chunks in flight, quick items do not go out one per task before the size is known."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        # An input of unknown length: no tapering at its end (that has a test of its own).
        results = [r async for r in grid.map(add, iter(range(5000)), max_in_flight=1000)]
        assert results == list(range(5000))
        tasks = grid.stats()["tasks.succeeded"]
        assert tasks <= PROBES + 5000 // MOST + 2, f"{tasks} tasks for 5,000 quick items"


async def test_a_known_number_of_items_ends_in_ever_smaller_chunks() -> None:
    """With a sized input no chunk holds over a ``TAPER``-th of the items left, so the last ones shrink to one item."""
    sizes: list[int] = []

    class ChunkSizes:
        @gb.hookimpl
        def gridboost_task_finished(self, task: gb.TaskSpec) -> None:
            if isinstance(task.target, Chunk):
                sizes.append(len(task.args))

    async with gb.Grid(capacity=CAPACITY, plugins=[ChunkSizes()]) as grid:
        # One chunk in flight at a time: they finish in the order they went out.
        assert [r async for r in grid.map(add, range(3000), max_in_flight=1)] == list(range(3000))
    assert sum(sizes) == 3000 and sizes[-1] == 1
    left = 3000
    for size in sizes:
        assert size <= max(1, -(-left // TAPER)), f"a chunk of {size} with {left} items left: {sizes}"
        left -= size
    assert max(sizes) > 10 * sizes[-1]  # it did grow before it tapered


async def test_a_hundred_thousand_items_keep_memory_bounded() -> None:
    """However long the input, at most ``max_in_flight`` x ``MOST`` items wait in the map at once."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        results = grid.map(add, iter(range(100_000)), max_in_flight=4)
        assert isinstance(results, BatchedMap)
        total = count = most = 0
        async for value in results:
            total += value
            count += 1
            most = max(most, results._waiting)
        assert (count, total) == (100_000, sum(range(100_000)))
        assert 0 < most <= 4 * MOST


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"batch_size": "big"}, "batch_size must be 'auto' or a whole number >= 1"),
        ({"batch_size": 2.5}, "batch_size must be a whole number >= 1"),
        ({"batch_size": True}, "batch_size must be a whole number >= 1"),
        ({"batch_size": 4, "timeout": 1.0}, "a timeout bounds one item's run: use batch_size=1"),
    ],
)
async def test_a_bad_batch_size_is_refused_at_the_call(options: dict[str, object], message: str) -> None:
    """``batch_size`` is ``"auto"`` or a whole number; chunks with a per-item timeout are refused, the grid goes on."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.exceptions.InvalidRequest, match=message):
            grid.map(add, range(3), **options)  # type: ignore[arg-type]
        assert [r async for r in grid.map(add, range(3))] == [0, 1, 2]


async def test_auto_is_one_item_per_task_where_a_chunk_cannot_keep_the_item_bounds() -> None:
    """With a ``timeout``, or an ``async def`` function, ``"auto"`` sends one task per item; bad ``fn`` is refused."""

    async def double(x: int) -> int:
        return 2 * x

    async with gb.Grid(capacity=CAPACITY) as grid:
        assert not isinstance(grid.map(add, range(3), timeout=5.0), BatchedMap)
        assert not isinstance(grid.map(double, range(3)), BatchedMap)
        assert isinstance(grid.map(add, range(3)), BatchedMap)
        with pytest.raises(gb.exceptions.InvalidTask):
            grid.map(None, range(3))  # type: ignore[arg-type]
        with anyio.fail_after(10), pytest.raises(TimeoutError):
            [r async for r in grid.map(nap, [5.0], timeout=0.2)]
