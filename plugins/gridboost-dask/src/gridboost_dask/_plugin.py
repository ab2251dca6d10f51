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
        # Every logger of Dask's that prints (scheduler, workers, nannies, comms) is under "distributed"; distributed's
        # config gives these two levels of their own (the backend keeps them at their parent's, once it imports it).
        loggers=("distributed", "distributed.client", "distributed.gc"),
        # Read by dask's config when distributed is imported, here and in every worker process an embedded cluster
        # spawns (they inherit the environment): their "distributed" loggers start at ERROR too.
        quiet_env={"DASK_LOGGING__DISTRIBUTED": "error"},
    )
