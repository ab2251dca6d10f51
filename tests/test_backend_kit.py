"""The public kit for backend authors: the plugins import nothing private from the core, and every name the kit
publishes is documented, works as documented, and is what the plugins use."""

from __future__ import annotations

import ast
import os
import pickle
import re
import socket
import types
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import gridboost.backend_kit as kit
import gridboost.worker_command as worker_command
import gridboost.worker_leases as worker_leases
from gridboost import Command, Lease, Priority, Resources
from gridboost.backend_kit import SendCheck, lease_from_record, owner_name
from gridboost.exceptions import InvalidTask, NotSerializable

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCES = sorted(ROOT.glob("plugins/*/src/**/*.py"))
#: The public modules a backend builds on, and what each may be asked for.
KIT_MODULES = [kit, worker_command, worker_leases]


def private_imports(source: str) -> Iterator[tuple[int, str]]:
    """``(line, what)`` for each import of a private part of gridboost in ``source``: a module or package whose
    name starts with ``_`` (``gridboost._kit``, ``gridboost.testing._suite``), or a private name taken from one
    (``from gridboost import _kit``, ``from gridboost.abc import _x``)."""
    for node in ast.walk(ast.parse(source)):
        modules: list[tuple[str, list[str]]]
        if isinstance(node, ast.Import):
            modules = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            modules = [(node.module, [alias.name for alias in node.names])]
        else:  # a relative import is the plugin's own
            continue
        for module, names in modules:
            parts = module.split(".")
            if parts[0] != "gridboost":
                continue
            if any(part.startswith("_") for part in parts[1:]):
                yield node.lineno, f"import of {module}"
            for name in names:
                if name.startswith("_"):
                    yield node.lineno, f"{name} from {module}"


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import gridboost._kit", ["import of gridboost._kit"]),
        ("import gridboost._records as r", ["import of gridboost._records"]),
        ("from gridboost._kit import shown", ["import of gridboost._kit"]),
        ("from gridboost import _kit, Grid", ["_kit from gridboost"]),
        ("from gridboost.testing._suite import nap", ["import of gridboost.testing._suite"]),
        ("def f():\n    from gridboost._records import owner_name", ["import of gridboost._records"]),
        ("from gridboost import Grid, worker_command\nfrom gridboost.backend_kit import shown", []),
        ("from . import _worker\nfrom ._errors import map_errors\nimport gridboostx._y", []),
    ],
)
def test_the_private_import_check_sees_every_form(source: str, found: list[str]) -> None:
    """The check below finds ``import``, ``from ... import`` and ``from gridboost import _x``, at any depth of the
    file, and leaves the plugin's own relative imports and other packages alone."""
    assert [what for _, what in private_imports(source)] == found


def test_no_plugin_imports_anything_private_from_the_core() -> None:
    """Backends use the core's public API and ``gridboost.backend_kit`` only: what a third party can use too."""
    assert len(PLUGIN_SOURCES) >= 10, PLUGIN_SOURCES  # both plugins' sources are there to check
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in PLUGIN_SOURCES
        for line, what in private_imports(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_what_the_plugins_take_from_the_kit_is_published() -> None:
    """Every name a plugin imports from ``gridboost.backend_kit`` or ``gridboost.worker_command`` is in its
    ``__all__``; and the plugins do use the kit (the check is not vacuous)."""
    taken: dict[str, set[str]] = {module.__name__: set() for module in KIT_MODULES}
    for path in PLUGIN_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in taken:
                taken[node.module].update(alias.name for alias in node.names)
    for module in KIT_MODULES:
        assert taken[module.__name__] - set(module.__all__) == set(), module.__name__
    assert {"ErrorMap", "SendCheck", "lease_from_record", "owner_name"} <= taken[kit.__name__]
    assert taken[worker_command.__name__] == {"run"}


@pytest.mark.parametrize("module", KIT_MODULES, ids=lambda m: m.__name__)
def test_every_published_name_exists_once_with_a_docstring(module: types.ModuleType) -> None:
    names = module.__all__
    assert len(names) == len(set(names))
    for name in names:
        value = getattr(module, name)
        assert (value.__doc__ or "").strip(), f"{module.__name__}.{name} has no docstring"


@pytest.mark.parametrize("module", KIT_MODULES, ids=lambda m: m.__name__)
def test_the_module_docstring_gives_every_published_name_a_line(module: types.ModuleType) -> None:
    """The module's docstring is its index: one ``* :func:`name` — ...`` line per name of ``__all__``, no more."""
    listed = re.findall(r"^\* :(?:func|class):`(\w+)` — \S", module.__doc__ or "", re.MULTILINE)
    assert sorted(listed) == sorted(module.__all__)


def test_the_kit_is_in_the_api_reference_and_the_backend_guide() -> None:
    """The API page renders both modules; the guide for backend authors names each published name."""
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    guide = (ROOT / "docs" / "writing-a-backend.md").read_text(encoding="utf-8")
    for module in KIT_MODULES:
        assert f".. automodule:: {module.__name__}" in api
    for name in [*kit.__all__, "worker_command", "worker_leases"]:
        assert name in guide, name


def test_the_kit_reexports_are_the_cores_own_objects() -> None:
    """One implementation: the core and its backends share the same checks, not copies."""
    from gridboost import _kit, _records

    for name in ["LRU", "ErrorMap", "did_you_mean", "finite", "seconds", "shown", "until_done_on_trio"]:
        assert getattr(kit, name) is getattr(_kit, name), name
    assert kit.owner_name is _records.owner_name


# -- what the kit's own names do -------------------------------------------------------------------------------------


async def _later() -> None:
    pass


class _Counting:
    """A pickler that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, value: object) -> bytes:
        self.calls += 1
        return pickle.dumps(value)


def test_send_check_refuses_an_async_function_and_what_the_pickler_cannot_send() -> None:
    check = SendCheck("Engine", pickle.dumps)
    with pytest.raises(InvalidTask, match=r"^_later is an async function: a Engine task runs plain functions$"):
        check(_later)
    with pytest.raises(
        NotSerializable, match=r"^cannot send \u2026\S*<locals>\.<lambda> to Engine: it cannot be serialised \("
    ) as info:
        check(lambda: None)  # a local function cannot be pickled; its long qualified name loses its start
    assert isinstance(info.value.__cause__, Exception)


def test_send_check_remembers_what_passed_and_lets_commands_through() -> None:
    dumps = _Counting()
    check = SendCheck("Engine", dumps, size=2)
    check(Command(["true"]))
    assert dumps.calls == 0
    for _ in range(3):
        check(len)
    assert dumps.calls == 1
    for _ in range(2):  # unhashable: checked each time
        check([len])
    assert dumps.calls == 3
    for target in (abs, max, len):  # size 2: len was evicted
        check(target)
    assert dumps.calls == 6


def test_a_record_becomes_a_lease() -> None:
    record = {
        "id": "boost-1",
        "owner": owner_name(),
        "resources": "cpu=2,memory=1GiB",
        "priority": 2,
        "expires_at": 1234,
        "placements": ["n1", "n2", "n1"],
        "state": "lingering",
    }
    lease = lease_from_record(record, backend="engine")
    assert lease == Lease(
        id="boost-1",
        backend="engine",
        resources=Resources(cpu=2, memory=2**30),
        owner=owner_name(),
        state="lingering",
        priority=Priority.HIGH,
        expires_at=1234.0,
        placements=("n1", "n2"),
    )
    # The resources as a mapping, the backend named by the record, a registry's own state replaced.
    other = {**record, "resources": {"cpu": 2, "memory": 2**30}, "backend": "dask", "state": "granting"}
    assert lease_from_record(other, backend="engine", state="active") == attrs.evolve(
        lease, backend="dask", state="active"
    )


def test_owner_name_is_host_and_pid() -> None:
    assert owner_name() == f"{socket.gethostname()}:{os.getpid()}"
