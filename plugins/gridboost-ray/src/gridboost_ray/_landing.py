"""Results of Ray tasks, handed to an asyncio event loop a batch at a time.

``await ref`` costs, for every ref, a ``concurrent.futures.Future`` (with its lock and condition), an asyncio future
chained to it, and one wake-up of the event loop (a write to its self-pipe) from Ray's callback thread. With
thousands of tasks in flight that is most of what the driver spends per task after submitting it. Here Ray's
callback queues the result, the first one since the loop last looked wakes it once for all that arrived meanwhile,
and each run awaits a bare future of the loop: one wake-up per batch, no chained futures.

This uses ``ObjectRef._on_completed``, what ``ObjectRef.future()`` and ``await ref`` are built on in every Ray
release with asyncio support; where a Ray lacks it, :func:`landing` returns ``None`` and runs ``await ref``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from functools import partial
from typing import Any

__all__ = ["Landing", "landing"]


class Landing:
    """Futures of one event loop, completed from Ray's callback thread in batches."""

    __slots__ = ("_arrived", "_error", "_lock", "_task_error", "_woken", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from ray.exceptions import RayError, RayTaskError

        self.loop = loop
        self._task_error, self._error = RayTaskError, RayError
        self._lock = threading.Lock()
        self._arrived: list[tuple[asyncio.Future[Any], Any]] = []
        self._woken = False

    def watch(self, ref: Any) -> asyncio.Future[Any]:
        """A future of the loop that gets ``ref``'s value, or the exception ``await ref`` would raise."""
        future = self.loop.create_future()
        # The callback holds the ref until it is called, as Ray's own future does: a run cancelled meanwhile drops its
        # own, and the object must not be released while Ray still completes it.
        ref._on_completed(partial(self._arrive, future, ref))
        return future

    def _arrive(self, future: asyncio.Future[Any], _ref: Any, result: Any) -> None:
        # On Ray's thread. The lock makes "queue it, and wake the loop unless already woken" one step: two of Ray's
        # threads completing at once must not both assume the other woke it.
        with self._lock:
            self._arrived.append((future, result))
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits these any more
            self.loop.call_soon_threadsafe(self._land)

    def _land(self) -> None:
        with self._lock:
            arrived, self._arrived, self._woken = self._arrived, [], False
        for future, result in arrived:
            if future.done():  # cancelled while Ray ran it: its run has moved on
                continue
            # As Ray's own future helper does: a task's error re-raised as its cause's type, other Ray errors as is.
            if isinstance(result, self._task_error):
                future.set_exception(result.as_instanceof_cause())
            elif isinstance(result, self._error):
                future.set_exception(result)
            else:
                future.set_result(result)


def landing(loop: asyncio.AbstractEventLoop) -> Landing | None:
    """A :class:`Landing` for ``loop``, or ``None`` where this Ray has no ``ObjectRef._on_completed``."""
    from ray import ObjectRef

    return Landing(loop) if callable(getattr(ObjectRef, "_on_completed", None)) else None
