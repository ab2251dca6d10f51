"""Finding what a test left alive: open grids, reservations and tasks the local engine still holds, threads, child
processes and coroutines that were never awaited.

Plain functions, usable without pytest::

    baseline = snapshot()
    ...                                   # the code under test
    assert not find_leaks(baseline)

or, raising :class:`LeakError` (an ``AssertionError``) that names every leak::

    with no_leaks():
        ...

Only what is *new* since the baseline counts, so a grid or a thread that a longer-lived fixture opened earlier is
not blamed on the test. Call these outside a running event loop, or from a worker thread: :func:`find_leaks` may
sleep (``grace``) while a thread or a process finishes exiting.

Garbage collection is what costs: a full collection and a walk over every object take tens of milliseconds in a big
test process. :func:`no_leaks` (and the pytest plugin) therefore freeze the collector (:func:`gc.freeze`) for the
block, so that only objects made inside it are collected and searched. While frozen, cyclic garbage made *before*
the block is not reclaimed until it ends; that also keeps an earlier test's forgotten coroutine from being blamed on
this one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Collection, Iterable, Iterator

import attrs
import psutil

from .._grid import Grid
from .._local import LocalBackend
from .._teardown import open_grids as _open_grids
from ..abc import Backend

__all__ = [
    "Baseline",
    "LeakError",
    "describe",
    "find_leaks",
    "grid_leaks",
    "no_leaks",
    "recording_warnings",
    "snapshot",
]

#: How long :func:`find_leaks` waits, by default, for threads and processes that are on their way out.
GRACE = 1.0
_POLL = 0.02
_CMDLINE_MAX = 120

# Helper processes that multiprocessing starts once and keeps for the interpreter's whole life (the forkserver is the
# default start method from Python 3.14): the first test to use multiprocessing did not leak them.
_INTERPRETER_HELPERS = (
    "from multiprocessing.resource_tracker import main",
    "from multiprocessing.forkserver import main",
)


class LeakError(AssertionError):
    """Something the checked code started is still alive; ``leaks`` names each thing."""

    def __init__(self, leaks: Collection[str]) -> None:
        self.leaks = tuple(leaks)
        super().__init__(describe(self.leaks))


@attrs.frozen(eq=False)
class _EngineState:
    reservations: frozenset[str]
    running: frozenset[str]
    parked: frozenset[str] = frozenset()


@attrs.define(eq=False)
class Baseline:
    """What was alive when the check began; :func:`find_leaks` reports only what is new since."""

    grids: weakref.WeakSet[Grid]
    engines: weakref.WeakKeyDictionary[LocalBackend, _EngineState]
    threads: frozenset[threading.Thread]
    children: frozenset[tuple[int, float]]
    #: This baseline froze the garbage collector, and :func:`find_leaks` thaws it.
    froze_gc: bool = False


def snapshot(*, freeze_gc: bool = False) -> Baseline:
    """Record what is alive now, to compare with after the code under test ran.

    With ``freeze_gc``, the garbage collector is frozen until :func:`find_leaks` is called with this baseline — call
    it, in a ``finally``, or use :func:`no_leaks`, which does. Nothing is frozen if something else froze it already.
    """
    freeze_gc = freeze_gc and gc.get_freeze_count() == 0
    if freeze_gc:
        # Engines that can still take work are those of open grids; any other engine older than the block is frozen,
        # out of find_leaks' sight, and cannot be this block's doing.
        engines = [engine for grid in list(_open_grids) for engine in _engines_of(grid)]
    else:
        # Garbage left by earlier code is finalized now, so that a coroutine it never awaited is not blamed on the
        # code under test (its warning goes wherever warnings go now).
        gc.collect()
        engines = _local_engines()
    baseline = Baseline(
        grids=weakref.WeakSet(_open_grids),
        engines=weakref.WeakKeyDictionary({engine: _engine_state(engine) for engine in engines}),
        threads=frozenset(threading.enumerate()),
        children=frozenset(_key(p) for p in _children()),
        froze_gc=freeze_gc,
    )
    if freeze_gc:
        gc.freeze()
    return baseline


def find_leaks(baseline: Baseline, *, grace: float = GRACE, seen: Iterable[warnings.WarningMessage] = ()) -> list[str]:
    """Name everything started since ``baseline`` that is still alive; an empty list means nothing leaked.

    ``seen`` are warnings recorded while the code ran (see :func:`recording_warnings`): each "coroutine ... was never
    awaited" among them is a leak too, as is each one that garbage collection turns up now. Threads and child
    processes get up to ``grace`` seconds to finish exiting.
    """
    try:
        with warnings.catch_warnings(record=True) as collected:
            warnings.simplefilter("always")
            gc.collect()
        engines = dict.fromkeys([*baseline.engines.keys(), *_local_engines()])
    finally:
        _thaw(baseline)
    leaks = _unawaited([*seen, *collected])
    leaks += [f"grid {grid!r} still open" for grid in list(_open_grids) if grid not in baseline.grids]
    for engine in engines:
        before = baseline.engines.get(engine, _EngineState(frozenset(), frozenset()))
        leaks += _engine_leaks(engine, before)
    deadline = time.monotonic() + grace
    while True:
        threads = [t for t in threading.enumerate() if t not in baseline.threads and not _is_exempt_thread(t)]
        children = [p for p in _children() if _key(p) not in baseline.children and not _is_exempt_process(p)]
        if not (threads or children) or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    leaks += [f"thread {t.name!r} still alive" for t in threads if t.is_alive()]
    leaks += [f"child process pid {p.pid} ({_command_line(p)}) still alive" for p in children]
    return leaks


def grid_leaks(grids: Iterable[Grid]) -> list[str]:
    """Name what these grids left behind: a grid still open, or its local engine still holding or running something.

    For grids that should have closed already (the fixtures call it after teardown); the engine is asked, not the
    grid's own books.
    """
    leaks: list[str] = []
    for grid in grids:
        if grid in _open_grids:
            leaks.append(f"grid {grid!r} still open")
        for engine in _engines_of(grid):
            leaks += _engine_leaks(engine, _EngineState(frozenset(), frozenset()), f" of grid {grid!r}")
    return leaks


@contextlib.contextmanager
def recording_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings shown in the block, then pass each on to whoever shows warnings outside it.

    Filters apply as they did before (a warning turned into an error is raised, not recorded). Outside, each warning
    is shown again through :func:`warnings.showwarning`, so pytest still lists it in its summary.
    """
    try:
        with warnings.catch_warnings(record=True) as seen:
            yield seen
    finally:
        for w in seen:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


@contextlib.contextmanager
def no_leaks(*, grace: float = GRACE) -> Iterator[None]:
    """Raise :class:`LeakError` after the block if anything it started is still alive."""
    baseline = snapshot(freeze_gc=True)
    try:
        with recording_warnings() as seen:
            yield
        leaks = find_leaks(baseline, grace=grace, seen=seen)
    finally:
        _thaw(baseline)
    if leaks:
        raise LeakError(leaks)


def _thaw(baseline: Baseline) -> None:
    if baseline.froze_gc:
        baseline.froze_gc = False
        gc.unfreeze()


def describe(leaks: Collection[str]) -> str:
    """The report a failed check shows: one leak a line."""
    things = "thing is" if len(leaks) == 1 else "things are"
    return f"{len(leaks)} {things} still alive after the test:\n" + "\n".join(f"  - {leak}" for leak in leaks)


# -- what counts ----------------------------------------------------------------------------------------------------


def _unawaited(records: Iterable[warnings.WarningMessage]) -> list[str]:
    counts = Counter(
        str(w.message)
        for w in records
        if issubclass(w.category, RuntimeWarning) and "was never awaited" in str(w.message)
    )
    return [message if n == 1 else f"{message} ({n} times)" for message, n in counts.items()]


def _engines_of(grid: Grid) -> list[LocalBackend]:
    """The local engines a grid uses: its host, and its backend or the one a wrapper (FaultyBackend) delegates to."""
    engines: list[LocalBackend] = []
    for backend in (grid.backend, grid._runtime.host):
        for _ in range(8):  # wrappers of wrappers, but never round a cycle forever
            if isinstance(backend, LocalBackend):
                engines.append(backend)
                break
            inner = getattr(backend, "inner", None)
            if not isinstance(inner, Backend):
                break
            backend = inner
    return list(dict.fromkeys(engines))


def _local_engines() -> list[LocalBackend]:
    # The engines of grids that have closed are found through the garbage collector: a finished grid leaves
    # _open_grids, and an engine still running a thread is kept alive by that thread even when its grid is gone.
    # Matched by exact type: isinstance() against an ABC is slow enough to dominate a scan of every object.
    kinds = _subclasses(LocalBackend)
    return [obj for obj in gc.get_objects() if type(obj) in kinds]


def _subclasses(cls: type[LocalBackend]) -> set[type[LocalBackend]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


def _engine_state(engine: LocalBackend) -> _EngineState:
    return _EngineState(frozenset(_held(engine)), frozenset(engine.running_tasks()), frozenset(engine.parked()))


def _engine_leaks(engine: LocalBackend, before: _EngineState, whose: str = "") -> list[str]:
    try:
        held = _held(engine)
    except RuntimeError as exc:
        return [f"could not ask the local engine{whose} for its reservations: {exc}"]
    leaks = [f"local engine{whose} still holds reservation {rid}" for rid in held if rid not in before.reservations]
    leaks += [
        f"local engine{whose} still running {what}"
        for task_id, what in sorted(engine.running_tasks().items())
        if task_id not in before.running
    ]
    leaks += [
        f"local engine{whose} still holds parked object {key}" for key in engine.parked() if key not in before.parked
    ]
    return leaks


def _held(engine: LocalBackend) -> list[str]:
    """The ids of the reservations the engine holds, asked without an event loop.

    The local engine answers ``reservations()`` without suspending, so one step of the coroutine is the whole call; the
    check must work from sync fixtures and after the test's event loop is gone.
    """
    query = engine.reservations()
    try:
        query.send(None)
    except StopIteration as done:
        return [reservation.id for reservation in done.value]
    query.close()
    raise RuntimeError(f"{type(engine).__name__}.reservations() waits for something; it cannot be asked from here")


def _is_exempt_thread(thread: threading.Thread) -> bool:
    """Threads an event loop keeps for itself: pools of idle workers, whose work is checked through the engines.

    anyio's asyncio workers, trio's thread cache (which also runs trio's guest-mode I/O waits) and asyncio's default
    executor all outlive the job that started them by design.
    """
    if thread is threading.current_thread() or not thread.is_alive():
        return True
    anyio_asyncio = sys.modules.get("anyio._backends._asyncio")
    if anyio_asyncio is not None and isinstance(thread, anyio_asyncio.WorkerThread):
        return True
    trio_cache = sys.modules.get("trio._core._thread_cache")
    owner = getattr(getattr(thread, "_target", None), "__self__", None)
    if trio_cache is not None and isinstance(owner, trio_cache.WorkerThread):
        return True
    # asyncio waits for each child process in a thread of its own (ThreadedChildWatcher): the child is what counts.
    if thread.name.startswith("asyncio-waitpid-") and thread.daemon:
        return True
    futures_thread = sys.modules.get("concurrent.futures.thread")
    return (
        thread.name.startswith("asyncio_")
        and futures_thread is not None
        and getattr(thread, "_target", None) is futures_thread._worker
    )


def _children() -> list[psutil.Process]:
    pids = _linux_descendants()
    children: list[psutil.Process] = []
    if pids is None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process().children(recursive=True)
    else:
        for pid in pids:
            with contextlib.suppress(psutil.Error):  # gone since listed
                children.append(psutil.Process(pid))
    alive = []
    for child in children:
        with contextlib.suppress(psutil.Error):  # gone since listed: not alive
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return alive


def _linux_descendants() -> list[int] | None:
    """The pids of this process's descendants, from the children files Linux keeps per thread; ``None`` elsewhere.

    psutil finds children by reading the status of every process on the machine, which costs milliseconds per check.
    """
    found: list[int] = []
    pending = [os.getpid()]
    while pending:
        pid = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            if pid == os.getpid():
                return None
            continue  # exited while we looked
        except OSError:
            return None
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children") as listing:
                    children = [int(child) for child in listing.read().split()]
            except FileNotFoundError:
                if pid == os.getpid() and task == str(pid):
                    return None  # a kernel without CONFIG_PROC_CHILDREN
                continue
            except (OSError, ValueError):
                return None
            found += children
            pending += children
    return found


def _key(process: psutil.Process) -> tuple[int, float]:
    # The pid alone could be reused by a new process within one test; with its start time it cannot.
    try:
        return process.pid, process.create_time()
    except psutil.Error:
        return process.pid, 0.0


def _is_exempt_process(process: psutil.Process) -> bool:
    try:
        argv = process.cmdline()
    except psutil.Error:
        return False
    # anyio.to_process keeps idle workers for the event loop's life, as its thread pool does threads.
    if argv[-2:] == ["-m", "anyio.to_process"]:
        return True
    command = " ".join(argv)
    return any(helper in command for helper in _INTERPRETER_HELPERS)


def _command_line(process: psutil.Process) -> str:
    try:
        command = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "?"
    return command if len(command) <= _CMDLINE_MAX else command[: _CMDLINE_MAX - 1] + "…"
