"""Checks that need a process of their own (``ray.init`` is process-wide): run by test_ray_backend.py.

``python _fresh_process.py embedded``: two grids with no address share one private Ray instance; prints a JSON
report. ``python _fresh_process.py join ADDRESS``: joins ADDRESS and prints the error it gets, as JSON.
``python _fresh_process.py lease ADDRESS TTL GRACE``: takes a one-CPU boost, prints ``READY`` with its ids, then
waits to be killed (or stopped) by the test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio
import psutil

import gridboost as gb


def env_var() -> str | None:
    return os.environ.get("GB_PASSED")


def namespace() -> str:
    import ray

    return str(ray.get_runtime_context().namespace)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


async def embedded() -> dict[str, Any]:
    import ray

    report: dict[str, Any] = {}
    options: dict[str, Any] = {"num_cpus": 1, "namespace": "gbtest", "runtime_env": {"env_vars": {"GB_PASSED": "yes"}}}
    async with gb.Grid("ray", **options) as first:
        conn = first.backend.connection  # type: ignore[attr-defined]
        report["temp_dir"] = conn._temp_dir
        report["nodes"] = len((await first.snapshot()).nodes)
        async with gb.Grid("ray") as second:
            report["shared"] = second.backend.connection is conn  # type: ignore[attr-defined]
            report["env_var"] = await second.offload(env_var, where="cluster")
        report["namespace"] = await first.offload(namespace, where="cluster")
        report["pids"] = [p.pid for p in psutil.Process().children(recursive=True)]
    report["initialized_after"] = ray.is_initialized()
    deadline = time.monotonic() + 15
    while _alive(report["pids"]) and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    report["alive_after"] = _alive(report["pids"])
    report["temp_dir_after"] = os.path.exists(report["temp_dir"])
    return report


async def join(address: str) -> dict[str, Any]:
    started = time.monotonic()
    try:
        async with gb.Grid("ray", address=address, connect_timeout=5):
            pass
    except gb.GridboostError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


async def lease(address: str, ttl: float, grace: float) -> dict[str, Any]:
    async with gb.Grid("ray", address=address, lease_grace=grace, linger=0) as grid:
        boost = await grid.request_boost("cpu=1", ttl=ttl)
        assert boost.reservation is not None
        ids = {"boost": boost.id, "pg": boost.reservation.handle.pg.id.hex(), "pid": os.getpid()}
        print("READY " + json.dumps(ids), flush=True)
        await anyio.sleep(600)
    return ids


def main() -> None:
    what = sys.argv[1]
    if what == "lease":
        anyio.run(lease, sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        return
    report = anyio.run(embedded) if what == "embedded" else anyio.run(join, sys.argv[2])
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
