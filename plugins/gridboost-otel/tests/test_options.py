"""Bad options are refused as the telemetry is made, with a typed error and one line that says what was expected."""

from __future__ import annotations

import pytest
from gridboost_otel import GridTelemetry

import gridboost as gb
from conftest import Otel

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"tracer_provider": object()},
            r"^tracer_provider must be an OpenTelemetry TracerProvider or None, got <object",
        ),
        (
            {"meter_provider": "global"},
            r"^meter_provider must be an OpenTelemetry MeterProvider or None, got 'global'$",
        ),
        ({"prometheus_port": -1}, r"^prometheus_port must be a port number 0\.\.65535 \(0: any free one\), got -1$"),
        ({"prometheus_port": 65536}, r"got 65536$"),
        ({"prometheus_port": True}, r"got True$"),
        ({"prometheus_port": "9464"}, r"got '9464'$"),
        ({"prometheus_port": 9464.0}, r"got 9464\.0$"),
        ({"prometheus_addr": ""}, r"^prometheus_addr must be a host address such as '127\.0\.0\.1', got ''$"),
        ({"prometheus_addr": "0.0.0.0 "}, r"got '0\.0\.0\.0 '$"),
        ({"prometheus_addr": None}, r"got None$"),
    ],
)
def test_bad_options_are_refused_with_a_one_line_invalid_request(options: dict[str, object], message: str) -> None:
    with pytest.raises(gb.InvalidRequest, match=message) as refused:
        GridTelemetry(**options)  # type: ignore[arg-type]
    assert "\n" not in str(refused.value)


def test_a_meter_provider_and_a_prometheus_port_exclude_each_other(otel: Otel) -> None:
    with pytest.raises(gb.InvalidRequest, match=r"^give meter_provider or prometheus_port, not both: "):
        GridTelemetry(meter_provider=otel.meter_provider, prometheus_port=0)


def test_its_repr_shows_its_options_only() -> None:
    assert repr(GridTelemetry(prometheus_port=9464)) == (
        "GridTelemetry(tracer_provider=None, meter_provider=None, prometheus_port=9464, prometheus_addr='127.0.0.1')"
    )


async def test_watching_a_grid_that_is_not_open_is_refused_and_costs_nothing(otel: Otel) -> None:
    """``watch`` before the grid opens, or after it closed: ``GridClosed``; the grid is still reported while open."""
    grid = gb.Grid(plugins=[otel.telemetry])
    with pytest.raises(gb.GridClosed, match="not open yet"):
        otel.telemetry.watch(grid)
    async with grid:
        await grid.offload(sum, [1])
    with pytest.raises(gb.GridClosed, match="closed"):
        otel.telemetry.watch(grid)
    assert otel.value("gridboost.task.finished", destination="local", status="succeeded", backend="local") == 1
    assert otel.value("gridboost.task.placed", destination="local", backend="local") == 1


async def test_watching_a_grid_as_it_closes_is_refused(otel: Otel) -> None:
    """From the grid's teardown (an app callback, after the telemetry's own): ``GridClosed``, and no endpoint held."""
    refused: list[BaseException] = []

    async def late() -> None:
        try:
            otel.telemetry.watch(grid)
        except gb.GridClosed as exc:
            refused.append(exc)

    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        grid.push_async_callback(late)
        await grid.offload(sum, [1])  # the telemetry watches it from here, and stops as it closes: before `late`
    assert [str(e) for e in refused] == ["this grid is closing: there is nothing left to watch"]
