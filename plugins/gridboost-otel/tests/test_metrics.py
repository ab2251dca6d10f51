"""Metrics: boosts by state, grant latency, tasks placed, moved and finished by destination, pressure, TTL left."""

from __future__ import annotations

import pytest
from gridboost_otel import METRICS
from gridboost_otel._telemetry import GRANT_BUCKETS

import gridboost as gb
from conftest import WAIT, Gate, Otel, QueueHere, ScriptedProbe, cancel_held, fail, lab_grid, settle
from gridboost.testing import Fault, FaultPlan

pytestmark = pytest.mark.anyio


async def test_tasks_finished_are_counted_by_destination_and_status(otel: Otel) -> None:
    gate = Gate()
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        for n in range(3):
            await grid.offload(sum, [n])
        with pytest.raises(ValueError, match=r"^no$"):
            await grid.offload(fail, "no")
        async with grid.boost("cpu=1", ttl=30):
            await grid.offload(sum, [1])
            await cancel_held(grid, gate)
        stats = grid.stats()
    finished = otel.points("gridboost.task.finished")
    assert finished == {
        frozenset({"destination": "local", "status": "succeeded", "backend": "local"}.items()): 3,
        frozenset({"destination": "local", "status": "failed", "backend": "local"}.items()): 1,
        frozenset({"destination": "boost", "status": "succeeded", "backend": "local"}.items()): 1,
        frozenset({"destination": "boost", "status": "cancelled", "backend": "local"}.items()): 1,
    }
    for status in ("succeeded", "failed", "cancelled"):  # the core's own counters agree
        assert sum(v for k, v in finished.items() if ("status", status) in k) == stats[f"tasks.{status}"]
    assert otel.points("gridboost.task.placed") == {
        frozenset({"destination": "local", "backend": "local"}.items()): stats["placed.local"],
        frozenset({"destination": "boost", "backend": "local"}.items()): stats["placed.boost"],
    }
    assert (stats["placed.local"], stats["placed.boost"]) == (4, 2)


async def test_boosts_are_counted_by_the_state_they_end_in_and_active_while_they_last(otel: Otel) -> None:
    async with lab_grid(otel.telemetry) as grid:
        first = await grid.request_boost("cpu=1", ttl=30, priority="high")
        await grid.request_boost("cpu=1", ttl=30)
        assert otel.value("gridboost.boost.active", priority="high", backend="lab") == 1
        assert otel.value("gridboost.boost.active", priority="normal", backend="lab") == 1
        await first.release()
        assert otel.value("gridboost.boost.active", priority="high", backend="lab") == 0
        expiring = await grid.request_boost("cpu=1", ttl=0.1)
        await settle(lambda: expiring.state is gb.BoostState.EXPIRED, "the boost did not expire")
        lost = await grid.request_boost("cpu=1", ttl=30)
        await grid.backend.lose_reservation(lost.id)  # type: ignore[attr-defined]
        with pytest.raises(gb.BoostUnavailable):
            await grid.request_boost("cpu=1000", ttl=30)
        taken = await grid.request_boost("cpu=1", ttl=30, preemptible=True)
        await grid.backend.preempt_reservation(taken.id, grace=0.1)  # type: ignore[attr-defined]
        assert otel.value("gridboost.boost.active", priority="normal", backend="lab") == 1  # the second one
    ended = otel.points("gridboost.boost.ended")
    assert ended == {
        frozenset({"priority": "high", "backend": "lab", "state": "released"}.items()): 1,
        frozenset({"priority": "normal", "backend": "lab", "state": "released"}.items()): 1,  # at teardown
        frozenset({"priority": "normal", "backend": "lab", "state": "expired"}.items()): 1,
        frozenset({"priority": "normal", "backend": "lab", "state": "failed"}.items()): 2,  # lost, never granted
        frozenset({"priority": "normal", "backend": "lab", "state": "preempted"}.items()): 1,
    }
    assert otel.value("gridboost.boost.active", priority="normal", backend="lab") == 0
    stats = grid.stats()
    assert (stats["boosts.released"], stats["boosts.expired"], stats["boosts.failed"]) == (2, 1, 2)


async def test_the_grant_latency_of_each_boost_is_recorded_by_priority(otel: Otel) -> None:
    """From the request to the grant: here an engine that takes 0.2 s to reserve."""
    slow = FaultPlan([Fault("latency", operation="reserve", seconds=0.2)])
    async with lab_grid(otel.telemetry, plan=slow) as grid:
        await grid.request_boost("cpu=1", ttl=30, priority="critical")
        await grid.request_boost("cpu=1", ttl=30, priority="critical")
    (key, point), *others = otel.points("gridboost.boost.grant_latency").items()
    assert others == [] and key == frozenset({"priority": "critical", "backend": "lab"}.items())
    assert point.count == 2 and 0.4 <= point.sum < WAIT
    assert point.explicit_bounds == GRANT_BUCKETS


async def test_queued_work_moved_onto_a_boost_is_counted_as_moves(otel: Otel) -> None:
    """Work waiting for local capacity moves onto a boost as it becomes active: moves and placements, by destination."""
    gate = Gate()
    async with lab_grid(otel.telemetry, QueueHere(), lab="cpu=16") as grid:
        handles = [grid.submit(gate.hold, resources="cpu=1") for _ in range(6)]
        await settle(lambda: gate.entered == 2, "the host did not start two")
        await grid.request_boost("cpu=8", ttl=30)
        stats = grid.stats()
        assert stats["moves.boost"] == 4
        assert otel.value("gridboost.task.moves", destination="boost", backend="lab") == 4
        assert otel.value("gridboost.task.queued", backend="lab") == stats["placed.waiting"]
        gate.open()
        for handle in handles:
            await handle
        stats = grid.stats()
        assert otel.value("gridboost.task.placed", destination="boost", backend="lab") == stats["placed.boost"] == 4
        assert otel.value("gridboost.task.placed", destination="local", backend="lab") == stats["placed.local"]
    assert otel.value("gridboost.task.finished", destination="boost", status="succeeded", backend="lab") == 4
    assert otel.value("gridboost.task.finished", destination="local", status="succeeded", backend="lab") == 2


async def test_the_totals_keep_growing_across_grids_that_come_and_go(otel: Otel) -> None:
    """Counts read from grids are folded as each closes: a closed grid's work stays counted, the next one's adds."""
    for n in (2, 3):
        async with gb.Grid(plugins=[otel.telemetry]) as grid:
            for _ in range(n):
                await grid.offload(sum, [1])
        assert otel.value("gridboost.task.placed", destination="local", backend="local") in (2, 5)
    assert otel.value("gridboost.task.placed", destination="local", backend="local") == 5
    assert otel.value("gridboost.task.finished", destination="local", status="succeeded", backend="local") == 5


async def test_the_ttl_left_of_each_active_boost_is_a_gauge(otel: Otel) -> None:
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        boost = await grid.request_boost("cpu=1", ttl=60, priority="low")
        (left,) = otel.points("gridboost.boost.ttl_left").items()
        assert left[0] == frozenset({"boost": boost.id, "priority": "low", "backend": "local"}.items())
        assert 50 < left[1] <= 60
        await boost.release()
        assert otel.points("gridboost.boost.ttl_left") == {}


async def test_local_pressure_is_read_from_the_grid_and_its_changes_counted(otel: Otel) -> None:
    """The telemetry observes pressure changes, so the monitor runs from the start, even on the local backend."""
    probe = ScriptedProbe([gb.Reading(cpu=0.95, memory=0.5)])
    async with gb.Grid(plugins=[otel.telemetry], probe=probe, pressure_interval=0.01) as grid:
        await settle(lambda: grid.latest_pressure.taken_at is not None, "no pressure reading")
        assert otel.points("gridboost.pressure") == {
            frozenset({("dimension", "cpu")}): 0.95,
            frozenset({("dimension", "memory")}): 0.5,
        }
        assert otel.points("gridboost.pressure.high") == {
            frozenset({("dimension", "cpu")}): 1,
            frozenset({("dimension", "memory")}): 0,
        }
        assert otel.value("gridboost.pressure.changes", level="high", backend="local") == 1
        assert grid.stats()["pressure.changes"] == 1


def reported(otel: Otel) -> dict[str, str]:
    """The name and unit of each metric the reader has now."""
    seen = {}
    for resource in otel.reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "gridboost_otel"
            seen.update({m.name: m.unit for m in scope.metrics})
    return seen


async def test_every_metric_reported_is_documented_with_its_unit(otel: Otel) -> None:
    """The names the SDK sees are the documented ones, each with the unit the table gives."""
    gate = Gate()
    probe = ScriptedProbe([gb.Reading(cpu=0.95, memory=0.5), gb.Reading(cpu=0.1, memory=0.5)])
    async with lab_grid(otel.telemetry, QueueHere(), probe=probe) as grid:
        await settle(lambda: grid.stats()["pressure.changes"] >= 2, "pressure did not change twice")
        for _ in range(3):
            grid.submit(gate.hold, resources="cpu=1")
        await settle(lambda: gate.entered == 2, "the host did not start two")
        await grid.request_boost("cpu=1", ttl=30)
        await (await grid.request_boost("cpu=1", ttl=30)).release()
        seen = reported(otel)  # the gauges of what is open
        gate.open()
    seen.update(reported(otel))  # the tasks finished
    assert seen == {name: unit for name, (_, unit, _) in METRICS.items()}
