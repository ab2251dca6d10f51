"""A second plugin that also claims the backend name ``"mine"``."""

from __future__ import annotations

from collections.abc import Iterator

import gridboost
from gridboost._local import LocalBackend


@gridboost.hookimpl
def gridboost_backends() -> Iterator[gridboost.BackendSpec]:
    yield gridboost.BackendSpec(name="mine", factory=LocalBackend)
