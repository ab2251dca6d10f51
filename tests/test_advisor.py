"""The process advisor: what could run elsewhere, how hard moving it would be — and that it never touches a process."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import anyio
import psutil
import pytest

import gridboost as gb
from _lab import WAIT, QueueHere, hold, lab_grid, settle

pytestmark = pytest.mark.anyio

BUSY = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


async def test_queued_work_is_low_complexity_and_matched_against_the_cluster() -> None:
    """Work waiting for local capacity is recommended with low complexity, its needs compared with the cluster's room."""
    gate = threading.Event()
    async with lab_grid("cpu=8", "cpu=1,memory=4GiB", plugins=[QueueHere()]) as grid:
        handles = [grid.submit(hold, gate, resources="cpu=1,memory=1GiB") for _ in range(3)]
        await settle(lambda: any(h._run.started for h in handles), "the host did not start its task")
        advice = await grid.scan_processes(window=0.05, limit=50)
        waiting = sorted(h.id for h in handles if not h._run.started)
        gate.set()
        with anyio.fail_after(WAIT):
            for handle in handles:
                await handle
    queued = [r for r in advice if r.kind == "queued"]
    assert sorted(r.task_id for r in queued) == waiting and len(waiting) == 2
    for rec in queued:
        assert rec.migration_complexity == "low" and rec.destination == "cluster"
        assert rec.needed == gb.Resources(cpu=1, memory=2**30)
        assert rec.resource_match["cpu"] == gb.ResourceMatch(needed=1, available=8)
        assert not rec.resource_match["memory"].fits  # the lab declares no memory
        assert rec.confidence == pytest.approx(0.45) and not rec.fits
        assert "waiting for local capacity" in rec.reason and "lacks room for memory" in rec.reason
    assert advice[: len(queued)] == queued  # the easiest come first


async def test_a_command_gridboost_runs_is_medium_and_is_left_running() -> None:
    """A command this grid runs here is recommended with medium complexity, measured; the scan does not stop it."""
    async with lab_grid("cpu=8", "cpu=2") as grid:
        handle = grid.submit(gb.Command([sys.executable, "-c", BUSY]), resources="cpu=1", where="local")
        await settle(lambda: grid._runtime.host.running_commands(), "the command did not start")  # type: ignore[attr-defined]
        advice = await grid.scan_processes(window=0.2, limit=50)
        [rec] = [r for r in advice if r.kind == "command"]
        assert rec.migration_complexity == "medium" and rec.task_id == handle.id and rec.pid is not None
        assert rec.destination == "cluster" and rec.needed.cpu >= 1 and rec.needed.memory > 0
        assert rec.confidence in (0.6, 0.3) and "run again elsewhere" in rec.reason
        assert psutil.Process(rec.pid).is_running() and not handle.done()
        handle.cancel()
        with pytest.raises(gb.TaskCancelled):
            with anyio.fail_after(WAIT):
                await handle


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A busy process this test starts itself, not through gridboost: to gridboost, someone else's."""
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield child
    finally:
        child.kill()
        child.wait(WAIT)


async def test_a_process_gridboost_did_not_start_is_high_and_never_touched(stranger: subprocess.Popen[bytes]) -> None:
    """A busy process of someone else's is recommended with high complexity, and it is still running, untouched, after."""
    async with lab_grid() as grid:
        advice = await grid.scan_processes(window=1.0, limit=500)
    [rec] = [r for r in advice if r.pid == stranger.pid]
    assert rec.kind == "process" and rec.migration_complexity == "high"
    assert rec.confidence <= 0.3 and "only its owner" in rec.reason and "never touches it" in rec.reason
    assert rec.needed.cpu > 0 and set(rec.resource_match) >= {"cpu", "memory"}
    assert stranger.poll() is None  # never stopped, killed or moved
    assert psutil.Process(stranger.pid).status() != psutil.STATUS_STOPPED


async def test_on_a_backend_that_is_this_machine_there_is_nowhere_to_go() -> None:
    """With the local backend every recommendation says there is no destination, and why."""
    async with gb.Grid(capacity="cpu=1") as grid:
        gate = threading.Event()
        handles = [grid.submit(hold, gate, resources="cpu=1") for _ in range(2)]
        await settle(lambda: any(h._run.started for h in handles), "nothing started")
        advice = await grid.scan_processes(window=0.01)
        gate.set()
        with anyio.fail_after(WAIT):
            for handle in handles:
                await handle
    [rec] = [r for r in advice if r.kind == "queued"]
    assert rec.destination is None and not rec.fits and rec.resource_match["cpu"].available is None
    assert "nowhere else" in rec.reason


async def test_bad_arguments_are_refused_and_the_grid_goes_on() -> None:
    """A bad ``limit`` or ``window`` is an InvalidRequest naming it; the grid stays usable."""
    async with lab_grid() as grid:
        with pytest.raises(gb.InvalidRequest, match="limit"):
            await grid.scan_processes(limit=0)
        with pytest.raises(gb.InvalidRequest, match="window"):
            await grid.scan_processes(window=-1)
        assert await grid.offload(abs, -2) == 2
