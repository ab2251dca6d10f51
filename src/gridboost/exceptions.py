"""Every error gridboost raises on purpose.

All of them derive from :class:`GridboostError`. Errors about bad input also derive
from the built-in type a Python user would expect (``ValueError``, ``TypeError``,
``LookupError``), so ``except ValueError`` keeps working for code that does not know
gridboost. An exception raised by the *user's* function is never wrapped: it reaches
the caller with its own type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._text import shown as _shown

__all__ = [
    "BackendError",
    "BoostExpired",
    "BoostLost",
    "BoostPreempted",
    "BoostUnavailable",
    "CapacityUnavailable",
    "CommandFailed",
    "CommandNotFound",
    "GridClosed",
    "GridboostError",
    "InvalidRequest",
    "InvalidResources",
    "InvalidTask",
    "NotSerializable",
    "PluginError",
    "PolicyError",
    "ProbeError",
    "QuotaExceeded",
    "TaskCancelled",
    "TeardownError",
    "UnknownBackend",
]


class GridboostError(Exception):
    """The root of every error gridboost raises itself."""


class InvalidRequest(GridboostError, ValueError):
    """An argument's value is out of range or of an unknown kind (a ttl of 0, say)."""


class InvalidResources(InvalidRequest):
    """A resource amount is negative, NaN, infinite or not a number."""


class InvalidTask(GridboostError, TypeError):
    """What was asked to run cannot be run: not callable, or a command given as a string."""


class NotSerializable(InvalidTask):
    """The callable or its arguments cannot be sent to where they would run."""


class UnknownBackend(GridboostError, LookupError):
    """No installed plugin provides a backend of that name."""

    def __init__(self, name: str, available: Sequence[str], hint: str | None = None) -> None:
        self.name = name
        self.available = tuple(available)
        self.hint = hint
        message = f"unknown backend {_shown(name)}; available: {', '.join(self.available) or 'none'}"
        if hint:
            message += f" (to use {_shown(name)}: {hint})"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from what it was made of, not from its message
        return (type(self), (self.name, self.available, self.hint), self.__dict__)


class CapacityUnavailable(GridboostError):
    """What was asked for is more than the cluster can ever hold, or did not fit in time."""


class BoostUnavailable(CapacityUnavailable):
    """A boost could not be granted: it is larger than the cluster, or did not fit in time."""


class QuotaExceeded(BoostUnavailable):
    """A boost would pass its tenant's quota: ``wait=0``, or its wait ran out while the quota held it back."""


class BoostExpired(GridboostError):
    """The boost reached its TTL (or was released) while it was being used."""


class BoostLost(GridboostError):
    """The engine lost a boost's reservation (a node died under it); its work was stopped."""


class BoostPreempted(BoostLost):
    """A preemptible boost was taken back for another owner's request of higher priority.

    ``grace`` is how long its work had, from the notice, to finish before it was stopped with this error.
    """

    def __init__(self, message: str, grace: float = 0.0) -> None:
        super().__init__(message)
        self.grace = grace

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.grace))


class GridClosed(GridboostError, RuntimeError):
    """The grid has been closed; it cannot be used any more."""


class TaskCancelled(GridboostError):
    """The awaited task was cancelled before it produced a result."""


class CommandFailed(GridboostError):
    """A command run with ``check=True`` exited with a non-zero status."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        super().__init__(f"command {list(self.argv)!r} exited with status {returncode}: {tail[0]}")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from what it was made of, not from its message
        return (type(self), (self.argv, self.returncode, self.stdout, self.stderr), self.__dict__)


class CommandNotFound(GridboostError, FileNotFoundError):
    """A command's program (or its ``cwd``) does not exist where the command was to run.

    Also a ``FileNotFoundError``, as ``subprocess`` raises: ``errno`` is ``ENOENT`` and
    ``filename`` the missing program or directory. Raised the same on every backend.
    """


class BackendError(GridboostError):
    """The engine failed in a way that is not the user's function's fault."""


class PolicyError(GridboostError):
    """A decision hook raised or returned something unusable; the operation failed."""


class ProbeError(GridboostError):
    """The pressure probe failed, or gave no reading in time: the machine's pressure is unknown."""


class PluginError(GridboostError):
    """Plugins conflict (two backends of one name) or a plugin broke the hook contract."""


class TeardownError(GridboostError):
    """Leaving the grid could not release everything; ``leftovers`` names what remains."""

    def __init__(self, leftovers: Sequence[str], errors: Sequence[BaseException] = ()) -> None:
        self.leftovers = tuple(leftovers)
        self.errors = tuple(errors)
        super().__init__("teardown left behind: " + "; ".join(self.leftovers))

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from what it was made of, not from its message
        return (type(self), (self.leftovers, self.errors), self.__dict__)
