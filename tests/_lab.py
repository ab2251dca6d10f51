"""Shared by the placement, pressure, moves and advisor tests: a stand-in cluster and a probe that reads from a script.

``Lab`` is the local backend's accounting and threads, reported as remote, so the grid gets a separate host (with
``local_capacity``) and the whole placement policy applies. ``ScriptedProbe`` implements the probe interface and
returns exact readings, in order; nothing here patches psutil or NVML.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import anyio

import gridboost as gb
from gridboost._local import LocalBackend

WAIT = 20.0  # every bounded wait of these tests


class Lab(LocalBackend):
    """A stand-in cluster for these tests: local accounting, but reported as remote, so the host is a separate machine."""

    name = "lab"

    @property
    def capabilities(self) -> gb.abc.Capabilities:
        return gb.abc.Capabilities(remote=True)


class LabPlugin:
    @gb.hookimpl
    def gridboost_backends(self) -> Iterator[gb.BackendSpec]:
        yield gb.BackendSpec("lab", Lab, options={"capacity": "the lab's capacity"})


class ScriptedProbe(gb.Probe):
    """Returns its readings in order, then the last one again and again; counts reads and says when it was closed."""

    def __init__(self, readings: Sequence[gb.Reading], *, block: threading.Event | None = None) -> None:
        assert readings
        self._readings = list(readings)
        self._block = block
        self.reads = 0
        self.closed = False
        self.reading = threading.Event()  # set while a read is in progress

    def read(self) -> gb.Reading:
        self.reading.set()
        try:
            if self._block is not None:
                self._block.wait(WAIT)
            reading = self._readings[min(self.reads, len(self._readings) - 1)]
            self.reads += 1
            return reading
        finally:
            self.reading.clear()

    def close(self) -> None:
        self.closed = True

    async def wait_reads(self, n: int) -> None:
        with anyio.fail_after(WAIT):
            while self.reads < n:
                await anyio.sleep(0.005)


def calm() -> ScriptedProbe:
    """A machine with nothing to worry about."""
    return ScriptedProbe([gb.Reading(cpu=0.1, memory=0.2)])


def lab_grid(
    lab: str = "cpu=8",
    local: str = "cpu=2",
    *,
    probe: gb.Probe | None = None,
    plugins: Sequence[object] = (),
    **kw: object,
) -> gb.Grid:
    """A grid on the lab (``lab`` capacity) with a host of ``local`` capacity, no queue at the lab, and a calm probe."""
    kw.setdefault("pressure_interval", 0.01)
    kw.setdefault("cluster_queue", 0)  # exact room, unless a test is about the queue
    return gb.Grid(
        "lab",
        plugins=[LabPlugin(), *plugins],
        capacity=lab,
        local_capacity=local,
        probe=probe if probe is not None else calm(),
        **kw,  # type: ignore[arg-type]
    )


def hold(gate: threading.Event) -> str:
    """Run as a task: wait for the gate (bounded), then say which thread ran it."""
    gate.wait(WAIT)
    return threading.current_thread().name


def quick(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class QueueHere:
    """A placement plugin that sends every automatic task to wait for local capacity, as when there is no room elsewhere."""

    @gb.hookimpl
    def gridboost_choose_placement(self, task: gb.TaskSpec) -> gb.Placement:
        return gb.Placement("local", "the test queues everything here", waiting=True)


async def settle(check: object, what: str) -> None:
    """Wait (bounded) until ``check()`` is true."""
    with anyio.move_on_after(WAIT):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"after {WAIT:g}s: {what}")
