"""Work in flight: the run record the grid cancels, the awaitable handle, and ``grid.map``."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._checks import whole
from ._spec import Placement, TaskSpec
from ._text import shown
from .exceptions import InvalidRequest, TaskCancelled

if TYPE_CHECKING:
    from ._ledger import Ledger

T = TypeVar("T")

__all__ = ["TaskHandle", "TaskMap"]

_END = object()


class Run:
    """One task while the grid owns it: the scope that cancels it and the reason why."""

    __slots__ = (
        "attempts",
        "cause",
        "checked",
        "ledger",
        "on_start",
        "parked",
        "placement",
        "scope",
        "sent",
        "spec",
        "started",
    )

    def __init__(self, spec: TaskSpec, scope: anyio.CancelScope | None = None) -> None:
        self.spec = spec
        self.sent = spec  # as the backend gets it: parked-data handles among its arguments resolved
        self.parked = False  # it has such handles
        self.scope = anyio.CancelScope() if scope is None else scope
        self.cause: BaseException | None = None
        self.placement: Placement | None = None
        self.ledger: Ledger | None = None  # where its resources are claimed, while they are
        self.checked: object = None  # the backend whose check_task it passed already
        self.attempts = 0
        self.started = False
        self.on_start: Callable[[], None] | None = None  # told once, when it starts (a futures executor's future)

    def mark_started(self) -> None:
        """The backend admitted it (or it left for the engine): from now on it is running, and never moves."""
        self.started = True
        tell = self.on_start
        if tell is not None:
            self.on_start = None
            tell()

    @property
    def is_waiting_locally(self) -> bool:
        return not self.started and self.cause is None and self.placement is not None and self.placement.kind == "local"

    def move_to(self, placement: Placement) -> None:
        """Re-place a run that has not started, with a fresh scope."""
        self.cause = None
        self.attempts = 0  # it never started: the waiting was not an attempt
        self.sent = self.spec  # resolved again for the backend it moves to
        self.scope = type(self.scope)()  # the event loop's own class, made directly (see Executor.task)
        self.placement = placement

    def cancel(self, cause: BaseException) -> None:
        """Cancel the run; the first cause given is what its awaiter will see raised."""
        if self.cause is None:
            self.cause = cause
        self.scope.cancel()


class TaskHandle(Generic[T]):
    """A task submitted with :meth:`Grid.submit`: await it for the result, or ``cancel()`` it.

    Awaiting a cancelled task raises :class:`~gridboost.exceptions.TaskCancelled`
    (or :class:`~gridboost.exceptions.BoostExpired` if its boost ran out); awaiting
    a failed one raises the user's exception with its own type. Awaiting twice gives
    the same outcome twice.
    """

    # Slots, and an event made only for a caller that waits before the end: a burst of submits keeps thousands
    # of handles alive at once, and each object the garbage collector tracks makes its passes longer.
    __slots__ = ("_callbacks", "_error", "_event", "_result", "_run", "_settled", "finished_at", "started_at")

    def __init__(self, run: Run) -> None:
        self._run = run
        self._event: anyio.Event | None = None
        self._settled = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[TaskHandle[T]], None]] | None = None
        #: ``time.monotonic()`` when it started and when it ended (``None`` until then).
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<TaskHandle {self.spec.id} {self.spec.name} {state}>"

    @property
    def spec(self) -> TaskSpec:
        return self._run.spec

    @property
    def id(self) -> str:
        return self._run.spec.id

    @property
    def placement(self) -> Placement | None:
        """Where the grid decided to run it; ``None`` until decided."""
        return self._run.placement

    @property
    def attempts(self) -> int:
        return self._run.attempts

    @property
    def _done(self) -> anyio.Event:
        """Set when it has settled (made on first need)."""
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
            if self._settled:
                event.set()
        return event

    def done(self) -> bool:
        return self._settled

    def cancelled(self) -> bool:
        """Whether it ended by cancellation: its own ``cancel()``, its boost ending, or the grid closing."""
        error = self._error
        return self.done() and error is not None and (error is self._run.cause or isinstance(error, TaskCancelled))

    def cancel(self) -> None:
        """Ask for cancellation; queued work is dropped, running work is stopped where the backend can."""
        if not self.done():
            self._run.cancel(self._run_cancelled())

    def _run_cancelled(self) -> BaseException:
        return TaskCancelled(f"task {self.spec.id} ({self.spec.name}) was cancelled")

    def result(self) -> T:
        """The result of a finished task (raises its exception); ``RuntimeError`` if not finished."""
        if not self.done():
            raise RuntimeError(f"task {self.spec.id} has not finished")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[no-any-return]

    async def wait(self) -> T:
        await self._done.wait()
        return self.result()

    def __await__(self) -> Generator[Any, None, T]:
        # A generator, not self.wait(): one coroutine object fewer per await.
        if not self._settled:
            yield from self._done.wait().__await__()
        return self.result()

    def _settle(self, result: Any, error: BaseException | None) -> None:
        self._result, self._error, self.finished_at = result, error, time.monotonic()
        self._settled = True
        if self._event is not None:
            self._event.set()
        if self._callbacks is not None:
            for callback in self._callbacks:
                callback(self)

    def _on_settled(self, callback: Callable[[TaskHandle[T]], None]) -> None:
        """Call ``callback(self)`` when it settles (before anyone awaiting it wakes)."""
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)


class TaskMap(Generic[T]):
    """``grid.map(...)``: results as an async iterator, with at most ``max_in_flight`` tasks running.

    Cancelling the consumer cancels the map: the tasks in flight are cancelled (on the
    engine too) and no new one is submitted, with a plain ``async for`` as with
    ``async with``. Use ``async with grid.map(...) as results:`` to have the tasks still
    in flight cancelled, and awaited, when the block ends early for any other reason
    (a ``break``, an exception); a plain ``async for`` left by ``break`` leaves them to
    finish (or to be cancelled when the grid closes).
    """

    def __init__(
        self,
        submit: Callable[..., TaskHandle[T]],
        fn: Callable[..., T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        max_in_flight: int,
        ordered: bool,
        options: dict[str, Any],
    ) -> None:
        whole("max_in_flight", max_in_flight, 1)
        if isinstance(items, AsyncIterable):
            self._aitems: AsyncIterator[Any] | None = aiter(items)
            self._items: Iterator[Any] | None = None
        elif isinstance(items, Iterable):
            self._aitems, self._items = None, iter(items)
        else:
            raise InvalidRequest(f"map needs an iterable or async iterable of arguments, got {shown(items)}")
        self._submit, self._fn, self._options = submit, fn, options
        self._limit, self._ordered = max_in_flight, ordered
        self._pending: deque[TaskHandle[T]] = deque()
        self._exhausted = False
        self._finished: deque[TaskHandle[T]] = deque()  # unordered: done, not yet yielded
        self._wakeup: anyio.Event | None = None

    async def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self._limit:
            if self._items is not None:  # a plain iterable needs no await per item
                item = next(self._items, _END)
            else:
                assert self._aitems is not None
                item = await anext(self._aitems, _END)
            if item is _END:
                self._exhausted = True
                break
            handle = self._submit(self._fn, item, **self._options)
            if not self._ordered:
                handle._on_settled(self._on_done)
            self._pending.append(handle)

    def _on_done(self, handle: TaskHandle[T]) -> None:
        self._finished.append(handle)
        if self._wakeup is not None:
            self._wakeup.set()

    def __aiter__(self) -> TaskMap[T]:
        return self

    async def __anext__(self) -> T:
        try:
            # A result already waiting would be returned without a checkpoint: a loop in a
            # cancelled scope would run on over every ready result.
            await anyio.lowlevel.checkpoint_if_cancelled()
            await self._fill()
            if not self._pending:
                raise StopAsyncIteration
            if self._ordered:
                handle = self._pending.popleft()
            else:
                while not self._finished:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                handle = self._finished.popleft()
                self._pending.remove(handle)
            return await handle
        except anyio.get_cancelled_exc_class():
            self._abandon()  # the consumer is cancelled: nobody will take these results
            raise

    def _abandon(self) -> None:
        """Cancel every task in flight and submit no more."""
        self._exhausted = True
        for handle in self._pending:
            handle.cancel()

    async def aclose(self) -> None:
        """Cancel whatever is still in flight and wait for it to end."""
        self._abandon()
        with anyio.CancelScope(shield=True):
            for handle in self._pending:
                await handle._done.wait()
        self._pending.clear()
        self._finished.clear()

    async def __aenter__(self) -> TaskMap[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
