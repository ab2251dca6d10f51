"""joblib's own backend tests (``joblib/test/test_parallel.py``, shipped in joblib's wheel), run on ``"gridboost"``.

Every test of that module whose parametrisation takes a backend (``backend``, ``parent_backend``/``child_backend``,
``outer_backend``/``inner_backend``) is collected here once for each of its cases that runs on the gridboost backend:

* a list that already holds it (``BACKENDS``, ``ALL_VALID_BACKENDS``: ``gridboost.joblib`` is imported first, so
  joblib's module lists ``"gridboost"`` and an instance of its class among its own backends) keeps only those;
* a fixed list of joblib's own (``PARALLEL_BACKENDS``, ``PROCESS_BACKENDS``, ``["loky", "threading"]``) is replaced
  by ``"gridboost"``;
* of two backend arguments (a nested call), each is ``"gridboost"`` in turn, the other takes joblib's values.

The other arguments keep joblib's values, and the test's own ``skipif`` marks still apply. A test that does not
apply, or asserts what only another backend does, is in :data:`EXCLUDED` with its reason; a backend-parametrised
test that appears in a later joblib and is in neither list runs here by default, so it is seen.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("joblib")

# Imported first, it registers "gridboost", which joblib's test module then lists among its backends.
from gridboost.joblib import NAME, GridboostBackend

BACKEND_ARGUMENTS = ("backend", "parent_backend", "child_backend", "outer_backend", "inner_backend")

#: joblib's backend-parametrised tests that are not run on gridboost, each with why.
EXCLUDED: dict[str, str] = {
    "test_nested_parallel_warnings": "its cases pair joblib's process backends with the warnings they give when "
    "nested; the expected outcome is a parameter written for those pairs",
    "test_background_thread_parallelism": "the body never uses its backend parameter (it runs joblib's default)",
    "test_error_capture": "asserts that after an error a managed Parallel has new workers (loky and multiprocessing "
    "kill theirs), where gridboost cancels the batches not started and keeps its executor; and a task that raises "
    "KeyboardInterrupt ends the executor's grid today (reported to the core). Errors keeping their type are tested "
    "in test_joblib.py",
    "test_parallel_with_interactively_defined_functions": "runs a script in a fresh interpreter that never imports "
    "gridboost.joblib, so joblib does not know the name",
    "test_parallel_with_unpicklable_functions_in_args": "runs a script in a fresh interpreter that never imports "
    "gridboost.joblib, so joblib does not know the name",
    "test_auto_memmap_on_arrays_from_generator": "memory-maps big arrays (max_nbytes), a feature of joblib's "
    "process pools only",
    "test_memmapping_leaks": "memory-maps big arrays (max_nbytes), a feature of joblib's process pools only",
    "test_parallel_thread_limit": "loky's limit of its workers' BLAS/OpenMP threads (inner_max_num_threads), which "
    "this backend does not claim (and joblib's OpenMP helper is not built in its wheel)",
    "test_initializer_context": "initializer= is a keyword of loky and multiprocessing; the gridboost backend "
    "refuses it (InvalidRequest, tested in test_joblib.py)",
    "test_initializer_parallel": "initializer= is a keyword of loky and multiprocessing; the gridboost backend "
    "refuses it (InvalidRequest, tested in test_joblib.py)",
    "test_multiple_generator_call_separated_gc": "its cases pair each backend with whether a second call must fail "
    "(loky's shared executor); the expected outcome is a parameter written for those pairs",
    # Aborted while batches sleep 10 s (30 s): they pass once the sleep ends, past this suite's budget. The gridboost
    # backend ends an aborted call when the running batches are done: a thread cannot be interrupted, and the grid's
    # teardown waits for what runs. test_joblib.py checks abort, timeout and unordered results with short sleeps.
    **dict.fromkeys(
        [
            "test_parallel_timeout_fail",
            "test_parallel_timeout_fail_with_generator",
            "test_abort_backend",
            "test_multiple_generator_call_managed",
            "test_parallel_unordered_generator_returns_fastest_first",
        ],
        "aborted while its batches sleep 10 s or more, which the call waits for (see above): too slow here",
    ),
}

#: Single cases of joblib's tests that are not run on gridboost (by id, arguments in the test's order), with why.
_IN_LOKY = (
    "the inner Parallel names the backend in a loky worker, a fresh interpreter that never imported gridboost.joblib "
    "(multiprocessing's workers are forked, and know it)"
)
EXCLUDED_CASES: dict[str, str] = {
    "test_nested_loop[loky-gridboost]": _IN_LOKY,
    "test_nested_loop[back_compat_backend-gridboost]": _IN_LOKY,  # a subclass of loky's backend
    "test_backend_nesting_level[parallel_config-loky-gridboost]": _IN_LOKY,
    "test_backend_nesting_level[parallel_backend-loky-gridboost]": _IN_LOKY,
}

#: joblib's own warnings, which this suite (warnings are errors) lets pass in joblib's tests as joblib's suite does:
#: a process pool nested in a task (which runs in a thread on the local grid) falls back to one job, as under
#: joblib's threading backend; a generator dropped early says what it cancelled, on every backend.
JOBLIB_WARNINGS = (
    "ignore:.*-backed parallel loops cannot be nested below threads:UserWarning",
    "ignore:.*tasks which were still being processed by the workers have been cancelled:UserWarning",
    "ignore:.*tasks have been successfully executed  but not used:UserWarning",
)

#: joblib's tests it marks xfail for another backend's bug, which pass on gridboost: run without the mark.
XFAIL_NOT_OURS: dict[str, str] = {
    "test_nested_exception_dispatch": "joblib's xfail is loky's bug (joblib/loky#255)",
}


def _import_joblib_tests(config: pytest.Config) -> ModuleType:
    """joblib's test module, imported once its marks are known to this suite (it runs with --strict-markers)."""
    for line in (
        "thread_unsafe: joblib's test module marks itself with it",
        "no_cover: joblib's test module marks a test with it",
    ):
        if line not in config.getini("markers"):
            config.addinivalue_line("markers", line)
    return importlib.import_module("joblib.test.test_parallel")


@dataclass(frozen=True)
class Case:
    """One call of one of joblib's tests: its name, its arguments, and the skip marks of the original."""

    name: str
    arguments: dict[str, Any]
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.name}[{'-'.join(_shown(value) for value in self.arguments.values())}]"


def _shown(value: Any) -> str:
    if isinstance(value, GridboostBackend):
        return "GridboostBackend()"
    if inspect.isclass(value) or inspect.isfunction(value):
        return value.__name__
    text = str(value)
    return text if len(text) <= 20 and "\n" not in text else f"{type(value).__name__}@{abs(hash(text)) % 10_000}"


def _is_ours(value: Any) -> bool:
    return value == NAME or isinstance(value, GridboostBackend)


def _parametrisations(test: Any) -> list[tuple[list[str], list[Any]]]:
    """The test's ``parametrize`` marks as (argument names, value rows), outermost first."""
    found = []
    for mark in reversed(getattr(test, "pytestmark", [])):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], list(mark.args[1])
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [list(v) if len(names) > 1 else [v] for v in values]
        found.append((names, rows))
    return found


def _cases(module: ModuleType) -> Iterator[Case]:
    for name, test in vars(module).items():
        if not name.startswith("test_") or not inspect.isfunction(test) or name in EXCLUDED:
            continue
        grids = _parametrisations(test)
        backend_grids = [i for i, (names, _) in enumerate(grids) if set(names) & set(BACKEND_ARGUMENTS)]
        if not backend_grids:
            continue
        for i in backend_grids:
            names, rows = grids[i]
            assert len(names) == 1, f"{name}: a backend parametrised with other arguments needs a decision"
        skips = tuple(
            pytest.mark.skipif(*mark.args, **mark.kwargs)
            for mark in getattr(test, "pytestmark", [])
            if mark.name == "skipif"
        ) + tuple(pytest.mark.filterwarnings(spec) for spec in JOBLIB_WARNINGS)
        xfail = any(mark.name == "xfail" for mark in getattr(test, "pytestmark", []))
        assert not xfail or name in XFAIL_NOT_OURS, f"{name}: joblib expects it to fail; it needs a decision"
        seen: set[str] = set()
        for ours in backend_grids:  # each backend argument is gridboost in turn
            choices = []
            for i, (_, rows) in enumerate(grids):
                if i == ours:
                    mine = [row for row in rows if _is_ours(row[0])]
                    choices.append(mine or [[NAME]])
                else:
                    choices.append(rows)
            for picked in itertools.product(*choices):
                given = {
                    n: v for (names, _), row in zip(grids, picked, strict=True) for n, v in zip(names, row, strict=True)
                }
                arguments = {n: given[n] for n in inspect.signature(test).parameters if n in given}
                case = Case(name, arguments, skips)
                if case.id not in seen and case.id not in EXCLUDED_CASES:
                    seen.add(case.id)
                    yield case


@pytest.fixture(scope="module", autouse=True)
def _loky_workers_end_with_the_module() -> Iterator[None]:
    """joblib's cases nest Parallel calls in loky's reusable pool, whose worker processes outlive a call by design;
    they end with this module, so that no later test finds them among this process's children."""
    yield
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "joblib_case" in metafunc.fixturenames:
        cases = list(_cases(_import_joblib_tests(metafunc.config)))
        metafunc.parametrize(
            "joblib_case", [pytest.param(case, marks=case.marks, id=case.id) for case in cases], scope="function"
        )


def test_joblib_lists_the_gridboost_backend_among_its_own(request: pytest.FixtureRequest) -> None:
    """Imported after gridboost.joblib, joblib's test module lists ``"gridboost"`` and an instance among its backends."""
    module = _import_joblib_tests(request.config)
    assert NAME in module.BACKENDS and NAME in module.ALL_VALID_BACKENDS
    assert any(isinstance(backend, GridboostBackend) for backend in module.ALL_VALID_BACKENDS)


def test_every_exclusion_names_a_backend_test_of_joblib(request: pytest.FixtureRequest) -> None:
    """Each excluded name joblib's module has is one of its backend-parametrised tests (an older joblib lacks some)."""
    module = _import_joblib_tests(request.config)
    present = [name for name in EXCLUDED if hasattr(module, name)]
    assert len(present) >= len(EXCLUDED) // 2, "joblib's test module no longer has most of the excluded tests"
    for name in present:
        grids = _parametrisations(getattr(module, name))
        assert any(set(names) & set(BACKEND_ARGUMENTS) for names, _ in grids), name


def test_joblibs_own_test_on_gridboost(joblib_case: Case, request: pytest.FixtureRequest) -> None:
    """joblib's test passes with the gridboost backend in place of joblib's own."""
    test = getattr(_import_joblib_tests(request.config), joblib_case.name)
    fixtures = {
        name: request.getfixturevalue(name)
        for name in inspect.signature(test).parameters
        if name not in joblib_case.arguments
    }
    test(**joblib_case.arguments, **fixtures)
