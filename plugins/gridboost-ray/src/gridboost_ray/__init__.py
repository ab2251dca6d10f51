"""gridboost-ray: the Ray backend of gridboost. ``Grid("ray")`` finds it through the ``gridboost`` entry point.

Importing this package does not import ray; the backend imports it when a grid starts.
"""

from __future__ import annotations

from ._backend import PREFIX, RayBackend

__all__ = ["PREFIX", "RayBackend", "__version__"]

__version__ = "0.1.0"
