"""Pressure: local utilisation per dimension, a level with hysteresis, and the loop that samples it.

One scale everywhere: utilisation and thresholds are fractions in 0..1. A dimension
*enters* ``high`` at or above its ``high`` threshold and *leaves* it only below its
``low`` one, so a value hovering at the line does not flap. The level is ``high``
while any dimension is.

The monitor is a background loop of the grid, started on first need (``await
grid.pressure()``, ``grid.pressure_changes()``, an automatic placement on a remote
backend, a ``gridboost_pressure_changed`` observer) and stopped at teardown, which
also waits, bounded, for a reading in flight and then closes the probe.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
from attrs import field, frozen

from ._checks import unit_fraction, whole
from ._kit import seconds, shown
from ._probes import Probe, Reading, SystemProbe
from .exceptions import GridClosed, InvalidRequest, ProbeError

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["DEFAULT_THRESHOLDS", "DIMENSIONS", "Monitor", "Pressure", "PressureChanges", "Threshold", "assess"]

DIMENSIONS = ("cpu", "memory", "gpu", "gpu_memory")


def _fraction(name: str) -> Any:
    return lambda _instance, attribute, value: unit_fraction(f"{name}{attribute.name}", value)


@frozen
class Threshold:
    """Enter ``high`` at or above ``high``; leave it below ``low`` (both 0..1, ``low <= high``)."""

    high: float = field(validator=_fraction("threshold "))
    low: float = field(validator=_fraction("threshold "))

    def __attrs_post_init__(self) -> None:
        if self.high is None or self.low is None:
            raise InvalidRequest(
                f"a threshold needs both high and low, got high={shown(self.high)} low={shown(self.low)}"
            )
        if self.low > self.high:
            raise InvalidRequest(f"threshold low ({shown(self.low)}) must not be above high ({shown(self.high)})")


#: CPU and GPU busy at 85 % is a full machine for new work; memory is left a little later,
#: since much of what is "used" is cache the kernel gives back.
DEFAULT_THRESHOLDS: Mapping[str, Threshold] = MappingProxyType(
    {
        "cpu": Threshold(high=0.85, low=0.70),
        "memory": Threshold(high=0.90, low=0.80),
        "gpu": Threshold(high=0.85, low=0.70),
        "gpu_memory": Threshold(high=0.90, low=0.80),
    }
)


def coerce_thresholds(value: object) -> Mapping[str, Threshold]:
    """The defaults, with the dimensions ``value`` names replaced: a ``Threshold`` or a ``(high, low)`` pair each."""
    if value is None:
        return DEFAULT_THRESHOLDS
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"pressure_thresholds must map dimensions to Threshold(high, low), got {shown(value)}")
    chosen = dict(DEFAULT_THRESHOLDS)
    for name, given in value.items():
        if name not in DIMENSIONS:
            raise InvalidRequest(
                f"pressure_thresholds has no dimension {shown(name)}; they are {', '.join(DIMENSIONS)}"
            )
        if isinstance(given, Threshold):
            chosen[name] = given
        elif isinstance(given, tuple | list) and len(given) == 2:
            chosen[name] = Threshold(
                high=unit_fraction(f"pressure_thresholds[{name!r}].high", given[0]),  # type: ignore[arg-type]
                low=unit_fraction(f"pressure_thresholds[{name!r}].low", given[1]),  # type: ignore[arg-type]
            )
        else:
            raise InvalidRequest(
                f"pressure_thresholds[{shown(name)}] must be a Threshold or (high, low), got {shown(given)}"
            )
    return MappingProxyType(chosen)


def _dimensions(value: Iterable[str]) -> frozenset[str]:
    names = frozenset(value)
    unknown = sorted(names - set(DIMENSIONS))
    if unknown:
        raise InvalidRequest(f"high_dimensions names no dimension {', '.join(unknown)}; they are {DIMENSIONS}")
    return names


@frozen
class Pressure:
    """This machine's utilisation per dimension (0..1; ``None`` where unknown, as GPUs are without NVML) and its level.

    ``high_dimensions`` are the dimensions above their threshold (with hysteresis);
    ``level`` is ``"high"`` while there is any. ``reading`` is the probe's reading
    behind it, with every GPU; ``taken_at`` is ``time.monotonic()`` when it was read.
    """

    cpu: float | None = field(default=None, validator=_fraction(""))
    memory: float | None = field(default=None, validator=_fraction(""))
    gpu: float | None = field(default=None, validator=_fraction(""))
    gpu_memory: float | None = field(default=None, validator=_fraction(""))
    high_dimensions: frozenset[str] = field(factory=frozenset, converter=_dimensions)
    reading: Reading | None = field(default=None, eq=False)
    taken_at: float | None = field(default=None, eq=False)

    @property
    def level(self) -> Literal["ok", "high"]:
        return "high" if self.high_dimensions else "ok"

    def value(self, dimension: str) -> float | None:
        if dimension not in DIMENSIONS:
            raise InvalidRequest(f"no pressure dimension {shown(dimension)}; they are {', '.join(DIMENSIONS)}")
        value: float | None = getattr(self, dimension)
        return value

    def __str__(self) -> str:
        parts = [f"{d}={v:.0%}" for d in DIMENSIONS if (v := getattr(self, d)) is not None]
        return f"{self.level} ({', '.join(parts) or 'unknown'})"


#: Before the first reading: nothing known, nothing high.
UNKNOWN = Pressure()


def assess(reading: Reading, thresholds: Mapping[str, Threshold], previous: Pressure = UNKNOWN) -> Pressure:
    """The pressure a reading means, given the thresholds and the pressure before it (for hysteresis)."""
    values = {
        "cpu": reading.cpu,
        # Including swap: a machine whose RAM *or* swap is nearly all taken is out of memory.
        "memory": None if reading.memory is None else max(reading.memory, reading.swap or 0.0),
        "gpu": reading.gpu,
        "gpu_memory": reading.gpu_memory,
    }
    high = set()
    for name, value in values.items():
        if value is None:
            continue  # unknown is never high
        threshold = thresholds[name]
        if value >= (threshold.low if name in previous.high_dimensions else threshold.high):
            high.add(name)
    return Pressure(**values, high_dimensions=frozenset(high), reading=reading, taken_at=time.monotonic())


class PressureChanges:
    """``async for pressure in grid.pressure_changes():`` — each change of level or of the dimensions that are high.

    Bounded: it keeps the newest ``buffer`` changes a slow reader has not taken yet,
    dropping the oldest (counted in ``dropped``). Cancelling a wait loses nothing. It
    ends when the grid closes, or at ``aclose()`` (``async with`` does that for you).
    """

    def __init__(self, monitor: Monitor, buffer: int) -> None:
        whole("buffer", buffer, 1)
        self._monitor = monitor
        self._items: deque[Pressure] = deque(maxlen=buffer)
        self._wake: anyio.Event | None = None
        self._closed = False
        #: Changes dropped because the reader fell ``buffer`` behind.
        self.dropped = 0

    def _push(self, pressure: Pressure) -> None:
        if self._closed:
            return
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(pressure)
        if self._wake is not None:
            self._wake.set()

    def _end(self) -> None:
        self._closed = True
        if self._wake is not None:
            self._wake.set()

    def __aiter__(self) -> PressureChanges:
        return self

    async def __anext__(self) -> Pressure:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._wake = anyio.Event()
            await self._wake.wait()
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop listening; a reader waiting in ``async for`` ends."""
        self._monitor._subscribers.discard(self)
        self._end()

    async def __aenter__(self) -> PressureChanges:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Monitor:
    """The sampling loop of one grid: a probe read every ``interval`` seconds, off the event loop."""

    def __init__(self, runtime: Runtime, probe: Probe | None, interval: object, thresholds: object) -> None:
        if probe is not None and not isinstance(probe, Probe):
            raise InvalidRequest(f"probe must be a gridboost.Probe, got {shown(probe)}")
        self._runtime = runtime
        self._probe = probe
        self.interval = seconds("pressure_interval", interval)
        self.thresholds = coerce_thresholds(thresholds)
        self.latest = UNKNOWN
        self.started = False
        self.error: BaseException | None = None
        self.errors = 0
        self.leftover: str | None = None
        self._attempted: anyio.Event | None = None
        # Held by a read in flight; closing takes it, so the probe is never closed under a read.
        self._reading = threading.Lock()
        self._probe_closed = False
        self._subscribers: weakref.WeakSet[PressureChanges] = weakref.WeakSet()

    def start(self) -> None:
        """Start the loop if it is not running yet (first need)."""
        if not self.started and self._runtime.state == "open":
            self.started = True
            self._attempted = anyio.Event()
            self._runtime.spawn(self._run)

    async def current(self) -> Pressure:
        self.start()
        if self._attempted is None:
            raise GridClosed("this grid is closed")
        if not self._attempted.is_set():
            with anyio.move_on_after(max(10.0, 3 * self.interval)):
                await self._attempted.wait()
        if self.latest.taken_at is None:
            if self.error is not None:
                error = self.error
                raise ProbeError(f"the pressure probe failed: {type(error).__name__}: {error}") from error
            raise ProbeError(f"the pressure probe gave no reading within {max(10.0, 3 * self.interval):g}s")
        return self.latest

    def subscribe(self, buffer: int) -> PressureChanges:
        changes = PressureChanges(self, buffer)
        self._subscribers.add(changes)
        self.start()
        return changes

    async def _run(self) -> None:
        probe = self._probe
        try:
            if probe is None:
                probe = self._probe = await anyio.to_thread.run_sync(SystemProbe)
            while True:
                await self._sample(probe)
                await anyio.sleep(self.interval)
        finally:
            with anyio.CancelScope(shield=True):
                if probe is not None:
                    await self._close(probe)
                for changes in list(self._subscribers):
                    changes._end()

    async def _sample(self, probe: Probe) -> None:
        try:
            reading = await anyio.to_thread.run_sync(self._read, probe, abandon_on_cancel=True)
            if not isinstance(reading, Reading):
                raise ProbeError(f"{type(probe).__name__}.read() returned {shown(reading)}, not a Reading")
        except Exception as exc:
            self.errors += 1
            if self.error is None:  # once per run of failures: a broken probe must not flood the log
                self._runtime.log_error("the pressure probe failed", exc)
            self.error = exc
        else:
            self.error = None
            self._update(assess(reading, self.thresholds, self.latest))
        finally:
            assert self._attempted is not None
            self._attempted.set()

    def _read(self, probe: Probe) -> Reading:
        with self._reading:
            if self._probe_closed:  # abandoned at teardown before it began
                raise GridClosed("the pressure probe is closed")
            return probe.read()

    def _update(self, new: Pressure) -> None:
        old, self.latest = self.latest, new
        if old.high_dimensions == new.high_dimensions and old.taken_at is not None:
            return
        if old.taken_at is None and not new.high_dimensions:
            return  # the first reading is a change only when it is already high
        runtime = self._runtime
        runtime.counts["pressure.changes"] += 1
        if runtime.state == "open":
            runtime.observers.notify("gridboost_pressure_changed", old=old, new=new)
        for changes in list(self._subscribers):
            changes._push(new)

    async def _close(self, probe: Probe) -> None:
        timeout = self._runtime.settings.teardown_timeout
        with anyio.move_on_after(timeout + 1):
            try:
                closed = await anyio.to_thread.run_sync(self._close_when_idle, probe, timeout, abandon_on_cancel=True)
            except Exception as exc:
                self.leftover = f"closing the pressure probe failed: {type(exc).__name__}: {exc}"
                return
            if closed:
                return
        self.leftover = f"the pressure probe ({type(probe).__name__}) was still reading after {timeout:g}s"

    def _close_when_idle(self, probe: Probe, timeout: float) -> bool:
        if not self._reading.acquire(timeout=timeout):
            return False
        try:
            self._probe_closed = True
            probe.close()
        finally:
            self._reading.release()
        return True
