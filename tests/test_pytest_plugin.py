"""The pytest plugin: grid fixtures for any project that installs gridboost, and a leak check that names each leak.

Projects are made with ``pytester`` and run with ``runpytest_subprocess``, in a fresh interpreter with no conftest, so
that the tests see what a user who only ran ``pip install gridboost`` sees. Tests that leak on purpose clean up
inside their own subprocess (atexit, daemon threads, a module-scoped janitor) so nothing outlives the run.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import anyio
import anyio.to_process
import psutil
import pytest

import gridboost as gb
from gridboost.testing import _leaks
from gridboost.testing.pytest_plugin import GridFactory

pytest_plugins = ["pytester"]

RUN_TIMEOUT = 120  # seconds for one pytest subprocess; each takes a few


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest in a new interpreter in the project, as strict as gridboost's own suite.

    Its output must not depend on where this runs: with ``CI`` set, pytest stops
    shortening the summary lines, which repeats each error's message there.
    """
    with pytest.MonkeyPatch.context() as env:
        for name in ("CI", "BUILD_NUMBER"):
            env.delenv(name, raising=False)
        return pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--strict-markers", "--strict-config", "-rA", *args, timeout=RUN_TIMEOUT
        )


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


# -- the fixtures, used right here ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_grid_fixture_is_an_open_local_grid(grid: gb.Grid) -> None:
    """``grid`` is an open grid on the local backend that runs work."""
    assert repr(grid) == "<Grid backend=local open>"
    assert await grid.offload(sum, [1, 2, 3]) == 6


@pytest.mark.anyio
async def test_grid_factory_opens_grids_of_any_options(grid_factory: GridFactory) -> None:
    """``grid_factory`` takes the backend name and the grid's and backend's options."""
    first = await grid_factory(capacity="cpu=1")
    second = await grid_factory("local", capacity="cpu=2", teardown_timeout=5)
    assert first is not second and not first.closed and not second.closed
    assert second.teardown_timeout == 5
    assert (await second.snapshot()).nodes[0].total == gb.Resources(cpu=2)
    with pytest.raises(gb.UnknownBackend):
        await grid_factory("no-such-backend")


@pytest.mark.anyio
async def test_leak_check_requested_last_still_runs_after_the_grid_closed(
    grid: gb.Grid, grid_factory: GridFactory, no_leaks: None
) -> None:
    """``no_leaks`` is set up before the other fixtures and checked after their teardown, wherever it is requested."""
    await grid_factory(capacity="cpu=1")
    await grid.offload(sum, [1])


@pytest.mark.no_leaks(False)
def test_plugin_adds_nothing_to_tests_that_do_not_ask(request: pytest.FixtureRequest) -> None:
    """A test that asks for none of it gets no gridboost fixture."""
    assert not {"no_leaks", "grid", "grid_factory"} & set(request.fixturenames)


def test_plugin_imports_no_backend_engine() -> None:
    """Loading the plugin imports neither Ray nor Dask."""
    code = (
        "import sys, gridboost.testing.pytest_plugin\n"
        "heavy = sorted({'ray', 'dask', 'distributed'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the leak finder on its own ---------------------------------------------------------------------------------------


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """Set after the test: threads the test starts wait on it, so none outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def test_find_leaks_names_a_new_thread_and_not_an_old_one(stop: threading.Event) -> None:
    """Only threads started after the baseline count, and each is named."""
    old = threading.Thread(target=stop.wait, args=(30,), name="old", daemon=True)
    old.start()
    baseline = _leaks.snapshot()
    new = threading.Thread(target=stop.wait, args=(30,), name="new", daemon=True)
    new.start()
    assert _leaks.find_leaks(baseline, grace=0) == ["thread 'new' still alive"]
    stop.set()
    new.join(5)
    assert _leaks.find_leaks(baseline, grace=0) == []


def test_find_leaks_names_a_child_process_and_waits_for_one_exiting() -> None:
    """A child still running is named with its pid and command line; one that exits within the grace is not."""
    baseline = _leaks.snapshot()
    with subprocess.Popen(["sleep", "30"]) as sleeper, subprocess.Popen(["sleep", "0.2"]) as quick:
        try:
            leaks = _leaks.find_leaks(baseline, grace=1.0)
            assert leaks == [f"child process pid {sleeper.pid} (sleep 30) still alive"]
            assert quick.poll() is not None
        finally:
            sleeper.kill()


def test_zombie_children_are_not_leaks() -> None:
    """A child that exited but was not reaped yet is not alive."""
    baseline = _leaks.snapshot()
    with subprocess.Popen(["true"]) as child:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _leaks.find_leaks(baseline, grace=0) == []


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_idle_event_loop_workers_are_not_leaks(loop: str) -> None:
    """The idle threads and processes an event loop keeps after ``to_thread`` and ``to_process`` are exempt."""

    async def use_workers(baseline: _leaks.Baseline) -> list[str]:
        await anyio.to_thread.run_sync(time.sleep, 0)
        await anyio.to_process.run_sync(os.getpid)
        return _leaks.find_leaks(baseline, grace=0)  # while the loop, and so its idle workers, are alive

    baseline = _leaks.snapshot()
    assert anyio.run(use_workers, baseline, backend=loop) == []


def test_a_coroutine_never_awaited_in_a_reference_cycle_is_found() -> None:
    """Garbage collection at the check finalizes a forgotten coroutine that only a cycle kept alive."""

    async def forgotten() -> None:
        pass

    baseline = _leaks.snapshot()
    cycle: list[object] = [forgotten()]
    cycle.append(cycle)
    del cycle
    assert _leaks.find_leaks(baseline, grace=0) == [
        "coroutine 'test_a_coroutine_never_awaited_in_a_reference_cycle_is_found.<locals>.forgotten' was never awaited"
    ]


@pytest.mark.no_leaks(False)  # it checks the collector is not frozen, which a check around it would do
def test_no_leaks_raises_naming_the_leak_and_thaws_the_collector(stop: threading.Event) -> None:
    """``no_leaks()`` raises LeakError naming what leaked, and leaves the garbage collector as it found it."""
    assert gc.get_freeze_count() == 0
    with pytest.raises(
        _leaks.LeakError, match=r"1 thing is still alive after the test:\n  - thread 'left' still alive"
    ):
        with _leaks.no_leaks(grace=0):
            assert gc.get_freeze_count() > 0
            threading.Thread(target=stop.wait, args=(30,), name="left", daemon=True).start()
    assert gc.get_freeze_count() == 0
    with pytest.raises(ZeroDivisionError), _leaks.no_leaks(grace=0):
        1 / 0  # noqa: B018
    assert gc.get_freeze_count() == 0


@pytest.mark.anyio
async def test_grid_leaks_names_an_open_grid_and_what_its_engine_holds() -> None:
    """``grid_leaks`` asks the engine itself: an open grid, then a reservation its engine still holds, are named."""
    from gridboost.abc import ReservationRequest

    with anyio.fail_after(30):
        async with gb.Grid(capacity="cpu=2") as grid:
            assert _leaks.grid_leaks([grid]) == ["grid <Grid backend=local open> still open"]
            sneaky = await grid.backend.reserve(ReservationRequest(id="sneaky", resources=gb.Resources(cpu=1)))
            held = _leaks.grid_leaks([grid])
            assert held[1] == "local engine of grid <Grid backend=local open> still holds reservation sneaky"
            await grid.backend.release(sneaky)
    assert _leaks.grid_leaks([grid]) == []


# -- a new project, in a new interpreter ------------------------------------------------------------------------------


def test_a_project_with_no_conftest_uses_the_fixtures(pytester: pytest.Pytester) -> None:
    """With only a test file, ``grid`` and ``grid_factory`` work in tests marked anyio, on asyncio and trio."""
    pytester.makepyfile(
        test_uses_grid="""
        import pytest

        pytestmark = pytest.mark.anyio

        async def test_grid(grid):
            assert await grid.offload(sum, [1, 2, 3]) == 6

        async def test_factory(grid_factory):
            grid = await grid_factory(capacity="cpu=1", executor="process")
            assert await grid.offload(abs, -3) == 3
        """
    )
    assert not list(pytester.path.glob("conftest.py"))
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=4)


def test_the_plugin_loads_by_name_when_autoloading_is_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``, ``-p anyio -p gridboost`` loads what the fixtures need."""
    pytester.makepyfile(
        test_uses_grid="""
        import pytest

        @pytest.mark.anyio
        async def test_grid(grid):
            assert not grid.closed
        """
    )
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    run(pytester, "-W", "error", "-p", "anyio", "-p", "gridboost").assert_outcomes(passed=2)


def test_a_grid_left_open_fails_when_checked_and_passes_when_not(pytester: pytest.Pytester) -> None:
    """A grid entered by hand and never exited is named; the unchecked twin passes."""
    pytester.makepyfile(
        test_open_grid="""
        import pytest
        import gridboost as gb

        pytestmark = pytest.mark.anyio
        LEFT_OPEN = []

        @pytest.fixture(scope="module")
        async def janitor(anyio_backend):
            # Closes, after the leak check, the grids the tests leave open: in the task that opened them.
            yield
            while LEFT_OPEN:
                await LEFT_OPEN.pop().__aexit__(None, None, None)

        async def leave_a_grid_open():
            grid = gb.Grid(capacity="cpu=1")
            await grid.__aenter__()
            LEFT_OPEN.append(grid)

        async def test_unchecked(janitor):
            await leave_a_grid_open()

        @pytest.mark.no_leaks
        async def test_checked(janitor):
            await leave_a_grid_open()
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_checked[[]asyncio[]]*", "*gridboost leak check*"])
    assert output(result).count("  - grid <Grid backend=local open> still open") == 2
    assert "PASSED test_open_grid.py::test_unchecked[asyncio]" in output(result)


def test_a_thread_left_running_fails_when_checked_and_passes_when_not(pytester: pytest.Pytester) -> None:
    """A thread the test started and left running is named; the unchecked twin passes."""
    pytester.makepyfile(
        test_thread="""
        import threading
        import pytest

        def start_thread(name):
            # A daemon waiting on an event nobody sets: it ends with the interpreter, not before.
            threading.Thread(target=threading.Event().wait, args=(60,), name=name, daemon=True).start()

        def test_unchecked():
            start_thread("unchecked")

        @pytest.mark.usefixtures("no_leaks")
        def test_checked():
            start_thread("leaky")
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_checked*", "*  - thread 'leaky' still alive"])
    assert "'unchecked'" not in output(result)


def test_a_child_process_left_running_fails_when_checked_and_passes_when_not(pytester: pytest.Pytester) -> None:
    """A child process still running after the test is named with its pid and command; the unchecked twin passes."""
    pytester.makepyfile(
        test_child="""
        import atexit
        import subprocess
        from pathlib import Path
        import pytest

        def start_sleeper():
            sleeper = subprocess.Popen(["sleep", "30"])
            with Path("pids").open("a") as pids:
                pids.write(f"{sleeper.pid}\\n")
            # Killed (and reaped) when this pytest exits, so nothing outlives the run.
            atexit.register(lambda: (sleeper.kill(), sleeper.wait(10)))
            return sleeper.pid

        def test_unchecked():
            start_sleeper()

        def test_checked(no_leaks):
            start_sleeper()
        """
    )
    try:
        result = run(pytester, "-W", "error")
    finally:
        pids = [int(line) for line in (pytester.path / "pids").read_text().split()]
        survivors = [pid for pid in pids if _alive(pid)]
        for pid in survivors:
            os.kill(pid, 9)
    assert survivors == []
    result.assert_outcomes(passed=2, errors=1)
    unchecked, checked = pids
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_checked*", f"  - child process pid {checked} (sleep 30) still alive"]
    )
    assert f"pid {unchecked}" not in output(result)


def test_a_coroutine_never_awaited_fails_when_checked(pytester: pytest.Pytester) -> None:
    """A coroutine never awaited is named, whether dropped at once or kept by a reference cycle.

    Unchecked, it passes with a warning in the summary. Under ``-W error`` the one dropped at once fails even
    unchecked, through pytest's own unraisable-exception check; the one in a cycle only the leak check catches.
    """
    pytester.makepyfile(
        test_coroutine="""
        import pytest

        async def forgotten():
            pass

        def drop_one():
            forgotten()

        def keep_one_in_a_cycle():
            cycle = [forgotten()]
            cycle.append(cycle)

        def test_dropped_unchecked():
            drop_one()

        @pytest.mark.no_leaks
        def test_dropped_checked():
            drop_one()

        @pytest.mark.no_leaks
        def test_cycle_checked():
            keep_one_in_a_cycle()
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=3, errors=2, warnings=2)
    for name in ("test_dropped_checked", "test_cycle_checked"):
        result.stdout.fnmatch_lines([f"*ERROR at teardown of {name}*", "  - coroutine 'forgotten' was never awaited"])

    strict = run(pytester, "-W", "error")
    strict.assert_outcomes(passed=1, failed=2, errors=1)
    strict.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_cycle_checked*",
            "  - coroutine 'forgotten' was never awaited",
            "FAILED test_coroutine.py::test_dropped_unchecked - pytest.PytestUnraisableExc*",
        ]
    )


def test_work_the_engine_still_runs_or_holds_fails_when_checked(pytester: pytest.Pytester) -> None:
    """The local engine is asked after the test: a task still running in its thread and a reservation it holds."""
    pytester.makepyfile(
        test_engine="""
        import time
        import anyio
        import pytest
        import gridboost as gb
        from gridboost.abc import ReservationRequest

        pytestmark = [pytest.mark.anyio, pytest.mark.no_leaks]
        KEPT = []

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        def stubborn():
            time.sleep(1.0)  # never looks for cancellation, so it outlives its grid

        async def test_task_outlives_its_grid():
            with pytest.raises(gb.TeardownError, match="still running"):
                async with gb.Grid(capacity="cpu=1", close_timeout=0.1) as grid:
                    grid.submit(stubborn)
                    await anyio.sleep(0.2)

        async def test_reservation_outlives_its_grid():
            with pytest.raises(gb.TeardownError, match="sneaky"):
                async with gb.Grid(capacity="cpu=1") as grid:
                    KEPT.append(grid)  # a local engine that is gone holds nothing; this one is kept
                    await grid.backend.reserve(ReservationRequest(id="sneaky", resources=gb.Resources(cpu=1)))
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_task_outlives_its_grid*",
            "  - local engine still running task * (stubborn) in a thread",
            "*ERROR at teardown of test_reservation_outlives_its_grid*",
            "  - local engine still holds reservation sneaky",
        ]
    )


def test_a_grid_fixture_teardown_error_fails_the_test(pytester: pytest.Pytester) -> None:
    """What the ``grid`` fixture's teardown cannot release is an error of the test, not swallowed."""
    pytester.makepyfile(
        test_teardown="""
        import pytest
        import gridboost as gb
        from gridboost.abc import ReservationRequest

        @pytest.mark.anyio
        async def test_reserves_behind_the_grids_back(grid):
            await grid.backend.reserve(ReservationRequest(id="sneaky", resources=gb.Resources(cpu=1)))
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*TeardownError: teardown left behind: reservation sneaky is still held*"])


def test_grid_factory_closes_its_grids_in_reverse_order(pytester: pytest.Pytester) -> None:
    """The grids ``grid_factory`` opened are closed last-made first, each awaited."""
    pytester.makepyfile(
        test_order="""
        from pathlib import Path
        import pytest

        async def note(name):
            with Path("closed").open("a") as closed:
                closed.write(name)

        @pytest.mark.anyio
        async def test_three_grids(grid_factory):
            for name in "abc":
                grid = await grid_factory(capacity="cpu=1")
                grid.push_async_callback(note, name)
        """
    )
    run(pytester, "-W", "error").assert_outcomes(passed=2)
    assert (pytester.path / "closed").read_text() == "cba" * 2


def test_the_ini_option_checks_every_test(pytester: pytest.Pytester) -> None:
    """``gridboost_leak_check = true`` checks every test; ``no_leaks(False)`` exempts one."""
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        gridboost_leak_check = true
        """
    )
    pytester.makepyfile(
        test_everywhere="""
        import threading
        import pytest

        def start_thread(name):
            threading.Thread(target=threading.Event().wait, args=(60,), name=name, daemon=True).start()

        def test_clean():
            pass

        def test_unmarked_leak():
            start_thread("unmarked")

        @pytest.mark.no_leaks(False)
        def test_exempt_leak():
            start_thread("exempt")
        """
    )
    for without_anyio in ((), ("-p", "no:anyio")):  # the check itself needs no async plugin
        result = run(pytester, "-W", "error", *without_anyio)
        result.assert_outcomes(passed=3, errors=1)
        result.stdout.fnmatch_lines(["*ERROR at teardown of test_unmarked_leak*", "  - thread 'unmarked' still alive"])
        assert "'exempt'" not in output(result)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_grid_fixtures_check_for_leaks_with_no_configuration(pytester: pytest.Pytester) -> None:
    """In a bare project, a test using ``grid`` or ``grid_factory`` that drops a coroutine fails; ``no_leaks(False)``
    exempts one, and a test using neither fixture is not checked."""
    pytester.makepyfile(
        test_bare="""
        import pytest

        pytestmark = pytest.mark.anyio

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        async def work():
            return 1

        async def test_grid_drops_a_coroutine(grid):
            assert await grid.offload(sum, [1, 2]) == 3
            work()

        async def test_factory_drops_a_coroutine(grid_factory):
            await grid_factory(capacity="cpu=1")
            work()

        @pytest.mark.no_leaks(False)
        async def test_grid_exempt(grid):
            work()

        async def test_no_grid_fixture():
            work()
        """
    )
    assert not list(pytester.path.glob("conftest.py")) and not list(pytester.path.glob("*.ini"))
    result = run(pytester)
    result.assert_outcomes(passed=4, errors=2, warnings=4)  # each dropped coroutine warns too; two only warn
    for name in ("test_grid_drops_a_coroutine", "test_factory_drops_a_coroutine"):
        result.stdout.fnmatch_lines([f"*ERROR at teardown of {name}*", "  - coroutine 'work' was never awaited"])


def test_a_project_fixture_named_grid_is_not_checked_by_default(pytester: pytest.Pytester) -> None:
    """A project's own ``grid`` fixture (a conformance suite's, say) keeps the leak check opt-in."""
    pytester.makepyfile(
        test_own="""
        import pytest

        @pytest.fixture
        def grid():
            return "mine"

        async def work():
            return 1

        def test_own_grid(grid):
            work()
        """
    )
    run(pytester).assert_outcomes(passed=1, warnings=1)
