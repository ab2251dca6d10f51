"""A plugin that breaks the ``gridboost_backends`` contract: it yields a dict, not a ``BackendSpec``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gridboost


@gridboost.hookimpl
def gridboost_backends() -> Iterator[Any]:
    yield {"name": "broken", "factory": None}
