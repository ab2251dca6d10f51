"""Teardown: the documented steps, each bounded, over one collector of what could not be done.

In order, whether the grid's block ends normally, by exception or by cancellation
(all of it shielded, each wait bounded by ``teardown_timeout``):

1. new calls are refused with :class:`~gridboost.exceptions.GridClosed`;
2. every task in flight and every pending boost request is cancelled, and awaited;
3. the host app's own resources (``enter_async_context``/``push_async_callback``)
   are closed, in reverse order;
4. every parked-data handle is released, then every boost;
5. observer coroutines are awaited and background loops stopped (the pressure monitor's
   probe closed, after any reading in flight);
6. the engine is asked which of our reservations it still holds — there must be
   none — and the backends are closed.

Whatever could not be done is named in one :class:`~gridboost.exceptions.TeardownError`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus
from attrs import frozen

from ._book import BoostBook
from ._boost import Boost
from ._dispatch import Dispatch
from ._executor import Executor
from ._parking import Parking
from ._pressure import Monitor
from ._records import BoostState
from ._runtime import Runtime
from ._text import shown
from .exceptions import GridClosed, InvalidRequest, TeardownError

__all__ = ["AppResources", "Leftovers", "Services", "lifetime"]

T = TypeVar("T")

log = logging.getLogger("gridboost")


class Leftovers:
    """What teardown could not do, as it goes; :meth:`check` raises them as one ``TeardownError``."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.errors: list[BaseException] = []

    def add(self, item: str, error: BaseException | None = None) -> None:
        self.items.append(item)
        if error is not None:
            self.errors.append(error)

    def check(self, during: BaseException | None = None) -> None:
        """Raise what was left as one ``TeardownError`` (in the context of ``during``, the block's own error)."""
        if self.items:
            error = TeardownError(self.items, self.errors)
            error.__context__ = during
            raise error
        if during is not None:
            raise during


def describe(cm: object) -> str:
    """An app resource as a teardown error names it: ``resource('db')`` for an ``@asynccontextmanager``."""
    func, args = getattr(cm, "func", None), getattr(cm, "args", None)
    if callable(func) and isinstance(args, tuple):
        return f"{getattr(func, '__qualname__', 'resource')}({', '.join(shown(a, 30) for a in args)})"
    return shown(cm)


class AppResources:
    """The host app's resources the grid closes at teardown (step 3), newest first, each on its own."""

    def __init__(self) -> None:
        self._closers: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    async def enter(self, cm: AbstractAsyncContextManager[T]) -> T:
        kind = type(cm)
        if not (callable(getattr(kind, "__aenter__", None)) and callable(getattr(kind, "__aexit__", None))):
            raise InvalidRequest(f"enter_async_context takes an async context manager, got {shown(cm)}")
        name = describe(cm)  # before entering: an @asynccontextmanager forgets its arguments then
        result = await kind.__aenter__(cm)
        self._closers.append((name, partial(kind.__aexit__, cm, None, None, None)))
        return result

    def callback(self, callback: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not callable(callback):
            raise InvalidRequest(f"push_async_callback takes a coroutine function, got {shown(callback)}")
        name = getattr(callback, "__qualname__", None) or shown(callback)
        self._closers.append((f"callback {name}", partial(callback, *args, **kwargs)))

    async def close(self, leftovers: Leftovers, timeout: float) -> None:
        """Close each within its own ``timeout``: one that hangs or fails is named, the others still close."""
        while self._closers:
            name, close = self._closers.pop()
            try:
                with anyio.move_on_after(timeout) as scope:
                    await close()
            except Exception as exc:
                leftovers.add(f"closing the app's resource {name} failed: {type(exc).__name__}: {str(exc)[:120]}", exc)
            else:
                if scope.cancelled_caught:
                    leftovers.add(f"the app's resource {name} did not close within {timeout:g}s")


async def stop_work(runtime: Runtime, services: Services, app: AppResources, leftovers: Leftovers) -> None:
    """Steps 2 to 5, but for stopping the loops: work, pending grants, app resources, parked data, boosts, observers."""
    executor, book = services.executor, services.book
    timeout = runtime.settings.teardown_timeout
    for scope in runtime.grants:
        scope.cancel()
    executor.cancel_all()
    with anyio.move_on_after(timeout):
        while runtime.runs or runtime.grants:
            await runtime.runs.emptied()
            await runtime.grants.emptied()
    for run in runtime.runs:
        leftovers.add(f"task {run.spec.id} ({run.spec.name}) still running after {timeout:g}s")
    await app.close(leftovers, timeout)
    for handle, exc in await services.parking.close():
        leftovers.add(f"{handle.id} ({handle.kind}) was not released: {type(exc).__name__}: {exc}", exc)

    async def release(boost: Boost) -> None:
        try:
            await book.finish(boost, BoostState.RELEASED)
        except Exception as exc:
            leftovers.add(f"boost {boost.id} was not released: {type(exc).__name__}: {exc}", exc)

    # All at once: each release is an engine round trip (a placement group removed, a marker cleared).
    async with anyio.create_task_group() as tg:
        for boost in list(book.boosts.values()):
            tg.start_soon(release, boost)
    running = runtime.observers.running
    with anyio.move_on_after(timeout):
        await running.emptied()
    if running:
        leftovers.add(f"{len(running)} observer hook(s) still running after {timeout:g}s")


async def close_backends(runtime: Runtime, leftovers: Leftovers) -> None:
    """Step 6: no reservation may be left on the engine; then each backend is closed."""
    timeout = runtime.settings.teardown_timeout
    backend = runtime.backend
    with anyio.move_on_after(timeout) as scope:
        try:
            held = await backend.reservations()
        except Exception as exc:
            leftovers.add(f"could not ask the {backend.name} engine for its reservations: {exc}", exc)
            held = []
    if scope.cancelled_caught:
        leftovers.add(f"the {backend.name} engine did not list its reservations in time")
    for reservation in held:
        leftovers.add(f"reservation {reservation.id} is still held by the {backend.name} engine")
    for each in dict.fromkeys((runtime.host, backend)):
        try:
            with anyio.fail_after(timeout):
                await each.aclose()
        except TeardownError as exc:
            for item in exc.leftovers:
                leftovers.add(f"{each.name}: {item}")
        except Exception as exc:
            leftovers.add(f"closing the {each.name} backend failed: {type(exc).__name__}: {exc}", exc)


#: Grids between entering and the end of teardown; the test kit's leak check reads it.
open_grids: weakref.WeakSet[Any] = weakref.WeakSet()


@frozen
class Services:
    """The services a grid composes, as its lifetime starts and stops them."""

    monitor: Monitor
    book: BoostBook
    dispatch: Dispatch
    executor: Executor
    parking: Parking

    def stats(self, counts: Mapping[str, int]) -> dict[str, int]:
        """The grid's counters, with the book's and the monitor's."""
        stats = dict(counts)
        stats.update({f"boosts.{k}": v for k, v in self.book.outcomes.items()})
        stats["boosts.granted"] = self.book.granted
        stats["probe_errors"] = self.monitor.errors
        for name in ("observer_errors", "moves", "pressure.changes"):
            stats.setdefault(name, 0)
        return stats


async def _start(runtime: Runtime, dispatch: Dispatch) -> None:
    """Start each backend and read the cluster; if that fails, close the backends (shielded) and raise."""
    backends = tuple(dict.fromkeys((runtime.backend, runtime.host)))
    try:
        for backend in backends:
            await backend.start()
        if runtime.remote:
            dispatch.local.set_capacity(getattr(runtime.host, "capacity", None))
            await dispatch.read_cluster()
    except BaseException:
        runtime.state = "closed"
        with anyio.CancelScope(shield=True):
            for backend in backends:
                try:
                    await backend.aclose()
                except Exception as exc:
                    log.warning("closing %s after a failed start: %s", backend.name, exc)
        raise


async def _loops(
    runtime: Runtime, services: Services, *, task_status: TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The background loops: boost expiry, the engine's watch of our reservations, the cluster's capacity."""

    async def watch() -> None:
        try:
            await runtime.backend.watch(services.book.lost)
        except Exception as exc:  # losing the watch must not take the grid down; say so loudly
            runtime.log_error(f"the {runtime.backend.name} backend stopped watching its reservations", exc)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            runtime.loops = tg
            tg.start_soon(services.book.expire_loop)
            tg.start_soon(watch)
            if runtime.remote:
                tg.start_soon(services.dispatch.watch_cluster)
            task_status.started(scope)


@asynccontextmanager
async def lifetime(runtime: Runtime, services: Services, app: AppResources, owner: object) -> AsyncIterator[None]:
    """A grid's one structured lifetime: start, run the block, then the teardown steps, whatever happened.

    ``owner`` (the grid) is listed in :data:`open_grids` from the start until the end of teardown.
    """
    if runtime.state != "new":
        raise GridClosed("a Grid can be entered only once; make a new one")
    open_grids.add(owner)
    try:
        async with _running(runtime, services, app):
            yield
    finally:
        open_grids.discard(owner)


@asynccontextmanager
async def _running(runtime: Runtime, services: Services, app: AppResources) -> AsyncIterator[None]:
    runtime.state = "open"
    await _start(runtime, services.dispatch)
    leftovers = Leftovers()
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            runtime.task_group = tg
            runtime.observers.open(tg, runtime.view)
            loops = await tg.start(_loops, runtime, services)
            try:
                if runtime.observers.wanted("gridboost_pressure_changed"):
                    services.monitor.start()  # someone listens: pressure is needed from the start
                yield
            except BaseException as exc:  # raised as it is below, not inside the task group's exception group
                body_error = exc
            finally:
                runtime.state = "closing"  # step 1
                with anyio.CancelScope(shield=True):
                    await stop_work(runtime, services, app, leftovers)
                loops.cancel()
                tg.cancel_scope.cancel()
    finally:
        runtime.observers.close()
        if services.monitor.leftover is not None:
            leftovers.add(services.monitor.leftover)
        with anyio.CancelScope(shield=True):
            await close_backends(runtime, leftovers)
        runtime.state = "closed"
    leftovers.check(during=body_error)
