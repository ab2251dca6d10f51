"""What NVML says about this machine's GPUs; "no GPU" where NVML or its driver is missing.

The bindings come from the ``nvidia-ml-py`` distribution (import name ``pynvml``),
never from the deprecated ``pynvml`` distribution, whose import warns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from attrs import frozen

__all__ = ["GpuInfo", "inventory"]

_lock = threading.Lock()  # nvmlInit/Shutdown are reference counted, but not atomically


@frozen
class GpuInfo:
    """One device: its index, name and memory (bytes); ``None`` where the device does not say."""

    index: int
    name: str
    memory_total: int
    memory_used: int | None


@contextmanager
def _session() -> Iterator[Any | None]:
    try:
        import pynvml
    except ImportError:
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


def inventory() -> list[GpuInfo]:
    """The GPUs NVML sees (blocking; call from a thread). Empty when there is none or no NVML."""
    with _session() as nvml:
        if nvml is None:
            return []
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                total, used = int(memory.total), int(memory.used)
            except nvml.NVMLError:  # MIG parents and some vGPUs do not report memory
                total, used = 0, None
            gpus.append(GpuInfo(index, name if isinstance(name, str) else name.decode(), total, used))
        return gpus
