"""The Prometheus endpoint: scraped over real HTTP while the grid is open, gone — port and thread — once it closes."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator

import anyio
import pytest
from gridboost_otel import GridTelemetry
from gridboost_otel._prometheus import THREAD_NAME
from prometheus_client.parser import text_string_to_metric_families

import gridboost as gb
from conftest import Gate, Otel, cancel_held, fail

pytestmark = pytest.mark.anyio

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape_now(url: str) -> Samples:
    """GET the endpoint and parse it as Prometheus does: each sample's value by name and labels (the scope's left out)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope_"))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def scrape(telemetry: GridTelemetry) -> Samples:
    url = telemetry.prometheus_url
    assert url is not None, "the endpoint is not serving"
    return await anyio.to_thread.run_sync(scrape_now, url)


def labels(**given: str) -> frozenset[tuple[str, str]]:
    return frozenset(given.items())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refused(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(5)
        return client.connect_ex(("127.0.0.1", port)) != 0


def serving_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@contextlib.contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Someone else listens on ``port`` (as a server restarted on it would: SO_REUSEADDR)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        yield server


async def test_a_scrape_parses_and_shows_the_same_counts_as_the_grid() -> None:
    telemetry = GridTelemetry(prometheus_port=0)
    gate = Gate()
    async with gb.Grid(plugins=[telemetry]) as grid:
        telemetry.watch(grid)
        await grid.offload(sum, [1])
        await grid.offload(sum, [2])
        with pytest.raises(ValueError, match=r"^no$"):
            await grid.offload(fail, "no")
        async with grid.boost("cpu=1", ttl=60, priority="high") as boost:
            await grid.offload(sum, [3])
            await cancel_held(grid, gate)
            during = await scrape(telemetry)
            assert during["gridboost_boost_active"] == {labels(priority="high", backend="local"): 1.0}
            (left,) = during["gridboost_boost_ttl_left_seconds"].items()
            assert left[0] == labels(boost=boost.id, priority="high", backend="local") and 50 < left[1] <= 60
        stats = grid.stats()
        after = await scrape(telemetry)
    assert after["gridboost_task_finished_total"] == {
        labels(destination="local", status="succeeded", backend="local"): 2.0,
        labels(destination="local", status="failed", backend="local"): 1.0,
        labels(destination="boost", status="succeeded", backend="local"): 1.0,
        labels(destination="boost", status="cancelled", backend="local"): 1.0,
    }
    assert after["gridboost_task_placed_total"] == {
        labels(destination="local", backend="local"): float(stats["placed.local"]),
        labels(destination="boost", backend="local"): float(stats["placed.boost"]),
    }
    assert after["gridboost_boost_ended_total"] == {labels(priority="high", backend="local", state="released"): 1.0}
    assert after["gridboost_boost_active"] == {labels(priority="high", backend="local"): 0.0}
    assert "gridboost_boost_ttl_left_seconds" not in after
    assert stats["tasks.succeeded"] == 3 and stats["tasks.failed"] == 1 and stats["tasks.cancelled"] == 1


async def test_the_endpoint_serves_while_the_grid_is_open_and_frees_port_and_thread_as_it_closes() -> None:
    port = free_port()
    telemetry = GridTelemetry(prometheus_port=port)
    assert telemetry.prometheus_url is None
    async with gb.Grid(plugins=[telemetry]) as grid:
        assert telemetry.prometheus_url is None  # nothing has happened yet
        telemetry.watch(grid)
        telemetry.watch(grid)  # idempotent
        assert telemetry.prometheus_url == f"http://127.0.0.1:{port}/metrics"
        assert "gridboost_task_finished_total" not in await scrape(telemetry)  # it answers; nothing ran yet
        assert len(serving_threads()) == 1
    assert telemetry.prometheus_url is None
    assert serving_threads() == []
    assert refused(port)
    with listening(port):  # the port is ours to take again
        pass
    async with gb.Grid(plugins=[telemetry]) as grid:  # and the telemetry serves the next grid on it
        await grid.offload(sum, [1])  # its first event starts the endpoint
        assert telemetry.prometheus_url == f"http://127.0.0.1:{port}/metrics"
        samples = await scrape(telemetry)
        assert samples["gridboost_task_finished_total"] == {
            labels(destination="local", status="succeeded", backend="local"): 1.0
        }
    assert serving_threads() == [] and refused(port)


async def test_grids_that_share_a_telemetry_share_its_endpoint_until_the_last_closes() -> None:
    telemetry = GridTelemetry(prometheus_port=0)
    async with gb.Grid(plugins=[telemetry]) as first:
        telemetry.watch(first)
        url = telemetry.prometheus_url
        async with gb.Grid(plugins=[telemetry]) as second:
            telemetry.watch(second)
            assert telemetry.prometheus_url == url
            await first.offload(sum, [1])
            await second.offload(sum, [2])
        assert telemetry.prometheus_url == url
        samples = await scrape(telemetry)
        assert samples["gridboost_task_finished_total"] == {
            labels(destination="local", status="succeeded", backend="local"): 2.0
        }
    assert telemetry.prometheus_url is None and serving_threads() == []


async def test_a_port_in_use_is_counted_and_logged_and_breaks_nothing(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """The first hook of the grid cannot start the endpoint: an observer error, logged once; the work and its span
    are as they would be."""
    port = free_port()
    telemetry = GridTelemetry(tracer_provider=otel.tracer_provider, prometheus_port=port)
    with listening(port), caplog.at_level(logging.ERROR, logger="gridboost"):
        async with gb.Grid(plugins=[telemetry]) as grid:
            assert await grid.offload(sum, [1, 2]) == 3
            assert await grid.offload(sum, [3]) == 3
            assert grid.stats()["observer_errors"] == 1
            with pytest.raises(gb.InvalidRequest, match=rf"^cannot serve Prometheus metrics on 127\.0\.0\.1:{port}: "):
                telemetry.watch(grid)
    assert telemetry.prometheus_url is None and serving_threads() == []
    (record,) = [r for r in caplog.records if "gridboost_otel" in r.getMessage()]
    assert "gridboost_task_finished" in record.getMessage()
    assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}" in record.getMessage()
    assert len(otel.spans("gridboost.task")) == 2


def test_an_executors_grid_is_reported_and_its_endpoint_stops_at_shutdown() -> None:
    """``gridboost.Executor`` runs its grid on a loop in a thread of its own: the hooks run there, the scrape in the
    endpoint's thread, and ``shutdown`` (the grid's teardown) stops the endpoint."""
    telemetry = GridTelemetry(prometheus_port=0)
    with gb.Executor(plugins=[telemetry]) as executor:
        assert [f.result(timeout=20) for f in [executor.submit(sum, [n]) for n in range(4)]] == [0, 1, 2, 3]
        assert telemetry.prometheus_url is not None
        samples = scrape_now(telemetry.prometheus_url)
        assert samples["gridboost_task_finished_total"] == {
            labels(destination="local", status="succeeded", backend="local"): 4.0
        }
    assert telemetry.prometheus_url is None and serving_threads() == []
