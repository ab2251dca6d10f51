"""A pool of worker processes owned by one grid, unlike ``anyio.to_process`` whose workers are shared by the whole event
loop and outlive it: closing the pool stops and reaps every worker it started."""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any, TypeVar, cast

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

from gridboost._kit import seconds, shown
from gridboost.exceptions import BackendError, GridClosed, InvalidRequest, NotSerializable

__all__ = ["ProcessPool", "check_picklable"]

T = TypeVar("T")

# Frame = 8-byte big-endian length + pickle; _procworker keeps its own copy so the worker need not import this module.
_HEADER = struct.Struct("!Q")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# SIGKILL cannot be ignored, so a process still there after this long is stuck in the kernel; waiting longer would only
# hang the teardown that is about to report it.
_KILL_WAIT = 5.0
_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_procworker.py")


def _describe(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _pickle_call(fn: Callable[..., object], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    try:
        return pickle.dumps((fn, tuple(args), dict(kwargs)), _PROTOCOL)
    except Exception as exc:
        whole_error = exc
    # Only on failure: pickle each part alone to tell the user which one is at fault.
    name = _describe(fn)
    try:
        pickle.dumps(fn, _PROTOCOL)
    except Exception as exc:
        qualname = getattr(fn, "__qualname__", "")
        if "<lambda>" in qualname or "<locals>" in qualname:
            why = "local functions and lambdas cannot; define it at module level"
        else:
            why = str(exc) or type(exc).__name__
        raise NotSerializable(f"cannot send {name} to a worker process: it cannot be pickled ({why})") from exc
    parts = [(f"argument {i}", value) for i, value in enumerate(args)]
    parts += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for label, value in parts:
        try:
            pickle.dumps(value, _PROTOCOL)
        except Exception as exc:
            raise NotSerializable(
                f"cannot send a call of {name} to a worker process: its {label} ({type(value).__qualname__}) cannot be"
                f" pickled ({exc})"
            ) from exc
    raise NotSerializable(
        f"cannot send a call of {name} to a worker process: it cannot be pickled ({whole_error})"
    ) from whole_error


def check_picklable(fn: Callable[..., object], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`NotSerializable`, naming *fn* and the reason, unless the call can be sent to a worker process."""
    _pickle_call(fn, args, kwargs)


def _worker_command() -> list[str]:
    # By path rather than `-m gridboost._procworker`: -m would first import the gridboost package, and with it anyio and
    # the plugins, in every worker. -P keeps the script's own directory, whose modules shadow stdlib names (abc), off
    # sys.path. A zipped install has no file to run, so it falls back to -m.
    if os.path.isfile(_WORKER_PATH):
        return [sys.executable, "-P", _WORKER_PATH]
    return [sys.executable, "-m", "gridboost._procworker"]


def _init_request() -> bytes:
    # As multiprocessing's spawn does: the worker needs our sys.path to import the modules our functions live in, and
    # our __main__ (by module name when run with -m, else by file; with our argv, which it may read) for the functions
    # that pickle as __main__.f.
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    main_name: str | None = getattr(spec, "name", None)
    main_path: str | None = getattr(main, "__file__", None)
    return pickle.dumps((list(sys.path), list(sys.argv), main_name, main_path), _PROTOCOL)


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        with suppress(ValueError):
            return f"exit code {returncode}, killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


class _Worker:
    __slots__ = ("_stopped", "_stopping", "forced", "problem", "process", "stdin", "stdout")

    def __init__(self, process: Process) -> None:
        self.process = process
        self.stdin = cast(ByteSendStream, process.stdin)
        self.stdout = BufferedByteReceiveStream(cast(ByteReceiveStream, process.stdout))
        self.forced = False  # whether we signalled it, so its exit code says nothing about how it failed
        self.problem: str | None = None
        self._stopping = False
        self._stopped = anyio.Event()

    async def call(self, request: bytes) -> bytes:
        await self.stdin.send(_HEADER.pack(len(request)) + request)
        (length,) = _HEADER.unpack(await self.stdout.receive_exactly(_HEADER.size))
        return await self.stdout.receive_exactly(length)

    async def stop(self, grace: float, *, gently: bool) -> str | None:
        """Stop and reap the process; return why it could not be, if so. Callers must shield this from cancellation."""
        if self._stopping:
            # Run's cleanup and aclose() can both get here; the second waits for the first's bounded procedure.
            await self._stopped.wait()
            return self.problem
        self._stopping = True
        process = self.process
        try:
            if gently:
                # An idle worker exits by itself at end of input, which is the one exit that cannot interrupt anything.
                with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await self.stdin.aclose()
                with anyio.move_on_after(grace):
                    await process.wait()
            for send, wait in ((process.terminate, grace), (process.kill, _KILL_WAIT)):
                if process.returncode is not None:
                    break
                self.forced = True
                with suppress(ProcessLookupError):
                    send()
                with anyio.move_on_after(wait):
                    await process.wait()
            if process.returncode is None:
                self.problem = f"worker pid {process.pid} would not exit"
                # process.aclose() would wait for the exit forever; closing our ends of the pipes is all we can do.
                for stream in (self.stdin, self.stdout):
                    with suppress(Exception):
                        await stream.aclose()
            else:
                await process.aclose()
        finally:
            self._stopped.set()
        return self.problem


class ProcessPool:
    """Runs picklable calls in at most *max_workers* worker processes, started on demand and kept for reuse.

    Cancelling :meth:`run` terminates the worker running the call (and kills it if it is still there after *grace*
    seconds); :meth:`aclose` stops every worker. Either way the process is reaped before the call returns.
    """

    def __init__(self, max_workers: int, *, grace: float = 2.0) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidRequest(f"max_workers must be at least 1, not {shown(max_workers)}")
        self._grace = seconds("grace", grace, allow_zero=True)
        self._limiter = anyio.CapacityLimiter(max_workers)
        self._workers: set[_Worker] = set()  # every worker not yet reaped, busy or idle or being started
        self._idle: list[_Worker] = []
        self._closed = False
        self._close_done: anyio.Event | None = None
        self._problems: list[str] = []

    def pids(self) -> frozenset[int]:
        """The pids of the worker processes that are alive."""
        return frozenset(w.process.pid for w in self._workers if w.process.returncode is None)

    async def run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> T:
        """Call ``fn(*args, **kwargs)`` in a worker process and return its result or raise its exception."""
        if self._closed:
            raise GridClosed("the process pool is closed")
        # Pickled before waiting for a worker, so that a call that cannot be sent fails at once.
        request = _pickle_call(fn, args, kwargs)
        name = _describe(fn)
        async with self._limiter:
            if self._closed:
                raise GridClosed("the process pool is closed")
            worker = await self._take_worker()
            try:
                response = await worker.call(request)
            except BaseException as exc:
                # Whatever interrupted the exchange, the worker is mid-call or out of step with the protocol: it goes.
                with anyio.CancelScope(shield=True):
                    await self._discard(worker, gently=isinstance(exc, Exception))
                if isinstance(exc, Exception):
                    raise self._failure(worker, f"during a call to {name}") from exc
                raise
            if not self._closed:
                self._idle.append(worker)
        return cast(T, self._decode(response, name))

    async def aclose(self) -> list[str]:
        """Stop every worker and wait until each is reaped; return a description of each that could not be stopped.

        Idle workers are asked to exit, busy ones terminated (their callers get :class:`GridClosed`). Calling it again
        waits for the first call to finish and returns the same list.
        """
        if self._close_done is not None:
            await self._close_done.wait()
            return list(self._problems)
        self._closed = True
        self._close_done = anyio.Event()
        idle = set(self._idle)
        self._idle.clear()
        try:
            # Shielded: an aclose() cut short by cancellation would leave children behind, which it exists to prevent.
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for worker in list(self._workers):
                        tg.start_soon(self._stop_for_close, worker, worker in idle)
        finally:
            self._close_done.set()
        return list(self._problems)

    async def _stop_for_close(self, worker: _Worker, gently: bool) -> None:
        problem = await self._discard(worker, gently=gently)
        if problem is not None and problem not in self._problems:
            self._problems.append(problem)

    async def _discard(self, worker: _Worker, *, gently: bool) -> str | None:
        problem = await worker.stop(self._grace, gently=gently)
        if problem is None:
            self._workers.discard(worker)
        return problem

    async def _take_worker(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.process.returncode is None:
                return worker
            # Died while idle (killed from outside, say); reap it and look further.
            with anyio.CancelScope(shield=True):
                await self._discard(worker, gently=True)
        return await self._spawn()

    async def _spawn(self) -> _Worker:
        if getattr(sys.modules.get("__main__"), "_GRIDBOOST_WORKER_BOOTSTRAPPING", False):
            # We are in a worker that is loading its parent's main module, which starts a pool as it is imported.
            raise BackendError(
                "a worker process cannot start workers while it loads the main module; put the code that starts them"
                " under `if __name__ == '__main__':`"
            )
        # Shielded so that a cancellation cannot land between the fork and our owning the process.
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                _worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
            )
        worker = _Worker(process)
        self._workers.add(worker)
        if self._closed:
            # aclose() ran while we were starting it and did not see it; nothing else will stop it.
            with anyio.CancelScope(shield=True):
                await self._discard(worker, gently=True)
            raise GridClosed("the process pool is closed")
        try:
            response = await worker.call(_init_request())
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._discard(worker, gently=isinstance(exc, Exception))
            if isinstance(exc, Exception):
                raise self._failure(worker, "while starting") from exc
            raise
        status, *rest = pickle.loads(response)
        if status != "ok":
            with anyio.CancelScope(shield=True):
                await self._discard(worker, gently=True)
            error, tb_text = rest
            failure = BackendError(f"worker process pid {process.pid} could not load the main module: {error!r}")
            failure.add_note(f"Traceback in the worker process:\n{tb_text}")
            raise failure from error
        return worker

    def _failure(self, worker: _Worker, when: str) -> Exception:
        pid = worker.process.pid
        if self._closed:
            return GridClosed(f"the process pool was closed {when} (worker process pid {pid})")
        code = _exit_description(worker.process.returncode)
        if worker.forced:
            message = f"worker process pid {pid} stopped answering {when} and had to be stopped ({code})"
        else:
            message = f"worker process pid {pid} died {when} ({code})"
        if worker.problem:
            message += f"; {worker.problem}"
        return BackendError(message)

    @staticmethod
    def _decode(response: bytes, name: str) -> object:
        try:
            status, *rest = pickle.loads(response)
        except Exception as exc:
            raise NotSerializable(f"result of {name} cannot be unpickled: {exc}") from exc
        if status == "ok":
            return rest[0]
        if status == "notserializable":
            raise NotSerializable(rest[0])
        error, tb_text = rest
        if not isinstance(error, BaseException):
            raise BackendError(f"worker process sent a malformed error for {name}: {error!r}")
        error.add_note(f"Traceback in the worker process:\n{tb_text.rstrip()}")
        raise error
