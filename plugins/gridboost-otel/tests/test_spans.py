"""Spans: one per boost from its request to its end, one per task, each with what happened, and linked as it ran."""

from __future__ import annotations

import time

import pytest
from gridboost_otel import GridTelemetry
from gridboost_otel._telemetry import BOOST_SPAN, TASK_SPAN
from opentelemetry.trace import StatusCode

import gridboost as gb
from conftest import WAIT, Gate, Otel, fail, lab_grid, settle
from gridboost.testing import Fault, FaultPlan

pytestmark = pytest.mark.anyio


def only(spans: list) -> object:  # type: ignore[type-arg]
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


async def test_a_released_boost_is_one_span_from_its_request_to_its_release(otel: Otel) -> None:
    """The span covers the grant and the hold, and says what was asked, where it landed and how it ended."""
    before = time.time_ns()
    async with gb.Grid(plugins=[otel.telemetry], tenant="team-a") as grid:
        async with grid.boost("cpu=1", ttl=30, priority="high") as boost:
            assert otel.spans(BOOST_SPAN) == []  # open while the boost is
        after = time.time_ns()
    span = only(otel.spans(BOOST_SPAN))
    attributes = dict(span.attributes)
    assert attributes == {
        "gridboost.backend": "local",
        "gridboost.boost.id": boost.id,
        "gridboost.boost.priority": "high",
        "gridboost.boost.resources": "cpu=1",
        "gridboost.boost.resources.cpu": 1.0,
        "gridboost.boost.ttl": 30.0,
        "gridboost.boost.strategy": "pack",
        "gridboost.boost.preemptible": False,
        "gridboost.boost.tenant": "team-a",
        "gridboost.boost.placements": tuple(boost.placements),
        "gridboost.boost.token": boost.token,
        "gridboost.boost.state": "released",
        "gridboost.boost.held_for": attributes["gridboost.boost.held_for"],
        "gridboost.boost.grant_latency": attributes["gridboost.boost.grant_latency"],
    }
    assert boost.placements and 0 <= attributes["gridboost.boost.held_for"] < WAIT
    assert before <= span.start_time <= span.end_time <= after
    assert span.status.status_code is StatusCode.UNSET
    granted = only([e for e in span.events if e.name == "granted"])
    assert span.start_time <= granted.timestamp <= span.end_time
    assert granted.attributes["gridboost.boost.token"] == boost.token


async def test_a_boost_span_starts_at_the_request_and_marks_the_grant(otel: Otel) -> None:
    """An engine slow to reserve (0.2 s): the span starts at the request, its ``granted`` event 0.2 s later."""
    slow = FaultPlan([Fault("latency", operation="reserve", seconds=0.2)])
    async with lab_grid(otel.telemetry, plan=slow) as grid:
        boost = await grid.request_boost("cpu=1", ttl=30)
        await boost.release()
    span = only(otel.spans(BOOST_SPAN))
    granted = only([e for e in span.events if e.name == "granted"])
    assert span.start_time == int(boost.requested_at * 1e9)
    assert (granted.timestamp - span.start_time) / 1e9 >= 0.2
    assert span.attributes["gridboost.boost.grant_latency"] >= 0.2


async def test_a_boost_that_reaches_its_ttl_ends_expired(otel: Otel) -> None:
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        boost = await grid.request_boost("cpu=1", ttl=0.2)
        await settle(lambda: boost.state is gb.BoostState.EXPIRED, "the boost did not expire")
        await settle(lambda: otel.spans(BOOST_SPAN), "no span for the expired boost")
    span = only(otel.spans(BOOST_SPAN))
    assert span.attributes["gridboost.boost.state"] == "expired"
    assert span.status.status_code is StatusCode.UNSET
    assert (span.end_time - span.start_time) / 1e9 >= 0.2


async def test_a_request_never_granted_is_a_failed_span_with_the_error(otel: Otel) -> None:
    """More than the machine has: refused at once, and the span says why, with status ERROR."""
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        with pytest.raises(gb.BoostUnavailable) as refused:
            await grid.request_boost("cpu=100000", ttl=30)
    span = only(otel.spans(BOOST_SPAN))
    assert span.attributes["gridboost.boost.state"] == "failed"
    assert span.attributes["gridboost.boost.resources.cpu"] == 100000.0
    assert "gridboost.boost.held_for" not in span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description.startswith("BoostUnavailable: ")
    event = only([e for e in span.events if e.name == "exception"])
    assert event.attributes["exception.type"].endswith("BoostUnavailable")
    assert event.attributes["exception.message"] == str(refused.value)


async def test_a_boost_the_engine_loses_is_a_failed_span(otel: Otel) -> None:
    async with lab_grid(otel.telemetry) as grid:
        boost = await grid.request_boost("cpu=1", ttl=30)
        await grid.backend.lose_reservation(boost.id)  # type: ignore[attr-defined]  # the lab's FaultyBackend
        await settle(lambda: boost.state is gb.BoostState.FAILED, "the boost was not failed")
    span = only(otel.spans(BOOST_SPAN))
    assert span.attributes["gridboost.boost.state"] == "failed"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description.startswith("BoostLost: ")


async def test_a_preempted_boost_span_ends_at_the_notice_with_its_grace(otel: Otel) -> None:
    """No hook marks the end of a preempted boost's grace: the span ends at the notice and records the grace."""
    async with lab_grid(otel.telemetry) as grid:
        boost = await grid.request_boost("cpu=1", ttl=30, preemptible=True)
        await grid.backend.preempt_reservation(boost.id, grace=0.5)  # type: ignore[attr-defined]
        span = only(otel.spans(BOOST_SPAN))
    assert span.attributes["gridboost.boost.state"] == "preempted"
    assert span.attributes["gridboost.boost.preemptible"] is True
    assert span.status.status_code is StatusCode.UNSET
    event = only([e for e in span.events if e.name == "preempted"])
    assert event.attributes["gridboost.boost.grace"] == 0.5


async def test_a_boost_span_is_a_child_of_the_span_current_where_it_was_requested(otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        with tracer.start_as_current_span("request") as app:
            async with grid.boost("cpu=1", ttl=30):
                pass
    span = only(otel.spans(BOOST_SPAN))
    assert span.parent is not None and span.parent.span_id == app.get_span_context().span_id
    assert span.context.trace_id == app.get_span_context().trace_id


async def test_tasks_that_run_inside_a_boost_are_children_of_its_span(otel: Otel) -> None:
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        async with grid.boost("cpu=2", ttl=30) as boost:
            assert await grid.offload(sum, [1, 2]) == 3
            assert await grid.submit(max, 4, 5) == 5
    boost_span = only(otel.spans(BOOST_SPAN))
    tasks = otel.spans(TASK_SPAN)
    assert [t.attributes["gridboost.task.name"] for t in tasks] == ["sum", "max"]
    for task in tasks:
        assert task.parent is not None and task.parent.span_id == boost_span.context.span_id
        assert task.context.trace_id == boost_span.context.trace_id
        assert task.attributes["gridboost.task.placement"] == "boost"
        assert task.attributes["gridboost.boost.id"] == boost.id
        assert task.links == ()


async def test_a_task_run_elsewhere_inside_a_boost_block_links_to_the_boost(otel: Otel) -> None:
    """``where="local"`` inside the block: not the boost's child, but linked to it."""
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        async with grid.boost("cpu=1", ttl=30):
            await grid.offload(sum, [1], where="local")
    boost_span = only(otel.spans(BOOST_SPAN))
    task = only(otel.spans(TASK_SPAN))
    assert task.parent is None
    assert task.attributes["gridboost.task.placement"] == "local"
    assert "gridboost.boost.id" not in task.attributes
    assert [link.context.span_id for link in task.links] == [boost_span.context.span_id]


async def test_a_task_outside_boosts_is_a_child_of_the_span_current_where_it_started(otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        with tracer.start_as_current_span("request") as app:
            await grid.offload(sum, [1])
            await grid.submit(sum, [2])
        await grid.offload(sum, [3])
    first, second, third = otel.spans(TASK_SPAN)
    for task in (first, second):
        assert task.parent is not None and task.parent.span_id == app.get_span_context().span_id
    assert third.parent is None and third.links == ()


async def test_a_task_span_says_placement_attempts_outcome_and_duration(otel: Otel) -> None:
    """Its times are the run's: from the start of its run to its end, as long as ``outcome.duration`` says."""
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")
        time.sleep(0.05)
        return "done"

    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        start = time.time_ns()
        assert await grid.offload(flaky, retries=2) == "done"
        end = time.time_ns()
    task = only(otel.spans(TASK_SPAN))
    attributes = dict(task.attributes)
    duration = attributes.pop("gridboost.task.duration")
    assert attributes == {
        "gridboost.backend": "local",
        "gridboost.task.id": attributes["gridboost.task.id"],
        "gridboost.task.name": "test_a_task_span_says_placement_attempts_outcome_and_duration.<locals>.flaky",
        "gridboost.task.placement": "local",
        "gridboost.task.placement.reason": "the backend is this machine",
        "gridboost.task.attempts": 3,
        "gridboost.task.outcome": "succeeded",
    }
    assert attributes["gridboost.task.id"].startswith("task-")
    assert 0.05 <= duration < WAIT
    assert start <= task.start_time < task.end_time <= end
    assert abs((task.end_time - task.start_time) / 1e9 - duration) < 0.001
    assert task.status.status_code is StatusCode.UNSET


async def test_failed_and_timed_out_tasks_are_errors_and_cancelled_ones_are_not(otel: Otel) -> None:
    gate = Gate()
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        with pytest.raises(ValueError, match=r"^broken$"):
            await grid.offload(fail, "broken")
        with pytest.raises(TimeoutError):
            await grid.offload(time.sleep, 0.5, timeout=0.05)
        handle = grid.submit(gate.hold)
        await settle(lambda: gate.entered == 1, "the task did not start")
        handle.cancel()
        with pytest.raises(gb.TaskCancelled):
            await handle
        gate.open()
    by_outcome = {s.attributes["gridboost.task.outcome"]: s for s in otel.spans(TASK_SPAN)}
    assert set(by_outcome) == {"failed", "timed_out", "cancelled"}
    failed = by_outcome["failed"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: broken"
    event = only([e for e in failed.events if e.name == "exception"])
    assert event.attributes["exception.type"] == "ValueError" and event.attributes["exception.message"] == "broken"
    assert by_outcome["timed_out"].status.status_code is StatusCode.ERROR
    assert by_outcome["cancelled"].status.status_code is StatusCode.UNSET
    assert by_outcome["cancelled"].events == ()


async def test_tasks_a_released_boost_cancels_end_inside_its_span(otel: Otel) -> None:
    """Releasing a boost cancels its work first: each task's span is the boost's child and ends before it."""
    gate = Gate()
    async with gb.Grid(plugins=[otel.telemetry]) as grid:
        async with grid.boost("cpu=2", ttl=30) as boost:
            for _ in range(2):
                grid.submit(gate.hold, where=boost)
            await settle(lambda: gate.entered == 2, "the tasks did not start")
            gate.open()  # their threads end; the tasks are cancelled by the release either way
    boost_span = only(otel.spans(BOOST_SPAN))
    tasks = otel.spans(TASK_SPAN)
    assert len(tasks) == 2
    for task in tasks:
        assert task.parent is not None and task.parent.span_id == boost_span.context.span_id
        assert task.end_time <= boost_span.end_time


async def test_the_global_providers_without_an_sdk_cost_nothing_and_break_nothing() -> None:
    """OpenTelemetry's API without an SDK: every span is a no-op, and no hook fails."""
    telemetry = GridTelemetry()
    async with gb.Grid(plugins=[telemetry]) as grid:
        async with grid.boost("cpu=1", ttl=30):
            assert await grid.offload(sum, [1, 2]) == 3
        with pytest.raises(ValueError, match=r"^x$"):
            await grid.offload(fail, "x")
        assert grid.stats()["observer_errors"] == 0
