"""The fault-injecting backend: each kind of fault, through a real grid over the local backend, fires as planned."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import pytest

import gridboost as gb
import test_conformance  # the local backend's suite fixtures (tests/ is on sys.path)
from gridboost import _plugins
from gridboost._local import LocalBackend
from gridboost.testing import Fault, FaultPlan, FaultyBackend, FaultyPlugin, InjectedFault, nap
from gridboost.testing._faulty import Operation

pytestmark = pytest.mark.anyio

CAPACITY = "cpu=2,memory=4GiB"
TIMEOUT = 20
DELAY = 0.2
# asyncio may wake a timer up to its clock resolution early; the bound stays "at least the delay".
AT_LEAST = DELAY * 0.99


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load no entry-point plugins, so what is installed in the venv cannot interfere."""
    monkeypatch.setenv(_plugins.LOAD_ENV, "")


def faulty_grid(plan: FaultPlan, **options: Any) -> gb.Grid:
    return gb.Grid("faulty", plugins=[FaultyPlugin(plan)], capacity=CAPACITY, **options)


def faulty(grid: gb.Grid) -> FaultyBackend:
    assert isinstance(grid.backend, FaultyBackend)
    return grid.backend


def engine(grid: gb.Grid) -> LocalBackend:
    inner = faulty(grid).inner
    assert isinstance(inner, LocalBackend)
    return inner


def fired(backend: FaultyBackend) -> list[tuple[str, str, int]]:
    return [(f.kind, f.operation, f.call) for f in backend.injected]


def double(x: int) -> int:
    return 2 * x


def mark(ran: threading.Event) -> str:
    ran.set()
    return "ran"


def count(runs: list[int]) -> int:
    runs.append(1)
    return len(runs)


def flaky() -> str:
    return "not flaky this time"


def work_until_cancelled(started: threading.Event, limit: float = 30.0) -> str:
    """A thread body that cooperates with cancellation, as the local backend documents."""
    started.set()
    nap(limit)
    return "ran to the end"


# -- latency ---------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["run", "reserve", "release", "snapshot"])
async def test_latency_delays_the_operation_it_is_put_on(operation: Operation) -> None:
    """A latency fault delays its operation by at least its seconds, and is recorded with the call's target."""
    plan = FaultPlan([Fault("latency", operation=operation, seconds=DELAY)])
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60) if operation == "release" else None
            started = anyio.current_time()
            if operation == "run":
                handle = grid.submit(double, 21, where="cluster")
                assert await handle == 42
                target: str | None = handle.id
            elif operation == "reserve":
                boost = await grid.request_boost("cpu=1", ttl=60)
                target = boost.id
            elif operation == "release":
                assert boost is not None
                await boost.release()
                target = boost.id
            else:
                assert (await grid.snapshot()).local is not None
                target = None
            elapsed = anyio.current_time() - started
    assert elapsed >= AT_LEAST
    assert faulty(grid).injected == [InjectedFault("latency", operation, 1, target)]


async def test_injected_latency_is_cancelled_with_the_task_and_with_the_grid() -> None:
    """A task waiting out a latency is cancelled at once by ``cancel()`` or by the grid closing, and never runs."""
    plan = FaultPlan([Fault("latency", seconds=60)])
    ran = threading.Event()
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            cancelled = grid.submit(mark, ran, where="cluster")
            left_running = grid.submit(mark, ran, where="cluster")
            while faulty(grid).calls["run"] < 2:
                await anyio.sleep(0.01)
            cancelled.cancel()
            with pytest.raises(gb.TaskCancelled):
                await cancelled
    assert left_running.cancelled()
    assert not ran.is_set()
    assert fired(faulty(grid)) == [("latency", "run", 1), ("latency", "run", 2)]


# -- run failures ------------------------------------------------------------------------


async def test_submit_failure_raises_backend_error_and_the_work_never_runs() -> None:
    """A submit failure raises BackendError on its call only; the engine never sees that task."""
    plan = FaultPlan([Fault("submit_failure", on_calls={1})])
    ran = threading.Event()
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            refused = grid.submit(mark, ran, where="cluster")
            with pytest.raises(gb.BackendError, match=rf"task {refused.id} \(mark\) could not be submitted"):
                await refused
            assert not ran.is_set()
            assert await grid.offload(mark, ran, where="cluster") == "ran"
            assert ran.is_set()
    assert faulty(grid).injected == [InjectedFault("submit_failure", "run", 1, refused.id)]


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (None, RuntimeError, "injected task failure"),
        (ValueError, ValueError, "^$"),
        (lambda: KeyError("made fresh"), KeyError, "made fresh"),
        (LookupError("one instance"), LookupError, "one instance"),
    ],
    ids=["default", "class", "factory", "instance"],
)
async def test_task_failure_reaches_the_caller_with_its_own_type(
    error: Exception | Callable[[], Exception] | None, expected: type[Exception], message: str
) -> None:
    """A task failure raises the injected exception, unwrapped, instead of running the work."""
    plan = FaultPlan([Fault("task_failure", error=error)])
    ran = threading.Event()
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            for _ in range(2):  # raised twice: an instance must not carry the first traceback along
                with pytest.raises(expected, match=message) as info:
                    await grid.offload(mark, ran, where="cluster")
                assert not isinstance(info.value, gb.GridboostError)
    assert not ran.is_set()
    assert fired(faulty(grid)) == [("task_failure", "run", 1), ("task_failure", "run", 2)]


async def test_task_failure_on_the_first_call_is_retried_and_the_second_attempt_succeeds() -> None:
    """With ``retries=1`` and a failure scheduled on call 1 only, the grid's second attempt runs the work."""
    plan = FaultPlan([Fault("task_failure", on_calls={1})])
    runs: list[int] = []
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            handle = grid.submit(count, runs, where="cluster", retries=1)
            assert await handle == 1
    assert runs == [1]
    assert handle.attempts == 2
    assert faulty(grid).calls["run"] == 2
    assert faulty(grid).injected == [InjectedFault("task_failure", "run", 1, handle.id)]


async def test_node_lost_cancels_the_engine_work_and_names_the_node() -> None:
    """A node lost mid-task raises BackendError naming the node, and the engine no longer runs the work."""
    plan = FaultPlan([Fault("node_lost", on_calls={1}, seconds=DELAY)])
    started = threading.Event()
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            local = engine(grid)
            async with grid.boost("cpu=1", ttl=60) as boost:
                pattern = rf"node {re.escape(local.node_id)} running task \S+ \(work_until_cancelled\) was lost"
                with pytest.raises(gb.BackendError, match=pattern):
                    await grid.offload(work_until_cancelled, started)
                assert started.is_set()
                while local.running_tasks():
                    await anyio.sleep(0.01)
                assert boost.is_active
    assert fired(faulty(grid)) == [("node_lost", "run", 1)]
    assert local.running_tasks() == {}


async def test_node_lost_after_the_work_ended_still_loses_its_outcome() -> None:
    """Work that ends before its node dies is lost with the node all the same, so a planned loss always shows."""
    plan = FaultPlan([Fault("node_lost", seconds=TIMEOUT)])
    ran = threading.Event()
    with anyio.fail_after(TIMEOUT / 2):
        async with faulty_grid(plan) as grid:
            with pytest.raises(gb.BackendError, match=r"the node running task \S+ \(mark\) was lost"):
                await grid.offload(mark, ran, where="cluster")
    assert ran.is_set()


# -- release --------------------------------------------------------------------------


async def test_slow_release_takes_at_least_its_delay_and_releases() -> None:
    """A slow release delays ``boost.release()`` by at least its seconds, then the engine gives the capacity back."""
    plan = FaultPlan([Fault("slow_release", seconds=DELAY)])
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60)
            started = anyio.current_time()
            await boost.release()
            elapsed = anyio.current_time() - started
            assert boost.state is gb.BoostState.RELEASED
            assert await engine(grid).reservations() == []
    assert elapsed >= AT_LEAST
    assert faulty(grid).injected == [InjectedFault("slow_release", "release", 1, boost.id)]


async def test_release_failure_at_teardown_is_named_and_the_engine_still_holds_it() -> None:
    """A release that fails at teardown leaves the reservation on the engine, and TeardownError names it."""
    plan = FaultPlan([Fault("release_failure", on_calls={1})])
    with anyio.fail_after(TIMEOUT), pytest.raises(gb.TeardownError) as info:
        async with faulty_grid(plan) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60)
    leftovers = info.value.leftovers
    assert any(
        f"boost {boost.id} was not released" in item and "injected release_failure" in item for item in leftovers
    )
    assert any(f"reservation {boost.id} is still held" in item for item in leftovers)
    assert boost.state is gb.BoostState.FAILED
    assert {r.id for r in await engine(grid).reservations()} == {boost.id}


async def test_release_failure_seen_by_the_app_is_still_named_at_teardown() -> None:
    """An explicit release that fails raises BackendError to the app, and teardown still names what the engine holds."""
    plan = FaultPlan([Fault("release_failure", on_calls={1})])
    with anyio.fail_after(TIMEOUT), pytest.raises(gb.TeardownError, match=r"reservation boost-\S+ is still held"):
        async with faulty_grid(plan) as grid:
            boost = await grid.request_boost("cpu=1", ttl=60)
            with pytest.raises(gb.BackendError, match=f"reservation {boost.id} could not be released"):
                await boost.release()
            assert grid.boosts == ()
    assert {r.id for r in await engine(grid).reservations()} == {boost.id}


# -- when faults fire -------------------------------------------------------------------


async def _random_faults(seed: int, *, snapshots: bool) -> list[tuple[str, str, int]]:
    plan = FaultPlan(
        [
            Fault("submit_failure", probability=0.3),
            Fault("latency", operation="snapshot", seconds=0.001, probability=0.5),
            Fault("latency", seconds=0.001, probability=0.5),
        ],
        seed=seed,
    )
    async with faulty_grid(plan) as grid:
        for i in range(24):
            if snapshots:
                await grid.snapshot()
            with contextlib.suppress(gb.BackendError):
                assert await grid.offload(double, i, where="cluster") == 2 * i
    return [f for f in fired(faulty(grid)) if f[1] == "run"]


async def test_a_random_plan_is_reproducible_from_its_seed() -> None:
    """The same seed injects the same faults on two fresh backends, whatever calls interleave; another seed differs."""
    with anyio.fail_after(TIMEOUT):
        first = await _random_faults(7, snapshots=False)
        again = await _random_faults(7, snapshots=True)
        other = await _random_faults(8, snapshots=False)
    assert first == again
    assert first != other
    failures = [f for f in first if f[0] == "submit_failure"]
    assert 0 < len(failures) < 24


async def test_function_filter_picks_the_tasks_a_fault_fires_on() -> None:
    """A fault filtered by function name fails only calls of that function."""
    plan = FaultPlan([Fault("task_failure", functions={"flaky"})])
    with anyio.fail_after(TIMEOUT):
        async with faulty_grid(plan) as grid:
            assert await grid.offload(double, 2, where="cluster") == 4
            with pytest.raises(RuntimeError, match="injected task failure"):
                await grid.offload(flaky, where="cluster")
            assert await grid.offload(double, 3, where="cluster") == 6
    assert fired(faulty(grid)) == [("task_failure", "run", 2)]


async def test_tag_filter_counts_only_the_tasks_it_picks() -> None:
    """``on_calls`` of a tag-filtered fault counts the tagged calls; the record keeps the operation's call number."""
    backend = FaultyBackend(
        LocalBackend(capacity=CAPACITY), plan=FaultPlan([Fault("submit_failure", tags={"fragile"}, on_calls={2})])
    )
    tagged = [gb.TaskSpec(double, (i,), tags={"fragile", "other"}) for i in range(3)]
    with anyio.fail_after(TIMEOUT):
        await backend.start()
        try:
            assert await backend.run(tagged[0], None) == 0
            assert await backend.run(gb.TaskSpec(double, (10,)), None) == 20
            with pytest.raises(gb.BackendError, match="could not be submitted"):
                await backend.run(tagged[1], None)
            assert await backend.run(tagged[2], None) == 4
        finally:
            await backend.aclose()
    assert backend.injected == [InjectedFault("submit_failure", "run", 3, tagged[1].id)]


# -- the plugin, and bad input ------------------------------------------------------------


async def test_plugin_passes_the_inner_backends_options_and_delegates() -> None:
    """The faulty spec accepts and passes on exactly the inner backend's options; the rest is delegated."""
    with pytest.raises(gb.InvalidRequest, match=r"no option flavour; it accepts: executor, capacity"):
        faulty_grid(FaultPlan(), flavour="spicy")
    async with gb.Grid("faulty", plugins=[FaultyPlugin(FaultPlan())], capacity="cpu=3", executor="process") as grid:
        backend = faulty(grid)
        assert backend.name == "faulty-local"
        assert backend.capabilities == engine(grid).capabilities
        assert engine(grid).available == gb.Resources(cpu=3)
        with pytest.raises(gb.NotSerializable):
            grid.submit(lambda: None, where="cluster")
        assert await grid.offload(double, 4, where="cluster") == 8
    assert backend.injected == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Fault("meltdown"), "unknown fault kind 'meltdown'; kinds are latency, "),
        (lambda: Fault("submit_failure", probability=1.5), "probability must be a number from 0 to 1, got 1.5"),
        (lambda: Fault("submit_failure", probability=-0.1), "probability must be a number from 0 to 1"),
        (lambda: Fault("node_lost", seconds=-1), "seconds must be a finite number >= 0, got -1"),
        (lambda: Fault("latency"), "a latency fault needs seconds > 0"),
        (lambda: Fault("task_failure", on_calls={0}), "on_calls must be call numbers"),
        (lambda: Fault("task_failure", on_calls={1}, probability=0.5), "on_calls or probability, not both"),
        (lambda: Fault("latency", seconds=1, operation="start"), "unknown operation 'start'"),  # type: ignore[arg-type]
        (lambda: Fault("submit_failure", operation="reserve"), "acts on run, not reserve"),
        (lambda: Fault("release_failure", tags={"x"}), "a release_failure fault on release has none"),
        (lambda: Fault("task_failure", functions="flaky"), "functions must be a collection of strings"),
        (lambda: Fault("node_lost", error=ValueError), "a node_lost fault takes none"),
        (lambda: Fault("task_failure", error=KeyboardInterrupt), "error must be an Exception class"),  # type: ignore[arg-type]
        (lambda: FaultPlan(Fault("node_lost")), "a FaultPlan takes a list of Fault"),  # type: ignore[arg-type]
        (lambda: FaultPlan([], seed=1.5), "seed must be a whole number"),  # type: ignore[arg-type]
        (lambda: FaultyPlugin(FaultPlan(), name="local"), "needs a name of its own"),
        (lambda: FaultyBackend(LocalBackend(), plan=[]), "plan must be a FaultPlan"),  # type: ignore[arg-type]
    ],
)
def test_bad_plans_are_refused_with_invalid_request(make: Callable[[], object], message: str) -> None:
    """A plan that cannot mean anything is refused when it is made, with a message naming the problem."""
    with pytest.raises(gb.InvalidRequest, match=re.escape(message)):
        make()


def test_an_unknown_inner_backend_is_refused() -> None:
    """Wrapping a backend no plugin provides raises UnknownBackend listing those that exist."""
    with pytest.raises(gb.UnknownBackend, match="unknown backend 'nope'; available: local"):
        FaultyPlugin(FaultPlan(), inner="nope")


# -- a merely slow engine still conforms ---------------------------------------------------


SLOW_EVERYWHERE = FaultPlan(
    [Fault("latency", operation=op, seconds=0.01) for op in ("run", "reserve", "release", "snapshot")]
)


class TestSlowLocalBackendPassesTheSuite(test_conformance.TestLocalBackend):
    """Latency on every operation changes nothing the conformance suite checks: the wrapper is transparent."""

    @pytest.fixture
    def backend_name(self) -> str:
        return "faulty"

    @pytest.fixture
    def grid_options(self) -> dict[str, Any]:
        return {"plugins": [FaultyPlugin(SLOW_EVERYWHERE)], "capacity": CAPACITY, "grace": 0.5}
