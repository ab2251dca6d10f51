"""Checks that need a process of their own: run by test_dask_backend.py and test_leases.py.

``python _fresh_process.py embedded``: a grid with no address starts an embedded LocalCluster, runs work on it and
closes it; prints a JSON report (with the pids of the processes it started, to check they are gone).
``python _fresh_process.py chatter [quiet]``: on an embedded cluster, a task logs a warning on its worker's Dask logger
and the host one on its Dask client's; with ``quiet``, ``gridboost.quiet_engine_logs()`` is called first.
``python _fresh_process.py owner ADDRESS TTL``: joins ADDRESS, takes a one-CPU lease for TTL seconds, prints its id
and this process's owner name, then sleeps until it is killed (or stopped) by the test.
``python _fresh_process.py detached ADDRESS TTL GRACE``: joins ADDRESS, takes a detached one-CPU lease for TTL seconds
(through the backend: ``detached=True``), closes its grid and exits normally; prints a JSON report (the lease's id,
this process's owner name, and the backend's own reservations while it held the lease).
"""

from __future__ import annotations

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
from gridboost._records import owner_name
from gridboost.abc import ReservationRequest


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
    else:
        anyio.run(owner, sys.argv[2], float(sys.argv[3]))


if __name__ == "__main__":
    main()
