"""``ExecutorSuite``: the ``concurrent.futures.Executor`` contract of :class:`gridboost.Executor` over a backend.

The checks follow CPython's own tests of its executors (``test_concurrent_futures``): future states, ``cancel`` of a
queued future and of a running one, ``as_completed`` and ``wait``, ``map`` (order, several iterables, ``timeout``,
``chunksize``), exceptions with their own type, ``shutdown`` (``wait``, ``cancel_futures``, ``RuntimeError`` on
``submit`` after it) and no thread or process left once it returns. Subclass it and provide three fixtures::

    class TestMyExecutor(ExecutorSuite):
        @pytest.fixture
        def backend_name(self): return "mine"

        @pytest.fixture
        def grid_options(self): return {"address": cluster_address, "local_capacity": "cpu=1", "cluster_queue": 0}

        @pytest.fixture
        def capacity_units(self): return 5     # tasks of one CPU that the grid runs at once, before any waits here

The tests are synchronous, as the code an ``Executor`` serves: no event loop in the test's thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest

from .._sync import Executor
from ..exceptions import InvalidRequest, InvalidTask
from ..worker_leases import current_lease
from ._work import SuiteError, add, fail_if_odd, fail_with, mark_and_nap, nap

__all__ = ["ExecutorSuite"]

#: A nap long enough to still run while a test looks at it, even on a loaded machine.
LONG = 4.0


def _lease_of_task(_: object = None) -> tuple[str, int] | None:
    """What ``current_lease()`` says inside a task (a module-level function, so every engine ships it)."""
    lease = current_lease()
    return None if lease is None else (lease.id, lease.token)


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (bounded) until ``check()`` holds; fail naming ``what`` if it does not."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.02)


class ExecutorSuite:
    """The contract suite. Subclass it and provide the fixtures named in the module docstring."""

    #: Seconds the engine may take to start work or to let it go (a loaded CI box is slow).
    SETTLE: ClassVar[float] = 30.0
    #: Name prefixes of threads the engine's client library keeps for the whole process once it has started them
    #: (Dask's offload pool): not the executor's, and not counted as left behind by it.
    ENGINE_THREADS: ClassVar[tuple[str, ...]] = ()

    @pytest.fixture
    def backend_name(self) -> str:
        pytest.fail("an ExecutorSuite subclass must provide the `backend_name` fixture")

    @pytest.fixture
    def grid_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def capacity_units(self) -> int:
        pytest.fail("an ExecutorSuite subclass must provide `capacity_units`: one-CPU tasks the grid runs at once")

    @pytest.fixture
    def executor(self, backend_name: str, grid_options: dict[str, Any]) -> Iterator[Executor]:
        """An executor for the test; shut down after it (cancelling what is left), leaving no thread behind."""
        before = set(threading.enumerate())
        executor = Executor(backend_name, **grid_options)
        try:
            yield executor
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        _until(lambda: not self.new_threads(before), self.SETTLE, "the executor's threads ended")

    def new_threads(self, before: set[threading.Thread]) -> list[str]:
        """The names of live threads not in ``before``, but for the engine's own process-wide ones."""
        return sorted(
            t.name
            for t in set(threading.enumerate()) - before
            if t.is_alive() and not t.name.startswith(self.ENGINE_THREADS)
        )

    def _fill(self, executor: Executor, capacity_units: int, tmp_path: Path, extra: int) -> list[cf.Future[Any]]:
        """Submit long naps that take every slot, then ``extra`` more that must wait; return the futures in order."""
        futures = [executor.submit(nap, LONG) for _ in range(capacity_units)]
        _until(lambda: all(f.running() for f in futures), self.SETTLE, "every slot runs a nap")
        return futures + [executor.submit(mark_and_nap, (str(tmp_path / f"ran-{i}"), 0.0)) for i in range(extra)]

    # -- submit and the future's states -------------------------------------------------------------------------

    def test_submit_gives_the_result(self, executor: Executor) -> None:
        """``submit`` returns a standard Future that ends finished, with the function's result."""
        future = executor.submit(add, 2, b=3)
        assert isinstance(future, cf.Future)
        assert future.result(timeout=self.SETTLE) == 5
        assert future.done()
        assert not future.running()
        assert not future.cancelled()
        assert future.exception() is None

    def test_an_exception_keeps_its_type(self, executor: Executor) -> None:
        """The function's exception is raised by ``result()`` and returned by ``exception()``, as itself."""
        future = executor.submit(fail_with, 7)
        with pytest.raises(SuiteError) as raised:
            future.result(timeout=self.SETTLE)
        assert raised.value.code == 7
        error = future.exception()
        assert isinstance(error, SuiteError)
        assert error.code == 7

    def test_a_started_future_is_running(self, executor: Executor) -> None:
        """A future whose task started reports ``running()``, and cannot be cancelled any more."""
        future = executor.submit(nap, 1.0)
        _until(future.running, self.SETTLE, "the nap runs")
        assert not future.cancel()
        assert future.result(timeout=self.SETTLE) == 1.0

    def test_done_callbacks_run_once_with_the_future(self, executor: Executor) -> None:
        """A done-callback is called once with its future, added before or after it finished."""
        seen: list[cf.Future[Any]] = []
        future = executor.submit(add, 1)
        future.add_done_callback(seen.append)
        future.result(timeout=self.SETTLE)
        future.add_done_callback(seen.append)
        _until(lambda: len(seen) == 2, self.SETTLE, "both callbacks ran")
        assert seen == [future, future]

    def test_submit_refuses_what_is_not_callable(self, executor: Executor) -> None:
        """A value that is not a callable is refused at ``submit``, typed, and the executor goes on."""
        with pytest.raises(InvalidTask):
            executor.submit(42)  # type: ignore[arg-type]
        assert executor.submit(add, 1, 1).result(timeout=self.SETTLE) == 2

    # -- cancellation ---------------------------------------------------------------------------------------------

    def test_cancel_drops_a_queued_future(self, executor: Executor, capacity_units: int, tmp_path: Path) -> None:
        """A future still waiting for capacity cancels: it is cancelled, ``wait`` sees it, and it never runs."""
        futures = self._fill(executor, capacity_units, tmp_path, extra=2)
        queued = futures[-1]
        assert not queued.running()
        assert queued.cancel()
        assert queued.cancelled()
        assert queued.done()
        done, _ = cf.wait([queued], timeout=1.0)
        assert done == {queued}
        with pytest.raises(cf.CancelledError):
            queued.result(timeout=0)
        cf.wait(futures, timeout=self.SETTLE + 2 * LONG)
        assert futures[-2].result(timeout=0) == 0.0  # the one queued before it ran, once a slot freed
        assert (tmp_path / "ran-0").exists()
        assert not (tmp_path / "ran-1").exists()

    # -- waiting ----------------------------------------------------------------------------------------------------

    def test_as_completed_yields_each_future_once_the_fast_first(self, executor: Executor) -> None:
        """``as_completed`` yields every future once, a quick one before a slow one."""
        slow: cf.Future[Any] = executor.submit(nap, 1.5)
        fast: cf.Future[Any] = executor.submit(add, 1)
        order: list[cf.Future[Any]] = list(cf.as_completed([slow, fast], timeout=self.SETTLE))
        assert order == [fast, slow]

    def test_wait_returns_when_asked(self, executor: Executor) -> None:
        """``wait`` honours FIRST_COMPLETED, FIRST_EXCEPTION and ALL_COMPLETED."""
        slow: cf.Future[Any] = executor.submit(nap, 1.5)
        failing: cf.Future[Any] = executor.submit(fail_with, 1)
        done, not_done = cf.wait([slow, failing], timeout=self.SETTLE, return_when=cf.FIRST_EXCEPTION)
        assert failing in done
        assert slow in not_done
        done, not_done = cf.wait([slow, failing], timeout=self.SETTLE, return_when=cf.ALL_COMPLETED)
        assert done == {slow, failing}
        assert not not_done
        quick = executor.submit(add, 3)
        done, _ = cf.wait([quick], timeout=self.SETTLE, return_when=cf.FIRST_COMPLETED)
        assert done == {quick}

    # -- map ----------------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("chunksize", [1, 3])
    def test_map_is_the_builtin_map(self, executor: Executor, chunksize: int) -> None:
        """``map`` over several iterables gives what the builtin ``map`` gives, in order, shortest input first."""
        results = executor.map(add, range(10), range(100, 107), timeout=self.SETTLE, chunksize=chunksize)
        assert list(results) == list(map(add, range(10), range(100, 107)))

    @pytest.mark.parametrize("chunksize", [1, 4])
    def test_map_raises_an_item_exception_where_the_item_is(self, executor: Executor, chunksize: int) -> None:
        """An item's exception is raised when the iterator reaches that item, after the items before it."""
        results = executor.map(fail_if_odd, [0, 2, 3, 4], chunksize=chunksize)
        assert next(results) == 0
        assert next(results) == 2
        with pytest.raises(SuiteError) as raised:
            next(results)
        assert raised.value.code == 3

    def test_map_timeout_counts_from_the_call(self, executor: Executor) -> None:
        """``map(timeout=...)`` raises ``TimeoutError`` when a result is not there that long after the call."""
        results = executor.map(nap, [LONG], timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            next(results)
        assert time.monotonic() - started < LONG

    def test_map_refuses_a_bad_chunksize(self, executor: Executor) -> None:
        """A chunksize below 1 is a ``ValueError`` (an ``InvalidRequest``), as the stdlib's executors say."""
        with pytest.raises(InvalidRequest, match="chunksize"):
            executor.map(add, [1], chunksize=0)

    # -- shutdown -----------------------------------------------------------------------------------------------------

    def test_shutdown_waits_for_running_work(self, backend_name: str, grid_options: dict[str, Any]) -> None:
        """``shutdown(wait=True)`` returns once every future is done, with its result."""
        executor = Executor(backend_name, **grid_options)
        futures = [executor.submit(nap, 0.5) for _ in range(3)]
        executor.shutdown(wait=True)
        assert all(f.done() for f in futures)
        assert [f.result(timeout=0) for f in futures] == [0.5] * 3

    def test_shutdown_cancel_futures_cancels_the_queued(
        self, backend_name: str, grid_options: dict[str, Any], capacity_units: int, tmp_path: Path
    ) -> None:
        """``shutdown(cancel_futures=True)`` cancels the futures not running, and the running ones finish."""
        executor = Executor(backend_name, **grid_options)
        futures = self._fill(executor, capacity_units, tmp_path, extra=3)
        executor.shutdown(wait=True, cancel_futures=True)
        assert all(f.result(timeout=0) == LONG for f in futures[:capacity_units])
        assert all(f.cancelled() for f in futures[capacity_units:])
        assert not any((tmp_path / f"ran-{i}").exists() for i in range(3))

    def test_submit_after_shutdown_is_a_runtime_error(self, backend_name: str, grid_options: dict[str, Any]) -> None:
        """After ``shutdown``, ``submit`` and ``map`` raise ``RuntimeError``; a second ``shutdown`` is harmless."""
        executor = Executor(backend_name, **grid_options)
        executor.shutdown()
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(add, 1)
        with pytest.raises(RuntimeError, match="after shutdown"):
            list(executor.map(add, [1]))
        executor.shutdown()

    def test_shutdown_leaves_no_thread_nor_process(self, backend_name: str, grid_options: dict[str, Any]) -> None:
        """Once ``shutdown`` returns, no thread and no child process of the executor is left, and its grid is closed."""
        before_threads = set(threading.enumerate())
        before_children = {p.pid for p in psutil.Process().children(recursive=True)}
        with Executor(backend_name, **grid_options) as executor:
            assert executor.submit(add, 1).result(timeout=self.SETTLE) == 1
            assert self.new_threads(before_threads)  # its loop's thread, at least
        assert executor.grid.closed
        assert self.new_threads(before_threads) == []
        new = {p.pid for p in psutil.Process().children(recursive=True)} - before_children
        alive = {pid for pid in new if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"}
        assert not alive

    def test_a_bad_option_raises_and_leaves_no_thread(self, backend_name: str, grid_options: dict[str, Any]) -> None:
        """A grid option that is wrong raises at construction, typed, and leaves no thread behind."""
        before = set(threading.enumerate())
        with pytest.raises(InvalidRequest):
            Executor(backend_name, **{**grid_options, "teardown_timeout": -1})
        assert self.new_threads(before) == []

    # -- a boost for the executor's life -----------------------------------------------------------------------------

    def test_an_executor_boost_holds_its_work(self, backend_name: str, grid_options: dict[str, Any]) -> None:
        """With ``boost=``, every task runs inside that lease (the worker says so) and the lease ends at shutdown."""
        with Executor(backend_name, boost="cpu=1", **grid_options) as executor:
            (boost,) = executor.grid.boosts
            seen = set(executor.map(_lease_of_task, range(4), timeout=self.SETTLE))
            assert seen == {(boost.id, boost.token)}
            assert boost.id in {lease.id for lease in executor.call(executor.grid.leases)}
            shared = executor.grid.backend.capabilities.shared_leases
        if not shared:  # the backend keeps leases inside the grid: closing it ended them (its own tests check how)
            return
        with Executor(backend_name, **grid_options) as other:
            _until(
                lambda: boost.id not in {lease.id for lease in other.call(other.grid.leases)},
                self.SETTLE,
                "the lease left the engine's registry",
            )
