"""The entry point: registers the ``ray`` backend through the ``gridboost_backends`` hook (imports no ray)."""

from __future__ import annotations

from collections.abc import Iterator

import gridboost
from gridboost.abc import BackendSpec

from ._backend import _OPTIONS, RayBackend

__all__ = ["gridboost_backends"]


@gridboost.hookimpl
def gridboost_backends() -> Iterator[BackendSpec]:
    yield BackendSpec(
        name="ray",
        factory=RayBackend,
        description="a Ray cluster: boosts are placement groups, offloads are Ray tasks",
        options=_OPTIONS,
    )
