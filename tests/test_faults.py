"""The audit's faults in the core, each pinned: bad values get typed one-line errors, cancels reach the work."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

import gridboost as gb
from gridboost._kit import shown
from gridboost.testing import SuiteError, add, fail_with, nap

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=4GiB"
HUGE = (10**400, -(10**400), 10**5000)  # the last has no repr: Python refuses to print ints of > 4300 digits
HUGE_IDS = ["1e400", "-1e400", "1e5000"]


def repr_or_huge(value: object) -> str:
    return HUGE_IDS[HUGE.index(value)] if value in HUGE else repr(value)  # type: ignore[arg-type]


def _short(error: BaseException) -> None:
    assert len(str(error)) < 200, str(error)


# -- 3: TaskHandle.cancelled() ------------------------------------------------------------


async def test_cancelled_is_true_only_for_a_cancelled_task() -> None:
    """A task that succeeded or failed is not ``cancelled()``; one that was cancelled is."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        ok = grid.submit(add, 1, 2)
        failed = grid.submit(fail_with, 3)
        stopped = grid.submit(nap, 30.0)
        assert await ok == 3
        with pytest.raises(SuiteError):
            await failed
        stopped.cancel()
        with pytest.raises(gb.TaskCancelled):
            await stopped
        assert (ok.cancelled(), failed.cancelled(), stopped.cancelled()) == (False, False, True)


# -- 4, 5: numbers no float holds, and values no repr prints --------------------------------


@pytest.mark.parametrize("text", ["cpu=1e10000000", "memory=9e99999999GiB", "cpu=" + "9" * 100_000])
def test_parse_refuses_an_unbounded_number_at_once(text: str) -> None:
    """``Resources.parse`` refuses an exponent or a number of any length without computing it."""
    with pytest.raises(gb.InvalidResources, match="plain number") as info:
        gb.Resources.parse(text)
    _short(info.value)


@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
@pytest.mark.parametrize("option", ["teardown_timeout", "auto_offload_backoff", "pressure_interval", "cluster_queue"])
def test_grid_options_refuse_huge_ints_with_a_short_typed_error(option: str, value: int) -> None:
    """A Grid option given an int no float holds raises ``InvalidRequest`` in one short line."""
    with pytest.raises(gb.InvalidRequest, match=option) as info:
        gb.Grid(**{option: value})
    _short(info.value)


@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
async def test_request_arguments_refuse_huge_ints_with_a_short_typed_error(value: int) -> None:
    """ttl, wait, timeout and resource amounts given an int no float holds raise typed, short errors."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        calls = [
            lambda: grid.request_boost("cpu=1", ttl=value),
            lambda: grid.request_boost("cpu=1", ttl=10, wait=value),
            lambda: grid.offload(add, 1, timeout=value),
            lambda: grid.submit(add, 1, timeout=value),
            lambda: grid.run_command(["true"], timeout=value),
            lambda: grid.offload(add, 1, resources={"cpu": value}),
            lambda: grid.offload(add, 1, resources={"accel": value}),
            lambda: grid.offload(add, 1, retries=value) if value < 0 else grid.submit(add, 1, where=value),
        ]
        for call in calls:
            with pytest.raises(gb.GridboostError) as info:
                made = call()
                await made if hasattr(made, "__await__") else None
            assert isinstance(info.value, gb.InvalidRequest | gb.InvalidTask), info.value
            _short(info.value)
        assert await grid.offload(add, 2, 3) == 5


def test_shown_quotes_any_value_in_one_short_line() -> None:
    """Error messages quote values through ``shown``: short, and safe for values with no repr."""

    class NoRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert shown(NoRepr()) == "<NoRepr object>"
    assert shown(10**5000) == "an integer of about 5000 digits"
    assert len(shown("x" * 10_000)) == 60
    assert shown(1.5) == "1.5"


def test_unknown_backend_of_any_kind_is_a_short_typed_error() -> None:
    """A backend named by something that is not a name, or by a huge name, raises a short typed error."""
    for backend in (10**5000, object(), "x" * 10_000):
        with pytest.raises(gb.GridboostError) as info:
            gb.Grid(backend)  # type: ignore[arg-type]
        assert isinstance(info.value, gb.InvalidRequest | gb.UnknownBackend)
        _short(info.value)


# -- 6: commands the OS would refuse ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"argv": ["echo", "a\0b"]},
        {"argv": ["echo"], "env": {"A": "x\0y"}},
        {"argv": ["echo"], "env": {"A=B": "x"}},
        {"argv": ["echo"], "env": {"": "x"}},
        {"argv": ["echo"], "env": {1: "x"}},
        {"argv": ["echo"], "cwd": "/tmp\0"},
        {"argv": ["echo"], "cwd": 5},
        {"argv": [""]},
        {"argv": [b"echo"]},
    ],
)
async def test_run_command_refuses_what_the_os_would_refuse_at_the_call(kwargs: dict[str, object]) -> None:
    """NUL bytes, ``=`` in env names, a non-string cwd or argv item raise ``InvalidTask`` before anything runs."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.InvalidTask) as info:
            grid.run_command(**kwargs)  # type: ignore[arg-type]  # raises at the call: nothing to await
        _short(info.value)
        assert (await grid.run_command(["true"])).returncode == 0


async def test_a_missing_program_or_cwd_raises_command_not_found(tmp_path: object) -> None:
    """A program or working directory that does not exist raises ``CommandNotFound``, a ``FileNotFoundError``."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.CommandNotFound, match="no such program") as info:
            await grid.run_command(["gridboost-no-such-program"])
        assert isinstance(info.value, FileNotFoundError)
        assert info.value.filename == "gridboost-no-such-program"
        with pytest.raises(FileNotFoundError, match="no such working directory"):
            await grid.run_command(["true"], cwd="/gridboost/no/such/dir")
        assert grid.stats()["tasks.failed"] == 2


# -- 7: local backend options ---------------------------------------------------------------


@pytest.mark.parametrize("option", ["grace", "close_timeout"])
@pytest.mark.parametrize("value", ["x", float("nan"), float("inf"), -1, *HUGE, True, None], ids=repr_or_huge)
def test_local_backend_options_are_checked_at_construction(option: str, value: object) -> None:
    """A bad ``grace`` or ``close_timeout`` is refused when the grid is built, not when a command is stopped."""
    with pytest.raises(gb.InvalidRequest, match=option) as info:
        gb.Grid(**{option: value})
    _short(info.value)


async def test_a_timed_out_command_raises_timeout_with_a_zero_grace() -> None:
    """With ``grace=0`` a command past its timeout is killed and ``TimeoutError`` raised, its process gone."""
    async with gb.Grid(capacity=CAPACITY, grace=0) as grid:
        with pytest.raises(TimeoutError):
            await grid.run_command(["sleep", "30"], timeout=0.2)
        assert grid.backend.running_tasks() == {}  # type: ignore[attr-defined]


# -- 8: the app's resources, each closed on its own --------------------------------------------


async def test_a_hung_app_resource_is_named_and_the_others_still_close() -> None:
    """One app resource whose exit hangs is named in ``TeardownError``; the failing one too; the rest close."""
    closed: list[str] = []

    @asynccontextmanager
    async def resource(name: str, *, hang: bool = False) -> AsyncIterator[str]:
        yield name
        if hang:
            await anyio.sleep_forever()
        closed.append(name)

    async def failing() -> None:
        raise RuntimeError("registry unreachable")

    with anyio.fail_after(30), pytest.raises(gb.TeardownError) as info:
        async with gb.Grid(capacity=CAPACITY, teardown_timeout=0.5) as grid:
            await grid.enter_async_context(resource("first"))
            grid.push_async_callback(failing)
            await grid.enter_async_context(resource("stuck", hang=True))
            await grid.enter_async_context(resource("last"))
    assert closed == ["last", "first"]
    leftovers = info.value.leftovers
    assert len(leftovers) == 2, leftovers
    assert any("stuck" in item and "did not close within 0.5s" in item for item in leftovers)
    assert any("failing" in item and "registry unreachable" in item for item in leftovers)
    assert grid.closed


async def test_enter_async_context_refuses_what_is_not_an_async_context_manager() -> None:
    """A plain object given as an app resource raises ``InvalidRequest`` and the grid stays usable."""
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.InvalidRequest, match="async context manager"):
            await grid.enter_async_context(object())  # type: ignore[arg-type]
        assert await grid.offload(add, 1, 1) == 2


# -- 9: cancelling a map cancels its work --------------------------------------------------------


class _Tally:
    """Counts calls that started and that ran to the end, from worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.finished = 0

    def work(self, x: int) -> int:
        with self.lock:
            self.started += 1
        time.sleep(0.05)
        with self.lock:
            self.finished += 1
        return x


async def _until(predicate: object, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.01)


@pytest.mark.parametrize("form", ["for", "with"])
async def test_cancelling_a_map_consumer_cancels_its_work(form: str) -> None:
    """Cancelling the scope around ``async for`` over a map stops its queued work and runs the body no more."""
    tally = _Tally()
    bodies = 0
    async with gb.Grid(capacity=CAPACITY) as grid:
        with anyio.CancelScope() as scope:
            # Unordered: trio starts the first 32 in random order, so item 0 may come last.
            results = grid.map(tally.work, range(200), resources="cpu=1", max_in_flight=32, ordered=False)
            if form == "with":
                async with results:
                    async for _ in results:
                        bodies += 1
                        if bodies == 3:
                            scope.cancel()
            else:
                async for _ in results:
                    bodies += 1
                    if bodies == 3:
                        scope.cancel()
        assert bodies == 3  # no ready result is handed out past the cancel
        await _until(lambda: not grid._runtime.runs)  # every task of the map ended: it is not left to run on
        await _until(lambda: tally.started == tally.finished)  # a thread runs on past its cancel
        # Two run at a time (cpu=2): besides the three taken, at most the two running
        # and two being handed a thread at the cancel ran; the queued ones were dropped.
        assert tally.started == tally.finished <= 3 + 2 + 2, (tally.started, tally.finished)
        assert grid.stats()["tasks.cancelled"] >= 25
