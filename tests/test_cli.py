"""The ``gridboost`` command on the local backend, run as users run it: ``python -m gridboost ...`` in a process of its
own, with no entry-point plugin loaded (``GRIDBOOST_LOAD_PLUGINS=""``: the core's own view, whatever the venv holds).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from gridboost import _nvml, _plugins

#: Seconds one command may take (Python's start included).
COMMAND_TIMEOUT = 60
COMMANDS = ("status", "boost", "quota", "plugins", "doctor", "scan", "demo")


def gridboost(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gridboost ARGS`` with no entry-point plugins and no GRIDBOOST_* of the developer's, plus
    ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}}
    return subprocess.run(
        [sys.executable, "-m", "gridboost", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env={**base, _plugins.LOAD_ENV: "", **env},
        check=False,
    )


def json_of(*args: str) -> Any:
    """Run a command that must succeed and parse the JSON it printed."""
    done = gridboost(*args)
    assert done.returncode == 0 and "Traceback" not in done.stderr, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """Check a user's mistake ended as it should (exit 1, one line on stderr, no traceback); return the line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr and lines[0].startswith("gridboost: error: ")
    return lines[0]


def test_help_lists_every_command() -> None:
    """``gridboost --help`` names every command, and ``boost --help`` every action."""
    done = gridboost("--help")
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout
    done = gridboost("boost", "--help")
    assert done.returncode == 0
    for action in ("request", "list", "renew", "release"):
        assert action in done.stdout
    done = gridboost("quota", "--help")
    assert done.returncode == 0
    for action in ("set", "list", "clear"):
        assert action in done.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_status_json_shows_one_local_node_pressure_and_no_leases(where: str) -> None:
    """``status --json`` (the option before or after the command) shows this machine as the one node, a pressure
    level, and an empty list of leases."""
    status = json_of("--json", "status") if where == "before" else json_of("status", "--json")
    assert status["backend"] == "local"
    (node,) = status["nodes"]
    assert node["local"] and node["alive"] and "cpu=" in node["total"]
    assert status["pressure"]["level"] in {"ok", "high"} and isinstance(status["pressure"]["high"], list)
    assert status["leases"] == []


def test_plugins_json_lists_the_builtins_with_their_hooks_and_the_local_backend() -> None:
    """``plugins --json`` lists the two built-in plugins with the hooks each implements, local as ``_local``'s
    backend, and no load failure."""
    report = json_of("plugins", "--json")
    plugins = {p["name"]: p for p in report["plugins"]}
    assert set(plugins) == {"gridboost._local", "gridboost._policy"}
    assert plugins["gridboost._local"] == {
        "name": "gridboost._local",
        "kind": "built-in",
        "hooks": ["gridboost_backends"],
        "backends": ["local"],
    }
    assert plugins["gridboost._policy"]["kind"] == "built-in" and plugins["gridboost._policy"]["backends"] == []
    assert {"gridboost_choose_placement", "gridboost_offload_candidates"} <= set(plugins["gridboost._policy"]["hooks"])
    assert report["failed"] == []


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_doctor_json_reports_python_gpus_and_what_to_install() -> None:
    """``doctor --json`` reports this Python, the GPUs NVML sees (none without a driver), each engine plugin's
    version, and advice naming the ``pip install`` of each plugin that is missing."""
    report = json_of("doctor", "--json")
    assert report["python"] == platform.python_version()
    assert len(report["gpus"]) == len(_nvml.inventory())
    for backend, plugin in (("ray", "gridboost-ray"), ("dask", "gridboost-dask")):
        installed = _installed(plugin)
        assert (report["engines"][backend]["plugin"] is not None) == installed
        hint = f"pip install . ./plugins/{plugin}"  # from the root of the clone this suite's gridboost came from
        assert any(hint in line for line in report["advice"]) == (not installed)
    if not report["gpus"]:
        assert any("no GPU" in line for line in report["advice"])
    assert report["plugin_errors"] == []


def test_scan_json_is_a_list() -> None:
    """``scan --json`` prints a JSON list of recommendations (whatever this machine runs)."""
    assert isinstance(json_of("scan", "--json"), list)


def test_boost_list_on_local_is_empty() -> None:
    """``boost list --json`` on the local backend prints an empty list: its leases live inside one process."""
    assert json_of("boost", "list", "--json") == []


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("boost", "request", "cpu=1", "--ttl", "5"), {}, "keeps leases inside one process"),
        (("--backend", "nope", "status"), {}, "available: local"),
        (("status", "--backend", "nope"), {}, "available: local"),
        (("status",), {"GRIDBOOST_BACKEND": "nope"}, "available: local"),
        (("boost", "request", "cpu=-1", "--ttl", "5"), {}, "cpu"),
        (("boost", "request", "cpu=1", "--ttl", "0"), {}, "ttl"),
        (("boost", "request", "cpu=1", "--ttl", "5", "--priority", "urgent"), {}, "priority"),
        (("boost", "renew", "some-lease", "--ttl", "5"), {}, "some-lease"),
        (("status", "--address", "x"), {}, "add --backend ray|dask"),
        (("boost", "release", "boost-", "--json"), {}, "no lease on this cluster has an id starting with"),
        (("quota", "set", "team-a", "cpu=1"), {}, "it cannot keep quotas"),
        (("quota", "list", "--tenant", "a b"), {}, "tenant is a short name without spaces"),
    ],
)
def test_a_users_mistake_is_one_line_and_exit_1(args: tuple[str, ...], env: dict[str, str], named: str) -> None:
    """A user's mistake (a local lease, an unknown backend, a bad amount, TTL or priority, an unknown lease, an
    option the backend lacks) ends in one line on stderr naming it, and exit status 1."""
    assert named in one_line_error(gridboost(*args, **env))


@pytest.mark.parametrize(
    "args", [("frobnicate",), ("boost",), ("boost", "request", "cpu=1"), ("status", "--ttl", "5"), ()]
)
def test_a_malformed_command_line_exits_2(args: tuple[str, ...]) -> None:
    """An unknown command, a missing action or required option, or an unknown option exits with status 2."""
    done = gridboost(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "usage: gridboost" in done.stderr


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (("status",), "local pressure:"),
        (("plugins",), "gridboost._policy"),
        (("doctor",), "Python " + platform.python_version()),
        (("boost", "list"), "leases: none"),
        (("quota", "list"), "quotas: none"),
    ],
)
def test_tables_without_json(args: tuple[str, ...], shown: str) -> None:
    """Without ``--json`` each command draws its tables on stdout and writes nothing on stderr."""
    done = gridboost(*args, COLUMNS="200")
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert shown in done.stdout


def test_status_shows_memory_in_human_units_and_whole_node_ids() -> None:
    """The status table gives memory as ``23.5 GiB`` (never raw bytes or KiB) and each node's whole id."""
    done = gridboost("status", COLUMNS="200")
    assert done.returncode == 0, done.stderr[-3000:]
    node = json_of("status", "--json")["nodes"][0]["id"]
    assert node in done.stdout
    assert re.search(r"memory=\d+(\.\d)? (GiB|MiB|TiB)", done.stdout), done.stdout
    assert "KiB" not in done.stdout and not re.search(r"memory=\d{7,}", done.stdout)


def test_status_watch_redraws_until_ctrl_c_then_exits_0() -> None:
    """``status --watch`` in a terminal redraws every second; Ctrl-C ends it cleanly with exit status 0."""
    import pty

    controller, terminal = pty.openpty()
    base = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}}
    process = subprocess.Popen(
        [sys.executable, "-m", "gridboost", "status", "--watch"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**base, _plugins.LOAD_ENV: "", "COLUMNS": "160", "TERM": "xterm"},
        close_fds=True,
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while seen.count(b"local pressure") < 3:  # the first view and two redraws
            assert time.monotonic() < deadline, seen[-2000:]
            if select.select([controller], [], [], 1.0)[0]:
                seen += os.read(controller, 65536)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=COMMAND_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    assert status == 0
    assert b"Traceback" not in seen
