"""``tools/loaded.py``, the contributor's recipe for running the suite on a loaded machine (docs/testing.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import psutil

TOOL = Path(__file__).parents[1] / "tools" / "loaded.py"


def _loaded(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, check=False)


def _pids(output: str) -> list[int]:
    return [pid for found in re.findall(r"busy loop\(s\) (\[[0-9, ]*\])", output) for pid in ast.literal_eval(found)]


def test_runs_the_command_the_times_asked_with_every_busy_loop_gone_after() -> None:
    """The command runs once per ``--times`` while the loops spin; every loop is gone when the tool exits."""
    probe = "import os, psutil; print('busy', sum(map(psutil.pid_exists, map(int, os.environ['LOADED_BUSY_PIDS'].split()))))"
    done = _loaded("--times", "2", "--busy", "2", "--", sys.executable, "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exited 0 after") == 2
    assert re.findall(r"^busy (\d+)$", done.stdout, re.M) == ["2", "2"]
    pids = _pids(done.stdout)
    assert len(pids) == 4
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_the_first_failure_stops_the_runs_and_is_the_exit_status() -> None:
    """A failing command ends the repetition at once, with its exit status."""
    done = _loaded("--times", "3", "--busy", "1", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert done.returncode == 3
    assert done.stdout.count("exited") == 1
