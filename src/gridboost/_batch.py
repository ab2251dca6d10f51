"""``grid.map`` in chunks: many items per engine task, results still item by item.

Sending one engine task per item costs the engine's per-task overhead (a Ray task, a
Dask key, a thread hop) for every item; for items of a millisecond that overhead is the
whole cost. A batched map packs items into *chunks*, each one engine task that calls the
function on its items in turn (:class:`gridboost.worker_chunk.Chunk`), and hands the
results back one item at a time.

The chunk size adapts, as joblib's auto-batching does: a few one-item chunks probe first,
the first answer sets the size to what takes :data:`TARGET` seconds of work on the worker,
later ones grow it (at most doubling) or shrink it at once after a chunk slower than
:data:`SLOW`. The time
is the worker's own (the calls, not the queue), so a busy engine does not make chunks
shrink. ``max_in_flight`` bounds the chunks running at once; at most ``max_in_flight``
times :data:`MOST` items wait in memory, whatever the length of the input.

An item's exception reaches the consumer for that item, with its own type, while the
other items of its chunk deliver; ``retries`` re-run only the items that failed, each in
a chunk of its own. A failure of the whole chunk (the engine lost the worker, the task
was cancelled) is each of its items' failure. Cancelling the map cancels its chunks on
the engine, as it cancels single tasks.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Sized
from typing import Any, TypeVar, cast

import anyio

from ._checks import whole
from ._records import Command
from ._spec import check_target
from ._task import _END, TaskHandle, TaskMap
from ._text import shown
from .exceptions import BackendError, GridboostError, InvalidRequest
from .worker_chunk import Chunk, Outcomes

__all__ = ["MOST", "PROBES", "SLOW", "TAPER", "TARGET", "BatchedMap", "Sizer", "make_map"]

T = TypeVar("T")

#: Seconds of work a chunk aims at: long enough that an engine's per-task cost (about a millisecond on Ray and
#: Dask) is a few percent of it, short enough that the last chunks do not leave slots idle for long.
TARGET = 0.1
#: A chunk that took longer than this shrinks the next ones at once.
SLOW = 1.0
#: The most items a chunk holds.
MOST = 1024
#: One-item chunks in flight before the first one is back and the size is known.
PROBES = 4
#: When the number of items is known, no chunk holds more than this fraction of those not yet sent: the last chunks
#: get smaller and smaller, so slots do not idle while a few big ones finish (joblib splits its last batch too).
TAPER = 4


class Sizer:
    """The size of the next chunk: fixed, or adapting to how long chunks take on the worker.

    Until the first chunk is back, nothing is known of the items: a few one-item chunks probe (``probing``), and the
    first answer sets the size at once. Later answers grow it at most twofold (one slow answer must not make chunks
    oscillate), and shrink it at once after a chunk slower than :data:`SLOW`.
    """

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.size = fixed or 1
        self.observed = fixed is not None

    @property
    def probing(self) -> bool:
        return not self.observed

    def observe(self, items: int, seconds: float) -> None:
        if self.fixed is not None or items == 0:
            return
        ideal = MOST if seconds <= 0 else max(1, min(MOST, int(items * TARGET / seconds)))
        if not self.observed:
            self.observed = True
            self.size = ideal
        elif ideal > self.size:
            self.size = min(ideal, 2 * self.size)
        elif seconds > SLOW:
            self.size = ideal


class _Slot:
    """One item of the map: its argument, its tries, and its outcome once known."""

    __slots__ = ("attempts", "item", "outcome")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.attempts = 0
        self.outcome: tuple[bool, Any] | None = None


def _retryable(error: BaseException) -> bool:
    # As single tasks: the user's errors and the engine's failures are retried, gridboost's verdicts are not.
    return isinstance(error, Exception) and (not isinstance(error, GridboostError) or isinstance(error, BackendError))


class BatchedMap(TaskMap[T]):
    """``grid.map(...)`` with ``batch_size`` other than 1: the same iterator, its items run in chunks."""

    def __init__(
        self,
        submit: Callable[..., TaskHandle[Any]],
        fn: Callable[..., T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        max_in_flight: int,
        ordered: bool,
        options: dict[str, Any],
        sizer: Sizer,
    ) -> None:
        super().__init__(submit, fn, items, max_in_flight=max_in_flight, ordered=ordered, options=options)
        self._retries: int = options.pop("retries", 0)
        self._chunk = Chunk(fn)
        self._sizer = sizer
        self._running: dict[TaskHandle[Outcomes], list[_Slot]] = {}
        self._slots: deque[_Slot] = deque()  # ordered: every item not yet delivered, in order
        self._ready: deque[_Slot] = deque()  # unordered: items with an outcome, in the order they got it
        self._again: deque[_Slot] = deque()  # failed items to run once more
        self._waiting = 0  # items submitted and not yet delivered
        self._left = len(items) if isinstance(items, Sized) else None  # items not yet sent, when that is known

    async def _fill(self) -> None:
        while self._again and len(self._running) < self._limit:
            self._send([self._again.popleft()])
        # While the sizer probes, a few one-item chunks go out; the rest wait to be sized from their answer.
        limit = min(self._limit, PROBES) if self._sizer.probing else self._limit
        while not self._exhausted and len(self._running) < limit and self._waiting < self._limit * MOST:
            chunk: list[_Slot] = []
            size = min(self._sizer.size, self._limit * MOST - self._waiting)
            if self._left is not None and self._sizer.fixed is None:
                size = min(size, max(1, -(-self._left // TAPER)))
            while len(chunk) < size:
                if self._items is not None:  # a plain iterable needs no await per item
                    item = next(self._items, _END)
                else:
                    assert self._aitems is not None
                    item = await anext(self._aitems, _END)
                if item is _END:
                    self._exhausted = True
                    break
                slot = _Slot(item)
                chunk.append(slot)
                if self._ordered:
                    self._slots.append(slot)
            if not chunk:
                break
            if self._left is not None:
                self._left -= len(chunk)
            self._waiting += len(chunk)
            self._send(chunk)

    def _send(self, slots: list[_Slot]) -> None:
        for slot in slots:
            slot.attempts += 1
        items = [slot.item for slot in slots]
        handle = cast("TaskHandle[Outcomes]", self._submit(self._chunk, *items, **self._options))
        self._running[handle] = slots
        handle._on_settled(self._on_chunk_done)

    def _on_chunk_done(self, handle: TaskHandle[Outcomes]) -> None:
        slots = self._running.pop(handle)
        error = handle._error
        if error is None:
            outcomes, seconds = handle._result
            self._sizer.observe(len(slots), seconds)
            for slot, outcome in zip(slots, outcomes, strict=True):
                self._settle(slot, outcome)
        else:
            for slot in slots:
                self._settle(slot, (False, error))
        if self._wakeup is not None:
            self._wakeup.set()

    def _settle(self, slot: _Slot, outcome: tuple[bool, Any]) -> None:
        ok, value = outcome
        if not ok and slot.attempts <= self._retries and not self._exhausted_by_cancel and _retryable(value):
            self._again.append(slot)
            return
        slot.outcome = outcome
        if not self._ordered:
            self._ready.append(slot)

    _exhausted_by_cancel = False

    def _delivered(self) -> _Slot | None:
        if self._ordered:
            if self._slots and self._slots[0].outcome is not None:
                return self._slots.popleft()
        elif self._ready:
            return self._ready.popleft()
        return None

    async def __anext__(self) -> T:
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            while True:
                await self._fill()
                slot = self._delivered()
                if slot is not None:
                    break
                if not self._running and not self._again and self._exhausted:
                    raise StopAsyncIteration
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
            self._waiting -= 1
            assert slot.outcome is not None
            ok, value = slot.outcome
            if ok:
                return value  # type: ignore[no-any-return]
            raise value
        except anyio.get_cancelled_exc_class():
            self._abandon()
            raise

    def _abandon(self) -> None:
        self._exhausted = self._exhausted_by_cancel = True
        self._again.clear()
        for handle in list(self._running):
            handle.cancel()

    async def aclose(self) -> None:
        self._abandon()
        with anyio.CancelScope(shield=True):
            for handle in list(self._running):
                await handle._done.wait()
        self._slots.clear()
        self._ready.clear()


def make_map(
    submit: Callable[..., TaskHandle[Any]],
    fn: Callable[..., T],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    max_in_flight: int,
    ordered: bool,
    options: dict[str, Any],
    batch_size: object,
) -> TaskMap[T]:
    """The map ``grid.map`` returns: one task per item (``batch_size=1``), or chunks of a fixed or adapting size.

    ``"auto"`` is one item per task where a chunk cannot keep an item's own bounds: with a ``timeout`` (it bounds
    one item's run) or an ``async def`` function (a chunk calls the function; it does not await it).
    """
    check_target(fn)  # what the spec of each task would refuse, refused now: chunks would only carry it along
    one_by_one = options.get("timeout") is not None or inspect.iscoroutinefunction(fn) or isinstance(fn, Command)
    if batch_size == "auto" and isinstance(batch_size, str):
        sizer = None if one_by_one else Sizer()
    else:
        size = whole("batch_size", batch_size, 1, error=InvalidRequest) if not isinstance(batch_size, str) else 0
        if size < 1:
            raise InvalidRequest(f"batch_size must be 'auto' or a whole number >= 1, got {shown(batch_size)}")
        if size > 1 and one_by_one:
            what = "a timeout bounds one item's run" if options.get("timeout") is not None else "fn is async"
            raise InvalidRequest(f"batch_size={size} runs items in chunks, but {what}: use batch_size=1")
        sizer = None if size == 1 else Sizer(size)
    if sizer is None:
        return TaskMap(submit, fn, items, max_in_flight=max_in_flight, ordered=ordered, options=options)
    return BatchedMap(
        submit, fn, items, max_in_flight=max_in_flight, ordered=ordered, options=dict(options), sizer=sizer
    )
