"""Probes: what this machine's load is now. One interface, so tests can feed exact sequences.

The grid calls a probe from a worker thread (never on the event loop), once per
``pressure_interval``; a probe may block for as long as a reading takes.
"""

from __future__ import annotations

import abc
import os
import time
from typing import Any

from attrs import field, frozen

from ._checks import unit_fraction
from ._nvml import GpuReading, NvmlSession
from ._text import shown
from .exceptions import InvalidRequest

__all__ = ["GpuReading", "Probe", "Reading", "SystemProbe"]

# psutil's first cpu_percent() says 0.0: it has nothing to compare with. A reading over
# less than this many seconds is mostly noise, so the first one waits until it is real.
_MIN_WINDOW = 0.1


def _validated(name: str) -> Any:
    return lambda _instance, _attribute, value: unit_fraction(name, value)


def _gpus(value: Any) -> tuple[GpuReading, ...]:
    gpus = tuple(value)
    for gpu in gpus:
        if not isinstance(gpu, GpuReading):
            raise InvalidRequest(f"gpus must hold GpuReading records, got {shown(gpu)}")
        unit_fraction(f"gpus[{gpu.index}].utilization", gpu.utilization)
    return gpus


@frozen
class Reading:
    """What a probe saw: CPU, memory and swap in use (fractions, 0..1) and each GPU; ``None`` is unknown.

    ``gpu`` and ``gpu_memory`` add the devices up: the mean utilisation of the devices
    that report one, and memory used over memory total of those that report both.
    """

    cpu: float | None = field(default=None, validator=_validated("cpu"))
    memory: float | None = field(default=None, validator=_validated("memory"))
    swap: float | None = field(default=None, validator=_validated("swap"))
    gpus: tuple[GpuReading, ...] = field(default=(), converter=_gpus)

    @property
    def gpu(self) -> float | None:
        known = [g.utilization for g in self.gpus if g.utilization is not None]
        return sum(known) / len(known) if known else None

    @property
    def gpu_memory(self) -> float | None:
        both = [(g.memory_used, g.memory_total) for g in self.gpus if g.memory_used is not None and g.memory_total]
        if not both:
            return None
        return min(1.0, sum(u for u, _ in both) / sum(t for _, t in both))

    @property
    def process_gpu_memory(self) -> int | None:
        """Bytes of GPU memory this process and its children hold, over every device (``None``: unknown)."""
        known = [g.process_memory for g in self.gpus if g.process_memory is not None]
        return sum(known) if known else None


class Probe(abc.ABC):
    """Reads this machine's load. Blocking is fine: the grid calls it from a worker thread.

    Subclass it to feed the grid readings of your own (a test's exact sequence, a
    cgroup's limits, a remote agent). ``read`` is never called twice at once.
    """

    @abc.abstractmethod
    def read(self) -> Reading:
        """One reading, now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Let go of what the probe holds (NVML, say). Called once at teardown, after the last ``read``."""


def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, counted as psutil's ``cpu_percent`` counts them."""
    import psutil  # where used: not importing it keeps `import gridboost` cheap (tests/test_import_cost.py)

    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)  # already in user/nice
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


class SystemProbe(Probe):
    """This machine: psutil for CPU, memory and swap; NVML for GPUs (none where NVML or its driver is missing).

    CPU is measured from the probe's own baseline (not psutil's shared one), taken
    when the probe is made, so the first reading is real and other ``cpu_percent``
    callers in the process do not disturb it.
    """

    def __init__(self, *, gpus: bool = True) -> None:
        import psutil

        self._nvml = NvmlSession() if gpus else None
        self._me = psutil.Process(os.getpid())
        self._last = _cpu_times()
        self._last_at = time.monotonic()

    def read(self) -> Reading:
        early = _MIN_WINDOW - (time.monotonic() - self._last_at)
        if early > 0:
            time.sleep(early)
        busy, total = _cpu_times()
        cpu = None if total <= self._last[1] else (busy - self._last[0]) / (total - self._last[1])
        self._last, self._last_at = (busy, total), time.monotonic()
        import psutil

        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        return Reading(
            cpu=None if cpu is None else min(1.0, max(0.0, cpu)),
            memory=min(1.0, max(0.0, (memory.total - memory.available) / memory.total)) if memory.total else None,
            swap=min(1.0, swap.used / swap.total) if swap.total else None,
            gpus=self._nvml.read(self._tree) if self._nvml is not None else (),
        )

    def _tree(self) -> list[int]:
        import psutil

        try:
            return [self._me.pid, *(child.pid for child in self._me.children(recursive=True))]
        except psutil.Error:
            return [self._me.pid]

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
