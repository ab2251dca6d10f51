"""Small pieces the core and its first-party backends (gridboost-ray, gridboost-dask) share.

Private: the plugins are released with the core, so they may import it; a third-party backend should not.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal

from .exceptions import GridboostError, InvalidRequest

__all__ = ["LRU", "ErrorMap", "seconds", "until_done_on_trio"]


def seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds, > 0 (or >= 0 with ``allow_zero``); else ``InvalidRequest``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or math.isinf(value):
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidRequest(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")
    return float(value)


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
