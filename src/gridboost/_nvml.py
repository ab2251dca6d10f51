"""What NVML says about this machine's GPUs; "no GPU" where NVML or its driver is missing.

The bindings come from the ``nvidia-ml-py`` distribution (import name ``pynvml``),
never from the deprecated ``pynvml`` distribution, whose import warns.

Every call here blocks: run it from a worker thread. A missing library, driver or
device means "no GPU" (an empty answer), never an exception or a warning; a metric
one device does not support (utilisation on a MIG-enabled GPU, say) is ``None``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

from attrs import frozen

__all__ = ["GpuInfo", "GpuReading", "NvmlSession", "inventory", "process_memory"]

_lock = threading.Lock()  # nvmlInit/Shutdown are reference counted, but not atomically


@frozen
class GpuInfo:
    """One device: its index, name and memory (bytes); ``None`` where the device does not say."""

    index: int
    name: str
    memory_total: int
    memory_used: int | None


@frozen
class GpuReading:
    """One device at an instant: utilisation (0..1), memory (bytes), and what the watched processes hold on it.

    ``None`` is "unknown": the device (or the driver, inside a container) does not report it.
    """

    index: int
    name: str
    utilization: float | None
    memory_used: int | None
    memory_total: int | None
    process_memory: int | None = None


def _load() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


@contextmanager
def _session() -> Iterator[Any | None]:
    pynvml = _load()
    if pynvml is None:
        yield None
        return
    with _lock:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:  # no library, no driver, no device: all mean "no GPU"
            yield None
            return
        try:
            yield pynvml
        finally:
            pynvml.nvmlShutdown()


def _name(nvml: Any, handle: Any) -> str:
    name = nvml.nvmlDeviceGetName(handle)
    return name if isinstance(name, str) else name.decode()


def inventory() -> list[GpuInfo]:
    """The GPUs NVML sees (blocking; call from a thread). Empty when there is none or no NVML."""
    with _session() as nvml:
        if nvml is None:
            return []
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                total, used = int(memory.total), int(memory.used)
            except nvml.NVMLError:  # MIG parents and some vGPUs do not report memory
                total, used = 0, None
            gpus.append(GpuInfo(index, _name(nvml, handle), total, used))
        return gpus


def _process_memory(nvml: Any, handle: Any) -> dict[int, int] | None:
    """pid → bytes on one device, compute and graphics processes together; ``None`` when the device will not say."""
    found: dict[int, int] = {}
    known = False
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            processes = getattr(nvml, query)(handle)
        except (nvml.NVMLError, AttributeError):
            continue
        known = True
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            if isinstance(used, int) and used >= 0:  # NVML says None (or a sentinel) inside containers
                found[int(process.pid)] = found.get(int(process.pid), 0) + used
    return found if known else None


def process_memory() -> dict[int, int]:
    """GPU memory (bytes) each process holds, over every device; empty without NVML or a GPU."""
    with _session() as nvml:
        if nvml is None:
            return {}
        total: dict[int, int] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            for pid, used in (_process_memory(nvml, nvml.nvmlDeviceGetHandleByIndex(index)) or {}).items():
                total[pid] = total.get(pid, 0) + used
        return total


class NvmlSession:
    """NVML kept open between readings, for a sampler that reads every second.

    Opened on the first :meth:`read`; a machine without NVML (or without a GPU) is
    remembered as such and not asked again. Not thread-safe by itself: one reader.
    """

    def __init__(self) -> None:
        self._nvml: Any | None = None
        self._absent = False

    def read(self, pids: Callable[[], Collection[int]] | None = None) -> tuple[GpuReading, ...]:
        """Every device now; ``process_memory`` sums what the processes ``pids()`` names hold on it.

        ``()`` when there is no GPU (``pids`` is then not even called).
        """
        nvml = self._open()
        if nvml is None:
            return ()
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError:  # the driver went away under us (a GPU reset): no GPU until asked again
            self.close()
            return ()
        watched = frozenset(pids()) if pids is not None and count else frozenset()
        return tuple(self._device(nvml, index, watched) for index in range(count))

    def _device(self, nvml: Any, index: int, pids: Collection[int]) -> GpuReading:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            name = _name(nvml, handle)
        except nvml.NVMLError:
            name = f"GPU {index}"
        utilization: float | None
        try:
            utilization = min(1.0, max(0.0, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100))
        except nvml.NVMLError:  # MIG-enabled devices do not report utilisation: unknown, not an error
            utilization = None
        used: int | None
        total: int | None
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used, total = int(memory.used), int(memory.total)
        except nvml.NVMLError:
            used = total = None
        mine: int | None = None
        if pids:
            held = _process_memory(nvml, handle)
            mine = None if held is None else sum(held.get(pid, 0) for pid in pids)
        return GpuReading(index, name, utilization, used, total, mine)

    def _open(self) -> Any | None:
        if self._nvml is not None or self._absent:
            return self._nvml
        nvml = _load()
        if nvml is None:
            self._absent = True
            return None
        with _lock:
            try:
                nvml.nvmlInit()
            except nvml.NVMLError:
                self._absent = True
                return None
        self._nvml = nvml
        return nvml

    def close(self) -> None:
        """Shut NVML down (once), if this session opened it."""
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            with _lock, contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
