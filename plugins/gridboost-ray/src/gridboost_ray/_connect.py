"""Starting or joining Ray, once per process, shared by every ``RayBackend`` in it.

``ray.init`` is process-global: a process is connected to one Ray at a time. So the connection is refcounted. The
first backend to start connects (or starts a private instance); the others share it; the last one to close shuts
down what gridboost started — a private instance's processes, or a join's connection — and nothing else. A
connection the application made itself (its own ``ray.init``) is used and never shut down.

Where a backend points:

* no address (or ``"local"``): a fresh private Ray on this machine (``address="local"``: never some other instance
  that happens to run here), without dashboard, in a temporary directory of its own that is removed afterwards —
  unless the process is already connected to Ray, which it then uses;
* ``"auto"``: the cluster ``RAY_ADDRESS`` names, or the one ``ray start`` recorded on this machine;
* ``"host:port"``: that cluster's GCS; ``"ray://host:port"``: a Ray Client server.

Joining never hangs: the address must accept a TCP connection, and (for a GCS) answer Ray's own handshake, within
``timeout`` seconds, or :class:`~gridboost.BackendError` says what failed. (``ray.init`` itself would retry an
unreachable GCS for minutes, and report a refused token as a bare ``ConnectionError`` after 20 s.)

Two Ray facts shape this module:

* The processes an embedded ``ray.init`` starts are bound to the *thread* that started them (``PR_SET_PDEATHSIG``):
  they are SIGKILLed when it exits. So a dedicated thread calls ``ray.init``, lives as long as the instance, and
  calls ``ray.shutdown``; an ``anyio`` worker thread, which exits when idle, would take Ray down with it.
* Ray ≥ 2.60 uses token authentication by default. For a private instance, ``ray.init`` turns token mode on (it sets
  ``RAY_AUTH_MODE=token`` in this process's environment for good) and, when this machine has no token, writes one
  to ``~/.ray/auth_token`` — after which every later ``ray start --head`` on the machine finds it and turns token
  mode on too. gridboost keeps both from happening: a private instance it starts gets a random token of this
  process, given through the environment of the processes it starts, and the environment is restored once
  ``ray.init`` returns (see :func:`_private_token`). A token the user set up (``RAY_AUTH_TOKEN``,
  ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), and ``RAY_AUTH_MODE=disabled``, are used as Ray uses them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from attrs import define, field, frozen

from gridboost.backend_kit import shown
from gridboost.exceptions import BackendError, InvalidRequest

__all__ = ["QUIET_ENV", "Connection", "Target", "connect", "current", "parse_address", "release"]

Kind = Literal["embedded", "gcs", "client"]

#: Set (to anything but "" or "0") by :func:`gridboost.quiet_engine_logs`: every ``ray.init`` gridboost calls then
#: logs errors only ("Started a local Ray instance", "SIGTERM handler is not set ..." are dropped).
QUIET_ENV = "GRIDBOOST_RAY_QUIET"

_NO_TOKEN = (
    "RAY_AUTH_MODE=token is set, but this process has no token for the cluster: give it in RAY_AUTH_TOKEN, in a file "
    "named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
)


@frozen
class Target:
    """Where a backend asked to connect: ``address`` is ``host:port`` (canonical once resolved) or ``ray://...``."""

    kind: Kind
    address: str = ""
    #: The address as the user gave it, when Ray resolved it to another (``auto``, ``localhost``).
    given: str = ""

    def __str__(self) -> str:
        if self.kind == "embedded":
            return "a private local Ray instance"
        return f"{self.given} ({self.address})" if self.given and self.given != self.address else self.address


def parse_address(address: object) -> Target:
    """Check an address's form without importing ray; ``"auto"`` and host names are resolved when connecting."""
    if address is None or (isinstance(address, str) and address == "local"):  # a non-string may not even compare
        return Target("embedded")
    if not isinstance(address, str) or not address.strip():
        raise InvalidRequest(
            f"address must be None, 'local', 'auto', 'host:port' or 'ray://host:port', got {shown(address)}"
        )
    address = address.strip()
    if "\0" in address:
        raise InvalidRequest(f"address {shown(address)} contains a NUL byte")
    if address == "auto":
        return Target("gcs", "auto")
    if address.startswith("ray://"):
        _host_port(address.removeprefix("ray://"), address)
        return Target("client", address)
    if "://" in address:
        raise InvalidRequest(f"address {shown(address)}: only ray:// is understood (a Ray Client server)")
    _host_port(address, address)
    return Target("gcs", address)


def _host_port(text: str, original: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    # isascii and the length first: int() takes other scripts' digits, and refuses thousands of them.
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
        raise InvalidRequest(f"address {shown(original)} is not host:port")
    return host.strip("[]"), int(port)


@define(eq=False)
class Connection:
    """This process's connection to Ray, as gridboost holds it."""

    target: Target
    #: The GCS this process is connected to (``host:port``); empty for a Ray Client connection.
    gcs_address: str
    #: gridboost called ``ray.init`` (so it calls ``ray.shutdown``); false when the application did.
    owned: bool
    namespace: str | None = None
    runtime_env: Mapping[str, Any] | None = None
    cpus_gpus: tuple[float | None, float | None] = (None, None)
    users: int = 0
    _owner: _Owner | None = field(default=None, alias="owner")
    #: The private instance's directory that gridboost made (its owner thread removes it after ray.shutdown).
    _temp_dir: str | None = field(default=None, alias="temp_dir")

    @property
    def client_mode(self) -> bool:
        return self.target.kind == "client"

    def serves(self, target: Target) -> bool:
        if target.kind == "embedded":
            return True  # ray.init is process-wide: with no address, use the Ray the process has
        if target.kind == "client":
            return self.target == target
        return bool(self.gcs_address) and self.gcs_address == target.address


class _Owner:
    """A thread that calls ``ray.init``, lives as long as the connection, then calls ``ray.shutdown``."""

    def __init__(self, init_kwargs: dict[str, Any], own_dir: str | None) -> None:
        self._init_kwargs = init_kwargs
        self._own_dir = own_dir
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="gridboost-ray-owner", daemon=True)

    def start(self, timeout: float) -> bool:
        self.thread.start()
        return self._ready.wait(timeout)

    def stop(self, timeout: float) -> bool:
        self._stop.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _main(self) -> None:
        import ray

        private = self._init_kwargs.get("address") == "local"
        try:
            try:
                with _private_token() if private else contextlib.nullcontext():
                    ray.init(**self._init_kwargs)
            except BaseException as exc:
                self.error = exc
                # A start that failed half-way may have left processes; they are this thread's to end.
                ray.shutdown(wait_for_processes=True)
                self._ready.set()
                return
            self._ready.set()
            self._stop.wait()
            ray.shutdown(wait_for_processes=True)
        finally:
            _remove_dir(self._own_dir)  # whenever this thread ends, even long after a connect gave up on it


_lock = threading.Lock()
_current: Connection | None = None
# Owner threads whose start was given up on: a later connect must wait for them to finish ray.shutdown.
_stragglers: list[_Owner] = []


def connect(
    target: Target,
    *,
    namespace: str | None,
    runtime_env: Mapping[str, Any] | None,
    num_cpus: float | None,
    num_gpus: float | None,
    temp_dir: str | None,
    timeout: float,
) -> Connection:
    """Connect this process to ``target`` (or share the connection it has); blocking, bounded by ``timeout``."""
    global _current
    import ray

    if target.kind == "gcs":
        target = _resolve(target)
    with _lock:
        _wait_for_stragglers(timeout)
        if _current is not None and not ray.is_initialized():
            # The application called ray.shutdown() under us: that connection is gone, whoever still holds it.
            stale, _current = _current, None
            if stale._owner is not None:
                stale._owner.stop(timeout)
        conn = _current if _current is not None else _adopt()
        if conn is not None:
            if not conn.serves(target):
                if target.kind != "embedded":
                    _check_reachable(target, timeout)
                raise BackendError(
                    f"this process is already connected to Ray at {conn.gcs_address or conn.target}, and ray.init is "
                    f"process-wide: it cannot also connect to {target}. Use one address for every grid of a process."
                )
            _check_same_options(conn, namespace, runtime_env, num_cpus, num_gpus)
            conn.users += 1
            _current = conn
            return conn
        if target.kind != "embedded":
            _check_reachable(target, timeout)
        kwargs: dict[str, Any] = {"namespace": namespace, "runtime_env": dict(runtime_env) if runtime_env else None}
        if os.environ.get(QUIET_ENV, "") not in {"", "0"}:
            kwargs["logging_level"] = logging.ERROR  # ray.init sets the "ray" logger's level to this, INFO otherwise
        own_dir = None
        if target.kind == "embedded":
            own_dir = None if temp_dir is not None else tempfile.mkdtemp(prefix="gridboost-ray-")
            kwargs.update(
                address="local",
                include_dashboard=False,
                _temp_dir=temp_dir or own_dir,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
            )
        else:
            kwargs["address"] = target.address
        owner = _Owner(kwargs, own_dir)
        if not owner.start(timeout):
            _stragglers.append(owner)
            owner.stop(0)  # once ray.init returns, it shuts down again
            raise BackendError(f"Ray at {target} did not start or answer within {timeout:g}s")
        if owner.error is not None:
            owner.thread.join(timeout)
            raise _init_failed(target, owner.error)
        conn = Connection(
            target=target,
            gcs_address="" if target.kind == "client" else str(ray.get_runtime_context().gcs_address),
            owned=True,
            namespace=namespace,
            runtime_env=runtime_env,
            cpus_gpus=(num_cpus, num_gpus),
            owner=owner,
            temp_dir=own_dir,
            users=1,
        )
        _current = conn
        return conn


def release(conn: Connection, timeout: float) -> None:
    """One user fewer; the last one shuts down what gridboost started. Raises ``BackendError`` if Ray would not stop."""
    global _current
    with _lock:
        conn.users -= 1
        if conn.users > 0:
            return
        if _current is conn:
            _current = None
        owner = conn._owner
        if owner is not None and not owner.stop(timeout):
            _stragglers.append(owner)
            raise BackendError(f"ray.shutdown() did not finish within {timeout:g}s")


def current() -> Connection | None:
    """The connection gridboost holds now (for tests and the CLI)."""
    return _current


# -- helpers ---------------------------------------------------------------------------------------------------------


def _adopt() -> Connection | None:
    """The application's own ``ray.init``, if it made one: used, never shut down."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    client = _client_connected()
    gcs = "" if client else str(context.gcs_address)
    return Connection(
        target=Target("client", "ray://?") if client else Target("gcs", gcs),
        gcs_address=gcs,
        owned=False,
        namespace=context.namespace,
        runtime_env=None,
    )


def _client_connected() -> bool:
    try:
        from ray.util.client import ray as client_ray
    except ImportError:  # pragma: no cover - ray always ships it
        return False
    return bool(client_ray.is_connected())  # type: ignore[no-untyped-call]  # ray's own annotations lack it


def _check_same_options(
    conn: Connection,
    namespace: str | None,
    runtime_env: Mapping[str, Any] | None,
    num_cpus: float | None,
    num_gpus: float | None,
) -> None:
    import ray

    problems = []
    if namespace is not None and namespace != conn.namespace:
        problems.append(f"namespace {shown(namespace)} (it uses {shown(conn.namespace)})")
    if runtime_env:
        have = conn.runtime_env if conn.owned else dict(ray.get_runtime_context().runtime_env)
        if dict(runtime_env) != dict(have or {}):
            problems.append(f"runtime_env {shown(dict(runtime_env))} (it uses {shown(dict(have or {}))})")
    if (num_cpus, num_gpus) != (None, None) and (num_cpus, num_gpus) != conn.cpus_gpus:
        problems.append(f"num_cpus={num_cpus}, num_gpus={num_gpus} (they apply only when gridboost starts Ray)")
    if problems:
        raise BackendError(
            f"this process's Ray connection ({conn.gcs_address or conn.target}) is shared by every grid in it, and "
            f"was made with other options: cannot use {'; '.join(problems)}"
        )


def _resolve(target: Target) -> Target:
    """``auto`` → the cluster it names; ``localhost:port`` → the address Ray itself will use."""
    from ray._private import services

    try:
        address = services.canonicalize_bootstrap_address(target.address)
    except ConnectionError as exc:
        raise BackendError(f"address='auto' found no Ray cluster: {exc}") from None
    except Exception as exc:
        raise BackendError(f"cannot use Ray address {shown(target.address)}: {exc}") from exc
    if address is None:
        raise BackendError(
            "address='auto' found no Ray cluster: set RAY_ADDRESS, run `ray start --head`, or pass the address"
        )
    if target.address == "auto":
        # What ray.init does for "auto", and must happen before the handshake below: a cluster found
        # automatically uses the token this machine holds, if any.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return Target("gcs", address, given=target.address)


def _check_reachable(target: Target, timeout: float) -> None:
    host, port = _host_port(target.address.removeprefix("ray://"), target.address)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise BackendError(f"cannot resolve the host of Ray address {target}: {exc}") from None
    except OSError as exc:
        raise BackendError(
            f"cannot reach Ray at {target} ({exc or type(exc).__name__}): is the cluster running, and is this "
            "its GCS address (port 6379 by default; ray://host:10001 for a Ray Client server)?"
        ) from None
    with sock:
        answer = _speaks_grpc(sock, deadline) if _TLS not in os.environ else None
    if answer is not None:
        raise BackendError(
            f"{target} is not a Ray {_GRPC_SERVER[target.kind]} port ({answer}){_port_hint(port, target.kind)}"
        )
    if target.kind == "gcs":
        _handshake(target, max(0.001, deadline - time.monotonic()))


# What a GCS and a Ray Client server are: gRPC servers, which speak HTTP/2 without TLS unless RAY_USE_TLS is set.
_GRPC_SERVER = {"gcs": "GCS", "client": "Client server"}
_TLS = "RAY_USE_TLS"
# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server answers with a SETTINGS frame of its own.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4
# Ray's default ports, to say which one the user probably gave.
_RAY_PORTS = {
    8265: "the dashboard",
    10001: "the Ray Client server (use ray://host:10001 for it)",
    52365: "the dashboard agent",
    6379: "the GCS",
}


def _speaks_grpc(sock: socket.socket, deadline: float) -> str | None:
    """``None`` when the peer answers HTTP/2 as a gRPC server does, else what it did instead, in words.

    A GCS is a gRPC server: without this, Ray's own handshake with, say, the dashboard's web server retries for 13 s
    and says only that it timed out.
    """
    received = b""
    try:
        sock.sendall(_H2_HELLO)
        while len(received) < 9:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(9 - len(received))
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        return f"it accepted a connection but answered nothing within the connect timeout{_seen(received)}"
    except OSError as exc:
        return f"the connection failed ({exc or type(exc).__name__}){_seen(received)}"
    if len(received) == 9 and received[3] == _SETTINGS:
        return None
    if received.startswith(b"HTTP/"):
        return "an HTTP/1 web server answered"
    return f"it closed the connection{_seen(received)}"


def _seen(received: bytes) -> str:
    return f" (after {len(received)} byte(s) that are not HTTP/2)" if received else ""


def _port_hint(port: int, kind: Kind) -> str:
    known = _RAY_PORTS.get(port)
    guess = f"; is {port} {known}?" if known and known != "the GCS" else ""
    usual = "the GCS port is usually 6379" if kind == "gcs" else "a Ray Client server's port is usually 10001"
    return f"{guess}; {usual}"


def _handshake(target: Target, timeout: float) -> None:
    """Ask the GCS for its cluster id, in a thread given up on after ``timeout`` (Ray's own wait is ~12 s)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        from ray._raylet import AuthenticationTokenLoader, InnerGcsClient  # type: ignore[attr-defined]  # not in its .pyi
    except ImportError:  # pragma: no cover - a Ray without these internals: ray.init alone must do
        return
    if is_token_auth_enabled() and not AuthenticationTokenLoader.instance().has_token():
        raise BackendError(_NO_TOKEN)  # asking without one aborts the process inside Ray's C++
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            InnerGcsClient.standalone(target.address, None, int(timeout * 1000))
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    asker = threading.Thread(target=ask, name="gridboost-ray-handshake", daemon=True)
    asker.start()
    asker.join(timeout)
    if not outcome:
        raise BackendError(f"nothing at {target} answered as a Ray GCS within {timeout:g}s")
    error = outcome[0]
    if error is not None:
        raise _init_failed(target, error)


def _init_failed(target: Target, exc: BaseException) -> BackendError:
    from ._errors import translate

    if type(exc).__name__ == "AuthenticationError":
        translated = translate(exc, f"connecting to Ray at {target}")
        return translated if isinstance(translated, BackendError) else BackendError(str(exc))
    first = (str(exc).strip().splitlines() or [""])[0]
    error = BackendError(f"could not connect to {target}: {type(exc).__name__}: {first}")
    error.__cause__ = exc
    return error


#: The token of every private Ray this process starts: one per process, since Ray's token loader keeps the first
#: token it reads for the life of the process (a second private instance with another token would refuse it).
_token: str | None = None


@contextlib.contextmanager
def _private_token() -> Iterator[None]:
    """While a private Ray starts: token mode with this process's own token, given in the environment, when the user
    set up none; the environment as it was afterwards.

    The processes ``ray.init`` starts (GCS, raylet, and the workers the raylet starts later) inherit the token from
    the environment; this process's Ray has read it by the time ``ray.init`` returns. Restoring the environment keeps
    ``RAY_AUTH_MODE=token`` (which ``ray.init`` would set for good) out of every process this one starts afterwards,
    a ``ray start`` among them.
    """
    global _token
    mode = os.environ.get("RAY_AUTH_MODE")
    if (mode is not None and mode.lower() != "token") or _has_users_token():
        yield  # token auth off, or the user's own token: Ray writes nothing
        return
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in its .pyi

    if _token is None:
        _token = secrets.token_hex(32)
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = _token
    try:
        # What Ray does when it turns token mode on itself: this process's config and token loader read them anew.
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_users_token() -> bool:
    """Whether Ray would find a token the user gave (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip() or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    try:
        return (Path.home() / ".ray" / "auth_token").is_file()
    except (OSError, RuntimeError):  # no home directory to look in
        return False


def _wait_for_stragglers(timeout: float) -> None:
    for owner in list(_stragglers):
        if owner.stop(timeout):
            _stragglers.remove(owner)
        else:
            raise BackendError(f"an earlier Ray start or shutdown in this process is still running after {timeout:g}s")


def _remove_dir(path: str | None) -> None:
    if path is not None and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
