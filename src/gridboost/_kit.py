"""Small pieces the core and its first-party backends (gridboost-ray, gridboost-dask) share.

Private: the plugins are released with the core, so they may import it; a third-party backend should not.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal

from .exceptions import GridboostError, InvalidRequest

__all__ = ["LRU", "ErrorMap", "did_you_mean", "finite", "seconds", "shown", "until_done_on_trio"]

_SHOWN = 60  # characters of a value an error message quotes: one short line, whatever the value


def shown(value: object, limit: int = _SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages: never long, never raises.

    An int of thousands of digits has no ``repr`` (Python refuses to convert it) and a
    hostile object's ``__repr__`` may raise; both are described instead.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        sign = "-" if value < 0 else ""
        return f"{sign}an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = repr(value)
    except Exception:  # a __repr__ that raises (or returns a non-string, which repr turns into TypeError)
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def did_you_mean(word: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """``"; did you mean 'cpu'?"`` for a likely typo of one of ``choices``, or ``""``.

    Case is ignored; ``aliases`` maps words people write for a choice (``mem``) to it.
    """
    options = list(choices)
    folded = word.casefold()
    found = [c for c in options if c.casefold() == folded] or (
        [aliases[folded]] if aliases and folded in aliases else []
    )
    if not found and len(word) <= 40:
        lowered = {c.casefold(): c for c in options}
        found = [lowered[c] for c in difflib.get_close_matches(folded, list(lowered), n=1, cutoff=0.75)]
    return f"; did you mean {found[0]!r}?" if found else ""


def finite(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool) that a float holds finitely, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range is as unusable as inf
        return None
    return None if math.isnan(number) or math.isinf(number) else number


def seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds, > 0 (or >= 0 with ``allow_zero``); else ``InvalidRequest``."""
    number = finite(value)
    if number is None:
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {shown(value)}")
    if number < 0 or (number == 0 and not allow_zero):
        raise InvalidRequest(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {shown(value)}")
    return number


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
