"""A chunk of ``grid.map`` as a worker runs it: one engine task that calls the function on each of its items.

Named for where it runs — in a worker of the engine, or a thread of the local backend. It imports only the standard
library so that a backend can ship it to the workers *by value*, as it ships :mod:`gridboost.worker_command`::

    from gridboost import worker_chunk

    cloudpickle.register_pickle_by_value(worker_chunk)  # the engine's cloudpickle (Ray: ray.cloudpickle)

* :class:`Chunk` — ``Chunk(fn)(*items)`` calls ``fn(item)`` for each item and returns, for each, ``(True, result)``
  or ``(False, exception)``, with the seconds the calls took: one item's exception leaves the others to run and
  deliver, and crosses back to the host with its own type. ``Chunk(fn, star=True)`` calls ``fn(*item)``: each item
  is a tuple of arguments, as ``Executor.map`` over several iterables gives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Chunk", "Outcomes"]

#: What a chunk returns: each item's ``(ok, result or exception)``, in order, and the seconds its calls took.
Outcomes = tuple[list[tuple[bool, Any]], float]


class Chunk:
    """``fn`` over a list of items, as one task; named after ``fn`` in the engine's task table (``fn[chunk]``)."""

    def __init__(self, fn: Callable[..., Any], star: bool = False) -> None:
        self.fn = fn
        self.star = star
        self.__qualname__ = f"{getattr(fn, '__qualname__', None) or type(fn).__qualname__}[chunk]"

    def __call__(self, *items: Any) -> Outcomes:
        # The items are the task's own arguments, not one list: an engine resolves parked data (a Ray ObjectRef, a
        # Dask Future) where it is a whole argument.
        fn = self.fn
        star = self.star
        outcomes: list[tuple[bool, Any]] = []
        started = time.perf_counter()
        for item in items:
            try:
                outcomes.append((True, fn(*item) if star else fn(item)))
            except Exception as exc:  # that item's failure only; cancellation and KeyboardInterrupt end the chunk
                outcomes.append((False, exc))
        return outcomes, time.perf_counter() - started

    def __reduce__(self) -> tuple[Any, ...]:
        return (Chunk, (self.fn, self.star))
