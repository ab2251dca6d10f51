"""``gridboost.worker_command``, the command runner that engine workers run (shipped to them by value): it imports
only the standard library, returns a command's status and output, and never leaves the process behind — not when the
task is cancelled, nor when a second interruption arrives while it stops the process."""

from __future__ import annotations

import ast
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from gridboost import worker_command
from gridboost.worker_command import run, stop

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")

#: A command that ignores SIGTERM (noting it in ``<dir>/term``), writes its pid to ``<dir>/ready`` and sleeps.
STUBBORN = (
    "import os, signal, sys, time\n"
    "def note(*_):\n"
    "    open(os.path.join(sys.argv[1], 'term'), 'w').close()\n"
    "signal.signal(signal.SIGTERM, note)\n"
    "open(os.path.join(sys.argv[1], 'ready.tmp'), 'w').write(str(os.getpid()))\n"
    "os.rename(os.path.join(sys.argv[1], 'ready.tmp'), os.path.join(sys.argv[1], 'ready'))\n"
    "time.sleep(60)\n"
)


class Interrupted(Exception):
    """What the tests raise in a thread that is stopping a command."""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    """Raise ``exc`` in ``thread`` at its next bytecode (as ``ray.cancel`` does with KeyboardInterrupt)."""
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))
    assert done == 1


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_it_imports_only_the_standard_library() -> None:
    """Workers may lack gridboost and its dependencies: the module must run there by value."""
    tree = ast.parse(Path(worker_command.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would need gridboost on the worker"
            imported.add((node.module or "").partition(".")[0])
    assert imported and imported - {"__future__"} <= set(sys.stdlib_module_names), imported


def test_a_command_returns_its_status_and_output_with_env_and_cwd(tmp_path: Path) -> None:
    script = "import os, sys; print(os.environ['X'], os.getcwd()); print('err', file=sys.stderr); sys.exit(3)"
    status, out, err = run([sys.executable, "-c", script], {"X": "42"}, str(tmp_path), 1.0)
    assert (status, out.decode().split(), err) == (3, ["42", str(tmp_path)], b"err\n")


def test_a_check_that_raises_stops_the_command_and_passes_on(tmp_path: Path) -> None:
    """``check`` (Dask's look at its task's state) raising stops the process — SIGTERM, then SIGKILL after grace —
    and its exception goes on, unchained."""

    def check() -> None:
        if (tmp_path / "ready").exists():
            raise Interrupted("cancelled")

    with pytest.raises(Interrupted) as info:
        run([sys.executable, "-c", STUBBORN, str(tmp_path)], None, None, 0.5, check=check)
    assert info.value.__context__ is None
    assert (tmp_path / "term").exists()  # asked politely first
    assert _gone(int((tmp_path / "ready").read_text()))


def test_stop_reaps_the_process_even_when_interrupted_meanwhile(tmp_path: Path) -> None:
    """An interruption while :func:`stop` waits out the grace (a second ``ray.cancel``, an exception from the
    worker) does not make it give up on the process: it still kills it at the end of the grace and reaps it, then
    raises the interruption."""
    process = subprocess.Popen([sys.executable, "-c", STUBBORN, str(tmp_path)], start_new_session=True)
    try:
        _wait_for(tmp_path / "ready")
        raised: list[BaseException] = []

        def stopping() -> None:
            try:
                stop(process, 1.5)
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=stopping)
        started = time.monotonic()
        thread.start()
        _wait_for(tmp_path / "term")  # SIGTERM arrived and was ignored: stop now waits out the grace
        _raise_in(thread, Interrupted)
        thread.join(20)
        assert not thread.is_alive()
        assert [type(exc) for exc in raised] == [Interrupted]
        assert process.returncode == -signal.SIGKILL and _gone(process.pid)
        assert time.monotonic() - started >= 1.5  # it waited out the grace before the SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()


def test_a_missing_program_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        run(["gridboost-no-such-program"], None, None, 1.0)
