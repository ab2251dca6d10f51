"""Parked data: an object stored once in the engine and handed to many tasks by a handle.

``handle = await grid.put(obj)`` stores ``obj`` once where the work runs (Ray's object
store, Dask workers' memory, this process for the local backend). A handle passed as an
argument of ``offload``/``submit``/``map`` reaches the function as the object itself,
resolved by the engine on the worker: the object is not shipped again per call.

A handle is released by ``await handle.release()`` (or leaving ``async with handle``),
when the boost it was put under ends, and at the grid's teardown; an engine that will
not let go of it is named in the :class:`~gridboost.exceptions.TeardownError`. Put
under a boost that holds memory, its size counts against that boost's memory.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
from attrs import evolve

from ._book import BoostBook
from ._boost import Boost
from ._records import new_id
from ._resources import Resources, format_bytes
from ._runtime import Runtime
from ._spec import TaskSpec
from ._text import shown
from .abc import Backend
from .exceptions import CapacityUnavailable, InvalidRequest

__all__ = ["Parked", "Parking", "nbytes"]


def nbytes(value: object) -> int:
    """About how many bytes ``value`` takes once stored: its buffer's size, or what pickling it writes.

    Buffers (``bytes``, ``bytearray``, NumPy arrays, ``memoryview``) are measured without a copy, and so are the
    buffers inside a container that pickle protocol 5 hands out of band (NumPy's). What cannot be pickled here
    counts its shallow size: the engine's serialiser may still take it.
    """
    try:
        return memoryview(value).nbytes  # type: ignore[arg-type]
    except TypeError:
        pass
    import pickle  # here, not at the top: `import gridboost` stays cheap (tests/test_import_cost.py)

    buffers: list[pickle.PickleBuffer] = []
    try:
        inline = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        return sys.getsizeof(value)
    return len(inline) + sum(buffer.raw().nbytes for buffer in buffers)


class Parked:
    """A handle on an object parked in the engine by :meth:`gridboost.Grid.put`.

    Pass the handle itself as an argument (positional or keyword) of ``offload``,
    ``submit`` or ``map`` (as an item): the function receives the object. A handle
    inside another value (a list, a dict) is not resolved, and cannot be sent.
    ``release()`` is idempotent; ``async with handle:`` releases it on exit.
    """

    __slots__ = ("_backend", "_claim", "_done", "_parking", "_token", "boost", "id", "kind", "released", "size")

    #: A handle was made in this process: from then on every grid looks through its tasks' arguments (to resolve
    #: handles, and refuse released ones or another grid's); until then that costs nothing.
    issued: ClassVar[bool] = False

    def __init__(
        self, parking: Parking, backend: Backend, size: int, kind: str, boost: Boost | None, claim: Resources | None
    ) -> None:
        self.id = new_id("parked")
        #: Bytes the object takes, as measured when it was put (see :func:`nbytes`).
        self.size = size
        #: The object's type name, for people.
        self.kind = kind
        #: The boost it was put under (its object lives on the boost's nodes), or ``None``.
        self.boost = boost
        self.released = False
        self._parking = parking
        self._backend = backend
        self._claim = claim
        self._token: Any = None
        self._done: anyio.Event | None = None

    def __repr__(self) -> str:
        where = f" in {self.boost.id}" if self.boost is not None else ""
        state = " released" if self.released else ""
        return f"<Parked {self.id} {self.kind} {format_bytes(self.size)}{where}{state}>"

    async def release(self) -> None:
        """Let the engine free the object, awaited; tasks already running with it keep it until they end."""
        await self._parking.release(self)

    async def __aenter__(self) -> Parked:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()

    def cancel(self, cause: BaseException) -> None:
        """Its boost is ending: release it (the boost's end awaits that, as it awaits its work)."""
        self._parking.release_soon(self)

    def __reduce__(self) -> Any:
        # Only a handle passed as a whole argument is resolved; one inside another value would reach the
        # worker as a dead handle, so it is refused where the engine serialises it.
        raise TypeError(
            f"{self.id} is a parked-data handle: pass it as an argument of its own, not inside another value"
        )


class Parking:
    """The handles a grid has put and not released: put, resolve into task arguments, release."""

    def __init__(self, runtime: Runtime, book: BoostBook) -> None:
        self._runtime = runtime
        self._book = book
        #: Handles not yet released, by id.
        self.live: dict[str, Parked] = {}

    async def put(self, value: object, boost: Boost | None) -> Parked:
        """Park ``value`` in the engine (inside ``boost`` when given) and return its handle."""
        runtime = self._runtime
        runtime.check_open()
        claim = None
        if boost is not None:
            if not isinstance(boost, Boost):
                raise InvalidRequest(f"boost must be a Boost or None, got {shown(boost)}")
            if not self._book.owns(boost):
                raise InvalidRequest(f"boost {boost.id} belongs to another grid")
            boost.require_active()
        size = nbytes(value)
        if boost is not None and boost.resources.memory:
            claim = Resources(memory=size)
            if not boost.ledger.room_for(claim):
                free = boost.available.memory
                raise CapacityUnavailable(
                    f"cannot park {format_bytes(size)} in boost {boost.id}: {format_bytes(int(free))} of its "
                    "memory is unclaimed"
                )
        backend = runtime.backend
        Parked.issued = True
        handle = Parked(self, backend, size, type(value).__qualname__, boost, claim)
        reservation = boost.reservation if boost is not None else None
        if claim is not None:
            boost.ledger.take(claim)  # type: ignore[union-attr]
        try:
            # Shielded: an object the engine stored as we were cancelled must still get a handle, to be freed.
            with anyio.CancelScope(shield=True):
                handle._token = await backend.park(handle.id, value, reservation)
        except BaseException:
            self._forget(handle)
            raise
        self.live[handle.id] = handle
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()  # a put cancelled while the engine stored: undone
            if boost is not None:
                boost.admit(handle)  # ends with the boost, which may have ended while the object was stored
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release(handle)
            raise
        return handle

    async def release(self, handle: Parked) -> None:
        if handle._done is not None:  # released, or being released by someone else: wait for that
            await handle._done.wait()
            return
        handle.released = True
        done = handle._done = anyio.Event()
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self._runtime.settings.teardown_timeout):
                await handle._backend.unpark(handle.id, handle._token)
        finally:
            self._forget(handle)
            done.set()

    def release_soon(self, handle: Parked) -> None:
        """Release ``handle`` in the grid's task group; failures are logged."""

        async def release() -> None:
            try:
                await self.release(handle)
            except Exception as exc:
                self._runtime.log_error(f"releasing {handle.id} failed", exc)

        if handle._done is None:
            self._runtime.start_soon(release)

    def _forget(self, handle: Parked) -> None:
        self.live.pop(handle.id, None)
        handle._token = None
        if handle.boost is not None:
            if handle._claim is not None:
                handle.boost.ledger.give(handle._claim)
                handle._claim = None
            handle.boost.work.discard(handle)

    # -- tasks ---------------------------------------------------------------------------

    def check(self, spec: TaskSpec) -> bool:
        """Whether the task has handles among its arguments; a handle released or not this grid's is refused."""
        found = False
        for value in (*spec.args, *spec.kwargs.values()):
            if type(value) is Parked:
                if value._parking is not self:
                    raise InvalidRequest(f"{value.id} was put by another grid")
                if value.released:
                    raise InvalidRequest(f"{value.id} was released; put the object again")
                found = True
        return found

    async def resolve(self, spec: TaskSpec, backend: Backend) -> TaskSpec:
        """The task as ``backend`` runs it: each handle replaced by what that engine resolves on its worker."""
        args = tuple([await self._arg(value, backend) for value in spec.args])
        kwargs: Mapping[str, Any] = {key: await self._arg(value, backend) for key, value in spec.kwargs.items()}
        return evolve(spec, args=args, kwargs=kwargs)

    async def _arg(self, value: Any, backend: Backend) -> Any:
        if type(value) is not Parked:
            return value
        token = value._token
        if value.released:
            raise InvalidRequest(f"{value.id} was released before the task started")
        if value._backend is backend:
            return token
        return await value._backend.fetch(token)  # the task runs elsewhere (the host): it gets the object here

    async def close(self) -> list[tuple[Parked, Exception]]:
        """Release every handle left (teardown); the ones the engine would not free, with why."""
        failed: list[tuple[Parked, Exception]] = []

        async def release(handle: Parked) -> None:
            try:
                await self.release(handle)
            except Exception as exc:
                failed.append((handle, exc))

        async with anyio.create_task_group() as tg:
            for handle in list(self.live.values()):
                tg.start_soon(release, handle)
        return failed
