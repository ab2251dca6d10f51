"""gridboost's pytest plugin: ``grid`` and ``grid_factory`` fixtures, and a leak check.

Registered through the ``pytest11`` entry point, so installing gridboost is enough. With plugin autoloading off
(``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), load it with ``-p anyio -p gridboost``.

* ``grid``: an open local-backend :class:`~gridboost.Grid`, torn down (awaited) after the test;
* ``grid_factory``: ``await grid_factory(backend="local", **options)`` opens more grids, all closed in reverse
  order after the test;
* ``no_leaks``: fail the test if anything it started is still alive after it (see :mod:`gridboost.testing._leaks`).
  It is on, with no configuration, for every test that uses this plugin's ``grid`` or ``grid_factory``. For other
  tests: request the fixture, mark the test ``@pytest.mark.no_leaks``, or set ``gridboost_leak_check = true`` in the
  pytest configuration for every test; ``@pytest.mark.no_leaks(False)`` exempts one test from both.

The grid fixtures are async: use them from tests marked ``@pytest.mark.anyio``. They always check that what they
made closed and left nothing in its engine, whether or not the leak check is on.

Loading it costs what importing gridboost costs, and imports no backend engine (Ray, Dask); in a test that uses none
of it, nothing of it runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any, Protocol

import pytest

from .._grid import Grid
from . import _leaks

__all__ = ["GridFactory", "grid", "grid_factory", "no_leaks"]

INI_OPTION = "gridboost_leak_check"
MARKER = "no_leaks"
FIXTURE = "no_leaks"


class GridFactory(Protocol):
    """The type of the ``grid_factory`` fixture."""

    async def __call__(self, backend: str = "local", /, **options: Any) -> Grid: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI_OPTION,
        type="bool",
        default=False,
        help="gridboost: fail every test that leaves a grid, reservation, task, thread, child process or un-awaited "
        "coroutine alive (opt a test out with @pytest.mark.no_leaks(False))",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(enabled=True): gridboost: fail the test if it leaves a grid, reservation, task, thread, child "
        "process or un-awaited coroutine alive; no_leaks(False) exempts it from the gridboost_leak_check ini option",
    )


@pytest.hookimpl(trylast=True)  # after other plugins and conftests have added their markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    everywhere = bool(config.getini(INI_OPTION))
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        requested = FIXTURE in item.fixturenames
        marker = item.get_closest_marker(MARKER)
        by_default = everywhere or _uses_our_grids(item)
        wanted = requested or (marker is not None and _enabled(marker)) or (by_default and marker is None)
        if wanted:
            _check_first(item)


def _uses_our_grids(item: pytest.Function) -> bool:
    """Whether the test's ``grid`` or ``grid_factory`` is this plugin's, not a project's own fixture of that name."""
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in ("grid", "grid_factory"):
        if name in item.fixturenames and name in definitions:
            function = getattr(definitions[name][-1], "func", None)
            if getattr(function, "__module__", None) == __name__:
                return True
    return False


def _enabled(marker: pytest.Mark) -> bool:
    return bool(marker.kwargs.get("enabled", marker.args[0] if marker.args else True))


def _check_first(item: pytest.Function) -> None:
    """Put the check before every other function-scoped fixture, so that it sees them all set up and torn down.

    Fixtures of wider scope stay before it: they outlive the test, and what they hold is in the baseline.
    """
    # A new list: parametrized siblings share the old one, and the marker may differ between them.
    names = [name for name in item.fixturenames if name != FIXTURE]
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    at = 0
    while at < len(names) and names[at] in definitions and definitions[names[at]][-1].scope != "function":
        at += 1
    names.insert(at, FIXTURE)
    item.fixturenames = names


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if a grid, a reservation or task of a local engine, a thread, a child process or a coroutine
    that was never awaited, started during the test, is still alive after it."""
    leaked: _leaks.LeakError | None = None
    try:
        with _leaks.no_leaks():
            yield
    except _leaks.LeakError as exc:
        leaked = exc
    if leaked is not None:  # failed out here, so the report is the list alone and no chained traceback
        pytest.fail(f"gridboost leak check: {leaked}", pytrace=False)


@pytest.fixture
async def grid(anyio_backend: object) -> AsyncIterator[Grid]:
    """An open local-backend grid; teardown is awaited, and what it cannot release fails the test."""
    async with Grid() as opened:
        yield opened
    _fail_on_leaks([opened])


@pytest.fixture
async def grid_factory(anyio_backend: object) -> AsyncIterator[GridFactory]:
    """``await grid_factory(backend="local", **options)`` opens a grid; all are closed, awaited, in reverse order."""
    made: list[Grid] = []
    async with AsyncExitStack() as stack:

        async def make(backend: str = "local", /, **options: Any) -> Grid:
            opened = await stack.enter_async_context(Grid(backend, **options))
            made.append(opened)
            return opened

        yield make
    _fail_on_leaks(made)


def _fail_on_leaks(grids: list[Grid]) -> None:
    leaks = _leaks.grid_leaks(grids)
    if leaks:
        pytest.fail(f"gridboost leak check: {_leaks.describe(leaks)}", pytrace=False)
