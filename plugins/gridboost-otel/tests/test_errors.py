"""A tracing pipeline that raises is counted and logged, and nothing else: no operation fails, no figure is lost."""

from __future__ import annotations

import logging

import pytest
from gridboost_otel import GridTelemetry
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import gridboost as gb
from conftest import Otel, fail

pytestmark = pytest.mark.anyio


class Broken(Exception):
    pass


class RaisingProcessor(SpanProcessor):
    """A span processor whose exporter fails in line: as spans end (or start), it raises."""

    def __init__(self, *, on_start: bool = False) -> None:
        self.raise_on_start = on_start
        self.calls = 0

    def on_start(self, span: Span, parent_context: object = None) -> None:
        if self.raise_on_start:
            self.calls += 1
            raise Broken("the collector is down")

    def on_end(self, span: ReadableSpan) -> None:
        if not self.raise_on_start:
            self.calls += 1
            raise Broken("the collector is down")


class RaisingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: object) -> SpanExportResult:
        self.calls += 1
        raise Broken("the collector is down")


async def work(grid: gb.Grid) -> None:
    """A boost with a task in it, a task outside, and a task that fails: four spans."""
    async with grid.boost("cpu=1", ttl=30):
        assert await grid.offload(sum, [1, 2]) == 3
    assert await grid.offload(sum, [3]) == 3
    with pytest.raises(ValueError, match=r"^mine$"):
        await grid.offload(fail, "mine")


def figures(otel: Otel) -> tuple[object, ...]:
    return (
        otel.value("gridboost.task.finished", destination="boost", status="succeeded", backend="local"),
        otel.value("gridboost.task.finished", destination="local", status="succeeded", backend="local"),
        otel.value("gridboost.task.finished", destination="local", status="failed", backend="local"),
        otel.value("gridboost.boost.ended", priority="normal", backend="local", state="released"),
        otel.value("gridboost.boost.active", priority="normal", backend="local"),
    )


@pytest.mark.parametrize("on_start", [False, True], ids=["as-spans-end", "as-spans-start"])
async def test_a_span_processor_that_raises_is_counted_and_logged_and_nothing_else(
    otel: Otel, caplog: pytest.LogCaptureFixture, on_start: bool
) -> None:
    broken = RaisingProcessor(on_start=on_start)
    otel.tracer_provider.add_span_processor(broken)  # after the in-memory one, which still sees every span it can
    with caplog.at_level(logging.ERROR, logger="gridboost"):
        async with gb.Grid(plugins=[otel.telemetry]) as grid:
            await work(grid)
            assert grid.stats()["observer_errors"] == broken.calls == 4
    failures = [r for r in caplog.records if r.name == "gridboost" and "collector is down" in r.getMessage()]
    assert len(failures) == 4
    # A span starts as a boost is granted and as a task ends; it ends as the boost ends and as the task ends.
    first = "gridboost_boost_activated" if on_start else "gridboost_boost_released"
    assert {r.getMessage().split()[1] for r in failures} == {first, "gridboost_task_finished"}
    assert all("gridboost_otel._telemetry.GridTelemetry" in r.getMessage() for r in failures)
    assert figures(otel) == (1, 1, 1, 1, 0)  # every figure, though every span failed
    assert len(otel.spans()) == (0 if on_start else 4)


async def test_an_exporter_that_raises_under_the_sdks_processor_breaks_nothing(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's own processors catch and log what their exporter raises: no hook fails, nothing is lost here."""
    exporter = RaisingExporter()
    otel.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with caplog.at_level(logging.ERROR):
        async with gb.Grid(plugins=[otel.telemetry]) as grid:
            await work(grid)
            assert grid.stats()["observer_errors"] == 0
    assert exporter.calls == 4
    assert sum("Exception while exporting Span" in r.getMessage() for r in caplog.records) == 4
    assert figures(otel) == (1, 1, 1, 1, 0)
    assert len(otel.spans()) == 4


async def test_a_telemetry_whose_meter_raises_breaks_no_operation(caplog: pytest.LogCaptureFixture) -> None:
    """Even a meter provider that is no provider at all (every instrument call raises) only costs observer errors."""

    class Hostile:
        def get_meter(self, *args: object, **kwargs: object) -> object:
            return self

        def __getattr__(self, name: str) -> object:
            def broken(*args: object, **kwargs: object) -> object:
                if name.startswith("create_"):
                    return self
                raise Broken(f"{name} failed")

            return broken

    telemetry = GridTelemetry(meter_provider=Hostile())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="gridboost"):
        async with gb.Grid(plugins=[telemetry]) as grid:
            await work(grid)
            errors = grid.stats()["observer_errors"]
    assert errors == 2  # the boost's activation and release: task figures are only counted, never recorded
