"""The kit for backend authors: what a backend needs from gridboost beyond the contract in :mod:`gridboost.abc`.

A backend imports only public names: ``gridboost``, :mod:`gridboost.abc`, :mod:`gridboost.exceptions`, this module
and :mod:`gridboost.worker_command` (``gridboost.testing`` in its tests). gridboost's own backends, gridboost-ray and
gridboost-dask, are built from these pieces and nothing private, so a third-party backend has the same footing
(see the page *Writing a backend*).

Engine errors

* :class:`ErrorMap` — ``with ErrorMap(translate, what):`` raises gridboost's error (or the user's own) for the engine's.

Option checks and messages

* :func:`finite` — a value as a finite ``float``, or ``None`` (bools, NaN, infinities, huge ints are not numbers here).
* :func:`seconds` — a finite number of seconds, > 0 (>= 0 with ``allow_zero``), else ``InvalidRequest``.
* :func:`shown` — ``repr`` cut short for an error message; never long, never raises.
* :func:`did_you_mean` — ``"; did you mean 'cpu'?"`` for a likely typo of a known word, else ``""``.

Work

* :class:`SendCheck` — refuses, before anything is submitted, an async function or a callable the engine cannot send.

Leases

* :func:`owner_name` — who owns this process's leases, as lease registries record it: ``host:pid``.
* :func:`lease_from_record` — a lease registry's record as a :class:`gridboost.Lease`, for ``Backend.leases()``.
* :func:`amounts` — resources as the flat mapping a registry's :class:`~gridboost.worker_leases.Arbiter` sums.
* :mod:`gridboost.worker_leases` — the turns, quotas and fencing tokens every owner's requests share (standard
  library only, so it can travel with the registry by value).

Plumbing

* :class:`LRU` — a bounded cache (``remember`` evicts the oldest), for per-shape options or checks already passed.
* :func:`until_done_on_trio` — await, on trio, a ``concurrent.futures.Future`` another thread completes.

Commands on workers: :mod:`gridboost.worker_command` (standard library only, so it can travel to the workers by
value).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ._kit import LRU, ErrorMap, did_you_mean, finite, seconds, shown, until_done_on_trio
from ._public import publish
from ._records import Command, Lease, Priority, owner_name
from ._resources import Resources
from .exceptions import InvalidTask, NotSerializable

__all__ = [
    "LRU",
    "ErrorMap",
    "SendCheck",
    "amounts",
    "did_you_mean",
    "finite",
    "lease_from_record",
    "owner_name",
    "seconds",
    "shown",
    "until_done_on_trio",
]

_NAME = 80  # characters of a callable's name an error message quotes


def _named(fn: object) -> str:
    """A callable as an error message names it: its qualified name, else its ``repr``, cut short.

    A long qualified name loses its start, not its end: ``…test_x.<locals>.holds_a_lock`` still says which function.
    """
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name:
        return shown(fn)
    return name if len(name) <= _NAME else "\u2026" + name[-(_NAME - 1) :]


class SendCheck:
    """``SendCheck("Dask", cloudpickle.dumps)``: called with a task's target, refuses what the engine cannot run.

    For ``Backend.check_task``. An async function raises :class:`~gridboost.InvalidTask` (an engine's task runs plain
    functions); a callable that ``dumps`` (the engine's own pickler) cannot serialise raises
    :class:`~gridboost.NotSerializable`, naming it and why. A :class:`~gridboost.Command` passes: the backend runs it.
    A callable that passed is remembered (the last ``size`` hashable ones) and not serialised again.
    ``dumps`` is called only when a callable is checked, so it may import the engine then.
    """

    __slots__ = ("_passed", "dumps", "engine")

    def __init__(self, engine: str, dumps: Callable[[Any], object], *, size: int = 512) -> None:
        self.engine = engine
        self.dumps = dumps
        self._passed = LRU(size)

    def __call__(self, target: object) -> None:
        if isinstance(target, Command):
            return
        try:
            if target in self._passed:
                return
        except TypeError:  # unhashable: checked every time
            pass
        if inspect.iscoroutinefunction(target):
            raise InvalidTask(f"{_named(target)} is an async function: a {self.engine} task runs plain functions")
        try:
            self.dumps(target)
        except Exception as exc:
            raise NotSerializable(
                f"cannot send {_named(target)} to {self.engine}: it cannot be serialised ({type(exc).__name__}: {exc})"
            ) from exc
        with contextlib.suppress(TypeError):  # unhashable
            self._passed.remember(target, True)


def lease_from_record(
    record: Mapping[str, Any],
    *,
    backend: str,
    state: Literal["active", "pending", "preempting", "lingering"] | None = None,
) -> Lease:
    """A lease registry's record as a :class:`gridboost.Lease`.

    The record holds ``id``, ``owner`` (:func:`owner_name` of the process that took it), ``resources`` (a
    ``Resources``, its text or its mapping), ``priority`` (an int), ``expires_at`` (wall-clock seconds) and
    ``placements`` (a node per bundle: each node is listed once, in order), and may hold ``backend``, ``state``,
    ``token``, ``tenant``, ``preemptible`` and ``requested_at``. ``backend`` names the backend when the record does
    not; ``state``, when given, is reported instead of the record's (for a registry whose own states, such as
    ``granting``, are not a lease's).
    """
    return Lease(
        id=str(record["id"]),
        backend=str(record.get("backend") or backend),
        resources=Resources.coerce(record["resources"]),
        owner=str(record["owner"]),
        state=state or record.get("state", "active"),
        priority=Priority(record["priority"]),
        expires_at=float(record.get("expires_at", 0.0)),
        placements=tuple(dict.fromkeys(record.get("placements", ()))),
        token=int(record.get("token", 0)),
        tenant=str(record.get("tenant", "")),
        preemptible=bool(record.get("preemptible", False)),
        requested_at=float(record.get("requested_at", 0.0)),
    )


def amounts(resources: Resources) -> dict[str, float]:
    """``resources`` as a flat mapping of names to numbers (``cpu``, ``gpu``, ``memory``, ``gpu_memory``, custom
    names), with zero amounts left out: what a lease registry's :class:`~gridboost.worker_leases.Arbiter` sums."""
    flat = {key: float(value) for key, value in resources.as_dict().items() if key != "custom" and value}
    flat.update({key: float(value) for key, value in resources.custom.items() if value})
    return flat


publish(__name__)
