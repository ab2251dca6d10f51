"""The ``gridboost`` command against the session's Dask cluster: every call a process of its own, checked against the
scheduler's own books (the lease registry's records and the workers' resources) and the workers'.
"""

from __future__ import annotations

import json
import os
import re
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
#: Seconds Python, gridboost and distributed may take to start on a loaded 2-core machine, for bounds on a command.
STARTUP = 30
#: The lease registry's name among the scheduler's plugins (gridboost_dask._worker.REGISTRY).
REGISTRY = "gridboost-leases"


def gridboost(*args: str, timeout: float = COMMAND_TIMEOUT, **extra: str) -> tuple[int, str, str, int]:
    """Run ``python -m gridboost ARGS`` (this session's environment, no GRIDBOOST_* of the developer's, plus
    ``extra``); return its exit status, stdout, stderr and pid."""
    env = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}} | extra
    with subprocess.Popen(
        [sys.executable, "-m", "gridboost", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # ours, by its pid
            out, err = process.communicate(timeout=30)
            pytest.fail(f"gridboost {' '.join(args)} ran past {timeout:g}s\n{out[-2000:]}\n{err[-2000:]}")
    return process.returncode, out, err, process.pid


def on_dask(address: str, *args: str) -> Any:
    """Run a ``--json`` command on the Dask cluster at ``address`` and parse what it printed; it must succeed."""
    code, out, err, _ = gridboost("--backend", "dask", "--address", address, "--json", *args)
    assert code == 0, f"gridboost {' '.join(args)} exited {code}\n{err[-3000:]}"
    return json.loads(out)


def one_line_error(code: int, err: str) -> str:
    """Check a user's mistake ended as it should (exit 1, one line on stderr, no traceback); return the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, f"exit {code}\n{err[-3000:]}"
    assert lines[0].startswith("gridboost: error: ")
    return lines[0]


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
        (("boost", "renew", "no-such-lease", "--ttl", "5"), "'no-such-lease'"),
        (("boost", "request", "cpu=-1", "--ttl", "5"), "cpu"),
    ],
)
def test_a_users_mistake_on_dask_is_one_line_and_exit_1(
    cluster_address: str, args: tuple[str, ...], named: str
) -> None:
    """An unknown lease id, or a negative amount, ends in one line naming it on stderr and exit status 1."""
    code, _, err, _ = gridboost("--backend", "dask", "--address", cluster_address, *args)
    assert named in one_line_error(code, err)


def all_lease_ids(client: Client) -> list[str]:
    """Every lease id the scheduler's registry holds, of any owner."""
    ids: list[str] = client.run_on_scheduler(_all_lease_ids)
    return ids


def _all_lease_ids(dask_scheduler: Any = None) -> list[str]:
    plugin = dask_scheduler.plugins.get(REGISTRY)
    return [str(r["id"]) for r in (plugin.leases.values() if plugin else ())]


def test_renew_and_release_take_a_unique_prefix_and_refuse_an_ambiguous_or_unknown_one(
    cluster_address: str, dask_client: Client
) -> None:
    """Of two leases, a prefix only one id has renews and then releases that one (the registry says so); a prefix
    both ids share, or none has, is refused in one line naming it, and the registry is left as it was."""
    taken = [
        on_dask(cluster_address, "boost", "request", "cpu=1", "--ttl", "60", "--label", f"name={name}")
        for name in WORKERS
    ]
    ids = [lease["id"] for lease in taken]
    try:
        others = [i for i in all_lease_ids(dask_client) if i != ids[0]]
        unique = next(
            ids[0][:n] for n in range(1, len(ids[0]) + 1) if not any(o.startswith(ids[0][:n]) for o in others)
        )
        assert unique != ids[0]  # a real prefix, not the whole id

        shared = os.path.commonprefix(ids)  # noqa: RUF071 - ids, not paths: character by character is meant
        before = {i: registry_record(dask_client, i) for i in ids}
        for args, named in [
            (("boost", "renew", shared, "--ttl", "600"), repr(shared)),
            (("boost", "release", shared), repr(shared)),
            (("boost", "renew", "zz-no-such", "--ttl", "600"), "'zz-no-such'"),
            (("boost", "release", "zz-no-such"), "'zz-no-such'"),
        ]:
            code, _, err, _ = gridboost("--backend", "dask", "--address", cluster_address, *args)
            assert named in one_line_error(code, err)
        assert {i: registry_record(dask_client, i) for i in ids} == before

        renewed = on_dask(cluster_address, "boost", "renew", unique, "--ttl", "600")
        assert renewed["id"] == ids[0] and renewed["expires_at"] >= time.time() + 590
        record = registry_record(dask_client, ids[0])
        assert record is not None and record["expires_at"] == pytest.approx(renewed["expires_at"])
        assert registry_record(dask_client, ids[1]) == before[ids[1]]

        assert on_dask(cluster_address, "boost", "release", unique) == {"released": ids[0]}
        assert registry_record(dask_client, ids[0]) is None and not held_anywhere(dask_client, ids[0])
        assert registry_record(dask_client, ids[1]) is not None
    finally:
        for lease_id in ids:
            if registry_record(dask_client, lease_id) is not None:
                gridboost("--backend", "dask", "--address", cluster_address, "boost", "release", lease_id)


def test_ids_are_whole_and_memory_in_binary_units_in_the_status_tables(
    cluster_address: str, dask_client: Client
) -> None:
    """``status`` at 80 and 250 columns shows every worker's address and a lease's id whole, and memory as GiB."""
    lease = on_dask(cluster_address, "boost", "request", "cpu=1,memory=1.5GiB", "--ttl", "60")
    try:
        workers = [worker_named(dask_client, name) for name in WORKERS]
        for columns in ("80", "250"):
            code, out, err, _ = gridboost("--backend", "dask", "--address", cluster_address, "status", COLUMNS=columns)
            assert code == 0 and err == "", err[-3000:]
            for whole in [*workers, lease["id"]]:
                assert whole in out, f"{whole} is not whole at COLUMNS={columns}:\n{out}"
            assert not re.search(r"memory=\d{4,}", out), out  # never bytes
        # Wide enough for no cell to wrap: the workers' memory_limit (bytes on the scheduler) and the lease's memory.
        assert re.search(r"memory=\d+(\.\d)? GiB", out) and "memory=1.5 GiB" in out, out
    finally:
        on_dask(cluster_address, "boost", "release", lease["id"])


def test_boost_request_without_an_address_is_refused_naming_it() -> None:
    """``boost request`` with no ``--address`` would take a lease on a private cluster that ends with the command: it
    is refused in one line that says to give ``--address``, and no Dask process is started."""
    code, _, err, _ = gridboost("--backend", "dask", "boost", "request", "cpu=1", "--ttl", "60")
    line = one_line_error(code, err)
    assert "--address" in line and "GRIDBOOST_ADDRESS" in line


@pytest.mark.timeout(180)
def test_a_refused_address_fails_within_the_connect_timeout_given() -> None:
    """``--connect-timeout 2`` with a refused address ends in one line naming the address and that timeout, exit 1,
    within a bound derived from it: Dask's retries for 2 s, our cut 5 s later, and the interpreter's start."""
    where, timeout = "tcp://127.0.0.1:1", 2.0
    started = time.monotonic()
    code, _, err, _ = gridboost(
        "--backend", "dask", "--address", where, "--connect-timeout", f"{timeout:g}", "status", timeout=120
    )
    took = time.monotonic() - started
    line = one_line_error(code, err)
    assert where in line and f"connect_timeout={timeout:g}s" in line
    # Generous: Python and distributed start slowly on a loaded machine; the default of 5 s, or Dask's own 30 s,
    # would show as far more.
    assert took < timeout + 5 + STARTUP, f"{took:.1f}s"


def test_status_on_a_private_cluster_prints_nothing_on_stderr() -> None:
    """``gridboost --backend dask status`` starts an embedded cluster, shows its workers, closes it, and prints
    nothing on stderr: Dask's log lines, from this process and its worker processes, stay off the terminal."""
    code, out, err, _ = gridboost("--backend", "dask", "status", timeout=180)
    assert code == 0 and err == "", err[-3000:]
    assert "dask: nodes" in out and "tcp://127.0.0.1:" in out
