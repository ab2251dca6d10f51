"""Ray's exceptions, translated where they cross into gridboost (one place, as httpcore does it).

* the user's own exception, which Ray wraps in ``RayTaskError``, crosses unwrapped, with its own type (``err.cause``
  is the original object; ``as_instanceof_cause()`` would make a new ``RayTaskError(T)`` class instead) and Ray's
  remote traceback as a note;
* ``TaskCancelledError`` that gridboost did not ask for becomes :class:`~gridboost.TaskCancelled`;
* everything Ray raises for its own reasons (a worker or node died, an object was lost, the runtime env failed, the
  token was refused) becomes :class:`~gridboost.BackendError` that says what happened and chains Ray's exception.
"""

from __future__ import annotations

import re

from gridboost.backend_kit import ErrorMap
from gridboost.exceptions import BackendError, NotSerializable, TaskCancelled

__all__ = ["map_errors", "translate"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# By class name, most specific first, so that looking them up needs no ray import until something failed.
_WHY = {
    "OutOfMemoryError": "Ray's memory monitor killed it: its node ran out of memory",
    "NodeDiedError": "the node running it died",
    "WorkerCrashedError": "the worker process running it died (killed, or crashed)",
    "LocalRayletDiedError": "the raylet of this node died",
    "OwnerDiedError": "the process that owned its result died",
    "ObjectLostError": "its result was lost (the node holding it died)",
    "TaskPlacementGroupRemoved": "its boost's placement group was removed while it waited",
    "TaskUnschedulableError": "no node can ever run it",
    "RuntimeEnvSetupError": "Ray could not set up its runtime_env",
    "ObjectStoreFullError": "the object store is full",
    "OutOfDiskError": "the node ran out of disk",
    "AuthenticationError": (
        "the cluster refused this process's token: set RAY_AUTH_MODE=token and give the cluster's token in "
        "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, before the process starts"
    ),
    "RaySystemError": "Ray failed internally",
}


def translate(exc: BaseException, what: str) -> BaseException:
    """The exception to raise in place of ``exc``, which Ray raised while doing ``what`` ("task x (f)")."""
    import ray.exceptions as rex

    if isinstance(exc, rex.TaskCancelledError):  # also RayTaskError(TaskCancelledError)
        return TaskCancelled(f"{what} was cancelled by Ray, not by gridboost")
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if isinstance(cause, rex.RayError):  # the task failed because Ray did, inside it
            return translate(cause, what)
        if isinstance(cause, Exception):
            # str() of Ray's wrapper is the remote traceback (its traceback_str hides behind the cause's attributes).
            remote = _ANSI.sub("", str(exc)).rstrip()
            if remote:
                cause.add_note(f"(raised in Ray, {what})\n{remote}")
            return cause
        return BackendError(f"{what} failed in Ray, and its exception could not be recovered: {exc}")
    if isinstance(exc, rex.RayError):
        why = next((_WHY[cls.__name__] for cls in type(exc).__mro__ if cls.__name__ in _WHY), None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return BackendError(f"{what} failed: {why or 'Ray failed'} ({detail})")
    if isinstance(exc, TypeError) and "Could not serialize" in str(exc):
        first = str(exc).strip().splitlines()[0]
        return NotSerializable(f"cannot send {what} to Ray: {first.rstrip(':')}")
    return exc


def map_errors(what: str) -> ErrorMap:
    """``with map_errors("task x (f)"):`` — raise :func:`translate`'s verdict in place of what Ray raised."""
    return ErrorMap(translate, what)
