"""The core's shape: imports flow one way, the facade is small, and records know no services."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "gridboost"

# The one import cycle allowed: hookspecs names, for typing only, the records its hooks take, some of which
# live beside services (Pressure beside the monitor); services reach hookspecs through the plugin manager.
TYPE_ONLY_OK = "gridboost.hookspecs"
# What sits above the facade, or beside it, and may import it.
ABOVE_THE_FACADE = {"gridboost", "gridboost._cli", "gridboost._demo", "gridboost._sync"}
RECORDS = {"gridboost._records", "gridboost._resources", "gridboost._spec", "gridboost._text", "gridboost.exceptions"}
SERVICES = {
    "gridboost._advisor",
    "gridboost._book",
    "gridboost._dispatch",
    "gridboost._executor",
    "gridboost._grid",
    "gridboost._observers",
    "gridboost._plugins",
    "gridboost._policy",
    "gridboost._pressure",
    "gridboost._runtime",
    "gridboost._teardown",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path, modules: set[str]) -> Iterator[tuple[str, bool]]:
    """Each module of the package that ``path`` imports (anywhere in it), and whether only for typing."""
    name = _module_name(path)
    tree = ast.parse(path.read_text())
    typing_only = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            if target in modules and target != name:
                yield target, node.lineno in typing_only


def graph() -> dict[str, dict[str, bool]]:
    """Module → {imported module: whether every import of it is for typing only}."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, dict[str, bool]] = {}
    for name, path in paths.items():
        out: dict[str, bool] = {}
        for target, typing_only in _imports(path, set(paths)):
            out[target] = out.get(target, True) and typing_only
        edges[name] = out
    return edges


def cycles(edges: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    """The reader sees known imports, and knows a typing-only one from a real one."""
    edges = graph()
    assert edges["gridboost._grid"]["gridboost._executor"] is False
    assert edges["gridboost.hookspecs"]["gridboost._boost"] is True
    assert cycles({"a": {"b": False}, "b": {"a": True}, "c": {}}) == [["a", "b"]]


def test_no_import_cycle_but_the_typing_one_through_hookspecs() -> None:
    """Without hookspecs' typing-only imports, the package's imports form no cycle."""
    edges = graph()
    edges[TYPE_ONLY_OK] = {target: only for target, only in edges[TYPE_ONLY_OK].items() if not only}
    assert cycles(edges) == []


# The test kit drives grids from outside: it is a user of the facade, not below it.
BELOW_THE_FACADE = sorted(m for m in graph() if m not in ABOVE_THE_FACADE | {"gridboost._grid"} and ".testing" not in m)


@pytest.mark.parametrize("module", BELOW_THE_FACADE)
def test_nothing_below_the_facade_imports_it(module: str) -> None:
    """No service, record or helper imports ``_grid``, not even for typing: the facade composes, nobody calls back."""
    assert "gridboost._grid" not in graph()[module]


@pytest.mark.parametrize("module", sorted(RECORDS))
def test_records_import_no_service(module: str) -> None:
    """The record modules depend on no service module."""
    assert set(graph()[module]) & SERVICES == set()


def test_the_facade_stays_small() -> None:
    """``_grid.py`` composes and delegates: under 400 lines."""
    assert len((SRC / "_grid.py").read_text().splitlines()) < 400
