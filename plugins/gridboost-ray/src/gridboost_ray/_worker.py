"""What runs inside Ray's worker processes.

This module is shipped to the workers *by value* (``cloudpickle.register_pickle_by_value``), so a cluster whose
nodes do not have gridboost-ray installed can still run gridboost's work; it therefore imports only the standard
library at the top, ray inside the functions (every Ray worker has it), and the one part of gridboost made to
travel the same way, :mod:`gridboost.worker_command` (commands: started, waited for, stopped when cancelled), which
the backend ships by value too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gridboost.worker_command import run

__all__ = ["LeaseKeeper", "call", "hold", "run_command"]


def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run a callable that ``ray.remote`` cannot wrap itself (a builtin, a ``partial``, a callable object).

    Its arguments are this task's own, not a tuple of them: Ray resolves an ``ObjectRef`` (parked data) only where
    it is a whole argument."""
    return fn(*args, **kwargs)


def hold(value: Any) -> Any:
    """Return ``value``: run inside a boost's placement group, it stores parked data on the lease's node."""
    return value


def run_command(
    argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None, grace: float
) -> tuple[int, bytes, bytes, str]:
    """Run ``argv``; return (status, stdout, stderr, node id). Cancelled (``ray.cancel`` raises KeyboardInterrupt
    here): SIGTERM, then SIGKILL after ``grace``, reaped before the task ends (:func:`gridboost.worker_command.run`)."""
    import ray

    status, out, err = run(argv, env, cwd, grace)
    return status, out, err, ray.get_runtime_context().get_node_id()


class LeaseKeeper:
    """The cluster's registry of gridboost leases: a detached actor, one per cluster, on the head node.

    Every backend records its leases here (``put``), so any process connected to the cluster can list, renew or
    release them, and the keeper removes a lease's placement group its ``grace`` seconds (the record's, else the
    keeper's) past its ``expires_at``, whoever owns it: a lease never outlives its TTL, even when its owner hangs.
    Records whose group Ray removed (released, or its owner's job ended, which takes its groups with it) are
    dropped. With no record for ``idle_exit`` seconds the keeper exits, so a cluster that gridboost stopped using
    is left as it was found.

    An async actor: its methods run on one event loop, so the records need no lock.
    """

    def __init__(self, grace: float, tick: float, idle_exit: float) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._grace = grace
        self._tick = tick
        self._idle_exit = idle_exit
        self._reaper: asyncio.Task[None] | None = None
        self.reaped: list[str] = []

    def _start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def put(self, record: dict[str, Any], replaces: str | None = None) -> None:
        """Record a lease (or replace its record): id, pg_id, owner, state, expires_at, and what it holds.

        ``replaces`` names a record this one takes over (a lingering group reused by a new lease).
        """
        self._start()
        if replaces is not None:
            self._records.pop(replaces, None)
        self._records[record["id"]] = record

    async def renew(self, lease_id: str, expires_at: float) -> dict[str, Any] | None:
        """Move a lease's expiry; its record, or ``None`` when there is no such lease."""
        self._start()
        record = self._records.get(lease_id)
        if record is not None:
            record["expires_at"] = expires_at
        return record

    async def get(self, lease_id: str) -> dict[str, Any] | None:
        self._start()
        return self._records.get(lease_id)

    async def drop(self, lease_id: str) -> None:
        self._start()
        self._records.pop(lease_id, None)

    async def leases(self) -> list[dict[str, Any]]:
        self._start()
        return list(self._records.values())

    async def reaped_ids(self) -> list[str]:
        """The leases this keeper removed at their expiry (for tests and the CLI)."""
        return list(self.reaped)

    async def _reap_forever(self) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(self._tick)
            if self._records:
                idle_since = time.monotonic()
                table = placement_group_table()
                now = time.time()
                for lease_id, record in list(self._records.items()):
                    row = table.get(record["pg_id"])
                    if row is None or row.get("state") == "REMOVED":
                        self._records.pop(lease_id, None)
                    elif now >= record["expires_at"] + record.get("grace", self._grace):
                        with contextlib.suppress(Exception):  # already being removed: the next tick drops it
                            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["pg_id"]))))
                        self._records.pop(lease_id, None)
                        self.reaped.append(lease_id)
            elif time.monotonic() - idle_since >= self._idle_exit:
                # exit_actor() works only from a method; from this task the keeper ends itself by its handle.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
