"""``concurrent.futures`` over a grid: :class:`GridExecutor`, the standard ``Executor`` contract for synchronous code.

The grid lives on its event loop; the code that calls ``submit`` lives in other threads (a thread pool, a web
framework's worker, joblib). Each call crosses into the loop with anyio's event loop token (``from_thread`` with
``token=``: any thread, not only anyio's own workers), starts the task there with the grid's one submit path, and
hands back a standard :class:`concurrent.futures.Future` that the task's handle settles, in the loop thread.

The stdlib contract, to the letter:

* a future is *pending* while its task waits for capacity on this machine, and *running* from the moment it starts
  (or leaves for the engine, which may queue it: as ``ProcessPoolExecutor`` marks a call running once it is in the
  call queue); ``cancel()`` succeeds only before that, and drops the queued task;
* ``result()``/``exception()`` give the function's own exception with its own type; ``as_completed``/``wait``
  work, as they work on any ``Future``;
* ``map`` submits at once, yields in order, measures ``timeout`` from the call, cancels what is left when its
  iterator is closed; ``chunksize > 1`` sends each chunk as one engine task (:class:`~gridboost.worker_chunk.Chunk`,
  the path batched ``grid.map`` takes), whose items still fail one by one;
* ``shutdown(wait=True)`` waits for every future; ``cancel_futures=True`` cancels those not running; after it,
  ``submit`` raises ``RuntimeError``.

Done-callbacks of a future run in the grid's loop thread, as a thread pool's run in its workers: keep them short.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._boost import Boost, current_boost
from ._checks import whole
from ._records import Command
from ._resources import Resources
from ._task import TaskHandle
from .exceptions import GridClosed, InvalidRequest, InvalidTask, TaskCancelled
from .worker_chunk import Chunk, Outcomes

if TYPE_CHECKING:
    from ._task import Run

__all__ = ["GridExecutor"]

T = TypeVar("T")

_telling = threading.Lock()
#: What each task of an executor claims unless told otherwise: one CPU, as one worker of a pool.
ONE_CPU = Resources(cpu=1)


class _Grid(Protocol):
    """What the executor needs of a grid (the facade hands it over: this module does not import it)."""

    @property
    def closed(self) -> bool: ...

    @property
    def local_available(self) -> Resources: ...

    async def snapshot(self) -> Any: ...


class _Tasks(Protocol):
    """The grid's one submit path (its executor service)."""

    def task(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> Run: ...

    def submit(self, run: Run) -> TaskHandle[Any]: ...


class GridExecutor(futures.Executor):
    """A :class:`concurrent.futures.Executor` over a running grid, for synchronous code in other threads.

    Get one with :meth:`gridboost.Grid.executor` (inside an ``async with grid.boost(...)`` block, its work runs in
    that boost), or own one with :class:`gridboost.Executor`. Each task claims ``resources`` (one CPU unless told
    otherwise), as a pool's worker: a future waits, *pending* and cancellable, until the grid has that room.
    ``shutdown`` ends this executor's work, not the grid. Call it from any thread but the grid's own event loop
    thread, where ``submit`` would wait on itself: there, use ``grid.submit``.
    """

    def __init__(self, grid: _Grid, tasks: _Tasks, where: Boost | None = None, resources: Resources = ONE_CPU) -> None:
        """Bind to ``grid`` (a running one: this runs in its event loop thread, where the token is read)."""
        self._grid = grid
        self._tasks = tasks
        self._where: Boost | str = "auto" if where is None else where
        self._resources = resources
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._stopped = False
        self._pending: set[futures.Future[Any]] = set()  # not done yet: what shutdown waits for or cancels

    def __repr__(self) -> str:
        state = "shut down" if self._stopped else f"{len(self._pending)} pending"
        return f"<{type(self).__name__} {state}>"

    @property
    def grid(self) -> Any:
        """The grid its work runs on (call its methods through :meth:`call`, from threads other than its own)."""
        return self._grid

    # -- crossing into the loop ----------------------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        """Run ``fn(*args)`` in the grid's event loop (awaited, if it is a coroutine function); return its result.

        >>> ex.call(grid.snapshot).total                # doctest: +SKIP
        Resources(cpu=8, memory=31.2GiB)
        """
        self._check_thread("call")
        try:
            return anyio.from_thread.run(_called, fn, args, token=self._token)
        except RuntimeError:
            if self._grid.closed:  # the loop may have ended with it
                raise GridClosed("the grid of this executor is closed") from None
            raise

    def _check_thread(self, what: str) -> None:
        if threading.get_ident() == self._loop_thread:
            raise InvalidRequest(
                f"Executor.{what} was called in the grid's own event loop thread, where it would wait on itself; "
                "use grid.submit (or grid.offload) there"
            )

    # -- the contract ----------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on the grid and return its :class:`~concurrent.futures.Future`.

        Bad input (``fn`` not callable, not serialisable for a remote engine) raises here, typed, as ``grid.submit``
        raises it; ``RuntimeError`` after :meth:`shutdown`, as every standard executor.
        """
        if isinstance(fn, Command) or not callable(fn):
            raise InvalidTask(f"Executor.submit takes a callable, got {type(fn).__name__}")
        future: futures.Future[T] = futures.Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._check_thread("submit")
            self._pending.add(future)
        try:
            handle = anyio.from_thread.run_sync(self._start, future, fn, args, kwargs, token=self._token)
        except BaseException:
            self._forget(future)
            raise
        future.add_done_callback(lambda f: self._cancelled(f, handle))
        return future

    def _start(self, future: futures.Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> TaskHandle[Any]:
        """In the loop thread: start the task and tie the future to it."""
        options = {"resources": self._resources, "where": self._where, "retries": 0, "timeout": None}
        run = self._tasks.task(fn, args, kwargs, options)
        run.on_start = lambda: _running(future, run)
        handle = self._tasks.submit(run)
        handle._on_settled(lambda h: self._settled(future, h))
        return handle

    def _settled(self, future: futures.Future[Any], handle: TaskHandle[Any]) -> None:
        self._forget(future)
        if future.done():  # cancelled by its caller while it waited
            return
        if handle.cancelled() and future.cancel():
            return  # the grid cancelled it before it started (shutdown's cancel_futures, the grid closing)
        error = handle._error
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(handle._result)

    def _cancelled(self, future: futures.Future[Any], handle: TaskHandle[Any]) -> None:
        """A done-callback: a future cancelled before it ran tells its waiters, and drops its task from the grid."""
        if not future.cancelled():
            return
        self._forget(future)
        _set_running(future)  # what a pool's worker does on taking a cancelled item: as_completed and wait see it
        if handle.done():
            return
        if threading.get_ident() == self._loop_thread:
            handle.cancel()
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone, and the task with it
            anyio.from_thread.run_sync(handle.cancel, token=self._token)

    def _forget(self, future: futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def map(
        self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[T]:
        """``fn`` over the iterables, as the builtin ``map``: submitted at once, results in order.

        ``chunksize`` items run as one engine task: worth it when each call is short (a millisecond), where a task
        per item costs more than the call. An item's exception is raised when the iterator reaches it.
        """
        size = whole("chunksize", chunksize, least=1)
        if size == 1:
            return super().map(fn, *iterables, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        chunk = Chunk(fn, star=True)
        arguments = zip(*iterables, strict=False)
        submitted = [self.submit(chunk, *piece) for piece in iter(lambda: list(itertools.islice(arguments, size)), [])]
        return _chunked_results(submitted, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work from now on; ``cancel_futures`` cancels what has not started; ``wait`` waits for the rest."""
        with self._lock:
            self._stopped = True
            pending = list(self._pending)
        if wait and pending and threading.get_ident() == self._loop_thread:
            raise InvalidRequest(
                "Executor.shutdown(wait=True) was called in the grid's own event loop thread with work pending, where "
                "it would wait on itself; shut it down from another thread, or with wait=False"
            )
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            futures.wait(pending)

    def capacity(self) -> int:
        """How many CPUs this executor's work can use now: its boost's, or the grid's (every node, this one too)."""
        return int(self.call(self._capacity))

    async def _capacity(self) -> int:
        if isinstance(self._where, Boost):
            return max(1, int(self._where.resources.cpu))
        snapshot = await self._grid.snapshot()
        cpus = snapshot.total.cpu
        if snapshot.local is None:  # a remote cluster beside this machine, where work may run too
            cpus += self._grid.local_available.cpu
        return max(1, int(cpus))


def bound_executor(grid: _Grid, tasks: _Tasks, resources: Resources | str | Mapping[str, Any]) -> GridExecutor:
    """``grid.executor()``: in the loop thread, bound to the boost of the block it is called in, if any."""
    return GridExecutor(grid, tasks, current_boost(), Resources.coerce(resources))


async def _called(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    result = fn(*args)
    if hasattr(result, "__await__"):
        result = await result
    return result


def _set_running(future: futures.Future[Any]) -> bool:
    """``set_running_or_notify_cancel``, once, whichever thread comes first: whether the future now runs.

    Its start (the loop thread) and its cancellation (the caller's thread) may race to it; a second call would log
    at CRITICAL and raise, so the first one marks the future."""
    with _telling:
        if getattr(future, "_gridboost_told", False):
            return False
        future._gridboost_told = True  # type: ignore[attr-defined]
    return future.set_running_or_notify_cancel()


def _running(future: futures.Future[Any], run: Run) -> None:
    """The task started: the future runs, unless its caller cancelled it just before (then the task goes too)."""
    if not _set_running(future) and future.cancelled():
        run.cancel(TaskCancelled(f"task {run.spec.id} ({run.spec.name}) was cancelled"))


def _chunked_results(submitted: list[futures.Future[Outcomes]], end: float | None) -> Iterator[Any]:
    """The items of each chunk in order, as ``Executor.map``'s iterator yields them; closing it cancels the rest."""
    try:
        submitted.reverse()  # pop from the end: a yielded chunk's future is no longer held
        while submitted:
            future = submitted.pop()
            outcomes, _ = future.result(None if end is None else end - time.monotonic())
            for ok, value in outcomes:
                if not ok:
                    raise value
                yield value
    finally:
        for future in submitted:
            future.cancel()
