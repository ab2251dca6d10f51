"""Commands on Dask's workers: they run :mod:`gridboost.worker_command`, shipped by value, and a cancelled command's
process is gone even when its worker thread is interrupted while it stops it (as on Ray)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import psutil
import pytest

import gridboost as gb
from conftest import SETTLE, eventually
from gridboost import Command, Grid

# Dask's workers run what this module sends: it travels by value (see conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Ignores SIGTERM (noting it in ``<dir>/term``), writes its pid to ``<dir>/pid``, sleeps a minute.
STUBBORN = (
    "import os, signal, sys, time\n"
    "def note(*_):\n"
    "    open(os.path.join(sys.argv[1], 'term'), 'w').close()\n"
    "signal.signal(signal.SIGTERM, note)\n"
    "open(os.path.join(sys.argv[1], 'pid.tmp'), 'w').write(str(os.getpid()))\n"
    "os.rename(os.path.join(sys.argv[1], 'pid.tmp'), os.path.join(sys.argv[1], 'pid'))\n"
    "time.sleep(60)\n"
)
GRACE = 4.0


class SecondInterrupt(Exception):
    """Raised in the worker thread that is stopping a cancelled command."""


def _interrupt(task_id: str, dask_worker: Any = None) -> int:
    """On a worker: raise SecondInterrupt in each thread executing the task ``task_id`` (the end of its key); how
    many threads were hit."""
    import ctypes

    with dask_worker.active_threads_lock:
        threads = [ident for ident, key in dask_worker.active_threads.items() if str(key).endswith(task_id)]
    for ident in threads:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(SecondInterrupt))
    return len(threads)


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancelled_command_interrupted_while_it_stops_is_still_killed_after_grace(
    cluster_address: str, dask_client: Any, tmp_path: Path
) -> None:
    """A cancelled command that ignores SIGTERM is SIGKILLed once the grace is over, even when its worker thread is
    interrupted while it waits out the grace: the stop holds the interruption until the process is reaped."""
    async with Grid("dask", address=cluster_address, grace=GRACE, watch_interval=0.2) as grid:
        handle = grid.submit(Command([sys.executable, "-c", STUBBORN, str(tmp_path)]), where="cluster")
        with anyio.fail_after(SETTLE):
            while not (tmp_path / "pid").exists():
                await anyio.sleep(0.02)
        pid = int((tmp_path / "pid").read_text())
        handle.cancel()
        with anyio.fail_after(SETTLE):  # the worker saw the cancellation: SIGTERM sent, ignored; grace runs
            while not (tmp_path / "term").exists():
                await anyio.sleep(0.02)
        hit = await anyio.to_thread.run_sync(lambda: dask_client.run(_interrupt, handle.id))
        assert sum(hit.values()) == 1, hit
        assert not _gone(pid)  # still in its grace
        with anyio.fail_after(SETTLE), pytest.raises(gb.TaskCancelled):
            await handle

        async def gone() -> bool:
            return _gone(pid)

        await eventually(gone, f"command pid {pid} survived its cancellation and the interruption", GRACE + SETTLE)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_what_runs_a_command_on_a_worker_travels_without_gridboost(cluster_address: str) -> None:
    """What the backend ships for a command loads and runs in a Python that cannot import gridboost (nor anyio or
    attrs): the worker side of commands is registered to travel by value."""
    from gridboost_dask import _worker

    async with Grid("dask", address=cluster_address):
        blob = cloudpickle.dumps((_worker.run_command, _worker.run))
    script = (
        "import sys, pickle\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('gridboost', 'gridboost_dask', 'anyio', 'attrs'):\n"
        "            raise ImportError(f'{name} is not on this worker')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "run_command, run = pickle.loads(sys.stdin.buffer.read())\n"
        "status, out, err = run([sys.executable, '-c', 'print(6 * 7)'], None, None, 1.0)\n"
        "print(status, out.decode().strip(), run_command.__name__)\n"
    )
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-c", script], input=blob, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["0", "42", "run_command"]
