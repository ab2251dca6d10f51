"""Tests of the public surface: what ``__all__`` exports, the exception tree, and what importing pulls in."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import types

import pytest

import gridboost
import gridboost.abc
import gridboost.exceptions
import gridboost.hookspecs
from gridboost.exceptions import GridboostError


def _defined_in_gridboost(obj: object) -> bool:
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return False
    package = (getattr(obj, "__module__", None) or "").partition(".")[0]
    return package == "gridboost"


def _public_definitions(module: types.ModuleType) -> set[str]:
    """Public names of ``module`` bound to classes or functions defined somewhere in gridboost."""
    return {name for name, obj in vars(module).items() if not name.startswith("_") and _defined_in_gridboost(obj)}


MODULES = [gridboost, gridboost.exceptions, gridboost.abc, gridboost.hookspecs]
MODULE_IDS = [m.__name__ for m in MODULES]


@pytest.mark.parametrize("module", MODULES, ids=MODULE_IDS)
def test_all_names_exist_once(module: types.ModuleType) -> None:
    """Every name in ``__all__`` is an attribute of the module, and none is listed twice."""
    missing = [name for name in module.__all__ if not hasattr(module, name)]

    assert missing == []
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize("module", [gridboost, gridboost.exceptions], ids=["gridboost", "gridboost.exceptions"])
def test_all_lists_every_public_definition(module: types.ModuleType) -> None:
    """Every public class or function of gridboost the module exposes is in its ``__all__``."""
    assert "GridboostError" in _public_definitions(module)  # the check sees what it should
    assert _public_definitions(module) - set(module.__all__) == set()


def test_top_level_exports_the_whole_exception_tree() -> None:
    """Every exception in ``gridboost.exceptions.__all__`` is exported from ``gridboost`` as the same object."""
    for name in gridboost.exceptions.__all__:
        assert name in gridboost.__all__
        assert getattr(gridboost, name) is getattr(gridboost.exceptions, name)


def test_star_import_gives_exactly_all() -> None:
    """``from gridboost import *`` binds exactly the names of ``__all__``."""
    namespace: dict[str, object] = {}
    exec("from gridboost import *", namespace)

    assert set(namespace) - {"__builtins__"} == set(gridboost.__all__)


def test_version_matches_the_distribution() -> None:
    """``gridboost.__version__`` is the installed distribution's version."""
    assert gridboost.__version__ == importlib.metadata.version("gridboost")


def _exception_classes() -> list[type[BaseException]]:
    return [
        obj
        for obj in vars(gridboost.exceptions).values()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == "gridboost.exceptions"
    ]


def test_every_exception_derives_from_gridboost_error() -> None:
    """Every exception class gridboost defines is a GridboostError, which is an Exception."""
    classes = _exception_classes()

    assert len(classes) == len(gridboost.exceptions.__all__)
    assert [c.__name__ for c in classes if not issubclass(c, GridboostError)] == []
    assert issubclass(GridboostError, Exception)


@pytest.mark.parametrize(
    ("exc", "builtin"),
    [
        (gridboost.InvalidRequest, ValueError),
        (gridboost.InvalidResources, ValueError),
        (gridboost.InvalidResources, gridboost.InvalidRequest),
        (gridboost.InvalidTask, TypeError),
        (gridboost.NotSerializable, TypeError),
        (gridboost.NotSerializable, gridboost.InvalidTask),
        (gridboost.UnknownBackend, LookupError),
        (gridboost.GridClosed, RuntimeError),
    ],
    ids=lambda v: v.__name__,
)
def test_builtin_bases(exc: type[BaseException], builtin: type[BaseException]) -> None:
    """Errors about bad input also derive from the built-in type a Python user expects."""
    assert issubclass(exc, builtin)
    assert issubclass(exc, GridboostError)


@pytest.mark.parametrize(
    "exc",
    [
        gridboost.BackendError,
        gridboost.BoostExpired,
        gridboost.BoostUnavailable,
        gridboost.CommandFailed,
        gridboost.PluginError,
        gridboost.PolicyError,
        gridboost.TaskCancelled,
        gridboost.TeardownError,
    ],
    ids=lambda v: v.__name__,
)
def test_operational_errors_are_not_input_errors(exc: type[BaseException]) -> None:
    """Errors about what happened (not about bad input) are caught by no ``except ValueError/TypeError/LookupError``."""
    assert not issubclass(exc, ValueError | TypeError | LookupError)


def test_bad_input_is_caught_by_except_value_error() -> None:
    """Code that knows nothing of gridboost catches bad resources with ``except ValueError``."""
    with pytest.raises(ValueError, match="cpu"):
        gridboost.Resources(cpu=-1)


def test_plugin_load_warning_is_a_user_warning() -> None:
    """PluginLoadWarning is a UserWarning, so ordinary warning filters apply to it."""
    assert issubclass(gridboost.PluginLoadWarning, UserWarning)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("module", ["ray", "distributed", "dask", "pynvml"])
def test_import_does_not_pull_in(module: str) -> None:
    """``import gridboost`` (warnings as errors) imports neither an engine nor the NVML bindings."""
    result = _run_python(f"import gridboost, sys; assert {module!r} not in sys.modules, 'imported'")

    assert result.returncode == 0, result.stderr


def test_import_is_warning_free_and_leaves_no_engine() -> None:
    """The check the design names, verbatim, passes in a fresh interpreter."""
    result = _run_python(
        "import gridboost, sys; assert not {'ray', 'distributed', 'rich'} & set(sys.modules), sys.modules.keys()"
    )

    assert result.returncode == 0, result.stderr


def test_nvml_bindings_come_from_nvidia_ml_py() -> None:
    """The ``pynvml`` module is provided by ``nvidia-ml-py``; the deprecated ``pynvml`` distribution is absent."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("pynvml")

    assert importlib.metadata.distribution("nvidia-ml-py").metadata["Name"] == "nvidia-ml-py"
    assert importlib.metadata.packages_distributions()["pynvml"] == ["nvidia-ml-py"]


def test_nvml_bindings_import_without_warnings() -> None:
    """``import pynvml`` is warning-free, as a suite with warnings as errors needs."""
    result = _run_python("import pynvml")

    assert result.returncode == 0, result.stderr


def test_testing_all_names_every_export() -> None:
    """``gridboost.testing.__all__`` lists names that all resolve, lazily, to the real objects."""
    import gridboost.testing as testing
    from gridboost.testing import _chaos, _executor_suite, _faulty, _hooklog, _hostile, _leaks, _probe, _suite, _work

    modules = (_chaos, _executor_suite, _faulty, _hooklog, _hostile, _leaks, _probe, _suite, _work)
    for name in testing.__all__:
        value = getattr(testing, name)
        assert any(getattr(module, name, None) is value for module in modules), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        testing.nothing_here  # noqa: B018
