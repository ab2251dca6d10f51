"""Dask's exceptions, translated where they cross into gridboost (one place, as httpcore does it).

* the user's own exception crosses as itself: Dask already re-raises it with its own type, and its remote traceback;
* a cancellation gridboost did not ask for (``FutureCancelledError``: someone else cancelled the key, or the scheduler
  lost it) becomes :class:`~gridboost.TaskCancelled`;
* what Dask raises for its own reasons (a worker died too often under the task, the scheduler went away, a comm
  broke, an object could not be serialised) becomes :class:`~gridboost.BackendError` (or
  :class:`~gridboost.NotSerializable`) saying so, chaining Dask's exception.
"""

from __future__ import annotations

from gridboost.backend_kit import ErrorMap
from gridboost.exceptions import BackendError, NotSerializable, TaskCancelled

__all__ = ["map_errors", "translate"]

# By class name, most specific first, so that looking them up needs no distributed import until something failed.
_WHY = {
    "KilledWorker": "the workers running it died too many times (Dask's allowed-failures)",
    "CommClosedError": "the connection to the Dask cluster broke",
    "StreamClosedError": "the connection to the Dask cluster broke",
    "FutureCancelledError": "",  # handled below
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def translate(exc: BaseException, what: str) -> BaseException:
    """The exception to raise in place of ``exc``, which Dask raised while doing ``what`` ("task x (f)")."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name == "FutureCancelledError" or (module.startswith("distributed") and name == "CancelledError"):
        return TaskCancelled(f"{what} was cancelled in Dask, not by gridboost ({_first_line(exc)})")
    if name in _WHY and module.startswith(("distributed", "tornado")):
        detail = f"{name}: {_first_line(exc)}" if _first_line(exc) else name
        return BackendError(f"{what} failed: {_WHY[name]} ({detail})")
    if module.startswith("distributed") and isinstance(exc, Exception):
        return BackendError(f"{what} failed in Dask: {name}: {_first_line(exc)}")
    if isinstance(exc, TypeError | AttributeError) and ("serialize" in str(exc) or "pickle" in str(exc).lower()):
        return NotSerializable(f"cannot send {what} to Dask: {_first_line(exc)}")
    if type(exc).__name__ == "PicklingError":
        return NotSerializable(f"cannot send {what} to Dask: {_first_line(exc)}")
    return exc


def translate_connect(exc: BaseException, where: str, timeout: float) -> BackendError:
    """What failed while connecting to the scheduler at ``where``, as a ``BackendError``."""
    if isinstance(exc, TimeoutError) or "Timed out" in str(exc):
        message = (
            f"cannot reach the Dask scheduler at {where} within connect_timeout={timeout:g}s: is it running, is this "
            "its address (tcp://host:8786 by default), and does it use TLS (tls:// with security=) or not?"
        )
    else:
        message = f"could not connect to the Dask scheduler at {where}: {type(exc).__name__}: {_first_line(exc)}"
    error = BackendError(message)
    error.__cause__ = exc
    return error


def map_errors(what: str) -> ErrorMap:
    """``with map_errors("task x (f)"):`` — raise :func:`translate`'s verdict in place of what Dask raised."""
    return ErrorMap(translate, what)
