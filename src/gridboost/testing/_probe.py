"""How a test asks the *engine*, not gridboost's books, what it holds and runs."""

from __future__ import annotations

import abc
import socket
from collections.abc import Callable, Collection

from .._grid import Grid
from .._local import LocalBackend
from .._parking import Parked, nbytes

__all__ = ["EngineProbe", "LocalProbe"]


class EngineProbe(abc.ABC):
    """The engine's own state, as the conformance suite and leak checks read it.

    Each backend's tests provide one (Ray: the state API; Dask: the scheduler; local:
    the local backend, which *is* its engine). Methods take the grid under test,
    and must keep working after that grid has closed — that is when leaks show.
    """

    @abc.abstractmethod
    async def reservations(self, grid: Grid) -> Collection[str]:
        """Ids of the reservations (boost ids) the engine holds now."""

    @abc.abstractmethod
    async def reservation_nodes(self, grid: Grid, reservation_id: str) -> Collection[str]:
        """The ids of the nodes the engine placed that reservation on."""

    @abc.abstractmethod
    async def running(self, grid: Grid) -> Collection[str]:
        """Ids of the tasks (``TaskSpec.id``) whose work the engine is executing now."""

    @abc.abstractmethod
    async def parked_nodes(self, grid: Grid, handle: Parked) -> Collection[str]:
        """The ids of the nodes whose store holds the object of ``handle`` now; empty once the engine freed it.

        The suite asks while the handle is live before it asks after its release, so a probe may learn there
        how the engine names the object.
        """

    @abc.abstractmethod
    async def big_objects(self, grid: Grid, size: int) -> int:
        """How many stored objects of at least ``size`` bytes the engine holds for the grid now.

        What tasks were sent with counts too, while the engine keeps it (Ray's object store holds each large
        argument as an object of its own).
        """

    @property
    @abc.abstractmethod
    def whereami(self) -> Callable[[], str]:
        """A module-level function that, run *as a task*, returns the id of the node it runs on."""


def local_node_id() -> str:
    return f"local:{socket.gethostname()}"


class LocalProbe(EngineProbe):
    """The probe of the built-in local backend."""

    @staticmethod
    def _backend(grid: Grid) -> LocalBackend:
        backend = grid.backend
        while not isinstance(backend, LocalBackend) and hasattr(backend, "inner"):  # a wrapper: FaultyBackend
            backend = backend.inner
        assert isinstance(backend, LocalBackend), f"LocalProbe needs a local backend, got {grid.backend!r}"
        return backend

    async def reservations(self, grid: Grid) -> Collection[str]:
        return {r.id for r in await self._backend(grid).reservations()}

    async def reservation_nodes(self, grid: Grid, reservation_id: str) -> Collection[str]:
        backend = self._backend(grid)
        return {node for r in await backend.reservations() if r.id == reservation_id for node in r.placements}

    async def running(self, grid: Grid) -> Collection[str]:
        return set(self._backend(grid).running_tasks())

    async def parked_nodes(self, grid: Grid, handle: Parked) -> Collection[str]:
        return {local_node_id()} if handle.id in self._backend(grid).parked() else set()

    async def big_objects(self, grid: Grid, size: int) -> int:
        # Tasks get their arguments by reference here: only what was parked is stored.
        backend = self._backend(grid)
        return sum(nbytes(value) >= size for value in backend._parked.values())

    @property
    def whereami(self) -> Callable[[], str]:
        return local_node_id
