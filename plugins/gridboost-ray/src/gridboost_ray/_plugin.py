"""The entry point: registers the ``ray`` backend through the ``gridboost_backends`` hook (imports no ray)."""

from __future__ import annotations

from collections.abc import Iterator

import gridboost
from gridboost.abc import BackendSpec

from ._backend import _OPTIONS, RayBackend
from ._connect import QUIET_ENV

__all__ = ["gridboost_backends"]


@gridboost.hookimpl
def gridboost_backends() -> Iterator[BackendSpec]:
    yield BackendSpec(
        name="ray",
        factory=RayBackend,
        description="a Ray cluster: boosts are placement groups, offloads are Ray tasks",
        options=_OPTIONS,
        # Ray's Python loggers; ray.init resets the "ray" logger's level itself, so QUIET_ENV has the backend ask it
        # for errors only. (Not RAY_BACKEND_LOG_LEVEL: every Ray process that reads it logs an INFO line saying so.)
        loggers=("ray",),
        quiet_env={QUIET_ENV: "1"},
    )
