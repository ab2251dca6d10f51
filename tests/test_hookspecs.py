"""Every hook is documented, has an example, and is exercised by some test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from gridboost import hookspecs

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("gridboost_"))
TESTS = Path(__file__).parent
OWN = Path(__file__).name


def test_hookspecs_lists_its_hooks() -> None:
    """``hookspecs.__all__`` names every hook the module defines."""
    assert set(HOOKS) <= set(hookspecs.__all__)
    assert len(HOOKS) >= 9


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_docs_and_an_example(name: str) -> None:
    """A hook's docstring says what it is for and shows an implementation."""
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.splitlines()[0]) > 20, f"{name} has no one-line summary"
    assert "Example::" in doc and "@gridboost.hookimpl" in doc, f"{name} has no example implementation"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_implemented_by_some_test(name: str) -> None:
    """Some test module implements the hook (``def <hook>(``), so it is called through a real plugin."""
    implementations = [
        path.name
        for path in [*TESTS.glob("test_*.py"), *TESTS.glob("plugins_for_tests/*.py")]
        if path.name != OWN and f"def {name}(" in path.read_text()
    ]
    assert implementations, f"no test implements {name}"
