"""gridboost-dask: the Dask backend of gridboost. ``Grid("dask")`` finds it through the ``gridboost`` entry point.

Importing this package does not import distributed; the backend imports it when a grid starts.
"""

from __future__ import annotations

from ._backend import LEASE_PREFIX, PREFIX, DaskBackend

__all__ = ["LEASE_PREFIX", "PREFIX", "DaskBackend", "__version__"]

__version__ = "0.1.0"
