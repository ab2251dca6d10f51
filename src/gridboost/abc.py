"""The backend contract: what the local, Ray and Dask backends (and yours) implement.

A backend is an engine adapter. It knows nothing of priorities, TTLs, placement
policy, hooks or teardown order: the :class:`~gridboost.Grid` owns all of that and
calls the backend through the few coroutines below.

Cancellation is structured. :meth:`Backend.run` is an ordinary coroutine; the grid
cancels it through an anyio cancel scope, and the backend — which alone knows the
engine's handle — turns that into the engine's own cancel (``ray.cancel``,
``Future.cancel``, a process kill) from a shielded scope before it lets the
cancellation go on. A backend must record the engine handle *before* its first
await that can be cancelled, so a cancel always has something to reach.

Engine exceptions are translated at this boundary (one helper per backend, as
httpcore does): the user's own exception crosses unwrapped, with its own type;
everything the engine raises for its own reasons becomes a
:class:`~gridboost.exceptions.GridboostError`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from attrs import field, frozen

from ._records import ClusterSnapshot, Lease, Quota, Reservation, ReservationRequest, frozen_map
from ._resources import Resources
from ._spec import TaskSpec
from ._text import shown
from .exceptions import InvalidRequest

__all__ = ["Backend", "BackendSpec", "Capabilities", "Reservation", "ReservationRequest"]


@frozen
class Capabilities:
    """What a backend can do, so the grid and the conformance suite know what to expect.

    ``interrupt_running``: a running *callable* can be stopped (a process kill, a
    force-cancel); threads and Dask worker threads cannot. ``native_retries``: the
    engine retries failed work itself (``max_retries``), so the grid does not.
    ``grow``: the backend can add capacity (autoscaler, ``cluster.scale``), so a
    boost larger than today's cluster is not refused at once. ``shared_leases``: the
    engine keeps a lease registry that other processes read and act on, so a lease can
    outlive the process that took it (until its TTL) and be renewed or released by
    another (the ``gridboost boost`` commands need it).
    """

    reserve: bool = True
    grow: bool = False
    interrupt_running: bool = False
    commands: bool = True
    native_retries: bool = False
    remote: bool = True
    shared_leases: bool = False


class Backend(abc.ABC):
    """An engine adapter. Instances are single-use: ``start`` once, ``aclose`` once."""

    #: The name users pass to ``Grid(backend=...)``.
    name: str = ""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can do."""

    @property
    def task_prefix(self) -> str | None:
        """What the engine's own task table names this backend's work with: every name it gives starts with this.

        ``None`` (the default) where the engine has no such names. Dask's keys are this, then the
        task's id; Ray's task names are this, then the function's name (one name per function:
        Ray keeps a metric series per name, never freed), and the Ray backend's ``ray_task_ids()``
        tells which row is which task. So a tool can find a grid's work in ``ray list tasks`` or
        the scheduler. A backend names nothing per task that the engine keeps per name for good.
        """
        return None

    # -- life cycle ---------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to (or start) the engine; raise a ``GridboostError`` if unreachable, in bounded time."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything this backend started; awaited, idempotent.

        Raise :class:`~gridboost.exceptions.TeardownError` naming anything that could
        not be stopped (a thread still running, a process that would not die).
        """

    # -- seeing ---------------------------------------------------------------------

    @abc.abstractmethod
    async def snapshot(self) -> ClusterSnapshot:
        """Every node with its total and available resources, as the engine reports them."""

    # -- reserving ------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(self, request: ReservationRequest) -> Reservation:
        """Make the engine hold ``request``; return once it is really held.

        Wait as long as the engine needs (the grid bounds the wait with a cancel
        scope and enforces priority order). If cancelled while waiting, undo any
        partial reservation before the cancellation goes on. Raise
        :class:`~gridboost.exceptions.BoostUnavailable` when it can never fit.
        """

    @abc.abstractmethod
    async def release(self, reservation: Reservation) -> None:
        """Give the reservation back to the engine; idempotent. Called shielded."""

    async def extend(self, reservation: Reservation, ttl: float) -> None:  # noqa: B027 - optional hook
        """The lease was renewed for ``ttl`` seconds from now; engines that reap dead owners' leases store it."""

    @abc.abstractmethod
    async def reservations(self) -> Sequence[Reservation]:
        """The reservations the *engine* holds for this backend now — the leak check reads it."""

    async def leases(self) -> Sequence[Lease]:
        """Every gridboost lease the engine records, of *any* owner process (the CLI lists them).

        Engines with a shared lease registry (a Ray actor, a Dask scheduler plugin)
        answer for the whole cluster. The default knows only this process's
        reservations, with the TTL each was granted for.
        """
        return ()

    async def renew_lease(self, lease_id: str, ttl: float) -> Lease:
        """Move any owner's lease in the engine's registry to expire ``ttl`` seconds from now.

        Only backends with ``capabilities.shared_leases``; an id the registry does not
        know raises :class:`~gridboost.exceptions.InvalidRequest` naming it.
        """
        raise InvalidRequest(
            f"the {self.name} backend keeps no lease registry: it cannot renew lease {shown(lease_id)}"
        )

    async def release_lease(self, lease_id: str) -> None:
        """Give back any owner's lease in the engine's registry now, awaited (see :meth:`renew_lease`)."""
        raise InvalidRequest(
            f"the {self.name} backend keeps no lease registry: it cannot release lease {shown(lease_id)}"
        )

    async def set_quota(self, tenant: str, limit: Resources | None) -> None:
        """Cap what ``tenant``'s granted leases may hold together, in the engine's registry; ``None`` clears it.

        Only backends with ``capabilities.shared_leases``: the registry holds a request that would pass the cap
        until the tenant's own leases make room (requests of other tenants go on being granted).
        """
        raise InvalidRequest(f"the {self.name} backend keeps no lease registry: it cannot keep quotas")

    async def quotas(self) -> Sequence[Quota]:
        """Every tenant's quota in the engine's registry, with what its leases hold now."""
        return ()

    async def check_quota(self, request: ReservationRequest) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~gridboost.exceptions.QuotaExceeded` if ``request``'s tenant's quota holds it back.

        The grid asks when a request's ``wait`` ran out (``wait=0`` included), so that its error names the quota
        and the tenant's use rather than the cluster's free capacity.
        """

    async def watch(self, lost: Callable[[str, BaseException], Awaitable[None]]) -> None:  # noqa: B027 - optional hook
        """Report reservations the engine loses on its own: ``await lost(reservation_id, error)``.

        The grid runs this in its task group from start to teardown and cancels it
        there. When a node dies under a boost, the backend says so here; the grid
        marks the boost ``failed``, stops the work inside it with
        :class:`~gridboost.exceptions.BoostLost`, releases what is left and fires
        ``gridboost_boost_failed``. A backend whose reservations cannot be lost
        (the local one) returns at once, which is the default.
        """

    # -- parked data ------------------------------------------------------------------

    async def park(self, key: str, value: Any, reservation: Reservation | None) -> Any:
        """Store ``value`` once in the engine (on the reservation's nodes when given); return its token.

        The token is what a task's argument becomes when the task runs on this backend:
        the engine resolves it on the worker without shipping the value again (Ray: an
        ``ObjectRef``; Dask: a ``Future`` of scattered data). ``key`` names the object in
        :meth:`unpark` and in errors. The default keeps the value by reference, as the
        local backend does: a backend whose tasks run in this process needs no more.
        """
        return value

    async def unpark(self, key: str, token: Any) -> None:  # noqa: B027 - optional hook
        """Let the engine free the parked object ``key``; awaited, idempotent. Called shielded."""

    async def fetch(self, token: Any) -> Any:
        """The value behind ``token``, in this process: for a task that runs on another backend (the host)."""
        return token

    # -- running --------------------------------------------------------------------

    @abc.abstractmethod
    async def run(
        self, task: TaskSpec, reservation: Reservation | None, *, on_start: Callable[[], None] | None = None
    ) -> Any:
        """Run ``task`` (inside ``reservation`` when given) and return its result.

        For a :class:`~gridboost.Command` return a :class:`~gridboost.CommandResult`.
        Re-raise the user's exception with its own type. On cancellation, cancel
        the engine's work from a shielded scope, then let the cancellation go on.
        With ``capabilities.native_retries``, retry ``task.retries`` times.

        Call ``on_start()`` once the work has its capacity, just before it begins:
        until then the grid may move it onto a boost that just became active. A
        backend that cannot tell when its engine starts work calls it before it
        submits (so nothing it submitted is ever moved). A backend with
        ``capabilities.remote=False`` serves as the host and must honour it.
        """

    def check_task(self, task: TaskSpec) -> None:  # noqa: B027 - optional hook
        """Refuse, before anything is submitted, a task this backend cannot run (not picklable, say)."""

    def check_reservation(self, request: ReservationRequest) -> None:  # noqa: B027 - optional hook
        """Refuse, before the cluster is even looked at, a boost this engine cannot express.

        Raise :class:`~gridboost.exceptions.InvalidResources` for an amount it has no
        counter for (``gpu_memory`` on Ray or Dask): a typed error at the call, never a
        ``BoostUnavailable`` that blames the cluster's size.
        """


@frozen
class BackendSpec:
    """A backend a plugin provides, as yielded by the ``gridboost_backends`` hook.

    ``options`` names each option the factory accepts, with a one-line description;
    the grid refuses any other option with a message that lists these.

    ``loggers`` and ``quiet_env`` say how to keep the engine's chatter off a terminal,
    for :func:`gridboost.quiet_engine_logs`: the engine's Python loggers, and environment
    variables that quiet what it prints by other means (a C++ core), read when it starts.
    """

    name: str
    factory: Callable[..., Backend]
    description: str = ""
    options: Mapping[str, str] = field(factory=dict, converter=frozen_map)
    loggers: tuple[str, ...] = field(default=(), converter=tuple)
    quiet_env: Mapping[str, str] = field(factory=dict, converter=frozen_map)
