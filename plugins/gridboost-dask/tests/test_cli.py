"""The ``gridboost`` command against the session's Dask cluster: every call a process of its own, checked against the
scheduler's own books (the lease registry's records and the workers' resources) and the workers'.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from distributed import Client
from gridboost_dask import LEASE_PREFIX

from conftest import WORKERS, held_anywhere, worker_named

#: Seconds one command may take: Python and distributed start, join the cluster, do one thing and leave.
COMMAND_TIMEOUT = 90
#: The lease registry's name among the scheduler's plugins (gridboost_dask._worker.REGISTRY).
REGISTRY = "gridboost-leases"


def gridboost(*args: str) -> tuple[int, str, str, int]:
    """Run ``python -m gridboost ARGS`` (this session's environment, no GRIDBOOST_* of the developer's); return its
    exit status, stdout, stderr and pid."""
    env = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}}
    with subprocess.Popen(
        [sys.executable, "-m", "gridboost", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            out, err = process.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()  # ours, by its pid
            out, err = process.communicate(timeout=30)
            pytest.fail(f"gridboost {' '.join(args)} ran past {COMMAND_TIMEOUT}s\n{out[-2000:]}\n{err[-2000:]}")
    return process.returncode, out, err, process.pid


def on_dask(address: str, *args: str) -> Any:
    """Run a ``--json`` command on the Dask cluster at ``address`` and parse what it printed; it must succeed."""
    code, out, err, _ = gridboost("--backend", "dask", "--address", address, "--json", *args)
    assert code == 0, f"gridboost {' '.join(args)} exited {code}\n{err[-3000:]}"
    return json.loads(out)


def _registry_record(lease_id: str, dask_scheduler: Any = None) -> dict[str, Any] | None:
    """On the scheduler: the lease registry's record of ``lease_id`` (its owner, expiry, placements)."""
    plugin = dask_scheduler.plugins.get(REGISTRY)
    found = [r for r in (plugin.leases.values() if plugin else ()) if r["id"] == lease_id]
    return {k: found[0][k] for k in ("owner", "expires_at", "placements", "detached")} if found else None


def registry_record(client: Client, lease_id: str) -> dict[str, Any] | None:
    record: dict[str, Any] | None = client.run_on_scheduler(_registry_record, lease_id)
    return record


def _lease_resources(dask_worker: Any = None) -> list[str]:
    """On a worker: the lease resources in its own books."""
    return [name for name in dask_worker.state.total_resources if name.startswith(LEASE_PREFIX)]


def on_workers(client: Client, lease_id: str) -> list[str]:
    """The workers whose own state has a lease resource of ``lease_id``."""
    found: dict[str, list[str]] = client.run(_lease_resources, on_error="ignore")
    return sorted(addr for addr, names in found.items() if any(name.endswith(":" + lease_id) for name in names))


def test_status_lists_the_schedulers_workers_and_local_pressure(cluster_address: str, dask_client: Client) -> None:
    """``status --json`` lists exactly the workers the scheduler knows, and local pressure."""
    status = on_dask(cluster_address, "status")
    assert status["backend"] == "dask"
    workers = {worker_named(dask_client, name) for name in WORKERS}
    assert {n["address"] for n in status["nodes"] if n["alive"]} == workers
    assert status["pressure"]["level"] in {"ok", "high"} and "cpu" in status["pressure"]["utilization"]
    assert isinstance(status["leases"], list)


def test_a_lease_requested_by_one_process_is_listed_renewed_and_released_by_others(
    cluster_address: str, dask_client: Client
) -> None:
    """A lease from ``boost request`` outlives that process (the scheduler keeps it, its workers hold its resource);
    ``boost list`` in another process shows it with that owner; ``boost renew`` in a third moves the registry's
    expiry; ``boost release`` in a fourth takes it off the scheduler's and the workers' books."""
    code, out, err, pid = gridboost(
        "--backend", "dask", "--address", cluster_address, "--json", "boost", "request", "cpu=1", "--ttl", "60"
    )
    assert code == 0, err[-3000:]
    taken = json.loads(out)
    lease_id = taken["id"]
    try:
        owner = f"{socket.gethostname()}:{pid}"
        assert taken["owner"] == owner and taken["state"] == "active" and taken["resources"] == "cpu=1"
        record = registry_record(dask_client, lease_id)
        assert record is not None and record["owner"] == owner and record["detached"]
        assert held_anywhere(dask_client, lease_id) == sorted(taken["placements"]) == on_workers(dask_client, lease_id)

        listed = {le["id"]: le for le in on_dask(cluster_address, "boost", "list")}
        assert listed[lease_id]["owner"] == owner and listed[lease_id]["state"] == "active"
        assert listed[lease_id]["expires_at"] == pytest.approx(taken["expires_at"])

        renewed = on_dask(cluster_address, "boost", "renew", lease_id, "--ttl", "600")
        assert renewed["id"] == lease_id and renewed["expires_at"] >= time.time() + 590 > taken["expires_at"] + 400
        record = registry_record(dask_client, lease_id)
        assert record is not None and record["expires_at"] == pytest.approx(renewed["expires_at"])
        assert held_anywhere(dask_client, lease_id) == sorted(taken["placements"])

        assert on_dask(cluster_address, "boost", "release", lease_id) == {"released": lease_id}
        assert registry_record(dask_client, lease_id) is None
        assert not held_anywhere(dask_client, lease_id) and not on_workers(dask_client, lease_id)
        assert lease_id not in {le["id"] for le in on_dask(cluster_address, "status")["leases"]}
    finally:
        if registry_record(dask_client, lease_id) is not None:  # a check failed: give it back
            gridboost("--backend", "dask", "--address", cluster_address, "boost", "release", lease_id)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("boost", "release", "no-such-lease"), "'no-such-lease'"),
        (("boost", "request", "cpu=-1", "--ttl", "5"), "cpu"),
    ],
)
def test_a_users_mistake_on_dask_is_one_line_and_exit_1(
    cluster_address: str, args: tuple[str, ...], named: str
) -> None:
    """An unknown lease id, or a negative amount, ends in one line naming it on stderr and exit status 1."""
    code, _, err, _ = gridboost("--backend", "dask", "--address", cluster_address, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, f"exit {code}\n{err[-3000:]}"
    assert lines[0].startswith("gridboost: error: ") and named in lines[0]
