"""The work the conformance suite sends, public as ``gridboost.testing.nap``, ``add`` and ``fail_with``.

Module-level functions, so every engine can ship them by reference; this module imports
neither pytest nor the grid, so a worker that unpickles one loads little, and a cluster
whose workers lack pytest still runs them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sized
from pathlib import Path

import anyio.from_thread

__all__ = [
    "SuiteError",
    "add",
    "fail_if_odd",
    "fail_until",
    "fail_until_item",
    "fail_with",
    "mark_and_nap",
    "nap",
    "nap_then_size",
    "where_item",
]


class SuiteError(Exception):
    """The user's exception of the suite; it must reach the caller as itself."""

    def __init__(self, code: int) -> None:
        super().__init__(f"suite error {code}")
        self.code = code

    def __reduce__(self) -> tuple[type[SuiteError], tuple[int], dict[str, object]]:
        # Rebuilt from its code, not its message: it crosses process boundaries (the default would
        # call SuiteError("suite error 3") and say "suite error suite error 3").
        return type(self), (self.code,), self.__dict__


def add(a: int, b: int = 0) -> int:
    """``a + b``: the smallest work with a result to check."""
    return a + b


def fail_with(code: int) -> None:
    """Raise ``SuiteError(code)``: the user's own exception, which must reach the caller as itself."""
    raise SuiteError(code)


def fail_until(counter: str, failures: int) -> int:
    """Fail the first ``failures`` calls; the count lives in a file, so it survives process boundaries."""
    path = Path(counter)
    calls = int(path.read_text() or 0) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= failures:
        raise SuiteError(calls)
    return calls


def fail_if_odd(number: int) -> int:
    """``number`` if it is even; ``SuiteError(number)`` if it is odd (a map whose items fail one in two)."""
    if number % 2:
        raise SuiteError(number)
    return number


def fail_until_item(item: tuple[str, int]) -> int:
    """:func:`fail_until` for a map: the item is ``(counter, failures)``."""
    return fail_until(*item)


def mark_and_nap(item: tuple[str, float]) -> float:
    """Create the file ``item[0]`` (proof that the item ran), then :func:`nap` ``item[1]`` seconds."""
    Path(item[0]).touch()
    return nap(item[1])


def where_item(whereami: Callable[[], str]) -> str:
    """Call ``whereami`` (an engine probe's) and return what it says: where a map's item ran."""
    return whereami()


def nap(seconds: float) -> float:
    """Sleep ``seconds`` and return them, stopping early where the engine lets a thread see its cancellation.

    In an anyio worker thread (the local backend's) a cancelled task's ``nap`` ends at once, as
    well-behaved thread code should; elsewhere (a Ray or Dask worker, a process) it just sleeps.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # Outside an anyio worker thread (a Ray or Dask worker) there is nothing to check.
        with contextlib.suppress(RuntimeError, LookupError, AttributeError):
            anyio.from_thread.check_cancelled()
        time.sleep(0.01)
    return seconds


def nap_then_size(data: Sized, seconds: float = 0.0) -> int:
    """:func:`nap` ``seconds``, then return ``len(data)``: work that holds its (parked) argument a while."""
    nap(seconds)
    return len(data)
