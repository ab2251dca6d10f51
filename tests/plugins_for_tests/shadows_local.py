"""A plugin that claims the name of the built-in ``"local"`` backend."""

from __future__ import annotations

from collections.abc import Iterator

import gridboost
from gridboost._local import LocalBackend


@gridboost.hookimpl
def gridboost_backends() -> Iterator[gridboost.BackendSpec]:
    yield gridboost.BackendSpec(name="local", factory=LocalBackend)
