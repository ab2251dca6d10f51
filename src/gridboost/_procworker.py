"""The loop run by each worker process of :class:`gridboost._procpool.ProcessPool`.

It reads length-prefixed pickle frames from its stdin and answers on its stdout; see ``_procpool`` for the protocol.
"""

from __future__ import annotations

import functools
import os
import pickle
import runpy
import struct
import sys
import traceback
from typing import IO

# Kept in step with _procpool by hand: importing it from there would pull anyio into every worker's start-up.
_HEADER = struct.Struct("!Q")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_GRIDBOOST_WORKER_BOOTSTRAPPING = False


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return payload


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _qualname(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _error_response(exc: BaseException) -> bytes:
    tb_text = "".join(traceback.format_exception(exc))
    try:
        pickled = pickle.dumps(("error", exc, tb_text), _PROTOCOL)
        # Many exception classes pickle fine but cannot be rebuilt (an __init__ with extra required arguments); finding
        # that out here lets the parent still get a readable error instead of a failure to unpickle.
        pickle.loads(pickled)
    except Exception:
        substitute = RuntimeError(f"{exc!r} (its type could not be sent back from the worker process)")
        return pickle.dumps(("error", substitute, tb_text), _PROTOCOL)
    return pickled


def _init(sys_path: list[str], argv: list[str], main_name: str | None, main_path: str | None) -> None:
    global _GRIDBOOST_WORKER_BOOTSTRAPPING
    sys.path[:] = sys_path
    sys.argv[:] = argv
    # The parent's functions pickle as __main__.f, so its main module must become our __main__. It is loaded as
    # __mp_main__, as multiprocessing does, so that its `if __name__ == "__main__"` block does not run. A package run
    # with -m (`python -m pytest`) is not loaded: it has no functions to offer, and loading it might start the program.
    if main_name is not None:
        if main_name == "__main__" or main_name.endswith(".__main__"):
            return
        load = functools.partial(runpy.run_module, main_name, run_name="__mp_main__", alter_sys=True)
    elif main_path is not None and os.path.isfile(main_path):
        load = functools.partial(runpy.run_path, main_path, run_name="__mp_main__")
    else:
        return
    # Seen by _procpool: a main module that starts a pool outside its __main__ guard would otherwise start workers
    # that load it again, endlessly.
    _GRIDBOOST_WORKER_BOOTSTRAPPING = True
    try:
        namespace = load()
    finally:
        _GRIDBOOST_WORKER_BOOTSTRAPPING = False
    module = type(sys)("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _call(frame: bytes) -> bytes:
    try:
        fn, args, kwargs = pickle.loads(frame)
    except Exception as exc:
        message = f"the call could not be unpickled in the worker process: {exc!r}"
        return pickle.dumps(("notserializable", message), _PROTOCOL)
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        return _error_response(exc)
    try:
        return pickle.dumps(("ok", value), _PROTOCOL)
    except Exception as exc:
        message = f"result of {_qualname(fn)} cannot be pickled: {exc!r}"
        return pickle.dumps(("notserializable", message), _PROTOCOL)


def _serve(requests: IO[bytes], responses: IO[bytes]) -> None:
    frame = _read_frame(requests)
    if frame is None:
        return
    try:
        _init(*pickle.loads(frame))
    except Exception as exc:
        _write_frame(responses, _error_response(exc))
        return
    _write_frame(responses, pickle.dumps(("ok", None), _PROTOCOL))
    while _serve_one(requests, responses):
        pass


def _serve_one(requests: IO[bytes], responses: IO[bytes]) -> bool:
    # One call per function frame, so nothing of it (arguments, result) stays referenced while the worker is idle.
    frame = _read_frame(requests)
    if frame is None:
        return False
    _write_frame(responses, _call(frame))
    return True


def main() -> None:
    """Serve calls until stdin reaches end of file, then exit with status 0."""
    # The protocol gets private, non-inheritable copies of fds 0 and 1, and the standard fds are pointed elsewhere: then
    # neither a print() nor a subprocess started by the user's function can read or write protocol bytes, and a child
    # the function leaves behind does not hold our pipes open.
    requests = os.fdopen(os.dup(0), "rb")
    responses = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        os.dup2(2, 1)
    except OSError:
        os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = sys.stderr
    try:
        _serve(requests, responses)
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group; the parent decides what happens to the call, so exit quietly.
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
