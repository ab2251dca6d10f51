"""Fuzzing every public entry point: only the documented typed errors, never a hang, and the grid works after.

One grid stays open across all examples of a test (through a blocking portal), so each
example also proves that whatever the previous one sent left it usable.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gridboost as gb
from gridboost.testing import hostile_values

CAPACITY = "cpu=2,memory=4GiB"
# What a caller may see for bad input or for a request that can never fit; anything else is a defect.
TYPED = (gb.InvalidRequest, gb.InvalidTask, gb.UnknownBackend, gb.CapacityUnavailable, gb.PluginError)
LONGEST = 200  # characters: one short line, whatever the value
EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def anything() -> st.SearchStrategy[Any]:
    """Values of every kind a caller could pass by mistake, extremes included, and look-alikes of what the grid parses.

    (A value whose repr raises, and 10**5000, which has none, are in test_faults.py: hypothesis
    itself cannot print them.)
    """
    return hostile_values(["cpu=1e10000000", "cpu=-1", "auto", "local", "cluster"])


def resources_like() -> st.SearchStrategy[Any]:
    amounts = st.one_of(st.floats(min_value=0, max_value=4), anything())
    keys = st.sampled_from(["cpu", "gpu", "memory", "gpu_memory", "accel", "custom", "cpus", "x y", ""])
    return st.one_of(
        anything(),
        st.dictionaries(keys, amounts, max_size=3),
        st.from_regex(r"(cpu|memory|gpu|accel)=[0-9.eE+-]{1,12}(GiB|MB|x)?", fullmatch=True),
    )


def _short(error: BaseException) -> BaseException:
    assert len(str(error)) < LONGEST, str(error)
    return error


def _check(call: Callable[[], object]) -> object:
    try:
        return call()
    except TYPED as exc:
        return _short(exc)


def take(value: object) -> object:
    return value


def ignore(*args: object, **kwargs: object) -> int:
    return len(args) + len(kwargs)


@pytest.fixture(scope="module")
def portal_grid() -> Iterator[tuple[anyio.from_thread.BlockingPortal, gb.Grid]]:
    """A grid open for the whole module, reached from the test thread through a portal."""
    with anyio.from_thread.start_blocking_portal() as portal:
        cm = gb.Grid(capacity=CAPACITY, teardown_timeout=10)
        with portal.wrap_async_context_manager(cm) as grid:
            yield portal, grid


def _on(portal: anyio.from_thread.BlockingPortal, work: Callable[[], Coroutine[Any, Any, object]]) -> object:
    async def bounded() -> object:
        with anyio.fail_after(20):  # never a hang
            return await work()

    return portal.call(bounded)


def _still_works(portal: anyio.from_thread.BlockingPortal, grid: gb.Grid) -> None:
    async def probe() -> object:
        return await grid.offload(take, 7, where="local")

    assert _on(portal, probe) == 7
    assert not grid.boosts
    assert grid.local_available == gb.Resources.parse(CAPACITY)


# -- records -----------------------------------------------------------------------------------


@EXAMPLES
@given(cpu=anything(), gpu=anything(), memory=anything(), gpu_memory=anything(), custom=anything())
def test_resources_take_any_value(cpu: Any, gpu: Any, memory: Any, gpu_memory: Any, custom: Any) -> None:
    """``Resources(...)`` builds or raises ``InvalidResources`` in one short line."""
    made = _check(lambda: gb.Resources(cpu=cpu, gpu=gpu, memory=memory, gpu_memory=gpu_memory, custom=custom))
    assert isinstance(made, gb.Resources | gb.InvalidResources)


@EXAMPLES
@given(text=st.one_of(st.text(max_size=80), st.from_regex(r"[a-z_]{1,6}=[0-9.eE+-]{0,40}[A-Za-z]{0,4}")))
def test_parse_takes_any_text(text: str) -> None:
    """``Resources.parse`` reads any text at once, or raises ``InvalidResources``."""
    made = _check(lambda: gb.Resources.parse(text))
    assert isinstance(made, gb.Resources | gb.InvalidResources)


@EXAMPLES
@given(value=resources_like())
def test_coerce_takes_anything(value: Any) -> None:
    """``Resources.coerce`` accepts what the API accepts and refuses the rest with ``InvalidResources``."""
    made = _check(lambda: gb.Resources.coerce(value))
    assert isinstance(made, gb.Resources | gb.InvalidResources)


@EXAMPLES
@given(argv=anything(), env=anything(), cwd=anything())
def test_command_takes_anything(argv: Any, env: Any, cwd: Any) -> None:
    """``Command(...)`` builds or raises ``InvalidTask`` in one short line."""
    made = _check(lambda: gb.Command(argv, env=env, cwd=cwd))
    assert isinstance(made, gb.Command | gb.InvalidTask)


# -- the grid ----------------------------------------------------------------------------------

GRID_OPTIONS = {
    "teardown_timeout": anything(),
    "auto_offload": anything(),
    "auto_offload_limit": anything(),
    "auto_offload_backoff": anything(),
    "local_capacity": resources_like(),
    "cluster_queue": anything(),
    "probe": anything(),
    "pressure_interval": anything(),
    "pressure_thresholds": anything(),
    "plugins": anything(),
    # The local backend's own options, and names no backend has.
    "executor": anything(),
    "capacity": resources_like(),
    "max_workers": anything(),
    "grace": anything(),
    "close_timeout": anything(),
    "flavour": anything(),
}


@EXAMPLES
@given(backend=st.one_of(st.just("local"), anything()), options=st.fixed_dictionaries({}, optional=GRID_OPTIONS))
def test_grid_options_take_anything(backend: Any, options: dict[str, Any]) -> None:
    """``Grid(backend, **options)`` builds or raises a typed error; a built one opens, works and closes."""
    made = _check(lambda: gb.Grid(backend, **options))
    if not isinstance(made, gb.Grid):
        return

    async def use() -> None:
        with anyio.fail_after(30):
            async with made as grid:
                assert await grid.offload(take, 1, where="local") == 1

    anyio.run(use)


@EXAMPLES
@given(
    resources=resources_like(),
    ttl=st.one_of(st.floats(min_value=0.01, max_value=5), anything()),
    priority=anything(),
    wait=st.one_of(st.floats(min_value=0, max_value=0.2), anything()),
    strategy=st.one_of(st.sampled_from(["pack", "spread"]), anything()),
    nodes=anything(),
    labels=anything(),
)
def test_boost_takes_anything(
    portal_grid: tuple[anyio.from_thread.BlockingPortal, gb.Grid],
    resources: Any,
    ttl: Any,
    priority: Any,
    wait: Any,
    strategy: Any,
    nodes: Any,
    labels: Any,
) -> None:
    """A boost request is granted, refused with a typed error, or runs out of ``wait``; the grid stays usable."""
    portal, grid = portal_grid

    async def request() -> object:
        try:
            async with grid.boost(
                resources, ttl=ttl, priority=priority, wait=wait, strategy=strategy, nodes=nodes, labels=labels
            ) as boost:
                return boost
        except TYPED as exc:
            return _short(exc)

    assert isinstance(_on(portal, request), gb.Boost | gb.GridboostError)
    _still_works(portal, grid)


RUN_OPTIONS = {
    "resources": resources_like(),
    "where": st.one_of(st.sampled_from(["auto", "local", "cluster"]), anything()),
    "retries": anything(),
    "timeout": st.one_of(st.floats(min_value=0.01, max_value=2), anything()),
}


@EXAMPLES
@given(
    how=st.sampled_from(["offload", "submit", "map"]),
    target=st.one_of(st.just(ignore), anything()),
    args=st.lists(anything(), max_size=2),
    options=st.fixed_dictionaries({}, optional=RUN_OPTIONS),
    max_in_flight=st.one_of(st.just(4), anything()),
)
def test_running_takes_anything(
    portal_grid: tuple[anyio.from_thread.BlockingPortal, gb.Grid],
    how: str,
    target: Any,
    args: list[Any],
    options: dict[str, Any],
    max_in_flight: Any,
) -> None:
    """offload, submit and map run, or refuse bad input with a typed error at the call; the grid stays usable."""
    portal, grid = portal_grid

    async def run() -> object:
        try:
            if how == "offload":
                return await grid.offload(target, *args, **options)
            if how == "submit":
                return await grid.submit(target, *args, **options)
            return [y async for y in grid.map(target, args, max_in_flight=max_in_flight, **options)]
        except TYPED as exc:
            return _short(exc)
        except TimeoutError:  # a timeout drawn shorter than the run
            assert options.get("timeout") is not None
            return None

    _on(portal, run)
    _still_works(portal, grid)


@EXAMPLES
@given(value=anything(), boost=anything())
def test_put_takes_anything(
    portal_grid: tuple[anyio.from_thread.BlockingPortal, gb.Grid], value: Any, boost: Any
) -> None:
    """``put`` parks any value, or refuses a bad ``boost`` with a typed error; a handle released leaves nothing."""
    portal, grid = portal_grid

    async def put() -> object:
        try:
            handle = await grid.put(value, boost=boost)
        except TYPED as exc:
            return _short(exc)
        assert boost is None and await grid.offload(take, handle, where="local") is value
        await handle.release()
        return handle

    _on(portal, put)
    assert grid.backend.parked() == []  # type: ignore[attr-defined]
    _still_works(portal, grid)


@EXAMPLES
@given(
    # Only `true` and `echo` may ever run: any other program is drawn as a value of another type.
    program=st.one_of(st.sampled_from(["true", "echo"]), anything().filter(lambda v: not isinstance(v, str))),
    args=st.one_of(st.lists(st.text(max_size=10), max_size=3), anything()),
    env=st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2), anything()),
    cwd=st.one_of(st.none(), st.just("/"), st.text(max_size=10), anything()),
    timeout=st.one_of(st.none(), st.floats(min_value=0.5, max_value=5), anything()),
    check=anything(),
)
def test_run_command_takes_anything(
    portal_grid: tuple[anyio.from_thread.BlockingPortal, gb.Grid],
    program: Any,
    args: Any,
    env: Any,
    cwd: Any,
    timeout: Any,
    check: Any,
) -> None:
    """``run_command`` runs a harmless program, or refuses bad input with a typed error; the grid stays usable."""
    portal, grid = portal_grid
    argv = [program, *args] if isinstance(args, list) else args

    async def run() -> object:
        try:
            return await grid.run_command(argv, env=env, cwd=cwd, timeout=timeout, check=check)
        except (*TYPED, gb.CommandNotFound, gb.CommandFailed) as exc:
            return _short(exc)
        except (PermissionError, NotADirectoryError):  # a cwd drawn that is a file or not ours: the OS's verdict
            return None

    _on(portal, run)
    _still_works(portal, grid)


@pytest.mark.anyio
async def test_a_value_whose_eq_raises_is_refused_with_invalid_request_where_a_word_is_expected() -> None:
    """``where``, ``strategy`` and the local ``executor`` compare words only with strings (hypothesis found one)."""
    from gridboost.testing import Hostile

    with pytest.raises(gb.InvalidRequest, match="executor must be"):
        gb.Grid(executor=Hostile())
    async with gb.Grid(capacity="cpu=2") as grid:
        with pytest.raises(gb.InvalidRequest, match="where must be"):
            await grid.offload(sum, [1], where=Hostile())  # type: ignore[arg-type]
        with pytest.raises(gb.InvalidRequest, match="strategy must be one of"):
            await grid.request_boost("cpu=1", ttl=5, strategy=Hostile())  # type: ignore[typeddict-item]
        assert await grid.offload(sum, [1, 2]) == 3
