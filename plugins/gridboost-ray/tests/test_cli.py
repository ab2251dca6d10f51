"""The ``gridboost`` command against the session's Ray cluster: every call a process of its own, checked against Ray's
node table, placement group table and the lease keeper's records.

Each process inherits this session's environment (``RAY_TMPDIR``, ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``: see conftest),
so it joins this cluster with its token, and nothing else.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import ray
from gridboost_ray._leases import KEEPER_NAME, KEEPER_NAMESPACE
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

#: Seconds one command may take: Python and Ray start, join the cluster, do one thing and leave.
COMMAND_TIMEOUT = 90


def gridboost(*args: str, timeout: float = COMMAND_TIMEOUT, **extra: str) -> tuple[int, str, str, int]:
    """Run ``python -m gridboost ARGS`` (this session's environment, no GRIDBOOST_* of the developer's, plus
    ``extra``); return its exit status, stdout, stderr and pid."""
    env = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}} | extra
    with subprocess.Popen(
        [sys.executable, "-m", "gridboost", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # ours, by its pid
            out, err = process.communicate(timeout=30)
            pytest.fail(f"gridboost {' '.join(args)} ran past {timeout:g}s\n{out[-2000:]}\n{err[-2000:]}")
    return process.returncode, out, err, process.pid


def on_ray(address: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> Any:
    """Run a ``--json`` command on the Ray cluster at ``address`` (options before the command) and parse what it
    printed; it must succeed."""
    code, out, err, _ = gridboost("--backend", "ray", "--address", address, "--json", *args, timeout=timeout)
    assert code == 0, f"gridboost {' '.join(args)} exited {code}\n{err[-3000:]}"
    return json.loads(out)


def one_line_error(code: int, err: str) -> str:
    """Check a user's mistake ended as it should (exit 1, one line on stderr, no traceback); return the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, f"exit {code}\n{err[-3000:]}"
    assert lines[0].startswith("gridboost: error: ")
    return lines[0]


def keeper_record(lease_id: str) -> dict[str, Any] | None:
    """The lease keeper's record of ``lease_id``, read from the keeper actor itself."""
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    record: dict[str, Any] | None = ray.get(keeper.get.remote(lease_id), timeout=30)
    return record


def group_state(pg_id: str) -> str:
    """The group's state in Ray's placement group table (REMOVED when Ray no longer has it)."""
    row = placement_group_table().get(pg_id)
    return str(row["state"]) if row else "REMOVED"


def test_status_lists_the_clusters_nodes_and_local_pressure(cluster_address: str) -> None:
    """``status --json`` lists exactly the nodes Ray reports alive, with the local one marked, and local pressure."""
    status = on_ray(cluster_address, "status")
    alive = {str(n["NodeID"]) for n in ray.nodes() if n["Alive"]}  # type: ignore[no-untyped-call]
    assert status["backend"] == "ray"
    assert {n["id"] for n in status["nodes"] if n["alive"]} == alive
    # Every node of the session runs on this machine; the one this command's driver joined through is "local".
    assert sum(n["local"] for n in status["nodes"]) == 1
    assert {n["labels"].get("zone") for n in status["nodes"]} >= {"a", "b"}
    assert status["pressure"]["level"] in {"ok", "high"} and "cpu" in status["pressure"]["utilization"]
    assert isinstance(status["leases"], list)


def test_a_lease_requested_by_one_process_is_listed_renewed_and_released_by_others(cluster_address: str) -> None:
    """A lease from ``boost request`` outlives that process (Ray keeps its group CREATED); ``boost list`` in another
    process shows it with that owner; ``boost renew`` in a third moves its expiry; ``boost release`` in a fourth has
    Ray remove the group."""
    code, out, err, pid = gridboost(
        "--backend", "ray", "--address", cluster_address, "--json", "boost", "request", "cpu=1", "--ttl", "60"
    )
    assert code == 0, err[-3000:]
    taken = json.loads(out)
    lease_id = taken["id"]
    record = keeper_record(lease_id)
    try:
        owner = f"{socket.gethostname()}:{pid}"
        assert taken["owner"] == owner and taken["state"] == "active" and taken["resources"] == "cpu=1"
        assert record is not None and record["owner"] == owner
        row = placement_group_table().get(record["pg_id"])
        assert row is not None and row["state"] == "CREATED" and row["name"] == f"gridboost:lease:{lease_id}"
        assert set(row["bundles_to_node_id"].values()) == set(taken["placements"])

        listed = {le["id"]: le for le in on_ray(cluster_address, "boost", "list")}
        assert listed[lease_id]["owner"] == owner and listed[lease_id]["state"] == "active"
        assert listed[lease_id]["expires_at"] == pytest.approx(taken["expires_at"])
        code, out, err, _ = gridboost("--backend", "ray", "--address", cluster_address, "status", COLUMNS="250")
        assert code == 0 and err == "" and lease_id in out and owner in out  # the table, not JSON

        renewed = on_ray(cluster_address, "boost", "renew", lease_id, "--ttl", "600")
        assert renewed["id"] == lease_id and renewed["expires_at"] >= time.time() + 590 > taken["expires_at"] + 400
        after = keeper_record(lease_id)
        assert after is not None and after["expires_at"] == renewed["expires_at"]
        assert group_state(record["pg_id"]) == "CREATED"

        assert on_ray(cluster_address, "boost", "release", lease_id) == {"released": lease_id}
        assert group_state(record["pg_id"]) == "REMOVED"  # the command waits for Ray's removal
        assert keeper_record(lease_id) is None
        assert lease_id not in {le["id"] for le in on_ray(cluster_address, "status")["leases"]}
    finally:
        if record is not None and group_state(record["pg_id"]) != "REMOVED":  # a check failed: leave Ray clean
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["pg_id"]))))


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("boost", "release", "no-such-lease"), "'no-such-lease'"),
        (("boost", "renew", "no-such-lease", "--ttl", "5"), "'no-such-lease'"),
        (("boost", "request", "cpu=-1", "--ttl", "5"), "cpu"),
    ],
)
def test_a_users_mistake_on_ray_is_one_line_and_exit_1(cluster_address: str, args: tuple[str, ...], named: str) -> None:
    """An unknown lease id, or a negative amount, ends in one line naming it on stderr and exit status 1."""
    before = set(placement_group_table())
    code, _, err, _ = gridboost("--backend", "ray", "--address", cluster_address, *args)
    assert named in one_line_error(code, err)
    assert set(placement_group_table()) == before  # Ray got no group


@pytest.mark.timeout(180)
def test_an_unreachable_address_is_one_line_and_exit_1_in_bounded_time(cluster: Any) -> None:
    """``--address`` of a free local port (nothing listens) ends in one line naming it and exit 1, within the Ray
    backend's default connect timeout of 30 s (a refused port fails at once)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    code, _, err, _ = gridboost("--backend", "ray", "--address", f"127.0.0.1:{port}", "status", timeout=120)
    line = one_line_error(code, err)
    assert f"127.0.0.1:{port}" in line
    assert time.monotonic() - started < 30


def test_a_lease_without_an_address_is_refused_in_one_line_naming_address() -> None:
    """``boost request`` on the Ray backend with no ``--address`` (a private Ray that would end with the command)
    is refused: exit 1, one line that says to give ``--address``."""
    code, _, err, _ = gridboost("--backend", "ray", "boost", "request", "cpu=1", "--ttl", "60")
    assert "--address" in one_line_error(code, err)


def test_renew_and_release_take_a_unique_prefix_and_refuse_an_ambiguous_one(cluster_address: str) -> None:
    """With two leases on the cluster, ``renew`` and ``release`` act on the one lease a unique prefix names (the
    keeper's record moves, then goes); a prefix both ids share is refused in one line naming both."""
    taken = [
        on_ray(cluster_address, "boost", "request", "cpu=0.25", "--ttl", "60"),
        on_ray(cluster_address, "boost", "request", "cpu=0.25", "--ttl", "60"),
    ]
    ids = [lease["id"] for lease in taken]
    try:
        # The longest start both ids have, character by character (ids, not paths).
        shared = next((ids[0][:i] for i in range(len(ids[0]), 0, -1) if ids[1].startswith(ids[0][:i])), "")
        assert shared, ids
        code, _, err, _ = gridboost("--backend", "ray", "--address", cluster_address, "boost", "release", shared)
        line = one_line_error(code, err)
        assert all(i in line for i in ids), line
        assert all(keeper_record(i) is not None for i in ids)  # neither was touched

        unique = ids[0][: len(shared) + 1]
        renewed = on_ray(cluster_address, "boost", "renew", unique, "--ttl", "600")
        record = keeper_record(ids[0])
        assert renewed["id"] == ids[0] and record is not None and record["expires_at"] == renewed["expires_at"]
        assert on_ray(cluster_address, "boost", "release", unique) == {"released": ids[0]}
        assert keeper_record(ids[0]) is None and keeper_record(ids[1]) is not None
    finally:
        for lease in taken:
            record = keeper_record(lease["id"])
            if record is not None:  # a check failed, or the second lease: leave Ray clean
                on_ray(cluster_address, "boost", "release", lease["id"])


class _Web(http.server.BaseHTTPRequestHandler):
    """Answers every request as a web server such as Ray's dashboard would (it is not a GCS)."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass  # nothing on the test's stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("peer", ["web", "silent"])
def test_an_address_that_is_not_a_gcs_port_says_so_in_one_line_within_connect_timeout(peer: str) -> None:
    """``--address`` of a port where a web server (like the dashboard) or a silent listener waits ends in one line
    naming the address and that it is not a Ray GCS port, within ``--connect-timeout`` (plus the command's start)."""
    if peer == "web":
        # On every address: Ray resolves 127.0.0.1 to this machine's own address before connecting.
        server: Any = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Web)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
    else:
        server = socket.create_server(("0.0.0.0", 0))  # accepts (the backlog), says nothing
        port = server.getsockname()[1]
    try:
        started = time.monotonic()
        code, _, err, _ = gridboost(
            "--backend", "ray", "--address", f"127.0.0.1:{port}", "--connect-timeout", "3", "status", timeout=90
        )
        took = time.monotonic() - started
    finally:
        if peer == "web":
            server.shutdown()
            server.server_close()
        else:
            server.close()
    line = one_line_error(code, err)
    assert f"127.0.0.1:{port}" in line and "not a Ray GCS port" in line and "6379" in line, line
    # The command's own start (Python, gridboost, Ray's import) takes a few seconds on a loaded machine; the connect
    # itself is bounded by the 3 s given, far below Ray's own 13 s handshake and the 30 s default.
    assert took < 3 + 12, took
