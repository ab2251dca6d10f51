"""Public names show where users import them from (``gridboost.Grid``), and still pickle by reference.

``gridboost`` and ``gridboost.testing`` rename what they export from private modules, as anyio
does. Pickle looks a class or function up by ``__module__`` and ``__qualname__``, and exceptions,
records and work functions cross process boundaries (the local process pool, Ray, Dask): each
renamed one must come back from its new module, in this process and in a fresh one.
"""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
import traceback
import types
import typing
from typing import Any

import anyio
import pytest

import gridboost as gb
import gridboost.abc
import gridboost.backend_kit
import gridboost.exceptions
import gridboost.hookspecs
import gridboost.joblib
import gridboost.testing

PUBLIC_MODULES = [
    gridboost,
    gridboost.exceptions,
    gridboost.abc,
    gridboost.hookspecs,
    gridboost.testing,
    gridboost.backend_kit,
    gridboost.joblib,
]
# A public module shows its names as its own by calling ``gridboost._public.publish(__name__)`` once its
# ``__all__`` is bound (``gridboost`` does it for itself and the submodules it imports).


def _exported(module: types.ModuleType) -> dict[str, Any]:
    """The classes and functions ``module`` exports that gridboost defines."""
    found = {name: getattr(module, name) for name in module.__all__}
    return {
        name: value
        for name, value in found.items()
        if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__.startswith("gridboost")
    }


EXPORTED = [(module.__name__, name, value) for module in PUBLIC_MODULES for name, value in _exported(module).items()]
IDS = [f"{where}.{name}" for where, name, _ in EXPORTED]
SHOWN_AS_EXPORTED = [pytest.param(*export, id=f"{export[0]}.{export[1]}") for export in EXPORTED]


def test_the_check_sees_the_names_it_should() -> None:
    names = {f"{where}.{name}" for where, name, _ in EXPORTED}
    assert {
        "gridboost.Grid",
        "gridboost.exceptions.BoostLost",
        "gridboost.abc.Backend",
        "gridboost.testing.nap",
    } <= names
    assert len(names) > 60


@pytest.mark.parametrize(("where", "name", "value"), SHOWN_AS_EXPORTED)
def test_every_export_shows_a_public_module_that_gives_it_back(where: str, name: str, value: Any) -> None:
    """``X.__module__`` is a public module (``gridboost``, or the public module that defines it), whose ``X`` is it."""
    assert not any(part.startswith("_") for part in value.__module__.split(".")), value.__module__
    assert value.__module__ in {where, "gridboost.exceptions", "gridboost.abc", "gridboost.worker_leases"}  # its home
    assert value.__qualname__ == name
    assert getattr(sys.modules[value.__module__], name) is value


def test_names_from_private_modules_show_as_the_package() -> None:
    """What ``gridboost`` and ``gridboost.testing`` export from private modules shows as theirs."""
    for name in ("Grid", "Boost", "Resources", "TaskSpec", "Priority", "Pressure", "current_boost"):
        assert getattr(gb, name).__module__ == "gridboost", name
    for name in ("BackendSuite", "FaultyBackend", "HookLog", "SuiteError", "nap", "add", "fail_with", "Hostile"):
        assert getattr(gridboost.testing, name).__module__ == "gridboost.testing", name
    # Defined in a public module: shown where they are.
    assert gb.BoostLost.__module__ == "gridboost.exceptions"
    assert gb.BackendSpec.__module__ == "gridboost.abc"


def test_reprs_and_tracebacks_name_the_public_module() -> None:
    """Reprs of classes, of objects with the default repr, and tracebacks say ``gridboost.``, never ``gridboost._``."""
    shown = [
        repr(gb.Grid),
        repr(gb.Resources),
        repr(gb.TaskHandle),
        repr(gb.SystemProbe()),
        repr(gridboost.testing.HookLog()),
        repr(gridboost.testing.nap),
        "".join(traceback.format_exception_only(gridboost.testing.SuiteError(3))),
        "".join(traceback.format_exception_only(gb.GridClosed("closed"))),
        repr(typing.get_type_hints(gb.TaskSpec)),
    ]
    assert "<class 'gridboost.Grid'>" in shown
    assert shown[3].startswith("<gridboost.SystemProbe object at ")
    assert shown[6] == "gridboost.testing.SuiteError: suite error 3\n"
    assert shown[7] == "gridboost.exceptions.GridClosed: closed\n"
    assert [text for text in shown if "gridboost._" in text or "testing._" in text] == []


@pytest.mark.parametrize("cls", [value for _, _, value in EXPORTED if inspect.isclass(value)], ids=lambda c: c.__name__)
def test_type_hints_of_every_class_resolve(cls: type) -> None:
    """``typing.get_type_hints`` of a renamed class still resolves: it looks names up in ``cls.__module__``."""
    typing.get_type_hints(cls)


@pytest.mark.parametrize(("where", "name", "value"), EXPORTED, ids=IDS)
def test_every_export_pickles_by_reference(where: str, name: str, value: Any) -> None:
    """``pickle`` of each exported class and function gives back the very object."""
    assert pickle.loads(pickle.dumps(value)) is value


# Cheap instances of what crosses process boundaries: errors, records, the suite's own exception.
INSTANCES = [
    gb.GridClosed("closed"),
    gb.TeardownError(["lease x"]),
    gb.CommandFailed(["false"], 1, b"", b"no"),
    gb.UnknownBackend("nope", ["local"], "pip install nope"),
    gb.Priority.HIGH,
    gb.BoostState.ACTIVE,
    gb.Command(["true"]),
    gb.Threshold(high=0.9, low=0.5),
    gridboost.testing.SuiteError(3),
    gridboost.testing.Fault("latency", seconds=1.0),
    gb.Resources(cpu=1, memory=2**30, custom={"accel": 2}),
]


@pytest.mark.parametrize("value", INSTANCES, ids=lambda v: type(v).__name__)
def test_instances_pickle(value: object) -> None:
    """Exceptions, records and the suite's exception come back from pickle equal (as far as ``repr`` sees)."""
    back = pickle.loads(pickle.dumps(value))
    assert type(back) is type(value)
    assert repr(back) == repr(value)
    if isinstance(value, BaseException):
        assert vars(back) == vars(value)


def test_a_fresh_process_unpickles_every_export() -> None:
    """A process that has imported nothing of gridboost finds every renamed name (``gridboost.testing``'s lazily)."""
    values = [value for _, _, value in EXPORTED] + [gridboost.testing.SuiteError(3), gb.Priority.LOW]
    code = (
        "import pickle, sys\n"
        "values = pickle.loads(sys.stdin.buffer.read())\n"
        "print(sorted({value.__module__ for value in values}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(values), capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == str(sorted({value.__module__ for value in values}))


@pytest.mark.anyio
async def test_the_work_functions_and_their_error_cross_the_process_pool() -> None:
    """``gridboost.testing``'s work runs in the local process pool, and its exception comes back as itself."""
    async with gb.Grid("local", capacity="cpu=2", executor="process") as grid:
        assert await grid.offload(gridboost.testing.add, 2, 3, where="cluster") == 5
        with pytest.raises(gridboost.testing.SuiteError) as info:
            await grid.offload(gridboost.testing.fail_with, 7, where="cluster")
        assert info.value.code == 7
        assert await grid.offload(gb.Command, ["true"], where="cluster") == gb.Command(["true"])
        with anyio.fail_after(30):
            assert await grid.offload(gridboost.testing.nap, 0.01, where="cluster") == 0.01
