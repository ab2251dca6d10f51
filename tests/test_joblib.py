"""joblib's ``"gridboost"`` backend on the local grid: results, errors, n_jobs, batches as grid tasks, bound executors,
bad arguments, and nothing left behind once a ``Parallel`` call returns."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import psutil
import pytest

import gridboost as gb

pytest.importorskip("joblib")

import joblib
from joblib import Parallel, delayed, parallel_config

from gridboost.joblib import NAME, GridboostBackend  # importing it registers the backend

pytestmark = pytest.mark.timeout(120)
SETTLE = 10.0  # seconds any wait of these tests may take at most


class TaskLog:
    """A plugin that records what the grid ran: each task placed (with its batch size) and each outcome."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.statuses: list[str] = []
        self._lock = threading.Lock()

    @gb.hookimpl
    def gridboost_task_placed(self, task: gb.TaskSpec) -> None:
        with self._lock:
            self.batch_sizes.append(len(task.target))  # type: ignore[arg-type] # a joblib BatchedCalls

    @gb.hookimpl
    def gridboost_task_finished(self, outcome: gb.TaskOutcome) -> None:
        with self._lock:
            self.statuses.append(outcome.status)


class Failed(Exception):
    """An exception of the test's own, with an ``__init__`` of its own."""

    def __init__(self, item: int, why: str) -> None:
        super().__init__(item, why)
        self.item = item


def square(x: int) -> int:
    return x * x


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise Failed(x, "bad item")
    return x


def wait_then(x: int, event: threading.Event, timeout: float) -> int:
    event.wait(timeout)
    return x


def meet(barrier: threading.Barrier) -> int:
    return barrier.wait()


def lease_in_task(_: int) -> gb.CurrentLease | None:
    return gb.current_lease()


@pytest.fixture
def log() -> TaskLog:
    return TaskLog()


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def nothing_left() -> Iterator[None]:
    """The test's Parallel calls leave no thread and no child process behind them.

    Allowed a moment to settle: a killed worker process is reaped, and asyncio's thread that waits for it ends, just
    after the executor's shutdown returns.
    """
    threads, children = _threads(), _children()
    yield
    deadline = time.monotonic() + SETTLE
    while (_threads() - threads or _children() - children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {t.name for t in _threads() - threads} == set()
    assert _children() - children == set()


# -- results ---------------------------------------------------------------------------------------------------------


def test_results_come_back_in_order_and_nothing_is_left(nothing_left: None) -> None:
    """A Parallel call returns every result in input order, and leaves no thread or process of its grid behind."""
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2"}):
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(50)) == [i * i for i in range(50)]
        assert list(Parallel(n_jobs=2, return_as="generator")(delayed(square)(i) for i in range(5))) == [
            0,
            1,
            4,
            9,
            16,
        ]


def test_processes_of_the_process_executor_end_with_the_call(nothing_left: None) -> None:
    """With the local backend's process executor, results come back and its worker processes end with the call."""
    with parallel_config(backend=NAME, grid_options={"executor": "process", "capacity": "cpu=2"}):
        assert Parallel(n_jobs=2)(delayed(square)(i) for i in range(20)) == [i * i for i in range(20)]


def test_unordered_results_come_as_batches_finish(nothing_left: None) -> None:
    """``generator_unordered`` yields the batches that are done while one is still running."""
    slow = threading.Event()
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2"}):
        out = Parallel(n_jobs=2, batch_size=1, return_as="generator_unordered")(
            delayed(wait_then)(i, slow if i == 1 else threading.Event(), SETTLE if i == 1 else 0) for i in range(6)
        )
        quick = sorted(next(out) for _ in range(5))
        slow.set()
        assert quick == [0, 2, 3, 4, 5] and list(out) == [1]


# -- errors ----------------------------------------------------------------------------------------------------------


def test_an_exception_keeps_its_type_and_the_batch_frames(nothing_left: None) -> None:
    """The first failing item's own exception is raised, with a note that shows the function that raised it."""
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2"}):
        with pytest.raises(Failed) as raised:
            Parallel(n_jobs=2)(delayed(fail_at)(i, 7) for i in range(40))
    assert raised.value.item == 7
    assert any("in fail_at" in note for note in getattr(raised.value, "__notes__", []))


def test_an_error_cancels_the_batches_not_started(log: TaskLog, nothing_left: None) -> None:
    """After a batch fails, joblib aborts: batches queued on the grid are cancelled, never run, and the call returns
    once the running ones end."""
    release = threading.Event()
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=1", "max_workers": 1, "plugins": [log]}):
        calls = [delayed(fail_at)(0, 0)] + [delayed(wait_then)(i, release, 0.2) for i in range(1, 30)]
        with pytest.raises(Failed):
            Parallel(n_jobs=2, batch_size=1, pre_dispatch="all")(calls)
    assert log.statuses.count("failed") == 1
    assert "cancelled" in log.statuses and log.statuses.count("succeeded") < 29


def test_a_timeout_raises_timeout_error(nothing_left: None) -> None:
    """Parallel's ``timeout`` is honoured: a batch slower than it raises joblib's (multiprocessing's) TimeoutError."""
    never = threading.Event()
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2"}):
        with pytest.raises(multiprocessing.TimeoutError):
            Parallel(n_jobs=2, timeout=0.1)(delayed(wait_then)(i, never, 1.0) for i in range(4))


# -- n_jobs, batches -------------------------------------------------------------------------------------------------


def test_negative_n_jobs_count_back_from_the_grid_capacity(nothing_left: None) -> None:
    """``n_jobs=-1`` is every CPU of the grid (3 here), ``-2`` all but one; that many batches run at once."""
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=3"}):
        assert joblib.effective_n_jobs(-1) == 3 and joblib.effective_n_jobs(-2) == 2
        with Parallel(n_jobs=-1) as parallel:
            barrier = threading.Barrier(3, timeout=SETTLE)  # passes only if three batches run at once
            assert sorted(parallel(delayed(meet)(barrier) for _ in range(3))) == [0, 1, 2]


def test_n_jobs_1_runs_in_the_caller_without_a_grid(log: TaskLog) -> None:
    """``n_jobs=1`` runs sequentially in the caller, as on every joblib backend: the grid never starts."""
    with parallel_config(backend=NAME, grid_options={"plugins": [log]}):
        assert Parallel(n_jobs=1)(delayed(square)(i) for i in range(3)) == [0, 1, 4]
    assert log.batch_sizes == []


def test_auto_batches_run_as_grid_tasks(log: TaskLog) -> None:
    """Each batch of joblib's auto-batching is one grid task: many short items travel many to a task."""
    items = 3000
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2", "plugins": [log]}):
        parallel = Parallel(n_jobs=2)
        assert parallel(delayed(square)(i) for i in range(items)) == [i * i for i in range(items)]
    assert sum(log.batch_sizes) == items and len(log.batch_sizes) == parallel.n_dispatched_batches
    assert max(log.batch_sizes) > 1 and len(log.batch_sizes) < items
    assert log.statuses.count("succeeded") == len(log.batch_sizes)


# -- bound to an executor --------------------------------------------------------------------------------------------


def test_a_bound_executor_is_reused_and_left_running(log: TaskLog) -> None:
    """Bound to a live Executor, every Parallel call runs on its grid, which the backend never shuts down."""
    with gb.Executor(capacity="cpu=2", plugins=[log]) as executor:
        with parallel_config(backend=NAME, executor=executor):
            assert joblib.effective_n_jobs(-1) == 2
            for _ in range(2):
                assert Parallel(n_jobs=-1, batch_size=1)(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
        assert len(log.batch_sizes) == 8
        assert executor.submit(square, 5).result(timeout=SETTLE) == 25  # still running
        assert executor.call(lambda: executor.grid.stats()["tasks.succeeded"]) == 9


def test_a_backend_instance_starts_a_grid_per_call(log: TaskLog, nothing_left: None) -> None:
    """A backend instance given to Parallel starts an executor for each call and shuts it down after it."""
    backend = GridboostBackend(grid_options={"capacity": "cpu=2", "plugins": [log]})
    for _ in range(2):
        assert Parallel(n_jobs=2, backend=backend)(delayed(square)(i) for i in range(3)) == [0, 1, 4]
        assert backend._workers is None
    assert log.statuses.count("succeeded") == len(log.batch_sizes) >= 2


@pytest.mark.anyio
async def test_grid_executor_in_a_boost_runs_every_batch_in_the_lease() -> None:
    """From async code, ``grid.executor()`` in a boost block: n_jobs=-1 is the boost's CPUs and every item runs in
    its lease; the grid stays open after the call."""
    async with gb.Grid(capacity="cpu=4") as grid:
        async with grid.boost("cpu=2", ttl=60) as boost:
            executor = grid.executor()

            def search() -> tuple[int, list[gb.CurrentLease | None]]:
                with parallel_config(backend=NAME, executor=executor):
                    return joblib.effective_n_jobs(-1), Parallel(n_jobs=-1)(delayed(lease_in_task)(i) for i in range(8))

            n_jobs, leases = await anyio.to_thread.run_sync(search)
            assert n_jobs == 2
            assert {(lease.id, lease.token) for lease in leases if lease is not None} == {(boost.id, boost.token)}
            assert None not in leases
        assert not grid.closed
        assert grid.stats()["tasks.succeeded"] >= 1


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_workers": 2}, "takes executor= or grid_options=, not n_workers"),
        ({"executor": "local"}, "takes a gridboost.Executor or grid.executor"),
        ({"grid_options": ["local"]}, "takes a mapping"),
        ({"grid_options": {}, "executor": object()}, "not both"),
    ],
)
def test_bad_backend_arguments_are_invalid_requests(options: dict[str, Any], match: str) -> None:
    """Unknown keywords and values of the wrong kind are refused by parallel_config, typed, in one line."""
    with pytest.raises(gb.InvalidRequest, match=match):
        parallel_config(backend=NAME, **options)


def test_bad_grid_options_and_pool_keywords_fail_the_call_typed(nothing_left: None) -> None:
    """A grid option the grid refuses, a keyword meant for loky's pool, and n_jobs=0 raise gridboost's errors."""
    with parallel_config(backend=NAME, grid_options={"backend": "no-such-engine"}):
        with pytest.raises(gb.UnknownBackend):
            Parallel(n_jobs=2)(delayed(square)(i) for i in range(3))
    with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2"}):
        with pytest.raises(gb.InvalidRequest, match="initializer"):
            Parallel(n_jobs=2, initializer=print)(delayed(square)(i) for i in range(3))
        with pytest.raises(gb.InvalidRequest, match="n_jobs == 0"):
            Parallel(n_jobs=0)(delayed(square)(i) for i in range(3))


# -- scikit-learn ------------------------------------------------------------------------------------------------------


# In a process of its own: importing scikit-learn (scipy, its BLAS and OpenMP runtimes) changes this interpreter for
# the tests after it (a later test's SIGKILLed command was seen still alive), and that is not what is tested here.
_GRID_SEARCH = """
import gridboost as gb
from gridboost.joblib import NAME
from joblib import parallel_config
from sklearn import datasets, model_selection, tree


class Log:
    def __init__(self):
        self.statuses = []

    @gb.hookimpl
    def gridboost_task_finished(self, task, outcome):
        self.statuses.append(outcome.status)


log = Log()
x, y = datasets.load_iris(return_X_y=True)
search = model_selection.GridSearchCV(
    tree.DecisionTreeClassifier(random_state=0), {"max_depth": [1, 2, 3]}, cv=3, n_jobs=-1, return_train_score=False
)
fitted = []
with parallel_config(backend=NAME, grid_options={"capacity": "cpu=2", "plugins": [log]}):
    search.fit(x, y)
print(search.best_params_["max_depth"], len(log.statuses), log.statuses.count("succeeded"))
"""


def test_grid_search_cv_fits_through_the_grid() -> None:
    """scikit-learn's ``GridSearchCV(n_jobs=-1)`` under the backend runs its fits as grid tasks, all succeeding."""
    pytest.importorskip("sklearn")
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _GRID_SEARCH], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    depth, tasks, succeeded = map(int, done.stdout.split())
    assert depth == 3
    assert 1 <= tasks <= 9  # joblib batches the 3 candidates x 3 folds; every batch is one grid task
    assert succeeded == tasks


def test_import_gridboost_leaves_joblib_unimported() -> None:
    """``import gridboost`` imports neither joblib nor ``gridboost.joblib``; importing the latter registers it."""
    probe = (
        "import sys, gridboost; assert 'joblib' not in sys.modules and 'gridboost.joblib' not in sys.modules; "
        "import gridboost.joblib, joblib.parallel; assert joblib.parallel.BACKENDS['gridboost'] is "
        "gridboost.joblib.GridboostBackend"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
