"""Checks that need a process of their own: run by test_dask_backend.py, test_leases.py and test_shared.py.

``python _fresh_process.py embedded``: a grid with no address starts an embedded LocalCluster, runs work on it and
closes it; prints a JSON report (with the pids of the processes it started, to check they are gone).
``python _fresh_process.py chatter [quiet]``: on an embedded cluster, a task logs a warning on its worker's Dask logger
and the host one on its Dask client's; with ``quiet``, ``gridboost.quiet_engine_logs()`` is called first.
``python _fresh_process.py owner ADDRESS TTL``: joins ADDRESS, takes a one-CPU lease for TTL seconds, prints its id
and this process's owner name, then sleeps until it is killed (or stopped) by the test.
``python _fresh_process.py detached ADDRESS TTL GRACE``: joins ADDRESS, takes a detached one-CPU lease for TTL seconds
(through the backend: ``detached=True``), closes its grid and exits normally; prints a JSON report (the lease's id,
this process's owner name, and the backend's own reservations while it held the lease).
``python _fresh_process.py serve ADDRESS``: a lease owner for test_shared.py that serves many rounds without starting
again. It joins ADDRESS and reads JSON commands, one a line, on stdin; it answers with JSON events, one a line, on
stdout, the first ``{"event": "ready", "owner": "host:pid"}``:

* ``{"op": "request", "ref": R, "resources": "cpu=1", "priority": "low", "tenant": T, "wait": 60, "ttl": 120,
  "preemptible": false}`` asks for a boost in the background (one grid per tenant, opened first); then
  ``{"event": "granted", "ref": R, "id", "token", "placements"}`` or ``{"event": "failed", "ref": R, "error": <class
  name>, "message"}``.
* ``{"op": "release", "ref": R}``: releases that boost; ``{"event": "released", "ref": R}``.
* ``{"op": "leases", "ref": R}``: ``{"event": "leases", "ref": R, "leases": [...]}``, every lease the cluster lists.
* ``{"op": "renew", "ref": R, "ttl": T}``: renews that boost; ``{"event": "renewed", "ref": R}`` (or ``failed``).
* ``{"op": "work", "ref": R, "count": N, "seconds": S}``: submits ``N`` naps of ``S`` seconds under that boost;
  ``{"event": "submitted", "ref": R, "keys": [...]}`` (the scheduler's keys), then for each ``i``
  ``{"event": "done" or "error", "ref": "R#i", "error", "at"}``; a submission refused: ``error`` of ``R``.
* ``{"op": "lease", "ref": R}``: ``{"event": "lease", "ref": R, "inside": [id, token], "outside": null}``
  (``current_lease()`` offloaded under the boost, and without one).
* A boost of this process that is preempted says ``{"event": "preempted", "ref": R, "grace", "at"}`` (the hook).
* ``{"op": "quit"}`` (or the end of stdin): closes its grids and exits.

``serve ADDRESS OPTIONS`` (JSON) passes grid options (``preempt_grace``, ``lease_grace``) to every grid.
``python _fresh_process.py chaos ADDRESS SEED OPS``: a lease owner that makes ``OPS`` seeded random requests, releases,
renewals and short works under its boosts, saying ``{"event": "step", "ref": n}`` after each, then ``{"event":
"report", "counts"}`` and exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import time
from typing import Any

import anyio
import psutil

import gridboost as gb
from gridboost.abc import ReservationRequest
from gridboost.backend_kit import owner_name
from gridboost.testing import lease_chaos


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def hostname() -> str:
    import socket

    return socket.gethostname()


async def embedded() -> dict[str, Any]:
    report: dict[str, Any] = {}
    async with gb.Grid("dask", n_workers=1, threads_per_worker=1) as grid:
        snapshot = await grid.snapshot()
        report["nodes"] = len(snapshot.nodes)
        report["local"] = [node.is_local for node in snapshot.nodes]
        report["grow"] = grid.backend.capabilities.grow
        report["ran"] = await grid.offload(hostname, where="cluster")
        report["pids"] = [
            p.pid for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())
        ]
    deadline = time.monotonic() + 15
    while _alive(report["pids"]) and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    report["alive_after"] = _alive(report["pids"])
    return report


async def owner(address: str, ttl: float) -> None:
    async with gb.Grid("dask", address=address, lease_grace=2.0) as grid:
        boost = await grid.request_boost("cpu=1", ttl=ttl)
        print("LEASE " + json.dumps({"id": boost.id, "owner": owner_name(), "pid": os.getpid()}), flush=True)
        await anyio.sleep(3600)


async def detached(address: str, ttl: float, grace: float) -> dict[str, Any]:
    report: dict[str, Any] = {"id": f"detached-{os.getpid()}-{secrets.token_hex(3)}", "owner": owner_name()}
    async with gb.Grid("dask", address=address, lease_grace=grace) as grid:
        request = ReservationRequest(id=report["id"], resources=gb.Resources(cpu=1), ttl=ttl, detached=True)
        reservation = await grid.backend.reserve(request)
        report["placements"] = list(reservation.placements)
        report["reservations"] = [r.id for r in await grid.backend.reservations()]
    return report  # the grid is closed: its leak check and its backend's close passed the detached lease by


def chatter() -> str:
    """Run as a task: a warning on a worker process's Dask logger."""
    import logging

    logging.getLogger("distributed.worker").warning("CHATTER from a worker process")
    return "said"


async def chatty() -> dict[str, Any]:
    async with gb.Grid("dask", n_workers=1, threads_per_worker=1) as grid:
        said = await grid.offload(chatter, where="cluster")
        logging.getLogger("distributed.client").warning("CHATTER from the host's Dask client")
    return {"said": said}


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def nap(seconds: float) -> float:
    """Work that sleeps in small steps and stops as soon as Dask cancels its task (a thread cannot be interrupted)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # moved to this process (its boost was preempted): an ordinary nap
        time.sleep(seconds)
        return seconds
    key = worker.get_current_task()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        ts = worker.state.tasks.get(key)
        if ts is None or ts.state in ("cancelled", "released", "forgotten"):
            raise RuntimeError("cancelled")
        time.sleep(0.01)
    return seconds


class Notices:
    """Says ``preempted`` when a boost of this process is preempted (the grid's hook)."""

    def __init__(self, refs: dict[str, str]) -> None:
        self.refs = refs

    @gb.hookimpl
    def gridboost_boost_preempted(self, boost: gb.Boost, grace: float) -> None:
        emit({"event": "preempted", "ref": self.refs.get(boost.id), "grace": grace, "at": time.time()})


async def work(grid: gb.Grid, boost: gb.Boost, cmd: dict[str, Any]) -> None:
    """Naps under ``boost`` (``seconds``: one number for ``count`` naps, or a list): pinned to it with ``where=boost``,
    or with ``auto`` placed by the policy, claiming ``resources`` each, as work in the boost's block is; ``done``
    says where each ran in the end (a preempted boost's queued work moves)."""
    ref, auto = cmd["ref"], cmd.get("auto", False)
    seconds = cmd.get("seconds", 60)
    naps = seconds if isinstance(seconds, list) else [seconds] * cmd.get("count", 1)
    async with contextlib.AsyncExitStack() as stack:
        if auto:  # left (which releases the boost) once all the work has ended
            await stack.enter_async_context(boost)
        try:
            handles = [
                grid.submit(nap, s, where="auto" if auto else boost, resources=cmd.get("resources")) for s in naps
            ]
        except gb.GridboostError as exc:
            emit({"event": "error", "ref": ref, "error": type(exc).__name__, "message": str(exc), "at": time.time()})
            return
        prefix = grid.backend.task_prefix  # type: ignore[attr-defined]
        emit({"event": "submitted", "ref": ref, "keys": [prefix + h.id for h in handles]})

        async def one(i: int, handle: gb.TaskHandle[Any]) -> None:
            try:
                await handle
                assert handle.placement is not None
                emit({"event": "done", "ref": f"{ref}#{i}", "at": time.time(), "where": handle.placement.kind})
            except Exception as exc:
                emit({"event": "error", "ref": f"{ref}#{i}", "error": type(exc).__name__, "at": time.time()})

        async with anyio.create_task_group() as tasks:
            for i, handle in enumerate(handles):
                tasks.start_soon(one, i, handle)


def lease_json(lease: gb.Lease) -> dict[str, Any]:
    return {
        "id": lease.id,
        "owner": lease.owner,
        "state": lease.state,
        "tenant": lease.tenant,
        "preemptible": lease.preemptible,
        "priority": lease.priority.name,
        "token": lease.token,
        "waited": lease.waited,
        "requested_at": lease.requested_at,
        "expires_at": lease.expires_at,
        "resources": str(lease.resources),
    }


async def serve(address: str, options: dict[str, Any]) -> None:
    """A lease owner that serves many rounds: JSON commands on stdin, JSON events on stdout (see the module
    docstring)."""
    grids: dict[str, gb.Grid] = {}
    boosts: dict[str, gb.Boost] = {}
    refs: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:

        async def grid_for(tenant: str) -> gb.Grid:
            # Only in the main task: a grid is entered and exited in one task.
            if tenant not in grids:
                grid = gb.Grid(
                    "dask", address=address, tenant=tenant, watch_interval=0.2, plugins=[Notices(refs)], **options
                )
                grids[tenant] = await stack.enter_async_context(grid)
            return grids[tenant]

        async def request(cmd: dict[str, Any]) -> None:
            ref = cmd["ref"]
            try:
                boost = await grids[cmd.get("tenant") or "default"].request_boost(
                    cmd.get("resources", "cpu=1"),
                    ttl=cmd.get("ttl", 120),
                    priority=gb.Priority[cmd.get("priority", "normal").upper()],
                    wait=cmd.get("wait", 60),
                    preemptible=cmd.get("preemptible", False),
                )
            except gb.GridboostError as exc:
                emit({"event": "failed", "ref": ref, "error": type(exc).__name__, "message": str(exc)})
                return
            boosts[ref] = boost
            refs[boost.id] = ref
            emit({"event": "granted", "ref": ref, "id": boost.id, "token": boost.token, "placements": boost.placements})

        async def other(cmd: dict[str, Any]) -> None:
            if cmd["op"] == "release":
                await boosts.pop(cmd["ref"]).release()
                emit({"event": "released", "ref": cmd["ref"]})
            elif cmd["op"] == "renew":
                try:
                    await boosts[cmd["ref"]].renew(cmd.get("ttl", 120))
                except gb.GridboostError as exc:
                    emit({"event": "failed", "ref": cmd["ref"], "error": type(exc).__name__, "message": str(exc)})
                    return
                emit({"event": "renewed", "ref": cmd["ref"]})
            elif cmd["op"] == "work":
                await work(grids[cmd.get("tenant") or "default"], boosts[cmd["ref"]], cmd)
            elif cmd["op"] == "lease":
                grid, boost = grids[cmd.get("tenant") or "default"], boosts[cmd["ref"]]
                inside = await grid.offload(gb.current_lease, where=boost)
                outside = await grid.offload(gb.current_lease, where="cluster")
                emit({"event": "lease", "ref": cmd["ref"], "inside": inside, "outside": outside})
            elif cmd["op"] == "leases":
                leases = await grids[cmd.get("tenant") or "default"].leases()
                emit({"event": "leases", "ref": cmd["ref"], "leases": [lease_json(x) for x in leases]})

        # The first grid is opened before "ready": the test's first request then costs no connection.
        await grid_for("default")
        emit({"event": "ready", "owner": owner_name()})
        async with anyio.create_task_group() as tasks:
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line.strip():
                    if not line:  # stdin closed: the test is gone
                        break
                    continue
                cmd = json.loads(line)
                if cmd["op"] == "quit":
                    break
                await grid_for(cmd.get("tenant") or "default")
                tasks.start_soon(request if cmd["op"] == "request" else other, cmd)
            tasks.cancel_scope.cancel()


async def chaos(address: str, seed: int, ops: int) -> None:
    """``ops`` seeded random steps on one grid (:func:`gridboost.testing.lease_chaos`), each step reported."""
    async with gb.Grid("dask", address=address, preempt_grace=0.5, lease_grace=1.0, watch_interval=0.2) as grid:
        emit({"event": "ready", "owner": owner_name()})
        counts = await lease_chaos(grid, seed, ops, on_step=lambda step: emit({"event": "step", "ref": str(step)}))
    emit({"event": "report", "counts": counts})


def main() -> None:
    what = sys.argv[1]
    if what == "chatter":
        if sys.argv[2:] == ["quiet"]:
            gb.quiet_engine_logs()
        print("REPORT " + json.dumps(anyio.run(chatty)), flush=True)
    elif what == "embedded":
        print("REPORT " + json.dumps(anyio.run(embedded)), flush=True)
    elif what == "detached":
        print(
            "REPORT " + json.dumps(anyio.run(detached, sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))), flush=True
        )
    elif what == "serve":
        anyio.run(serve, sys.argv[2], json.loads(sys.argv[3]) if sys.argv[3:] else {})
    elif what == "chaos":
        anyio.run(chaos, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        anyio.run(owner, sys.argv[2], float(sys.argv[3]))


if __name__ == "__main__":
    main()
