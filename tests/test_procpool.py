"""Tests of the grid's own process pool: results, errors, limits, cancellation and teardown."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psutil
import pytest

import gridboost._procpool
from gridboost._procpool import ProcessPool, check_picklable
from gridboost.exceptions import BackendError, GridClosed, NotSerializable
from gridboost.testing import add

pytestmark = pytest.mark.anyio

GRACE = 0.5


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# Functions run in the workers: they must be module-level so that they pickle by reference.


def echo(value: object) -> object:
    return value


def get_pid() -> int:
    return os.getpid()


def timed_pid(delay: float) -> tuple[int, float, float]:
    start = time.monotonic()
    time.sleep(delay)
    return os.getpid(), start, time.monotonic()


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def sleep_with_marker(marker: str, seconds: float) -> None:
    _write_atomically(marker, str(os.getpid()))
    time.sleep(seconds)


def ignore_sigterm_and_sleep(marker: str, seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write_atomically(marker, str(os.getpid()))
    time.sleep(seconds)


def exit_abruptly(code: int) -> None:
    os._exit(code)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class PickyError(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


def raise_picky_error() -> None:
    raise PickyError("picky", code=7)


def make_lock() -> object:
    return threading.Lock()


def noisy() -> str:
    print("noise from print()")
    os.write(1, b"noise written to fd 1\n")
    subprocess.run([sys.executable, "-c", "print('noise from a grandchild')"], check=True, timeout=30)
    return "quiet"


# Helpers of the tests themselves.


async def wait_for_pid(marker: Path) -> int:
    path = anyio.Path(marker)
    with anyio.fail_after(30):
        # Polled: the marker is written by another process, so there is no event to wait on.
        while not await path.exists():
            await anyio.sleep(0.01)
    return int(await path.read_text())


def assert_gone(pids: frozenset[int] | set[int]) -> None:
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    assert not pids & children
    for pid in pids:
        assert not psutil.pid_exists(pid), f"process {pid} still exists"


@pytest.fixture
async def pool() -> AsyncIterator[ProcessPool]:
    pool = ProcessPool(2, grace=GRACE)
    seen: set[int] = set()
    try:
        yield pool
    finally:
        seen |= pool.pids()
        with anyio.fail_after(30):
            assert await pool.aclose() == []
        assert pool.pids() == frozenset()
        assert_gone(seen)
        # Unclosed transports and unreaped processes only warn when collected; collect now, inside the test.
        gc.collect()


async def test_round_trip(pool: ProcessPool) -> None:
    """Arguments, keyword arguments and results travel both ways intact, large ones included."""
    big = os.urandom(5_000_000)
    with anyio.fail_after(30):
        assert await pool.run(add, (1,), {"b": 2}) == 3
        assert await pool.run(echo, (big,), {}) == big
        assert await pool.run(echo, ({"nested": [1, (2, 3)]},), {}) == {"nested": [1, (2, 3)]}


async def test_worker_is_reused(pool: ProcessPool) -> None:
    """Consecutive calls run in the same worker process, which is not the test's own."""
    with anyio.fail_after(30):
        first = await pool.run(get_pid, (), {})
        second = await pool.run(get_pid, (), {})
    assert first == second != os.getpid()
    assert pool.pids() == {first}


async def test_user_exception_keeps_its_type(pool: ProcessPool) -> None:
    """An exception raised by the function reaches the caller with its own type and the worker's traceback."""
    with anyio.fail_after(30), pytest.raises(ValueError, match="boom") as info:
        await pool.run(raise_value_error, ("boom",), {})
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Traceback in the worker process" in notes
    assert "raise_value_error" in notes


async def test_exception_that_cannot_be_rebuilt(pool: ProcessPool) -> None:
    """An exception that does not survive pickling comes back as a RuntimeError naming it."""
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="PickyError"):
        await pool.run(raise_picky_error, (), {})
    with anyio.fail_after(30):
        assert await pool.run(add, (2, 2), {}) == 4


async def test_print_does_not_corrupt_protocol(pool: ProcessPool) -> None:
    """Output of print(), of raw writes to fd 1 and of subprocesses does not disturb the exchange."""
    with anyio.fail_after(30):
        assert await pool.run(noisy, (), {}) == "quiet"
        assert await pool.run(add, (1, 1), {}) == 2


async def test_concurrency_is_bounded(pool: ProcessPool) -> None:
    """Many concurrent calls never run in more than max_workers processes at once."""
    results: list[tuple[int, float, float]] = []
    most_alive = 0

    async def one() -> None:
        results.append(await pool.run(timed_pid, (0.2,), {}))

    async def watch() -> None:
        nonlocal most_alive
        while True:
            most_alive = max(most_alive, len(pool.pids()))
            await anyio.sleep(0.005)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as outer:
            outer.start_soon(watch)
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
            outer.cancel_scope.cancel()

    assert len(results) == 8
    assert len({pid for pid, _, _ in results}) == 2
    assert most_alive <= 2
    events = sorted([(start, 1) for _, start, _ in results] + [(end, -1) for _, _, end in results])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


async def test_cancel_while_waiting_for_slot_runs_nothing(tmp_path: Path) -> None:
    """A call cancelled while all workers are busy never starts."""
    pool = ProcessPool(1, grace=GRACE)
    busy_marker = tmp_path / "busy"
    never_marker = tmp_path / "never"
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, sleep_with_marker, (str(busy_marker), 60), {})
                pid = await wait_for_pid(busy_marker)
                with anyio.CancelScope() as waiting:
                    waiting.cancel()
                    await pool.run(sleep_with_marker, (str(never_marker), 0), {})
                tg.cancel_scope.cancel()
        assert not never_marker.exists()
        assert_gone({pid})
    finally:
        with anyio.fail_after(30):
            assert await pool.aclose() == []


async def test_cancel_kills_running_worker(pool: ProcessPool, tmp_path: Path) -> None:
    """Cancelling a running call terminates its worker promptly, reaps it, and the pool goes on working."""
    marker = tmp_path / "pid"
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, sleep_with_marker, (str(marker), 60), {})
            pid = await wait_for_pid(marker)
            start = time.monotonic()
            tg.cancel_scope.cancel()
    assert time.monotonic() - start < GRACE + 2
    assert pid not in pool.pids()
    assert_gone({pid})
    with anyio.fail_after(30):
        assert await pool.run(get_pid, (), {}) != pid


async def test_worker_ignoring_sigterm_is_killed(pool: ProcessPool, tmp_path: Path) -> None:
    """A worker that ignores SIGTERM is killed once the grace period is over."""
    marker = tmp_path / "pid"
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, ignore_sigterm_and_sleep, (str(marker), 60), {})
            pid = await wait_for_pid(marker)
            start = time.monotonic()
            tg.cancel_scope.cancel()
    elapsed = time.monotonic() - start
    assert GRACE * 0.9 <= elapsed < GRACE + 5
    assert_gone({pid})


async def test_worker_exiting_mid_call(pool: ProcessPool) -> None:
    """A worker that exits during a call gives BackendError naming its pid and exit code, and is replaced."""
    with anyio.fail_after(30):
        pid = await pool.run(get_pid, (), {})
        with pytest.raises(BackendError, match=rf"pid {pid} died during a call to exit_abruptly \(exit code 3\)"):
            await pool.run(exit_abruptly, (3,), {})
        assert_gone({pid})
        assert await pool.run(get_pid, (), {}) != pid


async def test_worker_killed_from_outside(pool: ProcessPool, tmp_path: Path) -> None:
    """A worker SIGKILLed from outside during a call gives BackendError saying so."""
    marker = tmp_path / "pid"

    async def kill_when_started() -> None:
        os.kill(await wait_for_pid(marker), signal.SIGKILL)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_when_started)
            with pytest.raises(BackendError, match=r"died during a call to sleep_with_marker .*SIGKILL"):
                await pool.run(sleep_with_marker, (str(marker), 60), {})
    assert_gone({int(marker.read_text())})


async def test_aclose_leaves_no_child_process() -> None:
    """aclose() stops and reaps every worker, is idempotent, and leaves no child process."""
    pool = ProcessPool(3, grace=GRACE)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(pool.run, timed_pid, (0.2,), {})
    pids = pool.pids()
    assert len(pids) == 3
    assert pids <= {child.pid for child in psutil.Process().children()}
    with anyio.fail_after(30):
        assert await pool.aclose() == []
        assert await pool.aclose() == []
    assert pool.pids() == frozenset()
    assert_gone(pids)
    gc.collect()


async def test_aclose_stops_busy_worker(tmp_path: Path) -> None:
    """aclose() during a call stops that worker too, and the caller gets GridClosed."""
    pool = ProcessPool(1, grace=GRACE)
    marker = tmp_path / "pid"
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            await pool.run(sleep_with_marker, (str(marker), 60), {})
        except GridClosed as exc:
            outcome.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            pid = await wait_for_pid(marker)
            assert await pool.aclose() == []
    assert len(outcome) == 1
    assert_gone({pid})
    gc.collect()


async def test_run_after_aclose_raises_grid_closed() -> None:
    """run() on a closed pool raises GridClosed without starting anything."""
    pool = ProcessPool(1)
    with anyio.fail_after(30):
        assert await pool.aclose() == []
        with pytest.raises(GridClosed):
            await pool.run(add, (1, 2), {})
    assert pool.pids() == frozenset()


async def test_check_picklable_rejects_lambda_and_local_function() -> None:
    """check_picklable rejects a lambda and a local function with a message naming it."""

    def local_function() -> None:
        pass

    with pytest.raises(NotSerializable, match=r"cannot send \S*<lambda> to a worker process: it cannot be pickled \("):
        check_picklable(lambda: None, (), {})
    with pytest.raises(NotSerializable, match=r"local_function") as info:
        check_picklable(local_function, (), {})
    message = str(info.value)
    assert "test_check_picklable_rejects_lambda_and_local_function.<locals>.local_function" in message
    assert "cannot be pickled" in message
    assert "define it at module level" in message
    check_picklable(add, (1,), {"b": 2})


async def test_check_picklable_names_bad_argument() -> None:
    """An unpicklable argument is reported with the function's name and the argument's position or keyword."""
    with pytest.raises(NotSerializable, match=r"call of add .*argument 1 \(lock\)"):
        check_picklable(add, (1, threading.Lock()), {})
    with pytest.raises(NotSerializable, match=r"keyword argument 'b'"):
        check_picklable(add, (1,), {"b": threading.Lock()})


async def test_run_rejects_unpicklable_call_without_starting_worker(pool: ProcessPool) -> None:
    """run() refuses an unpicklable call before starting any worker."""
    with anyio.fail_after(30), pytest.raises(NotSerializable, match="<lambda>"):
        await pool.run(lambda: None, (), {})
    assert pool.pids() == frozenset()


async def test_unpicklable_result(pool: ProcessPool) -> None:
    """A result that cannot be pickled gives NotSerializable naming the function, and the worker stays usable."""
    with anyio.fail_after(30):
        pid = await pool.run(get_pid, (), {})
        with pytest.raises(NotSerializable, match=r"result of make_lock cannot be pickled"):
            await pool.run(make_lock, (), {})
        assert await pool.run(get_pid, (), {}) == pid


# Where this gridboost was imported from, so that the script's interpreter imports the same one.
GRIDBOOST_ROOT = str(Path(gridboost._procpool.__file__).resolve().parent.parent)

SCRIPT = """
import sys

import anyio

from gridboost._procpool import ProcessPool


def triple(x):
    return 3 * x


def arguments():
    return sys.argv[1:]


async def main():
    pool = ProcessPool(1)
    try:
        print(await pool.run(triple, (14,), {}), *await pool.run(arguments, (), {}))
    finally:
        assert await pool.aclose() == []


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""

UNGUARDED_SCRIPT = SCRIPT.replace('if __name__ == "__main__":\n    ', "")


async def run_script(directory: Path, text: str, backend: str) -> tuple[int, str, str]:
    script = anyio.Path(directory) / "script.py"
    await script.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [GRIDBOOST_ROOT, os.environ.get("PYTHONPATH")]))}
    with anyio.fail_after(60):
        result = await anyio.run_process([sys.executable, str(script), backend, "extra"], env=env, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_function_from_script_main_module(tmp_path: Path, anyio_backend: str) -> None:
    """A function defined in a script's __main__ runs in a worker that sees the script's argv but not its main block."""
    returncode, stdout, stderr = await run_script(tmp_path, SCRIPT, anyio_backend)
    assert returncode == 0, stderr
    assert stdout == f"42 {anyio_backend} extra\n"


async def test_unguarded_script_does_not_spawn_recursively(tmp_path: Path, anyio_backend: str) -> None:
    """A script that starts a pool outside its __main__ guard fails with BackendError instead of spawning endlessly."""
    assert "__name__" not in UNGUARDED_SCRIPT
    returncode, stdout, stderr = await run_script(tmp_path, UNGUARDED_SCRIPT, anyio_backend)
    assert returncode != 0
    assert stdout == ""
    assert "BackendError" in stderr
    assert "a worker process cannot start workers while it loads the main module" in stderr
