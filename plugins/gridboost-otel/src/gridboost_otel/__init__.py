"""gridboost-otel: OpenTelemetry spans and metrics of gridboost's grids, and an optional Prometheus endpoint.

``Grid(plugins=[GridTelemetry()])`` reports one grid; ``GRIDBOOST_OTEL=1`` in the environment reports every grid of
the process (``docs/telemetry.md``). Importing this package imports no OpenTelemetry: the entry point that gridboost
loads for every grid stays cheap while telemetry is off, and ``GridTelemetry`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._telemetry import METRICS, GridTelemetry

__all__ = ["METRICS", "GridTelemetry", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("GridTelemetry", "METRICS"):
        from . import _telemetry

        return getattr(_telemetry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
