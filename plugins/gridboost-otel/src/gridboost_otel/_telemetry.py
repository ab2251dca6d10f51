"""``GridTelemetry``: OpenTelemetry spans and metrics of a grid, from its observer hooks, as any plugin would.

Spans:

* ``gridboost.boost`` — one per boost, from its request to its end (released, expired, failed, preempted), a child
  of the span current where it was requested; status ``ERROR`` when it failed or was lost. A request that is never
  granted gets one too, ending where it failed.
* ``gridboost.task`` — one per task, from the start of its run to its end: the child of its boost's span when it ran
  inside a boost, else of the span current where it was started (with a link to the span of the enclosing
  ``async with grid.boost(...)`` block, when it ran elsewhere); status ``ERROR`` when it failed or timed out.

Metrics: :data:`METRICS`. Per-task figures are counted where they are cheap and read when the meter collects
(``_watch``): a task costs its span and a dict increment, and the span costs nothing when tracing is off or samples
it out (only a recording span gets its attributes).

An OpenTelemetry component that raises in a hook (a span processor, an exporter called in line, a reader) is what
any raising observer is to gridboost: logged and counted in ``grid.stats()["observer_errors"]``, never a failed
operation. Each hook keeps its own books (the boosts it traces, the tasks it counts) before it first calls into the
pipeline, so a failure costs what that one call had left to report, and nothing after it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
from attrs import Attribute, define, field
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, Status, StatusCode

import gridboost
from gridboost import Boost, InvalidRequest, Placement, Pressure, TaskOutcome, TaskSpec, current_boost
from gridboost.backend_kit import shown
from gridboost.hookspecs import GridView

from . import __version__
from ._prometheus import PrometheusEndpoint
from ._watch import GridWatch, Watched, pressure_values

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["BOOST_SPAN", "GRANT_BUCKETS", "METRICS", "TASK_SPAN", "GridTelemetry"]

SCOPE = "gridboost_otel"
BOOST_SPAN = "gridboost.boost"
TASK_SPAN = "gridboost.task"
#: Seconds: a grant is milliseconds when there is room, up to a request's ``wait`` (30 s by default) when there is not.
GRANT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Every metric: name → (instrument, unit, what it says). Attributes: ``backend`` on all but the pressure gauges.
METRICS: dict[str, tuple[str, str, str]] = {
    "gridboost.boost.active": ("up-down counter", "{boost}", "Boosts active now, by priority"),
    "gridboost.boost.ended": (
        "counter",
        "{boost}",
        "Boosts that ended, by state (released, expired, failed, "
        "preempted) and priority; a request never granted ends failed",
    ),
    "gridboost.boost.grant_latency": ("histogram", "s", "Seconds from a boost's request to its grant, by priority"),
    "gridboost.boost.ttl_left": ("gauge", "s", "Seconds each active boost has left, by boost id and priority"),
    "gridboost.task.placed": (
        "counter",
        "{task}",
        "Tasks placed, by destination (local, cluster, boost); a moved task is placed again where it moved",
    ),
    "gridboost.task.queued": (
        "counter",
        "{task}",
        "Tasks placed here to wait for local capacity (they move to remote room that frees first)",
    ),
    "gridboost.task.moves": ("counter", "{task}", "Waiting tasks moved before they started, by destination"),
    "gridboost.task.finished": (
        "counter",
        "{task}",
        "Tasks that ended, by destination and status (succeeded, failed, cancelled, timed_out)",
    ),
    "gridboost.pressure": (
        "gauge",
        "1",
        "This machine's utilisation (0..1), by dimension (cpu, memory, gpu, gpu_memory)",
    ),
    "gridboost.pressure.high": ("gauge", "1", "1 while a dimension is above its threshold (with hysteresis), else 0"),
    "gridboost.pressure.changes": ("counter", "{change}", "Changes of local pressure, by the level changed to"),
}
_FAILED = frozenset({"failed", "timed_out"})


def _provider(kind: str, method: str) -> Callable[[object, Attribute[Any], object], None]:
    def check(_instance: object, attribute: Attribute[Any], value: object) -> None:
        if value is not None and not callable(getattr(value, method, None)):
            raise InvalidRequest(f"{attribute.name} must be an OpenTelemetry {kind} or None, got {shown(value)}")

    return check


def _port(_instance: object, _attribute: Attribute[Any], value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535):
        raise InvalidRequest(f"prometheus_port must be a port number 0..65535 (0: any free one), got {shown(value)}")


def _addr(_instance: object, _attribute: Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise InvalidRequest(f"prometheus_addr must be a host address such as '127.0.0.1', got {shown(value)}")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


class _Traced:
    """A boost's span while it lasts, the context its tasks are children in, and its metric attributes."""

    __slots__ = ("attributes", "context", "span")

    def __init__(self, attributes: dict[str, str]) -> None:
        self.attributes = attributes
        self.span: Span | None = None
        self.context: Context | None = None


def _weakly(
    method: Callable[[CallbackOptions], Iterable[Observation]],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """An instrument callback that does not keep the telemetry alive: a global meter provider lives for good."""
    ref = weakref.WeakMethod(method)

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        bound = ref()
        return () if bound is None else bound(options)

    return callback


@define(eq=False)
class GridTelemetry:
    """OpenTelemetry spans and metrics of every grid it is given to: ``Grid(plugins=[GridTelemetry()])``.

    ``tracer_provider`` and ``meter_provider`` default to OpenTelemetry's global ones (no-ops until an SDK is
    configured). ``prometheus_port`` serves the metrics at ``http://prometheus_addr:port/metrics`` while a grid that
    uses this telemetry is open (``0``: a free port, see :attr:`prometheus_url`); its metrics then go to a
    ``MeterProvider`` of its own, so it excludes ``meter_provider``. Needs the ``prometheus`` extra.
    """

    tracer_provider: TracerProvider | None = field(default=None, validator=_provider("TracerProvider", "get_tracer"))
    meter_provider: MeterProvider | None = field(default=None, validator=_provider("MeterProvider", "get_meter"))
    prometheus_port: int | None = field(default=None, validator=_port)
    prometheus_addr: str = field(default="127.0.0.1", validator=_addr)
    #: Set on the environment's telemetry (``GRIDBOOST_OTEL=1``): a grid given a telemetry of its own is left to it.
    _defers: bool = field(default=False, init=False, repr=False)
    _tracer: trace.Tracer = field(init=False, repr=False)
    _endpoint: PrometheusEndpoint | None = field(init=False, repr=False)
    _watch: GridWatch = field(init=False, repr=False)
    _boosts: dict[str, _Traced] = field(init=False, repr=False, factory=dict)
    _active: metrics.UpDownCounter = field(init=False, repr=False)
    _ended: metrics.Counter = field(init=False, repr=False)
    _grant_latency: metrics.Histogram = field(init=False, repr=False)
    _pressure_changes: metrics.Counter = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.prometheus_port is not None and self.meter_provider is not None:
            raise InvalidRequest(
                "give meter_provider or prometheus_port, not both: prometheus_port makes a MeterProvider of its own "
                "(to serve yours, add a PrometheusMetricReader to it)"
            )
        self._endpoint = None
        meter_provider = self.meter_provider
        if self.prometheus_port is not None:
            self._endpoint = PrometheusEndpoint(self.prometheus_addr, self.prometheus_port)
            meter_provider = self._endpoint.meter_provider
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=self.tracer_provider)
        self._watch = GridWatch(self._opened, self._closing, self._ignores)
        self._instruments(metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider))

    def _instruments(self, meter: metrics.Meter) -> None:
        def about(name: str) -> dict[str, str]:
            return {"name": name, "unit": METRICS[name][1], "description": METRICS[name][2]}

        self._active = meter.create_up_down_counter(**about("gridboost.boost.active"))
        self._ended = meter.create_counter(**about("gridboost.boost.ended"))
        self._grant_latency = meter.create_histogram(
            **about("gridboost.boost.grant_latency"), explicit_bucket_boundaries_advisory=GRANT_BUCKETS
        )
        self._pressure_changes = meter.create_counter(**about("gridboost.pressure.changes"))
        meter.create_observable_counter(callbacks=[_weakly(self._observe_placed)], **about("gridboost.task.placed"))
        meter.create_observable_counter(callbacks=[_weakly(self._observe_queued)], **about("gridboost.task.queued"))
        meter.create_observable_counter(callbacks=[_weakly(self._observe_moves)], **about("gridboost.task.moves"))
        meter.create_observable_counter(callbacks=[_weakly(self._observe_finished)], **about("gridboost.task.finished"))
        meter.create_observable_gauge(callbacks=[_weakly(self._observe_pressure)], **about("gridboost.pressure"))
        meter.create_observable_gauge(callbacks=[_weakly(self._observe_high)], **about("gridboost.pressure.high"))
        meter.create_observable_gauge(callbacks=[_weakly(self._observe_ttl)], **about("gridboost.boost.ttl_left"))

    # -- public ------------------------------------------------------------------------------------------------------

    @property
    def prometheus_url(self) -> str | None:
        """Where the Prometheus endpoint answers now (``http://127.0.0.1:9464/metrics``); ``None`` when it does not."""
        return None if self._endpoint is None else self._endpoint.url

    def watch(self, grid: GridView) -> None:
        """Watch an open grid from now on, rather than from its first boost or task: the endpoint starts serving.

        Idempotent. ``GridClosed`` for a grid that is not open; ``InvalidRequest`` when the port cannot be served.
        """
        watched = self._watch.watch(grid)
        watched.trouble = None  # what the first hook could not start is tried again here, and raised
        if not watched.serving and not watched.ignored:
            self._opened(watched)

    # -- boosts ------------------------------------------------------------------------------------------------------

    @gridboost.hookimpl
    def gridboost_boost_activated(self, grid: GridView, boost: Boost) -> None:
        watched = self._watch.of(grid)
        if watched.ignored:
            return
        attributes = {"priority": boost.priority.name.lower(), "backend": watched.backend}
        traced = self._boosts[boost.id] = _Traced(attributes)
        activated = boost.activated_at or time.time()
        requested = boost.requested_at
        waited = max(0.0, activated - requested)
        self._active.add(1, attributes)
        self._grant_latency.record(waited, attributes)
        span = traced.span = self._tracer.start_span(BOOST_SPAN, start_time=_ns(requested))
        traced.context = trace.set_span_in_context(span)
        if span.is_recording():
            span.set_attributes(self._boost_attributes(boost, watched.backend))
            span.add_event("granted", {"gridboost.boost.token": boost.token}, timestamp=_ns(activated))
            span.set_attribute("gridboost.boost.grant_latency", waited)
        if watched.trouble is not None:
            raise watched.take_trouble()

    @gridboost.hookimpl
    def gridboost_boost_released(self, grid: GridView, boost: Boost) -> None:
        self._boost_ended(grid, boost, "released")

    @gridboost.hookimpl
    def gridboost_boost_expired(self, grid: GridView, boost: Boost) -> None:
        self._boost_ended(grid, boost, "expired")

    @gridboost.hookimpl
    def gridboost_boost_failed(self, grid: GridView, boost: Boost, error: BaseException) -> None:
        self._boost_ended(grid, boost, "failed", error=error)

    @gridboost.hookimpl
    def gridboost_boost_preempted(self, grid: GridView, boost: Boost, grace: float) -> None:
        # No hook marks the end of a preempted boost (its grace, then the release): its span ends at the notice.
        self._boost_ended(grid, boost, "preempted", grace=grace)

    def _boost_ended(
        self,
        grid: GridView,
        boost: Boost,
        state: str,
        *,
        error: BaseException | None = None,
        grace: float | None = None,
    ) -> None:
        watched = self._watch.of(grid)
        if watched.ignored:
            return
        traced = self._boosts.pop(boost.id, None)
        if traced is not None:
            attributes = traced.attributes
            self._active.add(-1, attributes)
        else:  # a request that was never granted
            attributes = {"priority": boost.priority.name.lower(), "backend": watched.backend}
        self._ended.add(1, {**attributes, "state": state})
        now = time.time_ns()
        span = None if traced is None else traced.span
        if traced is None:
            span = self._tracer.start_span(BOOST_SPAN, start_time=_ns(boost.requested_at))
            if span.is_recording():
                span.set_attributes(self._boost_attributes(boost, watched.backend))
        if span is not None:
            if span.is_recording():
                span.set_attribute("gridboost.boost.state", state)
                if boost.activated_at is not None:
                    span.set_attribute("gridboost.boost.held_for", max(0.0, now / 1e9 - boost.activated_at))
                if grace is not None:
                    span.add_event("preempted", {"gridboost.boost.grace": grace}, timestamp=now)
                if error is not None:
                    span.set_status(Status(StatusCode.ERROR, _said(error)))
                    span.record_exception(error, timestamp=now)
            span.end(now)
        if watched.trouble is not None:
            raise watched.take_trouble()

    @staticmethod
    def _boost_attributes(boost: Boost, backend: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gridboost.backend": backend,
            "gridboost.boost.id": boost.id,
            "gridboost.boost.priority": boost.priority.name.lower(),
            "gridboost.boost.resources": str(boost.resources),
            "gridboost.boost.ttl": boost.ttl,
            "gridboost.boost.strategy": boost.strategy,
            "gridboost.boost.preemptible": boost.preemptible,
            "gridboost.boost.tenant": boost.tenant,
            "gridboost.boost.placements": list(boost.placements),
            "gridboost.boost.token": boost.token,
        }
        for name, amount in boost.resources.as_dict().items():
            attributes[f"gridboost.boost.resources.{name}"] = amount
        return attributes

    # -- tasks -------------------------------------------------------------------------------------------------------

    @gridboost.hookimpl
    def gridboost_task_finished(
        self, grid: GridView, task: TaskSpec, placement: Placement, outcome: TaskOutcome
    ) -> None:
        # The hot path: a count, and a span that is only dressed when it records.
        watched = self._watch.of(grid)
        if watched.ignored:
            return
        self._watch.count_finished(watched.backend, placement.kind, outcome.status)
        end = time.time_ns()
        boost = placement.boost
        context = None
        links = None
        if boost is not None:
            traced = self._boosts.get(boost.id)
            if traced is not None:
                context = traced.context
        else:
            around = current_boost()
            if around is not None:
                traced = self._boosts.get(around.id)
                if traced is not None and traced.span is not None:
                    links = (Link(traced.span.get_span_context()),)
        span = self._tracer.start_span(TASK_SPAN, context, links=links, start_time=end - _ns(outcome.duration))
        if span.is_recording():
            span.set_attributes(
                {
                    "gridboost.backend": watched.backend,
                    "gridboost.task.id": task.id,
                    "gridboost.task.name": task.name,
                    "gridboost.task.placement": placement.kind,
                    "gridboost.task.placement.reason": placement.reason,
                    "gridboost.task.attempts": outcome.attempts,
                    "gridboost.task.outcome": outcome.status,
                    "gridboost.task.duration": outcome.duration,
                }
            )
            if boost is not None:
                span.set_attribute("gridboost.boost.id", boost.id)
            if placement.waiting:
                span.set_attribute("gridboost.task.waiting", True)
            if outcome.status in _FAILED:
                error = outcome.error
                span.set_status(Status(StatusCode.ERROR, outcome.status if error is None else _said(error)))
                if error is not None:
                    span.record_exception(error, timestamp=end)
        span.end(end)
        if watched.trouble is not None:
            raise watched.take_trouble()

    # -- pressure ----------------------------------------------------------------------------------------------------

    @gridboost.hookimpl
    def gridboost_pressure_changed(self, grid: GridView, new: Pressure) -> None:
        # Observing this hook also starts the grid's pressure monitor as it opens, so the gauges have readings.
        watched = self._watch.of(grid)
        if watched.ignored:
            return
        self._pressure_changes.add(1, {"level": new.level, "backend": watched.backend})
        if watched.trouble is not None:
            raise watched.take_trouble()

    # -- the grids' lifetimes ----------------------------------------------------------------------------------------

    def _ignores(self, grid: GridView) -> bool:
        if not self._defers:
            return False
        plugins = getattr(grid, "plugins", None)
        registered = plugins.get_plugins() if plugins is not None else ()
        return any(isinstance(plugin, GridTelemetry) and plugin is not self for plugin in registered)

    def _opened(self, watched: Watched) -> None:
        if self._endpoint is not None:
            self._endpoint.acquire()
            watched.serving = True

    async def _closing(self, watched: Watched) -> None:
        if not watched.serving:
            return
        watched.serving = False
        assert self._endpoint is not None
        stop = self._endpoint.release()
        if stop is not None:
            await anyio.to_thread.run_sync(stop)

    # -- what the meter reads when it collects (in the reader's thread) -----------------------------------------------

    def _observe_placed(self, options: CallbackOptions) -> Iterator[Observation]:
        return (Observation(value, attributes) for value, attributes in self._watch.totals("placed"))

    def _observe_queued(self, options: CallbackOptions) -> Iterator[Observation]:
        return (Observation(value, attributes) for value, attributes in self._watch.totals("queued"))

    def _observe_moves(self, options: CallbackOptions) -> Iterator[Observation]:
        return (Observation(value, attributes) for value, attributes in self._watch.totals("moves"))

    def _observe_finished(self, options: CallbackOptions) -> Iterator[Observation]:
        for (backend, destination, status), count in self._watch.finished_counts():
            yield Observation(count, {"destination": destination, "status": status, "backend": backend})

    def _observe_pressure(self, options: CallbackOptions) -> Iterator[Observation]:
        for dimension, value, _high in pressure_values(self._watch.pressure()):
            yield Observation(value, {"dimension": dimension})

    def _observe_high(self, options: CallbackOptions) -> Iterator[Observation]:
        for dimension, _value, high in pressure_values(self._watch.pressure()):
            yield Observation(1 if high else 0, {"dimension": dimension})

    def _observe_ttl(self, options: CallbackOptions) -> Iterator[Observation]:
        for left, attributes in self._watch.ttl_left():
            yield Observation(left, attributes)
