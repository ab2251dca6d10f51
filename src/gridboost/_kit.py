"""Small pieces the core and its backends share: the error map, a bounded cache, the trio bridge.

Backends use them through :mod:`gridboost.backend_kit`, their public face. The text and argument
helpers live in ``_text`` and ``_checks``; they are re-exported here for the kit.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import anyio

from ._checks import finite, seconds
from ._text import did_you_mean, shown
from .exceptions import GridboostError

if TYPE_CHECKING:
    from concurrent.futures import Future  # a type only: concurrent.futures (and logging) cost ms at import

__all__ = ["LRU", "ErrorMap", "Tracked", "did_you_mean", "finite", "seconds", "shown", "until_done_on_trio"]

T = TypeVar("T")


class Tracked(set[T], Generic[T]):
    """A set whose emptying can be awaited: teardown's "wait until none is left", written once."""

    __slots__ = ("_idle",)

    def __init__(self) -> None:
        super().__init__()
        self._idle: anyio.Event | None = None

    def discard(self, item: object) -> None:
        super().discard(item)
        if not self and self._idle is not None:
            self._idle.set()

    async def emptied(self) -> None:
        """Return once the set is empty (bound it with a cancel scope)."""
        while self:
            if self._idle is None or self._idle.is_set():  # waiters share one event: a second must not orphan the first
                self._idle = anyio.Event()
            await self._idle.wait()


class LRU(OrderedDict[Hashable, Any]):
    """A bounded cache: ``remember`` evicts the oldest entry past ``size``."""

    def __init__(self, size: int = 512) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: Hashable, value: Any) -> Any:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class ErrorMap:
    """``with ErrorMap(translate, "task x (f)"):`` — raise ``translate(exc, what)`` in place of an engine's exception.

    The one place a backend turns engine exceptions into gridboost's (as httpcore does): ``translate`` returns a
    ``GridboostError`` (raised from the engine's exception), the user's own exception (raised without the engine's
    wrapper), or ``exc`` itself (left alone). Cancellation and KeyboardInterrupt pass untouched.
    """

    __slots__ = ("translate", "what")

    def __init__(self, translate: Callable[[Exception, str], BaseException], what: str) -> None:
        self.translate = translate
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc is None or not isinstance(exc, Exception):
            return False
        translated = self.translate(exc, self.what)
        if translated is exc:
            return False
        if isinstance(translated, GridboostError):
            raise translated from exc
        raise translated from None  # the user's own exception: the engine's wrapper would only repeat it


async def until_done_on_trio(future: Future[Any]) -> None:
    """Wait, on trio, for a future another thread completes: its callback wakes us through trio's token.

    No thread per wait. Cancellation interrupts the wait and leaves the future alone: the caller decides.
    """
    import trio

    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run ended, and nobody waits any more
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
