"""What the telemetry reported, read back through the OpenTelemetry SDK's own in-memory exporter and reader.

Every test gets an :class:`Otel`: a ``TracerProvider`` whose spans land in an ``InMemorySpanExporter`` (through a
``SimpleSpanProcessor``: a span is there as soon as it ends) and a ``MeterProvider`` read by an
``InMemoryMetricReader``, with a ``GridTelemetry`` wired to both. Nothing here sets OpenTelemetry's global providers:
a process may set them once, and the tests that need them run in a process of their own.

A stand-in cluster (``lab``) is the local engine reported as remote, through gridboost's public ``FaultyBackend``:
the grid then keeps a host of its own, and queued work moves, as it does with Ray or Dask; the same backend can
report a reservation lost or preempted, as an engine would.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from gridboost_otel import GridTelemetry
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import gridboost as gb
from gridboost.testing import FaultPlan, FaultyBackend, FaultyPlugin

# gridboost reads the entry point once per process: the developer's own switch must not add a second telemetry.
for _name in ("GRIDBOOST_OTEL", "GRIDBOOST_OTEL_PROMETHEUS_PORT", "GRIDBOOST_OTEL_PROMETHEUS_ADDR"):
    os.environ.pop(_name, None)

#: Every bounded wait of these tests, in seconds.
WAIT = 20.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Otel:
    """An SDK tracer and meter in memory, and a telemetry that reports to them."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.telemetry = GridTelemetry(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """The spans ended so far (those called ``name``), oldest first."""
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """Each data point of ``metric`` now, by its attributes: the value (counters, gauges) or the point
        (histograms)."""
        found: dict[frozenset[tuple[str, Any]], Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for each in scope.metrics:
                    if each.name == metric:
                        for point in each.data.data_points:
                            key = frozenset((point.attributes or {}).items())
                            found[key] = getattr(point, "value", point)
        return found

    def value(self, metric: str, **attributes: Any) -> Any:
        """The value of the one point of ``metric`` with exactly ``attributes`` (0 when there is none)."""
        return self.points(metric).get(frozenset(attributes.items()), 0)

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    otel = Otel()
    yield otel
    otel.close()


class ScriptedProbe(gb.Probe):
    """Gives its readings in order, then the last one again and again (gridboost's public ``Probe``)."""

    def __init__(self, readings: Sequence[gb.Reading]) -> None:
        self._readings = list(readings)
        self.reads = 0

    def read(self) -> gb.Reading:
        reading = self._readings[min(self.reads, len(self._readings) - 1)]
        self.reads += 1
        return reading


def calm() -> ScriptedProbe:
    return ScriptedProbe([gb.Reading(cpu=0.1, memory=0.2)])


_LOCAL = FaultyPlugin(FaultPlan([])).inner  # the built-in local backend's spec


class Lab(FaultyBackend):
    """The local engine, reported as a remote cluster, with ``plan``'s faults; it can also report a reservation lost
    or preempted."""

    def __init__(self, plan: FaultPlan, **options: Any) -> None:
        super().__init__(_LOCAL.factory(**options), plan=plan)
        self.name = "lab"

    @property
    def capabilities(self) -> gb.abc.Capabilities:
        return attrs.evolve(self.inner.capabilities, remote=True)


class LabPlugin:
    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.plan = plan or FaultPlan([])

    @gb.hookimpl
    def gridboost_backends(self) -> Iterator[gb.BackendSpec]:
        yield gb.BackendSpec("lab", functools.partial(Lab, self.plan), options=_LOCAL.options)


class QueueHere:
    """Every automatic task waits for local capacity, as when there is no room elsewhere: the first room moves it."""

    @gb.hookimpl
    def gridboost_choose_placement(self, task: gb.TaskSpec) -> gb.Placement:
        return gb.Placement("local", "the test queues everything here", waiting=True)


def lab_grid(
    *plugins: object, lab: str = "cpu=8", local: str = "cpu=2", plan: FaultPlan | None = None, **options: Any
) -> gb.Grid:
    """A grid on the lab (``lab`` capacity, ``plan``'s faults) with a host of ``local`` capacity and a calm probe."""
    options.setdefault("probe", calm())
    options.setdefault("pressure_interval", 0.01)
    options.setdefault("cluster_queue", 0)
    return gb.Grid("lab", plugins=[LabPlugin(plan), *plugins], capacity=lab, local_capacity=local, **options)


class Gate:
    """Work that holds its thread until the gate opens (bounded), counting how many started."""

    def __init__(self) -> None:
        self._opened = threading.Event()
        self._lock = threading.Lock()
        self.entered = 0

    def hold(self) -> str:
        """Run as a task."""
        with self._lock:
            self.entered += 1
        self._opened.wait(WAIT)
        return threading.current_thread().name

    def open(self) -> None:
        self._opened.set()


def fail(message: str) -> None:
    raise ValueError(message)


async def settle(check: Any, what: str) -> None:
    """Wait (bounded) until ``check()`` is true."""
    with anyio.move_on_after(WAIT):
        while not check():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"after {WAIT:g}s: {what}")


#: Seconds a script may take (a guard against a hang: each takes about one).
SCRIPT_TIMEOUT = 60


def run_script(
    code: str | tuple[str, ...], where: Path, *, name: str = "app.py", timeout: float = SCRIPT_TIMEOUT, **environ: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (its parts, one after the other) as the script ``where/name`` of this environment's interpreter,
    under ``-W error``, with no GRIDBOOST_ variable of the developer's but ``environ``; it must exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDBOOST_")}
    env.update(environ)
    script = where / name
    parts = (code,) if isinstance(code, str) else code
    script.write_text("".join(textwrap.dedent(part) for part in parts), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "error", script.name],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


async def cancel_held(grid: gb.Grid, gate: Gate) -> None:
    """Submit ``gate.hold``, cancel it once it runs, and see it end cancelled."""
    handle = grid.submit(gate.hold)
    await settle(lambda: gate.entered == 1, "the task did not start")
    handle.cancel()
    gate.open()
    with pytest.raises(gb.TaskCancelled):
        await handle
