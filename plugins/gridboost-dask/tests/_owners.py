"""Owners of a shared cluster for test_shared.py, and what the tests read of the engine.

:class:`Owner` is a lease owner process (``_fresh_process.py serve``, or ``chaos``), driven over stdin and speaking
JSON events on stdout, kept by kind and ref until a test takes them. The readers look at the scheduler's own state:
the lease registry plugin's records, line and quotas, and the workers' lease marks in the scheduler's books.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from distributed import Client

import gridboost as gb
from conftest import SETTLE, eventually
from gridboost import Grid

HERE = Path(__file__).parent
#: The lease registry's name among the scheduler's plugins (gridboost_dask._worker.REGISTRY).
REGISTRY = "gridboost-leases"

# The scheduler runs what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the scheduler plugin's own state --------------------------------------------------------------------------------


def _registry(dask_scheduler: Any = None) -> dict[str, Any]:
    """On the scheduler: the registry's line (in serving order), its lease records and its quotas."""
    plugin = dask_scheduler.plugins[REGISTRY]
    keys = ("id", "lease", "owner", "tenant", "priority", "held_back", "requested_at")
    return {
        "pending": [{k: t.get(k) for k in keys} for t in plugin.arbiter.waiting()],
        "leases": [
            {k: r.get(k) for k in ("id", "owner", "tenant", "token", "state", "total")} for r in plugin.leases.values()
        ],
        "quotas": {tenant: dict(q) for tenant, q in plugin.arbiter.quotas.items()},
        "preempted": {t["id"]: dict(t) for t in plugin.preempted.values()},
    }


async def registry(client: Client) -> dict[str, Any]:
    state: dict[str, Any] = await anyio.to_thread.run_sync(client.run_on_scheduler, _registry)
    return state


async def until(check: Callable[[dict[str, Any]], bool], client: Client, what: str, timeout: float = SETTLE) -> None:
    """Wait (bounded) until ``check`` holds of the registry's state."""

    async def holds() -> bool:
        return check(await registry(client))

    await eventually(holds, what, timeout)


# -- owner processes -------------------------------------------------------------------------------------------------


class Owner:
    """A process of its own that takes leases when told (``_fresh_process.py serve``); its events, by kind and ref."""

    def __init__(self, address: str, log: Path, *more: str, action: str = "serve") -> None:
        self.log = log
        with log.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "_fresh_process.py"), action, address, *more],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.events: dict[tuple[str, str | None], dict[str, Any]] = {}
        self.exited = False
        self.owner = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                self.events[(event["event"], event.get("ref"))] = event
        self.exited = True

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    async def expect(self, event: str, ref: str | None = None, timeout: float = SETTLE) -> dict[str, Any]:
        """The event ``event`` of ``ref``, once it came (bounded); a request that failed instead fails the test."""
        with anyio.move_on_after(timeout):
            while (event, ref) not in self.events:
                failed = self.events.get(("failed", ref))
                if event != "failed" and failed is not None:
                    pytest.fail(f"{self.owner}: {ref} failed: {failed['error']}: {failed['message']}")
                if self.exited:
                    pytest.fail(f"owner process exited {self.process.wait()}\n{self.log.read_text()[-3000:]}")
                await anyio.sleep(0.02)
            return self.events.pop((event, ref))
        pytest.fail(f"{self.owner}: no {event} event for {ref} after {timeout:g}s\n{self.log.read_text()[-3000:]}")

    async def start(self) -> Owner:
        self.owner = (await self.expect("ready", timeout=90))["owner"]
        return self

    def stop(self) -> None:
        """Ask it to quit (it closes its grids), then end it by its pid if it does not."""
        assert self.process.stdin is not None and self.process.stdout is not None
        with contextlib.suppress(OSError, ValueError):  # it may be gone already (killed)
            self.send(op="quit")
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self._reader.join(30)
        self.process.stdout.close()


async def fill(grid: Grid, leave: int = 0) -> list[gb.Boost]:
    """Take every free CPU of the cluster but ``leave`` with one-CPU boosts of this test's own grid."""
    snapshot = await grid.snapshot()
    free = int(sum(node.available.cpu for node in snapshot.alive) + 1e-9)
    assert free >= 3, f"the session's cluster has only {free} free CPUs: a lease of another test is still held"
    return [await grid.request_boost("cpu=1", ttl=120) for _ in range(free - leave)]


async def release_all(boosts: list[gb.Boost]) -> None:
    for boost in boosts:
        await boost.release()


def pending_of(state: dict[str, Any], owner: Owner) -> list[dict[str, Any]]:
    return [t for t in state["pending"] if t["owner"] == owner.owner]


def leases_of(state: dict[str, Any], owner: Owner) -> list[dict[str, Any]]:
    return [r for r in state["leases"] if r["owner"] == owner.owner and r["state"] == "active"]


def _marks(dask_scheduler: Any = None) -> dict[str, Any]:
    """On the scheduler: the lease marks workers hold (amount > 0) in its own books, by boost id, with where."""
    marks: dict[str, list[str]] = {}
    for addr, ws in dask_scheduler.workers.items():
        for name, amount in ws.resources.items():
            if name.startswith("gridboost-lease:") and amount > 0:
                marks.setdefault(name.rsplit(":", 1)[1], []).append(addr)
    return {"marks": marks}


async def engine_leases(client: Client) -> dict[str, Any]:
    """The lease marks of every owner, as the scheduler's books hold them (``marks``: boost id → workers)."""
    state: dict[str, Any] = await anyio.to_thread.run_sync(client.run_on_scheduler, _marks)
    return state
