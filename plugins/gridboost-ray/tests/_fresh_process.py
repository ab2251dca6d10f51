"""Checks that need a process of their own (``ray.init`` is process-wide): run by test_ray_backend.py.

``python _fresh_process.py embedded``: two grids with no address share one private Ray instance; prints a JSON
report. ``python _fresh_process.py join ADDRESS``: joins ADDRESS and prints the error it gets, as JSON.
``python _fresh_process.py lease ADDRESS TTL GRACE``: takes a one-CPU boost, prints ``READY`` with its ids, then
waits to be killed (or stopped) by the test. ``python _fresh_process.py detached ADDRESS TTL``: takes a one-CPU lease
with ``grid.request_lease`` (one that outlives this process), prints a JSON report of it and exits normally.
``python _fresh_process.py serve ADDRESS``: a lease owner that serves many requests, one JSON command a line on
stdin (see :func:`serve`), and says what happened on stdout, one ``WORD {json}`` line each.
``python _fresh_process.py chaos ADDRESS SEED OPS``: a lease owner that makes ``OPS`` seeded random requests,
releases and renewals of small boosts, then prints ``REPORT`` with what it did and exits.
``python _fresh_process.py grow``: starts a cluster of its own whose
head runs Ray's fake-multinode autoscaler, takes a boost only a node it has not got yet can hold, and prints a JSON
report of how the cluster grew; then ends every process it started, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any

import anyio
import psutil

import gridboost as gb
from gridboost.testing import lease_chaos


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


async def detached(address: str, ttl: float) -> dict[str, Any]:
    async with gb.Grid("ray", address=address, linger=0) as grid:
        lease = await grid.request_lease("cpu=1", ttl=ttl)
        held = [r.id for r in await grid.backend.reservations()]
    return {
        "id": lease.id,
        "owner": lease.owner,
        "pid": os.getpid(),
        "state": lease.state,
        "expires_at": lease.expires_at,
        "placements": list(lease.placements),
        "reservations": held,
    }


def _autoscaling_config(gcs_address: str) -> dict[str, Any]:
    """Ray's fake-multinode provider config (the wheel lacks the example.yaml AutoscalingCluster reads)."""
    return {
        "cluster_name": "gridboost-grow",
        "max_workers": 1,
        # As Ray's own fake-multinode example: no node updaters (they would ssh) and no launch-config check.
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "use_internal_ips": True,
        "idle_timeout_minutes": 1,
        "upscaling_speed": 1.0,
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0, "node_config": {}},
            "ray.worker.grown": {
                "resources": {"CPU": 2},
                "labels": {"zone": "grown"},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "nobody"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _request() -> list[dict[str, float]]:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("autoscaler_resource_request")
    return list(json.loads(raw)) if raw else []


async def grow() -> dict[str, Any]:
    import secrets
    import socket
    import tempfile

    # Before ray is imported: a temp dir, a token of our own, and the autoscaler's fake provider (its monitor, a
    # child of the head, inherits these).
    own_dir = tempfile.mkdtemp(prefix="gbgrow-")
    os.environ.update(
        RAY_TMPDIR=own_dir,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
    )
    import ray
    from ray.cluster_utils import Cluster

    with socket.socket() as free:
        free.bind(("", 0))
        port = free.getsockname()[1]
    gcs = f"{ray._private.services.get_node_ip_address()}:{port}"
    config = os.path.join(own_dir, "autoscaling.json")
    await anyio.Path(config).write_text(json.dumps(_autoscaling_config(gcs)))
    report: dict[str, Any] = {"temp_dir": own_dir}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "dashboard_agent_listen_port": None,
            "temp_dir": os.path.join(own_dir, "ray"),
            "gcs_server_port": port,
            "autoscaling_config": config,
        },
    )
    try:
        async with gb.Grid("ray", address=cluster.address, grow=True, linger=0) as grid:
            before = {n.id for n in (await grid.snapshot()).alive}
            started = time.monotonic()
            async with grid.boost("cpu=2", ttl=120, labels={"zone": "grown"}, wait=90) as boost:
                report["granted_after"] = time.monotonic() - started
                report["request_while_held"] = _request()
                report["placements"] = list(boost.placements)
                report["ran_on"] = await grid.offload(namespace_node, where=boost)
                snapshot = await grid.snapshot()
                report["new_nodes"] = {n.id: dict(n.labels) for n in snapshot.alive if n.id not in before}
            report["request_after"] = _request()
    finally:
        descendants = psutil.Process().children(recursive=True)
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        # The grown node's processes are the autoscaler monitor's children, and outlive it: end them, by pid.
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(descendants, timeout=15)
        report["alive_after"] = _alive([p.pid for p in descendants])
        shutil.rmtree(own_dir, ignore_errors=True)
    return report


def nap(seconds: float) -> float:
    """Work that sleeps (in small steps, so that a polite cancel reaches it) and says for how long."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(0.01)
    return seconds


def say(word: str, **what: Any) -> None:
    print(f"{word} {json.dumps(what)}", flush=True)


class Notices:
    """Says ``NOTICE {id, grace, at}`` when a boost of this process is preempted (the grid's hook)."""

    @gb.hookimpl
    def gridboost_boost_preempted(self, boost: gb.Boost, grace: float) -> None:
        say("NOTICE", id=boost.id, grace=grace, at=time.time(), state=boost.state.value)


async def _work(grid: gb.Grid, boost: gb.Boost, command: dict[str, Any]) -> None:
    """Naps under ``boost`` (``seconds``: one number for ``count`` naps, or a list): pinned to it with ``where=boost``,
    or with ``auto`` placed by the policy, as work in the boost's block is (only ``at_engine`` of them reach Ray at
    once then; the rest wait in the grid for a slot). Says ``SUBMITTED`` with the Ray task ids of those Ray has (None
    for the others), then ``DONE {result, where, ray_id}`` or ``ERROR {error, at}`` for each."""
    name, tag, auto = command["name"], command.get("tag", ""), command.get("auto", False)
    seconds = command.get("seconds", 60)
    naps = seconds if isinstance(seconds, list) else [seconds] * command.get("count", 1)
    async with contextlib.AsyncExitStack() as stack:
        if auto:  # left (which releases the boost) once all the work has ended
            await stack.enter_async_context(boost)
        try:
            resources = command.get("resources")
            handles = [grid.submit(nap, s, where="auto" if auto else boost, resources=resources) for s in naps]
            ids = grid.backend.ray_task_ids  # type: ignore[attr-defined]
            at_engine = command.get("at_engine", len(handles))
            with anyio.fail_after(30):
                while sum(h.id in ids() for h in handles) < at_engine:
                    await anyio.sleep(0.01)
            say("SUBMITTED", name=name, tag=tag, ray_ids=[ids().get(h.id) for h in handles])
        except Exception as exc:
            say("ERROR", name=name, tag=tag, error=type(exc).__name__, message=str(exc), at=time.time())
            return

        async def one(handle: gb.TaskHandle[Any]) -> None:
            try:
                result = await handle
                assert handle.placement is not None
                where, ray_id = handle.placement.kind, ids().get(handle.id)
                say("DONE", name=name, tag=tag, result=result, where=where, ray_id=ray_id, at=time.time())
            except Exception as exc:
                say("ERROR", name=name, tag=tag, error=type(exc).__name__, message=str(exc), at=time.time())

        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(one, handle)


async def serve(address: str) -> None:
    """Commands (JSON lines on stdin): ``{"op": "request", "name", "resources", "priority", "tenant", "grow", "wait",
    "ttl", "preemptible", "preempt_grace", "lease_grace"}`` asks for a boost in the background (on this process's
    grid for that tenant and options) and prints ``GRANTED {name, id, token, pg, took}`` or ``FAILED {name, error,
    message, took}``; ``{"op": "release", "name"}`` prints ``RELEASED {name}``; ``{"op": "work", "name", "tag",
    "seconds", "count", "resources"}`` runs naps under the boost (see :func:`_work`); ``{"op": "lease", "name"}`` prints
    ``LEASE {name, id, lease}`` (``current_lease()`` in a task under the boost, and without one); a preempted boost
    prints ``NOTICE``. End of input (or ``{"op": "exit"}``) closes every grid and exits."""
    grids: dict[tuple[Any, ...], gb.Grid] = {}
    boosts: dict[str, gb.Boost] = {}
    granted: dict[str, gb.Grid] = {}

    async def request(grid: gb.Grid, command: dict[str, Any]) -> None:
        name = command["name"]
        started = time.monotonic()
        try:
            boost = await grid.request_boost(
                command.get("resources", "slot=1"),
                ttl=command.get("ttl", 120),
                priority=command.get("priority", "normal"),
                wait=command.get("wait", 60),
                preemptible=command.get("preemptible", False),
            )
        except gb.GridboostError as exc:
            say("FAILED", name=name, error=type(exc).__name__, message=str(exc), took=time.monotonic() - started)
            return
        assert boost.reservation is not None
        boosts[name] = boost
        granted[name] = grid
        pg = boost.reservation.handle.pg.id.hex()
        say("GRANTED", name=name, id=boost.id, token=boost.token, pg=pg, took=time.monotonic() - started)

    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
        say("READY", pid=os.getpid())
        while line := await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            command = json.loads(line)
            if command["op"] == "exit":
                break
            if command["op"] == "release":
                await boosts.pop(command["name"]).release()
                say("RELEASED", name=command["name"])
                continue
            if command["op"] == "work":
                name = command["name"]
                tg.start_soon(_work, granted[name], boosts[name], command)
                continue
            if command["op"] == "lease":
                name = command["name"]
                inside = await granted[name].offload(gb.current_lease, where=boosts[name])
                outside = await granted[name].offload(gb.current_lease, where="cluster")
                say("LEASE", name=name, id=boosts[name].id, token=boosts[name].token, inside=inside, outside=outside)
                continue
            key = (
                command.get("tenant", "team-a"),
                bool(command.get("grow", False)),
                command.get("preempt_grace", 10.0),
                command.get("lease_grace", 5.0),
            )
            if key not in grids:
                grid = gb.Grid(
                    "ray",
                    address=address,
                    linger=0,
                    tenant=key[0],
                    grow=key[1],
                    preempt_grace=key[2],
                    lease_grace=key[3],
                    plugins=[Notices()],
                )
                grids[key] = await stack.enter_async_context(grid)
            tg.start_soon(request, grids[key], command)
        tg.cancel_scope.cancel()


async def chaos(address: str, seed: int, ops: int) -> dict[str, Any]:
    """``ops`` seeded random steps on one grid (:func:`gridboost.testing.lease_chaos`), each step reported."""
    async with gb.Grid("ray", address=address, linger=0, preempt_grace=0.5, lease_grace=1.0) as grid:
        say("READY", pid=os.getpid())
        counts = await lease_chaos(
            grid, seed, ops, unit="slot", work="slot=1", on_step=lambda step: say("STEP", step=step)
        )
    return {"pid": os.getpid(), "counts": counts}


def namespace_node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def main() -> None:
    what = sys.argv[1]
    if what == "grow":
        print("REPORT " + json.dumps(anyio.run(grow)), flush=True)
        return
    if what == "lease":
        anyio.run(lease, sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        return
    if what == "serve":
        anyio.run(serve, sys.argv[2])
        return
    if what == "chaos":
        print("REPORT " + json.dumps(anyio.run(chaos, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))), flush=True)
        return
    if what == "detached":
        print("REPORT " + json.dumps(anyio.run(detached, sys.argv[2], float(sys.argv[3]))), flush=True)
        return
    report = anyio.run(embedded) if what == "embedded" else anyio.run(join, sys.argv[2])
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
