"""What a cluster's lease registry decides for every owner at once: whose turn it is, quotas, fencing tokens.

A lease registry runs inside the engine (the Ray lease keeper actor, the Dask scheduler plugin) and serves every
process that takes leases on the cluster. :class:`Arbiter` is the part of it that is the same on every engine:

* **Turns.** A request that is not granted at once leaves a *ticket* (owner, tenant, priority, when it was first
  asked). A ticket gets its turn only when no live ticket is ahead of it: higher priority first, then the oldest.
  There is no backfill: a request that waits for capacity holds back every request behind it, so a big CRITICAL
  request is never starved by a stream of small LOW ones. Owners poll (every answer refreshes their ticket); a ticket
  not refreshed for ``stale`` seconds belongs to an owner that died, stalled or gave up, and is dropped (asks look
  for such tickets at most every tenth of ``stale``, and every second: a look goes over every ticket). The line is
  kept sorted, so an ask costs O(log n) in the tickets waiting, and :meth:`Arbiter.head` names the one ticket whose
  turn it is: a registry wakes that one owner when something changes, not every waiting one.
* **Quotas.** Per tenant, a cap on what the tenant's granted leases hold together. A request that would pass it is
  held back (answer ``quota``, with the quota and the use in one line); it waits, but never holds back another
  tenant's request. The registry tells the arbiter what each granted lease counts (:meth:`Arbiter.hold`,
  :meth:`Arbiter.unhold`), and the arbiter keeps a running sum per tenant: a quota check costs the same with ten
  leases or ten thousand.
* **Tokens.** Every grant gets a fencing token, larger than every token this registry issued before: the larger of
  the last one plus one and the wall clock in microseconds. So a registry that restarts (and forgets) still issues
  larger tokens, as long as the clock does not go back and it issued fewer than a million a second before.

Amounts are flat mappings of resource names to numbers (``{"cpu": 2.0, "gpu": 1.0, "memory": 2**30}``), as
:func:`gridboost.backend_kit.amounts` writes them. Like :mod:`gridboost.worker_command`, this module imports only the
standard library, so a backend ships it *by value* with the registry that uses it, and a cluster whose nodes lack
gridboost still runs it. The registry serialises calls (one event loop), so the arbiter takes no lock.

* :class:`Arbiter` — the turns, quotas and fencing tokens of one cluster's registry.
* :func:`current_lease` — inside work that runs under a boost: its lease's id and fencing token.
* :func:`in_lease` — run a callable so that :func:`current_lease` names a lease (what backends wrap boost work in).
* :class:`CurrentLease` — what :func:`current_lease` returns: ``(id, token)``.
* :func:`fits` — whether amounts fit in a room.
* :func:`total` — the sum of the amounts of some lease records.
* :func:`quota_text` — amounts in one short line, as quotas are written (``cpu=8,gpu=1``).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple

__all__ = ["Arbiter", "CurrentLease", "current_lease", "fits", "in_lease", "quota_text", "total"]

#: Seconds a waiting owner's ticket lives without being refreshed (owners poll far more often).
STALE = 10.0
_EPS = 1e-9

Amounts = dict[str, float]


def fits(amounts: Mapping[str, float], room: Mapping[str, float]) -> bool:
    """Whether ``amounts`` fit in ``room`` (a name ``room`` lacks has none)."""
    return all(value <= room.get(key, 0.0) + _EPS for key, value in amounts.items() if value > 0)


def total(records: Iterable[Mapping[str, Any]]) -> Amounts:
    """The sum of the ``amounts`` of ``records``."""
    out: Amounts = {}
    for record in records:
        for key, value in record["amounts"].items():
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _number(value: float) -> str:
    return f"{value:g}" if value < 1e6 else f"{value / 2**30:.3g}GiB"


def quota_text(amounts: Mapping[str, float]) -> str:
    """Amounts in one short line, as quotas are written: ``cpu=8,gpu=1``."""
    return ",".join(f"{key}={_number(value)}" for key, value in sorted(amounts.items())) or "nothing"


class CurrentLease(NamedTuple):
    """The lease a piece of work runs under: its id and the grant's fencing token."""

    id: str
    token: int


_current: ContextVar[CurrentLease | None] = ContextVar("gridboost_current_lease", default=None)


def current_lease() -> CurrentLease | None:
    """Inside work that runs under a boost (on any backend): the lease's id and fencing token; ``None`` elsewhere.

    Send the token with each write to an outside system, and have it refuse a token smaller than the largest it
    has seen: a writer whose lease ended (expired, preempted, reaped while its owner was stopped) and was granted to
    someone else is then refused, however late it wakes::

        lease = gridboost.current_lease()
        store.put(key, value, fence=lease.token if lease else None)
    """
    installed = _installed()
    return None if installed is None else installed._current.get()


def in_lease(lease_id: str, token: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` with :func:`current_lease` saying ``(lease_id, token)``.

    Backends wrap the work of a boost in it, on the worker.
    """
    installed = _installed()
    if installed is None:  # no gridboost on this worker: nothing there can ask
        return fn(*args, **kwargs)
    var = installed._current
    reset = var.set(CurrentLease(lease_id, token))
    try:
        return fn(*args, **kwargs)
    finally:
        var.reset(reset)


def _installed() -> Any:
    """This module as the worker's Python has it installed, or ``None``.

    Shipped by value (see the module docstring), a function of this module is a copy with globals of its own, and a
    ``ContextVar`` cannot travel at all: so both functions above reach the variable through the installed module,
    the one user code on the worker imports. A cached import, so the cost is a dictionary lookup.
    """
    try:
        import gridboost.worker_leases as installed
    except ImportError:
        return None
    return installed


def _key(ticket: Mapping[str, Any]) -> tuple[int, float, str]:
    return (-int(ticket["priority"]), float(ticket["requested_at"]), str(ticket["id"]))


def _add(into: Amounts, amounts: Mapping[str, float], sign: float = 1.0) -> None:
    for key, value in amounts.items():
        into[key] = into.get(key, 0.0) + sign * float(value)


class Arbiter:
    """Turns, quotas and tokens for one cluster's registry (see the module docstring).

    ``clock`` is wall-clock seconds (tickets carry the wall-clock time of their first request, which every process
    of a cluster reads alike); tests pass their own.

    Quota use comes from one of two places. A registry that calls :meth:`hold` and :meth:`unhold` as its leases are
    granted and end passes nothing (``granted=None``), and the arbiter's running sums are used; one that passes its
    granted leases (each with ``tenant`` and ``amounts``) has them summed on each call.
    """

    def __init__(self, *, stale: float = STALE, clock: Callable[[], float] = time.time) -> None:
        self.stale = stale
        self.clock = clock
        #: Waiting requests by lease id: id, owner, tenant, priority, requested_at, amounts, preemptible, seen.
        self.pending: dict[str, dict[str, Any]] = {}
        #: Caps by tenant.
        self.quotas: dict[str, Amounts] = {}
        self.last_token = 0
        # The keys (priority, age, id) of the pending tickets that no quota holds back, sorted: the line. And the ids
        # of those a quota holds back (a dict for its order).
        self._line: list[tuple[int, float, str]] = []
        self._held: dict[str, None] = {}
        # What each granted lease counts for its tenant's quota, and the running sums (with how many leases).
        self._holding: dict[str, tuple[str, Amounts]] = {}
        self._used: dict[str, Amounts] = {}
        self._leases: dict[str, int] = {}
        # When the tickets were last swept on an ask: a sweep looks at every ticket, so asks do it now and then.
        self._swept = -math.inf

    # -- tokens ----------------------------------------------------------------------------------------------------

    def token(self) -> int:
        """A fencing token for a grant: larger than every one issued before (see the module docstring)."""
        self.last_token = max(self.last_token + 1, int(self.clock() * 1_000_000))
        return self.last_token

    # -- quotas ----------------------------------------------------------------------------------------------------

    def set_quota(self, tenant: str, amounts: Mapping[str, float] | None) -> None:
        """Cap what ``tenant``'s granted leases hold together; ``None`` clears the cap."""
        if amounts is None:
            self.quotas.pop(tenant, None)
        else:
            self.quotas[tenant] = {key: float(value) for key, value in amounts.items()}

    def hold(self, lease_id: str, tenant: str, amounts: Mapping[str, float]) -> None:
        """Count granted lease ``lease_id`` (``amounts`` of ``tenant``) for its tenant's quota, in place of what it
        counted before."""
        self.unhold(lease_id)
        counted = {key: float(value) for key, value in amounts.items() if value}
        self._holding[lease_id] = (tenant, counted)
        _add(self._used.setdefault(tenant, {}), counted)
        self._leases[tenant] = self._leases.get(tenant, 0) + 1

    def unhold(self, lease_id: str) -> None:
        """Stop counting ``lease_id`` (it ended, or holds nothing now); nothing happens if it was not counted."""
        held = self._holding.pop(lease_id, None)
        if held is None:
            return
        tenant, counted = held
        left = self._leases[tenant] - 1
        if left:
            self._leases[tenant] = left
            _add(self._used[tenant], counted, -1.0)
        else:  # the last one: exactly nothing, not what rounding left over
            del self._leases[tenant], self._used[tenant]

    def used(self, tenant: str, granted: Iterable[Mapping[str, Any]] | None = None) -> Amounts:
        """What ``tenant``'s granted leases hold together: the running sum, or the sum of ``granted``'s."""
        if granted is None:
            return {key: value for key, value in self._used.get(tenant, {}).items() if abs(value) > _EPS}
        return total(r for r in granted if r.get("tenant") == tenant)

    def over_quota(
        self, tenant: str, amounts: Mapping[str, float], granted: Iterable[Mapping[str, Any]] | None = None
    ) -> str:
        """Why a request of ``amounts`` by ``tenant`` would pass its quota, in one line; ``""`` when it would not.

        ``granted``: the registry's granted leases (each with ``tenant`` and ``amounts``), or ``None`` for the
        running sums that :meth:`hold` keeps.
        """
        quota = self.quotas.get(tenant)
        if quota is None:
            return ""
        used = self.used(tenant, granted)
        after = {key: used.get(key, 0.0) + float(amounts.get(key, 0.0)) for key in quota}
        if fits(after, quota):
            return ""
        return (
            f"tenant {tenant!r} is over its quota: quota {quota_text(quota)}, in use {quota_text(used)}, "
            f"asked {quota_text(amounts)}"
        )

    def quota_rows(self, granted: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every quota with what its tenant's granted leases hold now (``granted`` as for :meth:`over_quota`)."""
        return [
            {"tenant": tenant, "quota": dict(quota), "used": self.used(tenant, granted)}
            for tenant, quota in sorted(self.quotas.items())
        ]

    # -- turns -----------------------------------------------------------------------------------------------------

    def ask(self, ticket: Mapping[str, Any], granted: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Queue ``ticket`` (or refresh it) and say whether it may be placed now.

        ``{"status": "turn"}``: place it now; ``{"status": "wait", "ahead": n}``: ``n`` live tickets come first;
        ``{"status": "quota", "why": ...}``: its tenant's quota holds it back. A ticket keeps its place (its first
        ``requested_at``) across refreshes. ``granted`` as for :meth:`over_quota`.
        """
        now = self.clock()
        if now - self._swept >= min(1.0, self.stale / 10):
            self.sweep(now)
        mine = self.pending.get(ticket["id"])
        if mine is not None and now - mine["seen"] > self.stale:  # stale, not swept yet: gone, as a sweep would have it
            self.leave(ticket["id"])
            mine = None
        if mine is None:
            mine = self.pending[ticket["id"]] = {**ticket, "held_back": ""}
            bisect.insort(self._line, _key(mine))
        mine["seen"] = now
        why = self.over_quota(mine["tenant"], mine["amounts"], granted)
        key = _key(mine)
        if bool(why) != bool(mine["held_back"]):  # into the line, or out of it
            if why:
                self._unline(key)
                self._held[mine["id"]] = None
            else:
                bisect.insort(self._line, key)
                self._held.pop(mine["id"], None)
        mine["held_back"] = why
        if why:
            return {"status": "quota", "why": why}
        ahead = bisect.bisect_left(self._line, key)
        return {"status": "wait", "ahead": ahead} if ahead else {"status": "turn"}

    def head(self) -> str | None:
        """The id of the ticket whose turn it is (as of its owner's last ask), or ``None`` when no ticket waits
        outside a quota."""
        return self._line[0][2] if self._line else None

    def held_back(self) -> list[str]:
        """The ids of the tickets their tenants' quotas hold back (as of their owners' last asks)."""
        return list(self._held)

    def to_wake(self) -> list[str]:
        """The tickets a registry wakes when something changes that may let a request through (a grant, a release, a
        ticket gone, a quota): the one whose turn it is, and those a quota holds back (their tenant may have room
        now). The others would only be told to wait again."""
        head = self.head()
        return [head, *self._held] if head is not None else list(self._held)

    def leave(self, lease_id: str) -> None:
        """The request was granted, or its owner gave up: its ticket goes."""
        mine = self.pending.pop(lease_id, None)
        if mine is None:
            return
        if mine["held_back"]:
            self._held.pop(lease_id, None)
        else:
            self._unline(_key(mine))

    def _unline(self, key: tuple[int, float, str]) -> None:
        at = bisect.bisect_left(self._line, key)
        if at < len(self._line) and self._line[at] == key:
            del self._line[at]

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop the tickets not refreshed for ``stale`` seconds; their ids."""
        now = self.clock() if now is None else now
        self._swept = now
        gone = [lid for lid, t in self.pending.items() if now - t["seen"] > self.stale]
        for lid in gone:
            self.leave(lid)
        return gone

    # -- preemption --------------------------------------------------------------------------------------------------

    @staticmethod
    def victims(
        ticket: Mapping[str, Any],
        granted: Iterable[Mapping[str, Any]],
        frees: Callable[[list[Mapping[str, Any]]], bool],
    ) -> list[Mapping[str, Any]] | None:
        """The leases to take back so that ``ticket`` fits; ``None`` when all that may be taken is not enough.

        Only a lease that is ``preemptible``, active, of another owner and of strictly lower priority may be taken;
        the lowest priority goes first, then the most recently granted (``granted_at``), and no more are taken than
        needed: ``frees(chosen)`` (the engine's placement) says whether ``ticket`` fits once ``chosen`` are gone.
        """
        pool = sorted(
            (
                r
                for r in granted
                if r.get("preemptible")
                and r.get("state", "active") == "active"
                and r.get("owner") != ticket.get("owner")
                and int(r["priority"]) < int(ticket["priority"])
            ),
            key=lambda r: (int(r["priority"]), -float(r.get("granted_at", 0.0)), str(r["id"])),
        )
        chosen: list[Mapping[str, Any]] = []
        for record in pool:
            chosen.append(record)
            if frees(chosen):
                break
        else:
            return None
        for record in reversed(chosen[:-1]):  # one taken early may be needless once a larger one is taken
            rest = [c for c in chosen if c is not record]
            if frees(rest):
                chosen = rest
        return chosen

    def waiting(self) -> list[dict[str, Any]]:
        """The live tickets in the order they will be served, each with ``waited`` (seconds since first asked)."""
        now = self.clock()
        self.sweep(now)
        return [{**t, "waited": max(0.0, now - t["requested_at"])} for t in sorted(self.pending.values(), key=_key)]
