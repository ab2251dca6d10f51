"""``gridboost.Executor``: a grid of its own, on an event loop in a thread of its own, behind ``concurrent.futures``.

Synchronous code gets the whole of gridboost without an ``async def``: ``with gb.Executor("ray") as ex:
ex.map(...)``. The executor starts an anyio blocking portal (one thread, one event loop), opens the grid in it with
``async with`` (through the portal, so the grid's lifetime stays structured), optionally takes a boost for its own
life and keeps renewing it, and then behaves as the :class:`~gridboost.GridExecutor` bound to that grid.
``shutdown(wait=True)`` ends all of it, in order, awaited: the futures, then the boost, then the grid (whose teardown
cancels, releases and checks), then the loop and its thread. A grid that leaves something behind raises its
``TeardownError`` from ``shutdown``, as ``async with Grid`` would.

An executor never shut down is shut down when the interpreter exits (before threads are joined, as the stdlib's
pools do it): its queued work is cancelled, its grid closed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import ExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.from_thread

from ._boost import Boost
from ._futures import GridExecutor
from ._grid import Grid
from ._resources import Resources

__all__ = ["BOOST_TTL", "Executor"]

#: The TTL of an executor's own boost: it renews it every third of that while it lives, so a host that dies without
#: shutting down gives the capacity back within a minute.
BOOST_TTL = 60.0

_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_at_exit_registered = False


class Executor(GridExecutor):
    """A :class:`concurrent.futures.Executor` that runs a grid of its own, for synchronous code.

    >>> with gb.Executor() as ex:                         # doctest: +SKIP
    ...     print(list(ex.map(pow, [2, 3], [5, 2])))
    [32, 9]

    ``backend`` and ``grid_options`` are :class:`~gridboost.Grid`'s; bad ones raise here, typed. ``boost``: an
    amount (``"cpu=4"``, a :class:`~gridboost.Resources`, a mapping) taken as a boost for the executor's life, and
    every task then runs inside it. ``resources``: what each task claims (one CPU, as one worker of a pool: the grid
    runs as many at once as it has CPUs, and the rest wait, pending and cancellable). ``shutdown`` (or leaving the
    ``with`` block) closes the grid and ends the thread.
    """

    def __init__(
        self,
        backend: str = "local",
        *,
        boost: Resources | str | Mapping[str, Any] | None = None,
        resources: Resources | str | Mapping[str, Any] = "cpu=1",
        **grid_options: Any,
    ) -> None:
        claim = Resources.coerce(resources)
        self._stack = ExitStack()
        self._closing = threading.Lock()
        try:
            portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
            grid = portal.call(partial(Grid, backend, **grid_options))
            self._stack.enter_context(portal.wrap_async_context_manager(grid))
            lease = (
                None
                if boost is None
                else self._stack.enter_context(portal.wrap_async_context_manager(_held(grid, boost)))
            )
            portal.call(self._bind, grid, lease, claim)
        except BaseException:
            self._stack.close()
            raise
        _register(self)

    def _bind(self, grid: Grid, lease: Boost | None, claim: Resources) -> None:
        """In the loop thread, where the executor reads the loop's token."""
        GridExecutor.__init__(self, grid, grid._executor, lease, claim)
        self._own = grid
        self._loop = asyncio.get_running_loop()

    @property
    def grid(self) -> Grid:
        """The grid it runs (its methods called through :meth:`call`, from threads other than its own)."""
        return self._own

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``concurrent.futures``; then the boost is released and the grid closed (``wait=False``: once the
        futures are done, in a thread that ends with it)."""
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self._close()
        else:
            threading.Thread(target=self._close_when_idle, name="gridboost-executor-shutdown").start()

    def _close_when_idle(self) -> None:
        super().shutdown(wait=True)
        self._close()

    def _close(self) -> None:
        with self._closing:
            _live.discard(self)
            try:
                self._stack.close()  # a grid that could not close everything raises its TeardownError from here
            finally:
                # The loop's worker threads (the local backend runs work in them) stop as its root task ends, a
                # moment after the portal returns: joined here, so that no thread of this executor outlives shutdown.
                deadline = time.monotonic() + self._own.teardown_timeout
                for thread in threading.enumerate():
                    if getattr(thread, "loop", None) is self._loop and thread is not threading.current_thread():
                        thread.join(max(0.0, deadline - time.monotonic()))


@asynccontextmanager
async def _held(grid: Grid, amount: Resources | str | Mapping[str, Any]) -> AsyncIterator[Boost]:
    """A boost for as long as the block lasts, renewed every third of its TTL."""
    async with grid.boost(amount, ttl=BOOST_TTL) as boost, anyio.create_task_group() as renewals:
        renewals.start_soon(_renew, boost)
        yield boost
        renewals.cancel_scope.cancel()


async def _renew(boost: Boost) -> None:
    while True:
        await anyio.sleep(BOOST_TTL / 3)
        await boost.renew()


def _register(executor: Executor) -> None:
    global _at_exit_registered  # one registration per process, as concurrent.futures does
    _live.add(executor)
    if not _at_exit_registered:
        # Before non-daemon threads are joined: the portal's thread would otherwise keep the interpreter waiting.
        threading._register_atexit(_shutdown_forgotten)  # type: ignore[attr-defined]
        _at_exit_registered = True


def _shutdown_forgotten() -> None:
    for executor in list(_live):
        GridExecutor.shutdown(executor, wait=False, cancel_futures=True)
        executor._close()
