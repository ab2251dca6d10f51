"""Public names show where users import them from (``gridboost.Grid``, not ``gridboost._grid.Grid``), as anyio does.

A public module calls :func:`publish` with its own name once its ``__all__`` is bound (``gridboost``
does it for itself, ``abc``, ``exceptions`` and ``hookspecs``); ``gridboost.testing``, whose names
load lazily, calls :func:`show_as_public` on each as it binds it.
"""

from __future__ import annotations

import inspect
import sys
from collections import ChainMap
from collections.abc import Mapping
from typing import Any

__all__ = ["publish", "show_as_public"]


def publish(module: str) -> None:
    """Show each class and function in ``module``'s ``__all__`` that a private module defines as ``module.X``."""
    namespace = vars(sys.modules[module])
    for name in namespace["__all__"]:
        if name in namespace:  # a name the module loads on first use shows as public then
            show_as_public(namespace[name], name, module)


def show_as_public(value: object, name: str, module: str) -> None:
    """Show ``value``, a class or function exported as ``module.name``, as ``module.name``: in reprs, tracebacks, docs.

    Only one defined in a private module of the package (``gridboost._grid``, ``gridboost.testing._suite``)
    under that same name is renamed: pickle finds a class or function by ``__module__`` and ``__qualname__``, so
    ``module.name`` must give it back. A class's string annotations are first evaluated where it
    was defined, since ``typing.get_type_hints`` looks them up in the module ``__module__`` names;
    one that cannot be stays a string.
    """
    defined_in = str(getattr(value, "__module__", None))
    package = module.partition(".")[0]
    private = defined_in.startswith(f"{package}.") and any(part.startswith("_") for part in defined_in.split("."))
    if getattr(value, "__qualname__", None) != name or not private:
        return
    if isinstance(value, type) and (annotations := inspect.get_annotations(value)):
        # The defining module's names, then the public module's: that also finds what the defining one imports
        # for type checkers only (a hook type, a record of another module), which typing.get_type_hints never did.
        names = ChainMap(vars(sys.modules[defined_in]), vars(sys.modules[module]))
        value.__annotations__ = {key: _evaluated(text, value, names) for key, text in annotations.items()}
    value.__module__ = module


def _evaluated(annotation: object, owner: type, names: Mapping[str, Any]) -> object:
    """``annotation`` evaluated as ``typing.get_type_hints`` does a class's (module names first), or left as it is."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(vars(owner)), names)
    except Exception:
        return annotation
