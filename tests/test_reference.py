"""The documentation site's reference pages cover every hook and every public name."""

from __future__ import annotations

import inspect
from pathlib import Path

import gridboost
from gridboost import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_hook_has_a_reference_entry() -> None:
    """``docs/plugins.md`` has an ``autofunction`` entry for every hook in ``gridboost.hookspecs``."""
    page = (DOCS / "plugins.md").read_text()
    hooks = [name for name in hookspecs.__all__ if name.startswith("gridboost_")]
    missing = [name for name in hooks if f".. autofunction:: gridboost.hookspecs.{name}\n" not in page]
    assert hooks and missing == []


def test_every_public_class_and_function_is_in_the_api_reference() -> None:
    """``docs/api.md`` documents every class and function ``gridboost`` exports (exceptions by their module)."""
    page = (DOCS / "api.md").read_text()
    documented_modules = {"gridboost.exceptions", "gridboost.abc"}
    missing = []
    for name in gridboost.__all__:
        value = getattr(gridboost, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)) or name == "hookimpl":
            continue
        if value.__module__ in documented_modules or getattr(value, "__module__", "").startswith("gridboost.abc"):
            continue
        if f"gridboost.{name}\n" not in page:
            missing.append(name)
    assert missing == []
