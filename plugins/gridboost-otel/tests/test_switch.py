"""The entry point: off and free unless ``GRIDBOOST_OTEL=1``; on, every grid of the process reports, once.

gridboost loads entry points once per process, so the switched-on cases run in a process of their own, as an app
would: the script sets OpenTelemetry's global SDK providers (what an app or ``opentelemetry-instrument`` does) and
makes plain grids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gridboost_otel import GridTelemetry, _auto

import gridboost as gb
from conftest import run_script

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("value", [None, "", "0", "false", "Off", " no "])
def test_off_unless_switched_on(value: str | None) -> None:
    environ = {} if value is None else {_auto.ENV: value}
    assert isinstance(_auto.from_environment(environ), _auto.Off)


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes"])
def test_switched_on_it_is_a_telemetry_of_the_global_providers_that_defers_to_a_grids_own(value: str) -> None:
    telemetry = _auto.from_environment({_auto.ENV: value, _auto.PORT_ENV: "9464", _auto.ADDR_ENV: "::1"})
    assert isinstance(telemetry, GridTelemetry)
    assert telemetry._defers
    assert (telemetry.tracer_provider, telemetry.meter_provider) == (None, None)
    assert (telemetry.prometheus_port, telemetry.prometheus_addr) == (9464, "::1")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({_auto.ENV: "maybe"}, r"^GRIDBOOST_OTEL must be 1 or 0 \(true/false, on/off\), got 'maybe'$"),
        (
            {_auto.ENV: "1", _auto.PORT_ENV: "http"},
            r"^GRIDBOOST_OTEL_PROMETHEUS_PORT must be a port number, got 'http'$",
        ),
        ({_auto.ENV: "1", _auto.PORT_ENV: "70000"}, r"^prometheus_port must be a port number 0\.\.65535"),
    ],
)
def test_a_bad_switch_is_an_invalid_request(environ: dict[str, str], message: str) -> None:
    with pytest.raises(gb.InvalidRequest, match=message):
        _auto.from_environment(environ)


async def test_off_it_is_registered_with_no_hook_at_all() -> None:
    """Installed and off: the plugin gridboost loads implements nothing, so a grid calls nothing of it."""
    async with gb.Grid() as grid:
        plugin = grid.plugins.get_plugin("entrypoint:otel")
        assert isinstance(plugin, _auto.Off)
        assert grid.plugins.get_hookcallers(plugin) == []
        assert "GRIDBOOST_OTEL=1" in repr(plugin)


def test_off_no_grid_imports_opentelemetry(tmp_path: Path) -> None:
    done = run_script(
        """
        import sys
        import anyio
        import gridboost as gb
        import gridboost_otel

        async def main():
            async with gb.Grid() as grid:
                await grid.offload(sum, [1])
                assert "entrypoint:otel" in grid.plugins.plugin_names()

        anyio.run(main)
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
        """,
        tmp_path,
    )
    assert done.stdout.strip() == "[]"


SDK = """
    import anyio
    import gridboost as gb
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
"""


def test_on_every_grid_reports_to_the_global_providers_and_a_grid_with_its_own_reports_once(tmp_path: Path) -> None:
    done = run_script(
        (
            SDK,
            """
        from gridboost_otel import GridTelemetry

        own = InMemorySpanExporter()
        mine = TracerProvider()
        mine.add_span_processor(SimpleSpanProcessor(own))

        async def main():
            async with gb.Grid() as grid:
                async with grid.boost("cpu=1", ttl=30):
                    await grid.offload(sum, [1])
            async with gb.Grid(plugins=[GridTelemetry(tracer_provider=mine)]) as grid:
                await grid.offload(sum, [2])
                assert grid.stats()["observer_errors"] == 0

        anyio.run(main)
        print(sorted(s.name for s in exporter.get_finished_spans()), sorted(s.name for s in own.get_finished_spans()))
        """,
        ),
        tmp_path,
        GRIDBOOST_OTEL="1",
    )
    assert done.stdout.strip() == "['gridboost.boost', 'gridboost.task'] ['gridboost.task']"


def test_on_with_a_port_it_serves_prometheus_while_a_grid_is_open(tmp_path: Path) -> None:
    done = run_script(
        """
        import json
        import urllib.request
        import anyio
        import gridboost as gb

        async def main():
            async with gb.Grid() as grid:
                telemetry = grid.plugins.get_plugin("entrypoint:otel")
                await grid.offload(sum, [1])
                url = telemetry.prometheus_url
                text = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            assert telemetry.prometheus_url is None
            return text

        text = anyio.run(main)
        print(json.dumps([line for line in text.splitlines() if line.startswith("gridboost_task_finished_total")]))
        """,
        tmp_path,
        GRIDBOOST_OTEL="1",
        GRIDBOOST_OTEL_PROMETHEUS_PORT="0",
    )
    (line,) = json.loads(done.stdout)
    assert 'destination="local"' in line and 'status="succeeded"' in line and line.endswith(" 1.0")


def test_a_bad_switch_warns_as_the_first_grid_is_made_and_leaves_grids_working(tmp_path: Path) -> None:
    done = run_script(
        """
        import warnings
        import anyio
        import gridboost as gb

        async def main():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                grid = gb.Grid()
            async with grid:
                assert await grid.offload(sum, [1, 2]) == 3
            return [str(w.message) for w in caught if issubclass(w.category, gb.PluginLoadWarning)]

        print(anyio.run(main))
        """,
        tmp_path,
        GRIDBOOST_OTEL="sometimes",
    )
    assert "gridboost plugin 'otel' failed to load: InvalidRequest: GRIDBOOST_OTEL must be 1 or 0" in done.stdout
