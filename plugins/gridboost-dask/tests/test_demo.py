"""``python -m gridboost demo`` as README command 1 runs it: with this plugin installed and no ``--backend``, on an
embedded Dask cluster of worker processes, in a process of its own; every process it starts is gone when it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import alive

#: Seconds the demo may take, as a guard against a hang, not a measure: it takes seconds (README: under a minute).
DEMO_TIMEOUT = 240
#: Seconds the demo's processes get to be gone once it has exited (they end before it does; this is slack for a
#: loaded machine to reap them).
GONE_WITHIN = 15


def _descendants(pid: int, seen: set[int], stop: threading.Event) -> None:
    """Until ``stop``: add every process below ``pid`` to ``seen`` (the demo's worker processes come and go)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(0.05):
        try:
            seen.update(p.pid for p in root.children(recursive=True))
        except psutil.NoSuchProcess:  # it has exited
            return


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_the_demo_moves_work_onto_a_boost_on_the_embedded_dask_and_leaves_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 0, on the embedded Dask (it says so), work moved onto the boost, the table of where the burst ran, no boost
    held at the end, nothing on stderr, and every process it started gone."""
    env = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}}
    seen: set[int] = set()
    stop = threading.Event()
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", "gridboost", "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        watcher = threading.Thread(target=_descendants, args=(process.pid, seen, stop), daemon=True)
        watcher.start()
        try:
            out, err = process.communicate(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()  # ours, by its pid
            out, err = process.communicate(timeout=30)
            pytest.fail(f"the demo ran past {DEMO_TIMEOUT}s\n{out[-3000:]}\n{err[-3000:]}")
        finally:
            stop.set()
            watcher.join(10)
    took = time.monotonic() - started
    with capsys.disabled():  # the figure the README's "under a minute" rests on, in the test log
        print(f"\n[the demo took {took:.1f}s; its processes: {len(seen)}]")

    assert process.returncode == 0, f"exit {process.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    assert err == "", err[-3000:]
    text = " ".join(out.split())  # rich wraps long lines at the width it sees
    assert "engine: dask: an embedded Dask LocalCluster of 2 worker process(es)" in text, out
    moved = re.search(r"onto the boost: (\d+)\)", text)
    assert moved is not None and int(moved[1]) > 0, out
    assert "where the burst ran" in text and re.search(r"boost \(succeeded\) │ +\d+", text), out
    assert "boosts held at the end: 0; grid closed: True" in text, out

    # The demo's worker processes (spawned by its nannies) were seen, and none outlives it.
    assert len(seen) >= 2, seen
    deadline = time.monotonic() + GONE_WITHIN
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(seen), f"processes the demo started survived it: {alive(seen)}"
