"""The entry point: registers the ``dask`` backend through the ``gridboost_backends`` hook (imports no distributed)."""

from __future__ import annotations

from collections.abc import Iterator

import gridboost
from gridboost.abc import BackendSpec

from ._backend import _OPTIONS, DaskBackend

__all__ = ["gridboost_backends"]


@gridboost.hookimpl
def gridboost_backends() -> Iterator[BackendSpec]:
    yield BackendSpec(
        name="dask",
        factory=DaskBackend,
        description="a Dask cluster: boosts are leases the scheduler holds on workers, offloads are client.submit",
        options=_OPTIONS,
    )
