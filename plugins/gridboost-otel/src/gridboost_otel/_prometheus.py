"""The Prometheus endpoint: an OpenTelemetry reader in a registry of its own, served over HTTP while a grid is open.

The reader is ``opentelemetry-exporter-prometheus``'s, registered in a private ``CollectorRegistry`` (never
``prometheus_client``'s global one, which the host app may serve itself), under a ``MeterProvider`` that belongs to
the telemetry. The server is ``wsgiref``'s, with ``prometheus_client``'s WSGI app, on a thread of ours: unlike
``prometheus_client.start_http_server`` it can be stopped, and it is — the port released and the thread ended —
when the last grid that uses it closes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gridboost import InvalidRequest

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

__all__ = ["THREAD_NAME", "PrometheusEndpoint"]

#: The name of the thread that serves the endpoint (the tests look for it after the grid closed).
THREAD_NAME = "gridboost-otel-prometheus"
#: How often the serving loop looks whether it should stop: the bound on how long a stop waits.
_POLL = 0.05
_INSTALL = "pip install 'gridboost-otel[prometheus]'"


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's own parameter name
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds the process open


class _Server6(_Server):
    address_family = socket.AF_INET6


class PrometheusEndpoint:
    """``/metrics`` on ``addr:port`` for as long as someone holds it (:meth:`acquire` / :meth:`release`)."""

    def __init__(self, addr: str, port: int) -> None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError as exc:
            raise InvalidRequest(f"prometheus_port needs the prometheus extra ({_INSTALL}): {exc}") from None
        self.addr = addr
        self.port = port
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(registry=self.registry)
        # No exit hook: the provider is the telemetry's, and lives as long as it does.
        self.meter_provider: MeterProvider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self._app = make_wsgi_app(self.registry)
        self._lock = threading.Lock()
        self._users = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        """``http://addr:port/metrics`` while serving (the port the system chose, for port 0); else ``None``."""
        server = self._server
        if server is None:
            return None
        host = self.addr if ":" not in self.addr else f"[{self.addr}]"
        return f"http://{host}:{server.server_port}/metrics"

    def acquire(self) -> None:
        """One more grid uses the endpoint: the first starts serving (``InvalidRequest`` if the port is taken)."""
        with self._lock:
            if self._users == 0:
                self._start()
            self._users += 1

    def release(self) -> Callable[[], None] | None:
        """One grid less; for the last, the stop to call (it blocks a moment: call it off the event loop)."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or self._server is None:
                return None
            server, thread = self._server, self._thread
            self._server = self._thread = None

        def stop() -> None:
            server.shutdown()  # returns once the serving loop has ended
            server.server_close()  # the port is free from here
            if thread is not None:
                thread.join()

        return stop

    def _start(self) -> None:
        kind = _Server6 if ":" in self.addr else _Server
        try:
            server = make_server(self.addr, self.port, self._app, kind, handler_class=_Quiet)
        except OSError as exc:
            where = f"{self.addr}:{self.port}"
            raise InvalidRequest(f"cannot serve Prometheus metrics on {where}: {exc.strerror or exc}") from exc
        thread = threading.Thread(target=server.serve_forever, args=(_POLL,), name=THREAD_NAME, daemon=True)
        thread.start()
        self._server, self._thread = server, thread
