"""The entry point gridboost loads for every grid: telemetry for all of them when ``GRIDBOOST_OTEL=1``, else nothing.

Off by default, and free when off: the plugin gridboost registers then has no hook at all, so a grid calls nothing of
ours and imports no OpenTelemetry. On, every grid of the process reports to OpenTelemetry's global providers (what
the app, or ``opentelemetry-instrument``, configured), and ``GRIDBOOST_OTEL_PROMETHEUS_PORT`` (with
``GRIDBOOST_OTEL_PROMETHEUS_ADDR``, default ``127.0.0.1``) serves them to Prometheus while a grid is open. A grid
given a ``GridTelemetry`` of its own is left to that one. gridboost reads the entry points once per process: set the
variables before the first grid is made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from gridboost import InvalidRequest
from gridboost.backend_kit import shown

__all__ = ["ADDR_ENV", "ENV", "PORT_ENV", "Off", "from_environment", "plugin"]

ENV = "GRIDBOOST_OTEL"
PORT_ENV = "GRIDBOOST_OTEL_PROMETHEUS_PORT"
ADDR_ENV = "GRIDBOOST_OTEL_PROMETHEUS_ADDR"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


class Off:
    """gridboost-otel installed and off: no hook, so grids pay nothing for it."""

    def __repr__(self) -> str:
        return f"<gridboost-otel: off (set {ENV}=1 to report every grid)>"


def from_environment(environ: Mapping[str, str] = os.environ) -> object:
    """The plugin the environment asks for: a ``GridTelemetry`` that defers to a grid's own, or :class:`Off`."""
    value = environ.get(ENV, "").strip().lower()
    if value in _OFF:
        return Off()
    if value not in _ON:
        raise InvalidRequest(f"{ENV} must be 1 or 0 (true/false, on/off), got {shown(environ[ENV])}")
    from ._telemetry import GridTelemetry

    port_text = environ.get(PORT_ENV, "").strip()
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise InvalidRequest(f"{PORT_ENV} must be a port number, got {shown(port_text)}") from None
    telemetry = GridTelemetry(prometheus_port=port, prometheus_addr=environ.get(ADDR_ENV, "127.0.0.1").strip())
    telemetry._defers = True
    return telemetry


#: What the ``gridboost`` entry point ``otel`` names.
plugin = from_environment()
