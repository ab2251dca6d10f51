"""``python -m gridboost demo --backend ray`` as a user runs it: on a private Ray standing in for the cluster, in a
process of its own, as a new user (no token set up); every process it starts is gone when it ends, and no token file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from test_private_ray import RUN_TIMEOUT, left_running, new_user_env, run_watched


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_the_demo_moves_work_onto_a_boost_on_a_private_ray_and_leaves_nothing(tmp_path: Path) -> None:
    """Exit 0, on a private Ray (it says so), waiting work moved onto the boost while the burst ran, the table of where
    it ran, no boost held at the end, nothing on stderr, no token file, and every process it started gone."""
    # A burst long enough to outlast the boost's placement group on a loaded machine: with the default 48 tasks a
    # busy host can run the whole rest of the burst itself in the ~2 s Ray then takes, and nothing is left to move.
    status, out, err, processes = run_watched(
        [sys.executable, "-m", "gridboost", "demo", "--backend", "ray", "--tasks", "160"], new_user_env(tmp_path)
    )
    assert status == 0, f"exit {status}\n{out[-3000:]}\n{err[-3000:]}"
    assert err == "", err[-3000:]
    text = " ".join(out.split())  # rich wraps long lines at the width it sees
    assert "engine: ray: a private Ray instance" in text, out
    moved = re.search(r"onto the boost: (\d+)\)", text)
    assert moved is not None and int(moved[1]) > 0, out
    assert "where the burst ran" in text and re.search(r"boost \(succeeded\) │ +\d+", text), out
    assert "boosts held at the end: 0; grid closed: True" in text, out
    assert not (tmp_path / ".ray" / "auth_token").exists()
    assert processes, "the demo started no process: it did not run on Ray"
    assert left_running(processes) == []
