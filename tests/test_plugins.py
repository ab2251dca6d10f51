"""Tests of hooks and plugin loading, each hook called through a real plugin registered the way users register one."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import gridboost as gb
from gridboost import _plugins
from plugins_for_tests import mine_backend, mine_backend_twin, not_a_spec, shadows_local

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=4,memory=4GiB"
TIMEOUT = 20
OBSERVER_DELAY = 0.05


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load no entry-point plugins unless a test installs its own, so what is in the venv cannot interfere."""
    monkeypatch.setenv(_plugins.LOAD_ENV, "")


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


def fail_with_value_error() -> None:
    raise ValueError("the user's function failed")


def wait_for_gate(started: threading.Event, gate: threading.Event) -> str:
    started.set()
    gate.wait(TIMEOUT)
    return "gate opened"


# -- backends ------------------------------------------------------------------------


async def test_backend_from_a_plugin_module_works_end_to_end() -> None:
    """A module whose ``gridboost_backends`` yields a BackendSpec makes ``Grid("mine")`` start, boost, run and close."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid("mine", plugins=[mine_backend], capacity=CAPACITY, flavour="spicy") as grid:
            backend = grid.backend
            assert isinstance(backend, mine_backend.MineBackend)
            assert backend.flavour == "spicy"
            snapshot = await grid.snapshot()
            assert snapshot.backend == "mine"
            assert snapshot.total == gb.Resources.parse(CAPACITY)
            async with grid.boost("cpu=1", ttl=60) as boost:
                inside = grid.submit(double, 21)
                assert await inside == 42
                assert len(await backend.reservations()) == 1
            assert await grid.offload(triple, 2) == 6
    assert inside.placement is not None
    assert inside.placement.boost is boost
    assert boost.state is gb.BoostState.RELEASED
    assert await backend.reservations() == []
    assert grid.closed


def test_backend_options_are_checked_against_the_spec() -> None:
    """An option the plugin's BackendSpec does not declare raises InvalidRequest listing the declared ones."""
    with pytest.raises(gb.InvalidRequest) as excinfo:
        gb.Grid("mine", plugins=[mine_backend], executor="process")

    message = str(excinfo.value)
    assert "executor" in message
    assert "it accepts: flavour, capacity" in message  # names only: one short line, whatever the spec declares
    assert "capacity" in message


def test_two_plugins_with_one_backend_name_raise_plugin_error_naming_both() -> None:
    """Two plugins that provide the same backend name raise PluginError naming the name and both plugins."""
    with pytest.raises(gb.PluginError) as excinfo:
        gb.Grid("mine", plugins=[mine_backend, mine_backend_twin])

    message = str(excinfo.value)
    assert "'mine'" in message
    assert "'plugins_for_tests.mine_backend'" in message
    assert "'plugins_for_tests.mine_backend_twin'" in message


def test_a_plugin_cannot_shadow_the_builtin_local_backend() -> None:
    """A plugin that also provides ``local`` conflicts with the built-in one, whichever backend is asked for."""
    with pytest.raises(gb.PluginError) as excinfo:
        gb.Grid("mine", plugins=[mine_backend, shadows_local])

    message = str(excinfo.value)
    assert "'local'" in message
    assert "'gridboost._local'" in message
    assert "'plugins_for_tests.shadows_local'" in message


def test_a_plugin_yielding_something_else_raises_plugin_error() -> None:
    """A plugin that yields a non-BackendSpec from ``gridboost_backends`` raises PluginError naming it and what it gave."""
    with pytest.raises(gb.PluginError) as excinfo:
        gb.Grid("local", plugins=[not_a_spec])

    message = str(excinfo.value)
    assert "'plugins_for_tests.not_a_spec'" in message
    assert "'broken'" in message
    assert "BackendSpec" in message


def test_install_hint_away_from_a_clone_is_the_cores_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed from an index (or from a folder no longer there), the hint is the core's extra, which it declares."""
    monkeypatch.setattr(_plugins, "_installed_from", lambda: None)
    assert _plugins.install_hint("ray") == 'pip install "gridboost[ray]"'
    requires = importlib.metadata.requires("gridboost") or []
    for backend in ("ray", "dask"):
        extra = re.compile(rf"^gridboost-{backend}\b.*; *extra *== *['\"]{backend}['\"]$")
        assert any(extra.match(r) for r in requires), requires


def test_install_hint_from_elsewhere_names_the_clone_by_its_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Run away from the clone it was installed from, the hint names the clone's folders by their paths."""
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).parents[1]
    assert _plugins.install_hint("dask") == f"pip install {root} {root / 'plugins' / 'gridboost-dask'}"


@pytest.mark.parametrize(
    ("name", "hint"),
    # The suite's gridboost is installed from this repository (run from its root): the hint installs the folders.
    [
        ("ray", "pip install . ./plugins/gridboost-ray"),
        ("dask", "pip install . ./plugins/gridboost-dask"),
        ("nope", None),
    ],
    ids=["ray", "dask", "unknown"],
)
def test_unknown_backend_lists_available_and_hints_at_the_install(name: str, hint: str | None) -> None:
    """An unknown backend raises UnknownBackend (a LookupError) listing what is available, with an install hint if known."""
    with pytest.raises(LookupError) as excinfo:
        gb.Grid(name, plugins=[mine_backend])

    error = excinfo.value
    assert isinstance(error, gb.UnknownBackend)
    assert error.name == name
    assert error.available == ("local", "mine")
    message = str(error)
    assert repr(name) in message
    assert "available: local, mine" in message
    if hint is None:
        assert "pip install" not in message
    else:
        assert hint in message


def test_unknown_backend_option_lists_the_accepted_ones() -> None:
    """An option the local backend does not take raises InvalidRequest (a ValueError) naming it and every accepted one."""
    with pytest.raises(ValueError) as excinfo:  # noqa: PT011 - the type is the point; the message is checked below
        gb.Grid("local", bogus=1)

    assert isinstance(excinfo.value, gb.InvalidRequest)
    message = str(excinfo.value)
    assert "bogus" in message
    for option in ("executor", "capacity", "max_workers", "grace", "close_timeout"):
        assert option in message


# -- placement -------------------------------------------------------------------------


class DoubleRunsHere:
    """Places ``double`` locally with its own reason; leaves every other task to the next plugin."""

    REASON = "double always runs here, says the test plugin"

    def __init__(self) -> None:
        self.asked: list[str] = []

    @gb.hookimpl
    def gridboost_choose_placement(self, task: gb.TaskSpec) -> gb.Placement | None:
        self.asked.append(task.id)
        if task.target is double:
            return gb.Placement("local", reason=self.REASON)
        return None


async def test_choose_placement_plugin_decides_and_its_reason_is_kept() -> None:
    """A placement plugin decides for the tasks it cares about, and the handle's placement carries its reason."""
    plugin = DoubleRunsHere()
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[plugin], capacity=CAPACITY) as grid:
            mine = grid.submit(double, 5)
            other = grid.submit(triple, 5)
            explicit = grid.submit(double, 1, where="local")
            assert (await mine, await other, await explicit) == (10, 15, 2)

    assert mine.placement == gb.Placement("local", reason=DoubleRunsHere.REASON)
    assert other.placement is not None
    assert other.placement.reason != DoubleRunsHere.REASON
    assert explicit.placement is not None
    assert explicit.placement.reason != DoubleRunsHere.REASON
    assert plugin.asked == [mine.id, other.id]  # where="local" is not the policy's to decide


async def test_placement_plugin_registered_on_an_open_grid_takes_effect_until_unregistered() -> None:
    """``grid.plugins.register`` on an open grid changes the next decision, and ``unregister`` undoes it."""
    plugin = DoubleRunsHere()
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(capacity=CAPACITY) as grid:
            before = grid.submit(double, 1)
            grid.plugins.register(plugin)
            during = grid.submit(double, 2)
            grid.plugins.unregister(plugin)
            after = grid.submit(double, 3)
            assert [await h for h in (before, during, after)] == [2, 4, 6]

    reasons = [h.placement.reason if h.placement else None for h in (before, during, after)]
    assert reasons[1] == DoubleRunsHere.REASON
    assert DoubleRunsHere.REASON not in (reasons[0], reasons[2])
    assert plugin.asked == [during.id]


class BrokenPolicy:
    """Raises for ``double``; returns a string, not a Placement, for ``triple``; leaves the rest alone."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    @gb.hookimpl
    def gridboost_choose_placement(self, task: gb.TaskSpec) -> Any:
        if task.target is double:
            self.error = ZeroDivisionError("the policy divided by zero")
            raise self.error
        if task.target is triple:
            return "local"
        return None


async def test_placement_plugin_that_raises_fails_the_call_with_a_chained_policy_error() -> None:
    """A raising placement hook fails offload and submit with PolicyError chained to its error; the grid goes on."""
    plugin = BrokenPolicy()
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[plugin], capacity=CAPACITY) as grid:
            with pytest.raises(gb.PolicyError, match="the policy divided by zero") as excinfo:
                await grid.offload(double, 1)
            assert excinfo.value.__cause__ is plugin.error
            assert isinstance(plugin.error, ZeroDivisionError)
            with pytest.raises(gb.PolicyError) as again:
                grid.submit(double, 1)
            assert isinstance(again.value.__cause__, ZeroDivisionError)

            assert await grid.offload(abs, -7) == 7
            assert await grid.submit(abs, -8) == 8
            stats = grid.stats()

    assert stats["tasks.succeeded"] == 2
    assert "tasks.failed" not in stats


async def test_placement_plugin_returning_a_non_placement_raises_policy_error() -> None:
    """A placement hook that returns something other than a Placement fails the call with PolicyError naming it."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[BrokenPolicy()], capacity=CAPACITY) as grid:
            with pytest.raises(gb.PolicyError, match=r"'local'.*not a Placement"):
                await grid.offload(triple, 1)

            assert await grid.offload(abs, -3) == 3


# -- offload candidates ----------------------------------------------------------------


def _queued(name: str, priority: gb.Priority, at: float, *tags: str) -> gb.TaskSpec:
    return gb.TaskSpec(double, (name,), priority=priority, submitted_at=at, tags=frozenset(tags))


QUEUED = [
    _queued("a", gb.Priority.NORMAL, 1.0),
    _queued("b", gb.Priority.HIGH, 3.0, "movable"),
    _queued("c", gb.Priority.HIGH, 2.0),
    _queued("d", gb.Priority.LOW, 0.0, "movable"),
    _queued("e", gb.Priority.CRITICAL, 5.0),
    _queued("f", gb.Priority.NORMAL, 0.5, "movable"),
]


class MovableOnly:
    """Moves only tasks tagged ``movable``; defers to the next plugin when there are none."""

    def __init__(self) -> None:
        self.boosts: list[gb.Boost] = []

    @gb.hookimpl
    def gridboost_offload_candidates(
        self, boost: gb.Boost, queued: list[gb.TaskSpec], limit: int
    ) -> list[gb.TaskSpec] | None:
        self.boosts.append(boost)
        movable = [t for t in queued if "movable" in t.tags]
        return movable[:limit] if movable else None


def _names(tasks: Any) -> list[str]:
    return [t.args[0] for t in tasks]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(4, ["e", "c", "b", "f"]), (10, ["e", "c", "b", "f", "a", "d"]), (1, ["e"]), (0, [])],
    ids=["limit-4", "limit-above-queue", "limit-1", "limit-0"],
)
async def test_offload_candidates_default_takes_highest_priority_then_oldest(limit: int, expected: list[str]) -> None:
    """With no plugin of its own, the grid picks queued work by priority, then by age, at most ``limit`` items."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(capacity=CAPACITY) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60)
            chosen = grid.plugins.hook.gridboost_offload_candidates(grid=grid, boost=boost, queued=QUEUED, limit=limit)

    assert _names(chosen) == expected


async def test_offload_candidates_plugin_overrides_the_default_and_may_defer() -> None:
    """A plugin's choice of queued work wins over the default; when it returns None the default decides."""
    plugin = MovableOnly()
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[plugin], capacity=CAPACITY) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60)
            hook = grid.plugins.hook.gridboost_offload_candidates
            chosen = hook(grid=grid, boost=boost, queued=QUEUED, limit=2)
            unmovable = [t for t in QUEUED if "movable" not in t.tags]
            deferred = hook(grid=grid, boost=boost, queued=unmovable, limit=2)

    assert _names(chosen) == ["b", "d"]
    assert _names(deferred) == ["e", "c"]
    assert plugin.boosts == [boost, boost]


# -- observers ---------------------------------------------------------------------------


class SyncObserver:
    """Records every observer hook as it is called, with plain functions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def named(self, hook: str) -> list[dict[str, Any]]:
        return [details for name, details in self.events if name == hook]

    def _note(self, hook: str, **details: Any) -> Any:
        self.events.append((hook, details))

    @gb.hookimpl
    def gridboost_boost_activated(self, grid: gb.Grid, boost: gb.Boost) -> Any:
        return self._note("activated", grid=grid, boost=boost, state=boost.state)

    @gb.hookimpl
    def gridboost_boost_released(self, grid: gb.Grid, boost: gb.Boost) -> Any:
        return self._note("released", grid=grid, boost=boost, state=boost.state)

    @gb.hookimpl
    def gridboost_boost_expired(self, grid: gb.Grid, boost: gb.Boost) -> Any:
        return self._note("expired", grid=grid, boost=boost, state=boost.state)

    @gb.hookimpl
    def gridboost_boost_failed(self, grid: gb.Grid, boost: gb.Boost, error: BaseException) -> Any:
        return self._note("failed", grid=grid, boost=boost, state=boost.state, error=error)

    @gb.hookimpl
    def gridboost_task_placed(self, grid: gb.Grid, task: gb.TaskSpec, placement: gb.Placement) -> Any:
        return self._note("placed", grid=grid, task=task.id, placement=placement)

    @gb.hookimpl
    def gridboost_task_finished(
        self, grid: gb.Grid, task: gb.TaskSpec, placement: gb.Placement, outcome: gb.TaskOutcome
    ) -> Any:
        return self._note("finished", grid=grid, task=task.id, placement=placement, outcome=outcome)


class AsyncObserver(SyncObserver):
    """The same hooks as ``async def``: each sleeps a little, then records, so it is done only if it was awaited.

    The body of an ``async def`` hook runs after the call returns, so these do not record ``boost.state``:
    by then it may have moved on.
    """

    async def _later(self, hook: str, details: dict[str, Any]) -> None:
        await anyio.sleep(OBSERVER_DELAY)
        self.events.append((hook, details))

    def _note(self, hook: str, **details: Any) -> Any:
        return self._later(hook, details)

    # The hooks are redefined as coroutine functions, as a plugin author would write them.

    @gb.hookimpl
    async def gridboost_boost_activated(self, grid: gb.Grid, boost: gb.Boost) -> None:
        await self._note("activated", grid=grid, boost=boost)

    @gb.hookimpl
    async def gridboost_boost_released(self, grid: gb.Grid, boost: gb.Boost) -> None:
        await self._note("released", grid=grid, boost=boost)

    @gb.hookimpl
    async def gridboost_boost_expired(self, grid: gb.Grid, boost: gb.Boost) -> None:
        await self._note("expired", grid=grid, boost=boost)

    @gb.hookimpl
    async def gridboost_boost_failed(self, grid: gb.Grid, boost: gb.Boost, error: BaseException) -> None:
        await self._note("failed", grid=grid, boost=boost, error=error)

    @gb.hookimpl
    async def gridboost_task_placed(self, grid: gb.Grid, task: gb.TaskSpec, placement: gb.Placement) -> None:
        await self._note("placed", grid=grid, task=task.id, placement=placement)

    @gb.hookimpl
    async def gridboost_task_finished(
        self, grid: gb.Grid, task: gb.TaskSpec, placement: gb.Placement, outcome: gb.TaskOutcome
    ) -> None:
        await self._note("finished", grid=grid, task=task.id, placement=placement, outcome=outcome)


@pytest.fixture(params=["sync", "async"])
def observer(request: pytest.FixtureRequest) -> SyncObserver:
    return SyncObserver() if request.param == "sync" else AsyncObserver()


def _boost_events(observer: SyncObserver, hook: str, state: gb.BoostState) -> list[tuple[gb.Grid, gb.Boost]]:
    """The (grid, boost) of each ``hook`` event; a plain observer also saw the boost in ``state`` when called."""
    events = observer.named(hook)
    if not isinstance(observer, AsyncObserver):
        assert [e["state"] for e in events] == [state] * len(events)
    return [(e["grid"], e["boost"]) for e in events]


async def test_boost_activated_and_released(observer: SyncObserver) -> None:
    """Granting a boost calls ``gridboost_boost_activated`` and leaving its block ``gridboost_boost_released``."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[observer], capacity=CAPACITY) as grid:
            async with grid.boost("cpu=1", ttl=60) as boost:
                pass

    assert _boost_events(observer, "activated", gb.BoostState.ACTIVE) == [(grid, boost)]
    assert _boost_events(observer, "released", gb.BoostState.RELEASED) == [(grid, boost)]
    assert observer.named("expired") == observer.named("failed") == []
    assert grid.stats()["observer_errors"] == 0


async def test_boost_released_at_teardown_is_observed(observer: SyncObserver) -> None:
    """A boost still held when the grid closes is released by teardown, and its observers finish before exit returns."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(capacity=CAPACITY) as grid:
            grid.plugins.register(observer)
            boost = await grid.request_boost("cpu=1", ttl=60)

    assert _boost_events(observer, "activated", gb.BoostState.ACTIVE) == [(grid, boost)]
    assert _boost_events(observer, "released", gb.BoostState.RELEASED) == [(grid, boost)]


async def test_boost_expired(observer: SyncObserver) -> None:
    """A boost that reaches its TTL calls ``gridboost_boost_expired``, not ``gridboost_boost_released``."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[observer], capacity=CAPACITY) as grid:
            boost = await grid.request_boost("cpu=1", ttl=0.2)
            with anyio.fail_after(5):
                while boost.state is not gb.BoostState.EXPIRED:
                    await anyio.sleep(0.01)

    assert _boost_events(observer, "expired", gb.BoostState.EXPIRED) == [(grid, boost)]
    assert observer.named("released") == []
    assert grid.stats()["boosts.expired"] == 1


async def test_boost_failed(observer: SyncObserver) -> None:
    """A boost larger than the machine raises BoostUnavailable at once and calls ``gridboost_boost_failed`` with it."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[observer]) as grid:
            with anyio.fail_after(5), pytest.raises(gb.BoostUnavailable) as excinfo:
                await grid.request_boost(gb.Resources(cpu=10_000), ttl=60)
            assert grid.boosts == ()

    [failed] = observer.named("failed")
    assert failed["error"] is excinfo.value
    assert failed["grid"] is grid
    assert failed["boost"].resources == gb.Resources(cpu=10_000)
    assert failed["boost"].state is gb.BoostState.FAILED
    assert _boost_events(observer, "failed", gb.BoostState.FAILED) == [(grid, failed["boost"])]
    assert observer.named("activated") == []


async def test_task_placed(observer: SyncObserver) -> None:
    """Each task's placement is told to ``gridboost_task_placed``, inside a boost and out."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[observer], capacity=CAPACITY) as grid:
            outside = grid.submit(double, 1)
            await outside
            async with grid.boost("cpu=1", ttl=60) as boost:
                inside = grid.submit(double, 2)
                await inside

    assert len(observer.named("placed")) == 2
    placed = {p["task"]: p for p in observer.named("placed")}  # async observers may finish in any order
    assert placed == {
        outside.id: {"grid": grid, "task": outside.id, "placement": outside.placement},
        inside.id: {"grid": grid, "task": inside.id, "placement": inside.placement},
    }
    assert placed[outside.id]["placement"].kind == "local"
    assert placed[inside.id]["placement"].kind == "boost"
    assert placed[inside.id]["placement"].boost is boost


async def _finish_as(grid: gb.Grid, status: str) -> tuple[gb.TaskHandle[Any], type[BaseException] | None, int]:
    """Run one task to the given end; return its handle, the error it raised and the attempts it should take."""
    if status == "succeeded":
        handle = grid.submit(double, 4)
        assert await handle == 8
        return handle, None, 1
    if status == "failed":
        handle = grid.submit(fail_with_value_error, retries=2)
        with pytest.raises(ValueError, match="the user's function failed"):
            await handle
        return handle, ValueError, 3
    started, gate = threading.Event(), threading.Event()
    try:
        if status == "cancelled":
            handle = grid.submit(wait_for_gate, started, gate)
            while not started.is_set():
                await anyio.sleep(0.005)
            handle.cancel()
            with pytest.raises(gb.TaskCancelled):
                await handle
            return handle, gb.TaskCancelled, 1
        assert status == "timed_out"
        handle = grid.submit(wait_for_gate, started, gate, timeout=0.05)
        with pytest.raises(TimeoutError):
            await handle
        return handle, TimeoutError, 1
    finally:
        gate.set()


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled", "timed_out"])
async def test_task_finished(observer: SyncObserver, status: str) -> None:
    """``gridboost_task_finished`` gets each task's outcome: status, attempts, duration and error."""
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[observer], capacity=CAPACITY) as grid:
            handle, error_type, attempts = await _finish_as(grid, status)

    [finished] = observer.named("finished")
    outcome: gb.TaskOutcome = finished["outcome"]
    assert finished["task"] == handle.id
    assert finished["placement"] == handle.placement
    assert outcome.status == status
    assert outcome.attempts == attempts
    assert outcome.duration >= 0
    if error_type is None:
        assert outcome.error is None
    else:
        assert isinstance(outcome.error, error_type)
    assert grid.stats()[f"tasks.{status}"] == 1


async def test_async_observers_are_awaited_before_the_grid_closes() -> None:
    """Async observers that are still sleeping when the block ends have finished by the time ``async with`` exits."""
    observer = AsyncObserver()
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(plugins=[observer], capacity=CAPACITY) as grid:
            async with grid.boost("cpu=1", ttl=60):
                await grid.offload(double, 1)
            pending = list(observer.events)

    assert sorted(name for name, _ in observer.events) == ["activated", "finished", "placed", "released"]
    assert len(pending) < len(observer.events)  # some were still sleeping when the block ended
    assert grid.stats()["observer_errors"] == 0


class RaisingObserver:
    """Observers that fail: plain and async, on boosts and on tasks."""

    @gb.hookimpl
    def gridboost_boost_activated(self) -> None:
        raise KeyError("the activated observer broke")

    @gb.hookimpl
    def gridboost_task_placed(self, task: gb.TaskSpec) -> None:
        raise RuntimeError(f"the placed observer broke on {task.id}")

    @gb.hookimpl
    async def gridboost_task_finished(self) -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("the async finished observer broke")


async def test_observer_errors_are_logged_and_counted_and_break_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """An observer that raises is logged and counted; the operation succeeds and the other observers still run."""
    caplog.set_level(logging.ERROR, logger="gridboost")
    recorder = SyncObserver()
    with anyio.fail_after(TIMEOUT):
        # Registered last, the raising plugin is called first: the recorder must still be called after it.
        async with gb.Grid(plugins=[recorder, RaisingObserver()], capacity=CAPACITY) as grid:
            async with grid.boost("cpu=1", ttl=60) as boost:
                assert boost.is_active
                assert await grid.offload(double, 21) == 42

    assert grid.stats()["observer_errors"] == 3
    assert [name for name, _ in recorder.events] == ["activated", "placed", "finished", "released"]
    messages = [r.getMessage() for r in caplog.records if r.name == "gridboost" and r.levelno == logging.ERROR]
    for hook, text in [
        ("gridboost_boost_activated", "the activated observer broke"),
        ("gridboost_task_placed", "the placed observer broke"),
        ("gridboost_task_finished", "the async finished observer broke"),
    ]:
        assert any(hook in m and text in m for m in messages), (hook, messages)


# -- wrappers ----------------------------------------------------------------------------


class NewStyleWrapper:
    @gb.hookimpl(wrapper=True)
    def gridboost_task_finished(self) -> Iterator[None]:
        return (yield)


class OldStyleWrapper:
    @gb.hookimpl(hookwrapper=True)
    def gridboost_boost_activated(self) -> Iterator[None]:
        yield


class BackendsWrapper:
    @gb.hookimpl(wrapper=True)
    def gridboost_backends(self) -> Iterator[None]:
        return (yield)


@pytest.mark.parametrize("plugin", [NewStyleWrapper(), OldStyleWrapper(), BackendsWrapper()], ids=type)
async def test_a_wrapper_of_a_hook_called_one_by_one_is_refused(plugin: object) -> None:
    """Observers (and ``gridboost_backends``) are called one implementation at a time: a wrapper is a ``PluginError``."""
    with pytest.raises(gb.exceptions.PluginError, match="implement it as a plain hook"):
        gb.Grid(plugins=[plugin], capacity=CAPACITY)
    async with gb.Grid(capacity=CAPACITY) as grid:
        with pytest.raises(gb.exceptions.PluginError, match="calls one implementation at a time"):
            grid.plugins.register(plugin)
        assert not grid.plugins.is_registered(plugin)  # refused whole: the grid goes on as it was
        assert await grid.offload(double, 4) == 8


async def test_a_wrapper_of_a_decision_hook_runs_around_the_default_policy() -> None:
    """Decision hooks are called through pluggy: a wrapper sees the default's placement, and tracing sees the call."""
    seen: list[gb.Placement] = []
    traced: list[str] = []

    class Wrapper:
        @gb.hookimpl(wrapper=True)
        def gridboost_choose_placement(self) -> Any:
            placement = yield
            seen.append(placement)
            return placement

    async with gb.Grid(plugins=[Wrapper()], capacity=CAPACITY) as grid:
        grid.plugins.trace.root.setwriter(traced.append)
        grid.plugins.enable_tracing()
        assert await grid.offload(double, 4) == 8
    assert [p.reason for p in seen] == ["the backend is this machine"]
    assert any("gridboost_choose_placement" in line for line in traced)


# -- entry points ------------------------------------------------------------------------

GOOD = "gridboost_test_ep_good"
BROKEN = "gridboost_test_ep_broken"

GOOD_SOURCE = '''
"""A plugin installed through the ``gridboost`` entry-point group."""

import gridboost
from gridboost._local import LocalBackend


class EntryPointBackend(LocalBackend):
    name = "from-entry-point"


@gridboost.hookimpl
def gridboost_backends():
    yield gridboost.BackendSpec(name="from-entry-point", factory=EntryPointBackend, options={"capacity": "capacity"})
'''

BROKEN_SOURCE = 'raise ImportError("gridboost_test_ep_broken needs libfoo, which is not installed")\n'


@pytest.fixture
def installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution on ``sys.path`` that declares two ``gridboost`` entry points: one good, one that cannot import."""
    dist_info = tmp_path / "gridboost_test_plugins-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: gridboost-test-plugins\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[gridboost]\ngood = {GOOD}\nbroken = {BROKEN}\n")
    (tmp_path / f"{GOOD}.py").write_text(GOOD_SOURCE)
    (tmp_path / f"{BROKEN}.py").write_text(BROKEN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(_plugins.LOAD_ENV)
    _plugins.load_entry_point_plugins.cache_clear()
    yield tmp_path
    _plugins.load_entry_point_plugins.cache_clear()
    for name in (GOOD, BROKEN):
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("installed_plugins")
async def test_entry_point_plugins_load_and_a_broken_one_warns_without_breaking_the_grid() -> None:
    """Installed plugins load by default; one that fails to import gives a PluginLoadWarning naming it, and the grid works."""
    with pytest.warns(gb.PluginLoadWarning, match="'broken'") as warned:
        grid = gb.Grid("from-entry-point", capacity=CAPACITY)

    [warning] = warned.list
    assert "ImportError" in str(warning.message)
    assert "libfoo" in str(warning.message)
    assert [name for name, _ in grid.plugins.load_errors] == ["broken"]
    assert "entrypoint:good" in grid.plugins.plugin_names()
    with anyio.fail_after(TIMEOUT):
        async with grid:
            assert (await grid.snapshot()).backend == "from-entry-point"
            assert await grid.offload(double, 8) == 16


@pytest.mark.usefixtures("installed_plugins")
async def test_empty_load_plugins_variable_loads_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GRIDBOOST_LOAD_PLUGINS=""`` imports no entry-point plugin: no warning, and their backends are unknown."""
    monkeypatch.setenv(_plugins.LOAD_ENV, "")

    with pytest.raises(gb.UnknownBackend, match=r"available: local$"):
        gb.Grid("from-entry-point")
    assert GOOD not in sys.modules
    assert BROKEN not in sys.modules
    with anyio.fail_after(TIMEOUT):
        async with gb.Grid(capacity=CAPACITY) as grid:
            assert await grid.offload(double, 1) == 2


@pytest.mark.usefixtures("installed_plugins")
async def test_load_plugins_variable_selects_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GRIDBOOST_LOAD_PLUGINS="good"`` loads that plugin only: the broken one is never imported, so nothing warns."""
    monkeypatch.setenv(_plugins.LOAD_ENV, "good")

    grid = gb.Grid("from-entry-point", capacity=CAPACITY)

    assert BROKEN not in sys.modules
    assert grid.plugins.load_errors == ()
    with anyio.fail_after(TIMEOUT):
        async with grid:
            assert await grid.offload(double, 2) == 4


@pytest.mark.usefixtures("installed_plugins")
@pytest.mark.parametrize(
    ("selection", "loaded", "failed"),
    [
        (None, ["good"], ["broken"]),
        ("", [], []),
        ("good", ["good"], []),
        (" good , broken ,", ["good"], ["broken"]),
        ("broken", [], ["broken"]),
        ("nothing-by-that-name", [], []),
    ],
    ids=["unset", "empty", "one", "spaces-and-trailing-comma", "only-broken", "unknown-name"],
)
def test_load_entry_point_plugins_selection(selection: str | None, loaded: list[str], failed: list[str]) -> None:
    """``load_entry_point_plugins`` imports what the selection names (all for None) and reports import errors."""
    plugins, errors = _plugins.load_entry_point_plugins(selection)
    # Plugins installed for real (gridboost-ray, say) may load too when nothing is selected: look at ours only.
    ours = {"good", "broken"}
    plugins = tuple((name, plugin) for name, plugin in plugins if name in ours)
    errors = tuple((name, error) for name, error in errors if name in ours)

    assert [name for name, _ in plugins] == loaded
    assert [name for name, _ in errors] == failed
    assert all(plugin is sys.modules[GOOD] for _, plugin in plugins)
    assert all(error.startswith("ImportError: ") and "libfoo" in error for _, error in errors)
    assert _plugins.load_entry_point_plugins(selection) is _plugins.load_entry_point_plugins(selection)
