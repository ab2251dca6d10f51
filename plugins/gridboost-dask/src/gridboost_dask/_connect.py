"""Starting or joining Dask, and the event loop its asynchronous client lives in.

Where a backend points:

* no address (or ``"local"``): an embedded ``LocalCluster`` of worker *processes* (nannies), with no dashboard (and
  no fixed port of any kind), so two grids on one machine never collide; sized by ``n_workers``,
  ``threads_per_worker``, ``memory_limit`` and ``resources``. It is the grid's own: closed, processes and all, when
  the grid closes, and it can grow (``LocalCluster.scale``).
* ``"tcp://host:port"``, ``"tls://host:port"`` (any Dask comm scheme; a bare ``host:port`` means tcp): that scheduler,
  with ``security=`` (a ``distributed.security.Security``) passed through for TLS.

Joining never hangs: ``Client(timeout=connect_timeout)`` (5 s by default) gives up on a refused or unreachable
address — Dask itself retries a refused connection until its timeout — and the whole join is bounded again from
outside, so a scheduler that accepts TCP but never answers cannot hold a grid either. Starting an embedded cluster is
bounded apart, by ``start_timeout`` (60 s by default): it starts processes, which a busy machine makes slow.

Dask's asynchronous client is asyncio-only. On asyncio it lives in the grid's own loop (nothing is faster); on trio it
lives in a dedicated asyncio loop in a thread of its own (:class:`DaskLoop`), and every call crosses to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, Literal, TypeVar

import anyio
from attrs import define, frozen

from gridboost.backend_kit import shown, until_done_on_trio
from gridboost.exceptions import BackendError, InvalidRequest

from ._errors import translate_connect

__all__ = ["Connection", "DaskLoop", "Target", "close", "on_trio", "open_connection", "parse_address"]

T = TypeVar("T")
Kind = Literal["embedded", "scheduler"]


@frozen
class Target:
    """Where a backend asked to connect: ``address`` is ``scheme://host:port`` for a scheduler."""

    kind: Kind
    address: str = ""

    def __str__(self) -> str:
        return "an embedded LocalCluster" if self.kind == "embedded" else self.address


def parse_address(address: object) -> Target:
    """Check an address's form; resolving it is the client's job."""
    if address is None or (isinstance(address, str) and address == "local"):
        return Target("embedded")
    if not isinstance(address, str) or not address.strip():
        raise InvalidRequest(
            f"address must be None, 'local' or a scheduler address like 'tcp://host:8786', got {shown(address)}"
        )
    address = address.strip()
    scheme, sep, rest = address.rpartition("://")
    if not sep:
        scheme, rest = "tcp", address
    host, colon, port = rest.rpartition(":")
    # ASCII digits, at most 5 of them: int() of a long or non-ASCII digit string fails, or costs, before the range test.
    well_formed = scheme.isascii() and scheme.isalpha() and colon and host and port.isascii() and port.isdigit()
    if not well_formed or len(port) > 5 or not 0 < int(port) < 65536:
        raise InvalidRequest(f"address {shown(address)} is not scheme://host:port (e.g. tcp://10.0.0.5:8786)")
    return Target("scheduler", f"{scheme}://{rest}")


def on_trio() -> bool:
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


class DaskLoop:
    """The asyncio loop that Dask's client runs in: the caller's own (asyncio), or a thread's (trio).

    :meth:`call` runs a coroutine function there and awaits it from the caller. Cancelled, it cancels the coroutine in
    Dask's loop, waits (shielded) for it to finish its own clean-up, and lets the cancellation go on.
    """

    def __init__(self, *, threaded: bool) -> None:
        self.threaded = threaded
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.threaded:
            self.loop = asyncio.get_running_loop()
            return
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="gridboost-dask-loop", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self, timeout: float) -> bool:
        """Stop the thread's loop (if any); ``False`` if it did not end within ``timeout``."""
        if self._thread is None or self.loop is None:
            return True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if not self.threaded:
            return await fn(*args, **kwargs)
        assert self.loop is not None
        future: ConcurrentFuture[T] = asyncio.run_coroutine_threadsafe(_coro(fn, args, kwargs), self.loop)
        await _wait_threadsafe(future)
        return future.result()


async def _coro(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> T:
    return await fn(*args, **kwargs)


async def _wait_threadsafe(future: ConcurrentFuture[Any]) -> None:
    """Wait for a future completed in another thread; on cancellation, cancel it and wait for it, shielded."""
    try:
        await until_done_on_trio(future)
    except BaseException:
        future.cancel()  # cancels the coroutine in Dask's loop; it cleans up (cancels its Dask future) there
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            await until_done_on_trio(future)
        raise


def _protected(threaded: bool) -> contextlib.AbstractContextManager[Any]:
    """Clean-up in Dask's loop: shielded from anyio when that loop is the grid's own; a thread's loop needs none.

    Code that runs in Dask's loop uses asyncio's own timeouts, never anyio's: the thread's loop is plain asyncio.
    """
    return contextlib.nullcontext() if threaded else anyio.CancelScope(shield=True)


@define(eq=False)
class Connection:
    """A backend's client, and the cluster it started (if any)."""

    target: Target
    client: Any
    cluster: Any = None
    #: The worker options an embedded cluster grows with (threads, memory, resources of one new worker).
    worker_template: Mapping[str, Any] | None = None

    @property
    def address(self) -> str:
        return str(self.client.scheduler.address)

    @property
    def can_grow(self) -> bool:
        return self.cluster is not None and callable(getattr(self.cluster, "scale", None))


async def open_connection(
    target: Target,
    *,
    security: Any,
    n_workers: int,
    threads_per_worker: int,
    memory_limit: str | float | None,
    resources: Mapping[str, float] | None,
    timeout: float,
    start_timeout: float,
    threaded: bool,
) -> Connection:
    """Start an embedded cluster (bounded by ``start_timeout``) or join a scheduler (by ``timeout``), in Dask's loop."""
    from distributed import Client, LocalCluster

    if target.kind == "embedded":
        cluster: Any = None
        try:
            async with asyncio.timeout(start_timeout):
                cluster = LocalCluster(  # type: ignore[no-untyped-call]  # distributed's __init__ is unannotated
                    n_workers=n_workers,
                    threads_per_worker=threads_per_worker,
                    processes=True,
                    memory_limit=memory_limit if memory_limit is not None else "auto",
                    resources=dict(resources) if resources else None,
                    # No dashboard; and the scheduler's HTTP endpoint (health, metrics) on a free port, not Dask's
                    # default 8787: two grids (or a grid and a Dask of the user's) on one machine never collide.
                    dashboard_address=None,
                    scheduler_kwargs={"dashboard_address": ":0"},
                    worker_dashboard_address=None,
                    host="127.0.0.1",
                    security=security,
                    # Dask's default drops its processes' INFO lines; a host that quieted Dask more
                    # (gridboost.quiet_engine_logs) gets its nannies' WARNING lines dropped too.
                    silence_logs=max(logging.WARNING, logging.getLogger("distributed").getEffectiveLevel()),
                    asynchronous=True,
                )
                await cluster
                client = await Client(cluster, asynchronous=True, set_as_default=False, timeout=start_timeout)  # type: ignore[no-untyped-call]
        except BaseException as exc:
            if cluster is not None:
                with _protected(threaded):
                    await asyncio.wait_for(cluster.close(), start_timeout)
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"could not start an embedded LocalCluster within start_timeout={start_timeout:g}s"
                ) from exc
            if isinstance(exc, Exception):
                raise BackendError(f"could not start an embedded LocalCluster: {type(exc).__name__}: {exc}") from exc
            raise
        template = {"nthreads": threads_per_worker, "resources": dict(resources or {})}
        return Connection(target=target, client=client, cluster=cluster, worker_template=template)
    joining: Any = None
    try:
        # Dask retries an unreachable address until its own timeout; a scheduler that accepts TCP but never answers
        # the handshake is cut off by ours.
        async with asyncio.timeout(timeout + 5):
            joining = Client(  # type: ignore[no-untyped-call]
                target.address, asynchronous=True, set_as_default=False, timeout=timeout, security=security
            )
            await joining
    except BaseException as exc:
        if joining is not None:
            with _protected(threaded), contextlib.suppress(Exception):
                await asyncio.wait_for(joining.close(), 5)
        if isinstance(exc, Exception):
            raise translate_connect(exc, str(target), timeout) from exc
        raise
    return Connection(target=target, client=joining)


async def close(conn: Connection, timeout: float) -> list[str]:
    """Close the client, then a cluster gridboost started; what could not be closed, named."""
    leftovers = []
    if conn.cluster is not None:
        # The processes of a cluster we close on purpose report their own closing as errors, on the host's terminal:
        # a worker whose heartbeat meets the closing scheduler ("Failed to communicate with scheduler during
        # heartbeat"), a nanny whose graceful close is cut short (CancelledError). Their logging goes quiet first.
        quiet = functools.partial(logging.disable, logging.CRITICAL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.client.run(quiet), timeout)
            await asyncio.wait_for(conn.client.run(quiet, nanny=True), timeout)
    try:
        await asyncio.wait_for(conn.client.close(), timeout)
    except Exception as exc:
        leftovers.append(f"the Dask client to {conn.target} did not close: {type(exc).__name__}: {exc}")
    if conn.cluster is not None:
        try:
            await asyncio.wait_for(conn.cluster.close(), timeout)
        except Exception as exc:
            leftovers.append(f"the embedded LocalCluster did not close: {type(exc).__name__}: {exc}")
    return leftovers
