"""Pressure: probes (the real one where NVML is absent, scripted ones), hysteresis, the level, the changes and teardown."""

from __future__ import annotations

import ctypes.util
import math
import subprocess
import sys
import textwrap
import threading
from typing import Any

import anyio
import pytest

import gridboost as gb
from _lab import WAIT, ScriptedProbe, lab_grid
from gridboost import _nvml
from gridboost._pressure import DEFAULT_THRESHOLDS, UNKNOWN, assess

pytestmark = pytest.mark.anyio

LINE = {"cpu": gb.Threshold(high=0.8, low=0.6)}
THRESHOLDS = {**DEFAULT_THRESHOLDS, **LINE}


def cpu(value: float | None) -> gb.Reading:
    return gb.Reading(cpu=value, memory=0.1)


# -- hysteresis ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "levels"),
    [
        ([0.79, 0.8], ["ok", "high"]),  # enter at high exactly
        ([0.9, 0.6], ["high", "high"]),  # at low exactly it stays
        ([0.9, 0.5999], ["high", "ok"]),  # below low it leaves
        ([0.7, 0.79, 0.7], ["ok", "ok", "ok"]),  # between the lines from below: never entered
        ([0.85, 0.7, 0.79, 0.65], ["high"] * 4),  # between the lines from above: stays
        ([0.9, 0.5, 0.79], ["high", "ok", "ok"]),  # having left, it needs high again
        ([0.9, None], ["high", "ok"]),  # unknown is never high
        ([0.0, 1.0, 0.0], ["ok", "high", "ok"]),  # the ends of the scale
    ],
)
def test_hysteresis(values: list[float | None], levels: list[str]) -> None:
    """A dimension enters ``high`` at or above ``high`` and leaves it only below ``low``."""
    pressure = UNKNOWN
    seen = []
    for value in values:
        pressure = assess(cpu(value), THRESHOLDS, pressure)
        seen.append(pressure.level)
    assert seen == levels


def test_each_dimension_has_its_own_thresholds_and_the_level_is_any_of_them() -> None:
    """The level is high while any dimension is; ``high_dimensions`` names which."""
    thresholds = {**DEFAULT_THRESHOLDS, "memory": gb.Threshold(high=0.5, low=0.4), "gpu_memory": gb.Threshold(0.5, 0.1)}
    gpus = [gb.GpuReading(0, "a", 0.2, 6, 10), gb.GpuReading(1, "b", None, 0, 10)]
    pressure = assess(gb.Reading(cpu=0.95, memory=0.45, gpus=gpus), thresholds)
    assert pressure.high_dimensions == {"cpu"}
    pressure = assess(gb.Reading(cpu=0.5, memory=0.55, gpus=gpus), thresholds, pressure)
    assert pressure.high_dimensions == {"memory"} and pressure.level == "high"
    assert pressure.gpu == pytest.approx(0.2)  # the device without a figure (MIG) is left out, not an error
    assert pressure.gpu_memory == pytest.approx(0.3)


def test_memory_counts_swap() -> None:
    """Memory is high when RAM or swap is nearly all taken; no swap at all is no pressure."""
    assert assess(gb.Reading(memory=0.3, swap=0.95), DEFAULT_THRESHOLDS).high_dimensions == {"memory"}
    assert assess(gb.Reading(memory=0.3, swap=None), DEFAULT_THRESHOLDS).memory == pytest.approx(0.3)


def test_gpus_add_up() -> None:
    """``gpu`` is the mean utilisation of the devices that report one; ``gpu_memory`` used over total."""
    reading = gb.Reading(
        gpus=[gb.GpuReading(0, "a", 1.0, 9, 10, 4), gb.GpuReading(1, "b", 0.0, 1, 30, None)],
    )
    assert reading.gpu == pytest.approx(0.5)
    assert reading.gpu_memory == pytest.approx(10 / 40)
    assert reading.process_gpu_memory == 4
    assert gb.Reading().gpu is None and gb.Reading().gpu_memory is None and gb.Reading().process_gpu_memory is None


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: gb.Reading(cpu=1.5), "cpu"),
        (lambda: gb.Reading(memory=-0.01), "memory"),
        (lambda: gb.Reading(swap=math.nan), "swap"),
        (lambda: gb.Reading(cpu=85), "cpu"),  # percent, not the 0..1 scale
        (lambda: gb.Reading(gpus=[gb.GpuReading(3, "x", 2.0, 1, 2)]), r"gpus\[3\].utilization"),
        (lambda: gb.Pressure(gpu_memory=1.01), "gpu_memory"),
        (lambda: gb.Pressure(high_dimensions={"disk"}), "disk"),
        (lambda: gb.Threshold(high=1.2, low=0.5), "threshold high"),
        (lambda: gb.Threshold(high=0.5, low=0.7), "low"),
        (lambda: lab_grid(pressure_thresholds={"cpu": (0.9, -1)}), r"pressure_thresholds\['cpu'\].low"),
        (lambda: lab_grid(pressure_thresholds={"disk": (0.9, 0.5)}), "no dimension 'disk'"),
        (lambda: lab_grid(pressure_thresholds={"cpu": 0.9}), r"pressure_thresholds\['cpu'\]"),
        (lambda: lab_grid(pressure_interval=0), "pressure_interval"),
        (lambda: lab_grid(pressure_interval=math.inf), "pressure_interval"),
        (lambda: lab_grid(probe="psutil"), "probe must be a gridboost.Probe"),
    ],
)
def test_one_scale_everywhere(make: Any, field: str) -> None:
    """Fractions outside 0..1, unknown dimensions and bad settings are refused with an InvalidRequest naming the field."""
    with pytest.raises(gb.InvalidRequest, match=field):
        make()


async def test_thresholds_are_configurable_per_dimension() -> None:
    """``pressure_thresholds`` replaces the named dimensions' thresholds and keeps the defaults of the rest."""
    async with lab_grid(pressure_thresholds={"cpu": (0.5, 0.25), "gpu": gb.Threshold(0.99, 0.9)}) as grid:
        assert grid.pressure_thresholds["cpu"] == gb.Threshold(high=0.5, low=0.25)
        assert grid.pressure_thresholds["gpu"] == gb.Threshold(high=0.99, low=0.9)
        assert grid.pressure_thresholds["memory"] == gb.DEFAULT_THRESHOLDS["memory"]


# -- the monitor ---------------------------------------------------------------------------


class Changes:
    """Records ``gridboost_pressure_changed`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[gb.Pressure, gb.Pressure]] = []

    @gb.hookimpl
    def gridboost_pressure_changed(self, grid: gb.Grid, old: gb.Pressure, new: gb.Pressure) -> None:
        self.calls.append((old, new))


async def test_a_scripted_sequence_gives_exactly_its_changes() -> None:
    """Readings fed in order produce the changes hysteresis says, to the observer hook and to the iterator alike."""
    values = [0.1, 0.85, 0.9, 0.7, 0.65, 0.5, 0.2, 0.95]
    probe = ScriptedProbe([cpu(v) for v in values])
    observer = Changes()
    async with lab_grid(probe=probe, plugins=[observer], pressure_thresholds=LINE) as grid:
        changes = grid.pressure_changes()
        seen: list[tuple[str, float | None]] = []
        with anyio.fail_after(WAIT):
            async for pressure in changes:
                seen.append((pressure.level, pressure.cpu))
                if len(seen) == 3:
                    break
        await changes.aclose()
        assert seen == [("high", 0.85), ("ok", 0.5), ("high", 0.95)]
        await probe.wait_reads(len(values) + 2)  # the last reading again and again: no more changes
        stats = grid.stats()
    assert [(old.level, new.level, new.cpu) for old, new in observer.calls] == [
        ("ok", "high", 0.85),
        ("high", "ok", 0.5),
        ("ok", "high", 0.95),
    ]
    assert stats["pressure.changes"] == 3
    assert observer.calls[0][0] == gb.Pressure(cpu=0.1, memory=0.1)


async def test_pressure_waits_for_the_first_reading_and_starts_the_monitor() -> None:
    """``await grid.pressure()`` starts the monitor on first need and returns a real first reading."""
    probe = ScriptedProbe([gb.Reading(cpu=0.42, memory=0.5, swap=0.1)])
    async with lab_grid(probe=probe) as grid:
        assert not grid._monitor.started and grid.latest_pressure == gb.Pressure()
        pressure = await grid.pressure()
        assert (pressure.cpu, pressure.memory, pressure.gpu, pressure.gpu_memory) == (0.42, 0.5, None, None)
        assert pressure.level == "ok" and pressure.reading is not None and pressure.taken_at is not None
        assert grid.latest_pressure == pressure
        assert str(pressure) == "ok (cpu=42%, memory=50%)"


async def test_a_failing_probe_is_a_typed_error_and_the_grid_goes_on() -> None:
    """A probe that raises makes ``pressure()`` raise ProbeError chained to it; once it reads again, all is well."""

    class Flaky(gb.Probe):
        def __init__(self) -> None:
            self.calls = 0

        def read(self) -> gb.Reading:
            self.calls += 1
            if self.calls <= 2:
                raise OSError("sensor unplugged")
            return cpu(0.3)

    probe = Flaky()
    async with lab_grid(probe=probe) as grid:
        with pytest.raises(gb.ProbeError, match="sensor unplugged") as info:
            await grid.pressure()
        assert isinstance(info.value.__cause__, OSError)
        assert await grid.offload(abs, -1) == 1
        with anyio.fail_after(WAIT):
            while grid.latest_pressure.cpu is None:
                await anyio.sleep(0.01)
        assert (await grid.pressure()).cpu == 0.3
        assert grid.stats()["probe_errors"] == 2


async def test_a_probe_returning_junk_is_a_typed_error() -> None:
    """A probe that returns something other than a Reading is a ProbeError that names what it returned."""

    class Junk(gb.Probe):
        def read(self) -> gb.Reading:
            return {"cpu": 0.5}  # type: ignore[return-value]

    async with lab_grid(probe=Junk()) as grid:
        with pytest.raises(gb.ProbeError, match=r"Junk.read\(\) returned \{'cpu': 0.5\}, not a Reading"):
            await grid.pressure()


async def test_the_changes_iterator_is_bounded_and_cancel_safe() -> None:
    """A reader that falls behind keeps the newest changes; a cancelled wait loses none; the count of dropped is kept."""
    gate = threading.Event()
    probe = ScriptedProbe([cpu(v) for v in (0.9, 0.1, 0.9, 0.1, 0.9)])
    async with lab_grid(probe=probe, pressure_thresholds=LINE) as grid:
        async with grid.pressure_changes(buffer=2) as changes:
            await probe.wait_reads(5)
            assert changes.dropped == 3
            assert [p.level for p in [await changes.__anext__(), await changes.__anext__()]] == ["ok", "high"]
            with anyio.move_on_after(0.05) as scope:
                await changes.__anext__()  # nothing more comes: the wait is cancelled
            assert scope.cancelled_caught
        with pytest.raises(gb.InvalidRequest, match="buffer"):
            grid.pressure_changes(buffer=0)
    gate.set()


async def test_the_changes_iterator_ends_when_the_grid_closes() -> None:
    """A reader waiting in ``async for`` ends cleanly when the grid closes, and pressure is refused after."""
    ended = anyio.Event()

    async def read(changes: gb.PressureChanges) -> None:
        async for _ in changes:
            pass
        ended.set()

    async with anyio.create_task_group() as tg:
        async with lab_grid() as grid:
            tg.start_soon(read, grid.pressure_changes())
            await grid.pressure()
        with anyio.fail_after(WAIT):
            await ended.wait()
    with pytest.raises(gb.GridClosed):
        await grid.pressure()
    with pytest.raises(gb.GridClosed):
        grid.pressure_changes()


async def test_teardown_stops_the_monitor_and_closes_the_probe() -> None:
    """Leaving the grid stops the sampling loop and closes the probe, after the last reading."""
    probe = ScriptedProbe([cpu(0.2)])
    async with lab_grid(probe=probe) as grid:
        await grid.pressure()
        await probe.wait_reads(3)
    reads = probe.reads
    assert probe.closed
    await anyio.sleep(0.05)
    assert probe.reads == reads  # nothing reads any more


async def test_a_probe_stuck_in_a_read_is_named_at_teardown() -> None:
    """A probe whose read never returns does not hang teardown: it is named in TeardownError, and not closed under it."""
    block = threading.Event()
    probe = ScriptedProbe([cpu(0.2)], block=block)
    try:
        with anyio.fail_after(WAIT), pytest.raises(gb.TeardownError, match="pressure probe") as info:
            async with lab_grid(probe=probe, teardown_timeout=0.2) as grid:
                grid._monitor.start()
                with anyio.fail_after(WAIT):
                    while not probe.reading.is_set():
                        await anyio.sleep(0.005)
        assert any("ScriptedProbe" in item and "still reading" in item for item in info.value.leftovers)
        assert not probe.closed
    finally:
        block.set()


async def test_an_observer_starts_the_monitor_with_the_grid() -> None:
    """A grid with a ``gridboost_pressure_changed`` observer samples from the start; without one, only on need."""
    async with lab_grid(plugins=[Changes()]) as grid:
        assert grid._monitor.started
    async with lab_grid() as grid:
        assert not grid._monitor.started


# -- the real probe -------------------------------------------------------------------------

HAS_GPU = bool(_nvml.inventory())


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU that NVML sees; the no-GPU behaviour is checked elsewhere")
async def test_without_nvml_the_real_probe_says_no_gpu() -> None:
    """Here NVML's library is absent: the real probe reads CPU and memory, and reports no GPU, without error or warning."""
    probe = gb.SystemProbe()
    try:
        first = await anyio.to_thread.run_sync(probe.read)
        second = await anyio.to_thread.run_sync(probe.read)
    finally:
        probe.close()
    for reading in (first, second):
        assert reading.gpus == () and reading.gpu is None and reading.gpu_memory is None
        assert reading.cpu is not None and 0 <= reading.cpu <= 1
        assert reading.memory is not None and 0 < reading.memory <= 1
    assert _nvml.inventory() == [] and _nvml.process_memory() == {}


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU that NVML sees")
async def test_the_default_probe_on_a_grid_has_no_gpu_dimension_here() -> None:
    """A grid with the default probe reports cpu and memory, and leaves the GPU dimensions unknown."""
    async with gb.Grid(capacity="cpu=1") as grid:
        pressure = await grid.pressure()
    assert pressure.cpu is not None and pressure.memory is not None
    assert pressure.gpu is None and pressure.gpu_memory is None and "gpu" not in pressure.high_dimensions


_ALLOCATE = textwrap.dedent(
    """
    import ctypes, sys
    cuda = ctypes.CDLL(sys.argv[1])
    size = int(sys.argv[2])
    device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    for call in (lambda: cuda.cuInit(0), lambda: cuda.cuDeviceGet(ctypes.byref(device), 0),
                 lambda: cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device),
                 lambda: cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size))):
        status = call()
        if status:
            sys.exit(f"CUDA driver call failed with status {status}")
    print("allocated", flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAS_GPU, reason="needs a GPU that NVML can see; here NVML finds none (its library, driver or device is missing)"
)
def test_allocating_gpu_memory_raises_gpu_memory_pressure() -> None:
    """A child process that allocates GPU memory shows in the process tree's GPU memory and raises gpu_memory pressure."""
    library = ctypes.util.find_library("cuda") or "libcuda.so.1"
    size = 1 << 30
    probe = gb.SystemProbe()
    try:
        before = probe.read()
        assert before.gpus and before.gpu_memory is not None
        device = before.gpus[0]
        assert device.memory_total is not None and device.memory_used is not None
        # High just above what is used now: the allocation must cross it.
        line = min(1.0, (device.memory_used + size / 2) / device.memory_total)
        thresholds = {**DEFAULT_THRESHOLDS, "gpu_memory": gb.Threshold(high=line, low=line)}
        assert "gpu_memory" not in assess(before, thresholds).high_dimensions
        child = subprocess.Popen(
            [sys.executable, "-c", _ALLOCATE, library, str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "allocated"
            after = probe.read()
        finally:
            child.communicate("\n", timeout=WAIT)
    finally:
        probe.close()
    assert after.gpu_memory is not None and after.gpu_memory > before.gpu_memory
    assert (after.process_gpu_memory or 0) >= size + (before.process_gpu_memory or 0)  # the child is in our tree
    assert "gpu_memory" in assess(after, thresholds, assess(before, thresholds)).high_dimensions
