"""A private Ray that gridboost starts itself (no address): the ``gridboost`` command and ``Grid("ray")``, each
run as a new user would, in a process of its own with a home directory of its own and no token set up.

Checked from outside: what is in that home directory afterwards, what the process printed on stderr, and whether
every process it started (Ray's GCS, raylet, workers) is gone once it exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

#: Seconds one run may take: Python and a private Ray start, the work, Ray's shutdown.
RUN_TIMEOUT = 180

# Run as its own process: a grid on a private Ray, and the environment it leaves to processes started after it.
GRID_SCRIPT = """
import os, anyio, gridboost as gb

async def main():
    async with gb.Grid("ray") as grid:
        assert await grid.offload(sum, [1, 2]) == 3
        during = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    after = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    print("during", during, "after", after)

anyio.run(main)
"""


def new_user_env(home: Path) -> dict[str, str]:
    """This session's environment as a new user has it: ``home`` as HOME, no Ray token or address set up, none of the
    developer's GRIDBOOST_* (RAY_TMPDIR stays: whatever Ray writes to its temp dir goes to this session's)."""
    drop = ("RAY_AUTH_", "RAY_ADDRESS", "GRIDBOOST_", "RAY_BACKEND_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"HOME": str(home), "COLUMNS": "200"}


def run_watched(args: list[str], env: dict[str, str]) -> tuple[int, str, str, list[psutil.Process]]:
    """Run ``args``; return its exit status, stdout, stderr, and every process it started that was seen while it ran
    (Ray's are its children and theirs)."""
    seen: dict[int, psutil.Process] = {}
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        parent = psutil.Process(process.pid)
        deadline = time.monotonic() + RUN_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            try:
                for child in parent.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)  # sampling the process tree while it runs, not waiting for a state
        try:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()  # ours, by its pid
            out, err = process.communicate(timeout=30)
            pytest.fail(f"{' '.join(args[1:])} ran past {RUN_TIMEOUT}s\n{out[-2000:]}\n{err[-2000:]}")
    return process.returncode, out, err, list(seen.values())


def left_running(processes: list[psutil.Process]) -> list[str]:
    """Those of ``processes`` (the same process: psutil checks its start time) still running, a few seconds after
    their parent exited (Ray's own shutdown ends them)."""
    _, alive = psutil.wait_procs(processes, timeout=20)
    left = []
    for process in alive:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
                process.kill()  # started by this test's process: the machine must not keep it
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_the_cli_on_a_private_ray_leaves_no_token_prints_nothing_on_stderr_and_no_process(tmp_path: Path) -> None:
    """``gridboost --backend ray status`` (a private Ray, started and stopped) exits 0 with nothing on stderr (no Ray
    INFO/WARNING or C++ lines), leaves no ``~/.ray/auth_token`` behind, and none of the processes it started."""
    code, out, err, started = run_watched(
        [sys.executable, "-m", "gridboost", "--backend", "ray", "status"], new_user_env(tmp_path)
    )
    assert code == 0, err[-3000:]
    assert err == "", err[-3000:]
    assert "nodes" in out
    assert not (tmp_path / ".ray" / "auth_token").exists()
    assert started, "no process of the private Ray was seen"
    assert not left_running(started)


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_a_grid_on_a_private_ray_leaves_no_token_and_restores_the_environment(tmp_path: Path) -> None:
    """``Grid("ray")`` in a host app runs work with token auth on, then leaves no ``~/.ray/auth_token`` and no
    RAY_AUTH_* in the app's environment (so a ``ray start`` it runs later behaves as before), and no process."""
    code, out, err, started = run_watched([sys.executable, "-c", GRID_SCRIPT], new_user_env(tmp_path))
    assert code == 0, err[-3000:]
    assert "during {'RAY_AUTH_MODE': None, 'RAY_AUTH_TOKEN': None}" in out, out
    assert "after {'RAY_AUTH_MODE': None, 'RAY_AUTH_TOKEN': None}" in out, out
    assert not (tmp_path / ".ray" / "auth_token").exists()
    assert not left_running(started)
