"""Running work on the local backend: offload, submit, map and commands, and their failure modes."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import psutil
import pytest

import gridboost as gb
from gridboost.testing import add, nap  # nap sleeps, but stops at a cancel, as thread code should

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=4GiB"


class Flaky:
    """Fails ``failures`` times, then succeeds; thread-safe enough for one task."""

    def __init__(self, failures: int) -> None:
        self.calls = 0
        self.failures = failures

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"attempt {self.calls} failed")
        return "ok"


class Custom(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def raise_custom(code: int) -> None:
    raise Custom(code)


def current_pid() -> int:
    return os.getpid()


async def test_offload_returns_the_result_and_passes_kwargs() -> None:
    """``offload`` returns the function's result; arguments reach it untouched."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        assert await grid.offload(add, 2, b=40) == 42
        assert await grid.submit(add, 1, b=1) == 2


async def test_user_exception_keeps_its_type() -> None:
    """The function's own exception reaches the caller with its type and attributes."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(Custom) as info:
            await grid.offload(raise_custom, 7)
        assert info.value.code == 7
        handle = grid.submit(raise_custom, 8)
        for _ in range(2):  # awaiting twice gives the same outcome
            with pytest.raises(Custom):
                await handle
        assert not handle.cancelled()
        assert grid.stats()["tasks.failed"] == 2


async def test_retries_rerun_failed_work_and_count_attempts() -> None:
    """``retries=n`` runs failing work up to n more times; the last error is raised when all fail."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        flaky = Flaky(failures=2)
        handle = grid.submit(flaky, retries=2)
        assert await handle == "ok"
        assert handle.attempts == 3
        hopeless = Flaky(failures=10)
        with pytest.raises(ConnectionError, match="attempt 2 failed"):
            await grid.offload(hopeless, retries=1)
        assert hopeless.calls == 2


async def test_timeout_raises_timeout_error_and_is_not_retried() -> None:
    """A task over its timeout raises TimeoutError; the timeout bounds all attempts together."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        started = anyio.current_time()
        with pytest.raises(TimeoutError):
            await grid.offload(nap, 30.0, timeout=0.2, retries=3)
        assert anyio.current_time() - started < 5
        assert grid.stats()["tasks.timed_out"] == 1


async def test_cancel_queued_work_never_runs_it() -> None:
    """Work cancelled while it waits for capacity is dropped and never runs."""
    ran = threading.Event()
    async with gb.Grid(capacity=CAPACITY) as grid:
        blockers = [grid.submit(nap, 30.0, resources="cpu=1") for _ in range(2)]
        with anyio.fail_after(5):
            while grid.local_available.cpu:  # trio starts tasks in any order: let the blockers in first
                await anyio.sleep(0.01)
        queued = grid.submit(ran.set, resources="cpu=1")
        await anyio.sleep(0.1)
        queued.cancel()
        with anyio.fail_after(5), pytest.raises(gb.TaskCancelled):
            await queued
        for blocker in blockers:
            blocker.cancel()
        with anyio.fail_after(5):
            for blocker in blockers:
                with pytest.raises(gb.TaskCancelled):
                    await blocker
        await anyio.sleep(0.05)
    assert not ran.is_set()
    assert queued.cancelled()


async def test_cancel_before_start_never_reaches_the_backend() -> None:
    """A handle cancelled right after ``submit`` is settled as cancelled without running."""
    ran = threading.Event()
    async with gb.Grid(capacity=CAPACITY) as grid:
        handle = grid.submit(ran.set)
        handle.cancel()
        with anyio.fail_after(5), pytest.raises(gb.TaskCancelled):
            await handle
    assert not ran.is_set()


async def test_cancelled_thread_stops_when_it_checks() -> None:
    """A running thread is released at once on cancel and stops at its next ``check_cancelled``."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        handle = grid.submit(nap, 30.0)
        await anyio.sleep(0.05)
        handle.cancel()
        with anyio.fail_after(2), pytest.raises(gb.TaskCancelled):
            await handle
        backend = grid.backend
        with anyio.fail_after(2):
            while backend.running_tasks():  # type: ignore[attr-defined]
                await anyio.sleep(0.01)


async def test_map_is_ordered_and_bounded() -> None:
    """``map`` yields results in input order with never more than ``max_in_flight`` running."""
    lock = threading.Lock()
    running = peak = 0

    def tracked(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01 * (x % 3))
        with lock:
            running -= 1
        return x * x

    async with gb.Grid(capacity=CAPACITY) as grid:
        results = [y async for y in grid.map(tracked, range(30), max_in_flight=4)]
    assert results == [x * x for x in range(30)]
    assert 1 < peak <= 4


async def test_map_unordered_and_async_source() -> None:
    """``ordered=False`` yields every result as it finishes; an async iterable is accepted as the source."""

    async def source() -> AsyncIterator[int]:
        for i in range(20):
            await anyio.lowlevel.checkpoint()
            yield i

    async with gb.Grid(capacity=CAPACITY) as grid:
        results = [y async for y in grid.map(add, source(), ordered=False, max_in_flight=5)]
    assert sorted(results) == list(range(20))


async def test_map_block_cancels_what_is_left_on_early_exit() -> None:
    """Leaving ``async with grid.map(...)`` early cancels the tasks still in flight (one task per item)."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        async with grid.map(nap, [0.0] + [30.0] * 6, max_in_flight=3, batch_size=1) as results:
            assert await anext(results) == 0.0
            in_flight = list(results._pending)
        assert in_flight and all(h.cancelled() for h in in_flight)


async def test_map_rejects_a_bad_bound() -> None:
    """``max_in_flight`` must be a whole number of at least one."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(gb.InvalidRequest, match="max_in_flight"):
                grid.map(add, [1], max_in_flight=bad)


async def test_command_result_carries_status_and_output(tmp_path: Path) -> None:
    """A command's exit status, stdout and stderr come back; env is laid over the environment; cwd is used."""
    script = "import os,sys; print(os.getcwd()); print(os.environ['GB_X'], os.environ['PATH'] != ''); sys.stderr.write('e'); sys.exit(3)"
    async with gb.Grid(capacity=CAPACITY) as grid:
        result = await grid.run_command([sys.executable, "-c", script], env={"GB_X": "42"}, cwd=tmp_path)
    assert result.returncode == 3
    lines = result.stdout.decode().splitlines()
    assert Path(lines[0]).resolve() == tmp_path.resolve()
    assert lines[1] == "42 True"
    assert result.stderr == b"e"
    assert result.node.startswith("local:")


async def test_command_check_raises_command_failed() -> None:
    """``check=True`` turns a non-zero status into CommandFailed with the output attached."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.CommandFailed, match="status 2: boom") as info:
            await grid.run_command(
                [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(2)"], check=True
            )
    assert info.value.returncode == 2 and info.value.stderr == b"boom"


async def _pid_from(path: Path) -> int:
    with anyio.fail_after(10):
        while not path.exists() or not path.read_text():
            await anyio.sleep(0.01)
    return int(path.read_text())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


SLEEPER = "import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(60)"
STUBBORN = "import os,signal,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(60)"


async def test_command_timeout_kills_the_process(tmp_path: Path) -> None:
    """A command over its timeout raises TimeoutError and its process is gone."""
    marker = tmp_path / "pid"
    async with gb.Grid(capacity=CAPACITY) as grid:
        with anyio.fail_after(10), pytest.raises(TimeoutError):
            await grid.run_command([sys.executable, "-c", SLEEPER, str(marker)], timeout=1.0)
        assert _gone(await _pid_from(marker))


async def test_cancelled_command_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    """Cancelling a command that ignores SIGTERM kills it after the grace period."""
    marker = tmp_path / "pid"
    async with gb.Grid(capacity=CAPACITY, grace=0.3) as grid:
        handle = grid.submit(gb.Command([sys.executable, "-c", STUBBORN, str(marker)]))
        pid = await _pid_from(marker)
        handle.cancel()
        with anyio.fail_after(5), pytest.raises(gb.TaskCancelled):
            await handle
        assert _gone(pid)


async def test_process_executor_runs_in_another_process_and_cancel_kills_it(tmp_path: Path) -> None:
    """With ``executor="process"`` work runs in a child process, and cancelling running work kills it."""
    before = {p.pid for p in psutil.Process().children()}  # an earlier test's pool (joblib's loky) is not ours
    async with gb.Grid(capacity=CAPACITY, executor="process", max_workers=2, grace=0.3) as grid:
        pid = await grid.offload(current_pid)
        assert pid != os.getpid()
        with pytest.raises(Custom):
            await grid.offload(raise_custom, 1)
        handle = grid.submit(time.sleep, 30)
        await anyio.sleep(0.3)
        children = {p.pid for p in psutil.Process().children()} - before
        handle.cancel()
        with anyio.fail_after(5), pytest.raises(gb.TaskCancelled):
            await handle
        survivors = {p.pid for p in psutil.Process().children()} - before
        assert len(survivors) < len(children)
    assert not ({p.pid for p in psutil.Process().children()} & children)


BAD_RESOURCES: list[Any] = [
    ({"cpu": -1}, "cpu must not be negative"),
    ({"cpu": float("nan")}, "cpu must be finite"),
    ({"memory": float("inf")}, "memory must be finite"),
    ({"gpu": "one"}, "gpu must be a number, got 'one'"),
    ("cpu=-2", "cpu must not be negative"),
]


@pytest.mark.parametrize(("resources", "message"), BAD_RESOURCES, ids=["negative", "nan", "inf", "string", "text"])
async def test_bad_resources_are_refused_and_the_grid_stays_usable(resources: Any, message: str) -> None:
    """Bad resources raise InvalidResources naming field and value; the next call works."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.InvalidResources, match=message):
            await grid.offload(add, 1, resources=resources)
        with pytest.raises(gb.InvalidResources, match=message):
            grid.submit(add, 1, resources=resources)
        assert await grid.offload(add, 1) == 1


async def test_bad_task_input_is_refused_at_the_boundary() -> None:
    """Non-callables, string argv, bad where/retries/timeout each raise a typed, named error; the grid stays usable."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.InvalidTask, match="expected a callable or a Command, got 42"):
            await grid.offload(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a string"):
            await grid.run_command("echo hi")  # type: ignore[arg-type]
        with pytest.raises(gb.InvalidTask, match="non-empty"):
            await grid.run_command([])
        with pytest.raises(gb.InvalidRequest, match="where must be"):
            await grid.offload(add, 1, where="moon")  # type: ignore[arg-type]
        with pytest.raises(gb.InvalidRequest, match="retries"):
            await grid.offload(add, 1, retries=-1)
        with pytest.raises(gb.InvalidRequest, match="timeout"):
            await grid.offload(add, 1, timeout=0)
        assert await grid.offload(add, 1, 2) == 3


async def test_resources_beyond_the_machine_are_refused_not_queued() -> None:
    """A task asking for more than the machine has fails at once instead of waiting forever."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with anyio.fail_after(2), pytest.raises(gb.CapacityUnavailable, match="needs cpu=3"):
            await grid.offload(add, 1, resources="cpu=3", where="local")


async def test_unpicklable_work_is_refused_before_submission() -> None:
    """With the process executor, a lambda or local function is refused at submit, naming it."""

    def local_function() -> int:
        return 1

    async with gb.Grid(capacity=CAPACITY, executor="process") as grid:
        with pytest.raises(gb.NotSerializable, match="lambda"):
            grid.submit(lambda: 1)
        with pytest.raises(gb.NotSerializable, match="local_function"):
            await grid.offload(local_function)
        assert grid.stats().get("placed.local", 0) == 0
        assert await grid.offload(add, 2, 3) == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"executor": "fibers"}, "executor must be"),
        ({"max_workers": 0}, "max_workers"),
        ({"capacity": "cpu=-1"}, "cpu must not be negative"),
        ({"teardown_timeout": 0}, "teardown_timeout"),
        ({"colour": "blue"}, "no option colour; it accepts: executor"),
    ],
    ids=["executor", "max_workers", "capacity", "teardown_timeout", "unknown-option"],
)
def test_bad_grid_options_are_refused(options: dict[str, Any], message: str) -> None:
    """Bad grid options raise InvalidRequest naming the option before anything starts."""
    with pytest.raises(gb.InvalidRequest, match=message):
        gb.Grid(**options)
