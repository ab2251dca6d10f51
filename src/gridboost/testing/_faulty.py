"""Fault injection: a backend that wraps another one and makes it fail on cue.

:class:`FaultyBackend` delegates every method of the :class:`~gridboost.abc.Backend`
contract to the backend it wraps, and injects the faults a :class:`FaultPlan` lists.
Host apps use it to test their own handling of a flaky cluster; gridboost's own
reliability tests use it to prove the grid's guarantees hold when the engine misbehaves.

The kinds of fault, and what each does to the call it fires on:

``latency``
    Sleeps ``seconds`` before the operation goes on. Applies to ``run`` (the default),
    ``reserve``, ``release``, ``snapshot`` or ``unpark``, as its ``operation`` says.
``submit_failure``
    ``run`` raises :class:`~gridboost.exceptions.BackendError`; the wrapped backend never
    sees the task, so none of its work runs.
``task_failure``
    ``run`` raises the fault's ``error`` (by default ``RuntimeError("injected task
    failure")``) *instead of* running the task: the wrapped backend never sees it. This
    stands for the user's function failing, so the grid treats it as such and retries it
    when the task asks for ``retries``. (An engine with ``native_retries`` retries inside
    the wrapped backend, which this fault never reaches, so there nobody retries it.)
``node_lost``
    ``run`` starts the task on the wrapped backend, and after ``seconds`` the node dies:
    the wrapped run is cancelled through a cancel scope (so the engine stops the work the
    way it stops any cancelled task), and ``run`` raises ``BackendError`` saying which node
    was lost. If the work ends before that, its outcome — value or exception — is lost
    with the node just the same, so a scheduled ``node_lost`` always surfaces; only an
    error of the wrapped backend itself (a ``GridboostError``: it refused the work, or
    failed first) goes through unchanged.
``slow_release``
    ``release`` sleeps ``seconds`` before it gives the reservation back.
``release_failure``
    ``release`` raises ``BackendError`` and does *not* give the reservation back: the
    engine still holds it, so the grid's teardown must name it in a
    :class:`~gridboost.exceptions.TeardownError`.
``unpark_failure``
    ``unpark`` (the release of a :meth:`~gridboost.Grid.put` handle) raises ``BackendError``
    and leaves the object parked in the engine, for the teardown to name.

``submit_failure``, ``task_failure``, ``release_failure`` and ``unpark_failure`` wait ``seconds`` (default 0)
before they fail, as an engine that is slow to say no would. Every delay is an
:func:`anyio.sleep`, so the grid's cancellation reaches it at once.

**When** a fault fires: on the calls numbered in ``on_calls``, or at random with
``probability``, or — with neither — on every call. Calls are numbered from 1, per fault,
among the calls it applies to (its operation, and its tasks when ``tags`` or
``functions`` filter them), in the order they reach the backend; with no filter that is
the operation's own call number. A random decision is drawn from a
:class:`random.Random` seeded with the plan's ``seed`` and the fault's place in the plan,
once per call the fault applies to, so the same plan over the same calls injects the same
faults on every run, whatever other operations interleave with them. On one call all
the delays that fire add up, and of the faults that would fail it the first in the plan
wins.

**What** fired is kept in :attr:`FaultyBackend.injected`, one :class:`InjectedFault` per
fault, appended when the call is chosen (before any delay).

With a :class:`~gridboost.Grid`, which takes a backend *name*, register a
:class:`FaultyPlugin`; the grid's options go to the wrapped backend::

    import gridboost as gb
    from gridboost.testing._faulty import Fault, FaultPlan, FaultyPlugin

    plan = FaultPlan(
        [Fault("submit_failure", on_calls={2, 5}), Fault("latency", seconds=0.05, probability=0.5)],
        seed=7,
    )
    async with gb.Grid("faulty", plugins=[FaultyPlugin(plan)], capacity="cpu=2") as grid:
        try:
            await grid.offload(work, where="cluster")
        except gb.BackendError:
            ...
    print(grid.backend.injected)

Faults reach only the work the grid hands to its backend: tasks placed on the cluster
(``where="cluster"``) or in a boost. Work placed ``"local"`` — where ``where="auto"``
puts work outside a boost when the backend is not remote — runs on the grid's own
host backend, which is not wrapped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, NoReturn, get_args

import anyio
import anyio.lowlevel
from attrs import Factory, field, frozen

from .._kit import finite, shown
from .._plugins import GridPluginManager, hookimpl
from .._records import ClusterSnapshot, Lease
from .._resources import Resources
from .._spec import TaskSpec
from ..abc import Backend, BackendSpec, Capabilities, Reservation, ReservationRequest
from ..exceptions import BackendError, BoostPreempted, GridboostError, InvalidRequest, UnknownBackend

__all__ = ["Fault", "FaultKind", "FaultPlan", "FaultyBackend", "FaultyPlugin", "InjectedFault", "Operation"]

FaultKind = Literal[
    "latency", "submit_failure", "task_failure", "node_lost", "slow_release", "release_failure", "unpark_failure"
]
Operation = Literal["run", "reserve", "release", "snapshot", "unpark"]

FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
OPERATIONS: tuple[str, ...] = get_args(Operation)

# The operation each kind acts on; latency alone may be put on any operation.
_OPERATION_OF: dict[str, Operation] = {
    "latency": "run",
    "submit_failure": "run",
    "task_failure": "run",
    "node_lost": "run",
    "slow_release": "release",
    "release_failure": "release",
    "unpark_failure": "unpark",
}
_DELAYS = frozenset({"latency", "slow_release"})


def _kind(value: str) -> FaultKind:
    if value not in FAULT_KINDS:
        raise InvalidRequest(f"unknown fault kind {shown(value)}; kinds are {', '.join(FAULT_KINDS)}")
    return value  # type: ignore[return-value]


def _default_operation(fault: Fault) -> Operation:
    return _OPERATION_OF[fault.kind]


def _on_calls(value: int | Iterable[int] | None) -> frozenset[int] | None:
    if value is None:
        return None
    numbers = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, Iterable) else ()
    if not numbers or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in numbers):
        raise InvalidRequest(f"on_calls must be call numbers (whole numbers >= 1, counted from 1), got {shown(value)}")
    return frozenset(numbers)


def _probability(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidRequest(f"probability must be a number from 0 to 1, got {shown(value)}")
    return float(value)


def _seconds(value: float) -> float:
    number = finite(value)
    if number is None or number < 0:
        raise InvalidRequest(f"seconds must be a finite number >= 0, got {shown(value)}")
    return number


def _strings(what: str, value: Iterable[str]) -> frozenset[str]:
    # A lone string would silently become a set of its characters.
    items = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise InvalidRequest(f"{what} must be a collection of strings, got {shown(value)}")
    return frozenset(items)


def _tags(value: Iterable[str]) -> frozenset[str]:
    return _strings("tags", value)


def _functions(value: Iterable[str]) -> frozenset[str]:
    return _strings("functions", value)


@frozen
class Fault:
    """One fault: what kind, when it fires, and on which tasks.

    ``on_calls`` (call numbers, from 1) or ``probability`` (0..1) say when it fires;
    with neither it fires on every call. ``seconds`` is the delay it adds (``latency``,
    ``slow_release``: required, > 0), how long the work runs before its node dies
    (``node_lost``), or how long the engine takes to fail (the other kinds).
    ``operation`` is for ``latency`` only: ``"run"`` (default), ``"reserve"``,
    ``"release"`` or ``"snapshot"``. ``tags`` (any of them) and ``functions`` (the
    task's qualified name, its bare ``__name__``, or a command's line) restrict a fault
    on ``run`` to some tasks. ``error`` is what ``task_failure`` raises: an exception,
    or a class or factory called for a fresh one each time (the better choice when
    calls overlap, since one instance raised twice shares its traceback).

    Example::

        Fault("task_failure", on_calls={1}, error=ValueError)          # the first run fails
        Fault("latency", operation="reserve", seconds=0.5, probability=0.25)
        Fault("node_lost", seconds=0.2, functions={"train_step"})      # every train_step loses its node
    """

    kind: FaultKind = field(converter=_kind)
    on_calls: frozenset[int] | None = field(default=None, kw_only=True, converter=_on_calls)
    probability: float | None = field(default=None, kw_only=True, converter=_probability)
    seconds: float = field(default=0.0, kw_only=True, converter=_seconds)
    operation: Operation = field(default=Factory(_default_operation, takes_self=True), kw_only=True)
    tags: frozenset[str] = field(factory=frozenset, kw_only=True, converter=_tags)
    functions: frozenset[str] = field(factory=frozenset, kw_only=True, converter=_functions)
    error: Exception | Callable[[], Exception] | None = field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        kind = self.kind
        if self.operation not in OPERATIONS:
            raise InvalidRequest(f"unknown operation {shown(self.operation)}; operations are {', '.join(OPERATIONS)}")
        if kind != "latency" and self.operation != _OPERATION_OF[kind]:
            raise InvalidRequest(
                f"a {kind} fault acts on {_OPERATION_OF[kind]}, not {self.operation}; only latency takes an operation"
            )
        if self.on_calls is not None and self.probability is not None:
            raise InvalidRequest(f"a {kind} fault takes on_calls or probability, not both")
        if kind in _DELAYS and self.seconds == 0:
            raise InvalidRequest(f"a {kind} fault needs seconds > 0: the delay it adds")
        if (self.tags or self.functions) and self.operation != "run":
            raise InvalidRequest(f"tags and functions pick tasks; a {kind} fault on {self.operation} has none")
        if self.error is not None:
            if kind != "task_failure":
                raise InvalidRequest(f"error is what a task_failure raises; a {kind} fault takes none")
            if isinstance(self.error, type):
                if not issubclass(self.error, Exception):
                    raise InvalidRequest(f"error must be an Exception class, got {shown(self.error)}")
            elif not isinstance(self.error, Exception) and not callable(self.error):
                raise InvalidRequest(
                    f"error must be an exception, or a class or factory making one: {shown(self.error)}"
                )

    def applies_to(self, task: TaskSpec | None) -> bool:
        """Whether this fault's task filters let ``task`` through (always, for operations with no task)."""
        if task is None:
            return True
        if self.tags and not self.tags & task.tags:
            return False
        if self.functions:
            names = {task.name}
            bare = getattr(task.target, "__name__", None)
            if isinstance(bare, str):
                names.add(bare)
            return bool(names & self.functions)
        return True

    def make_error(self) -> Exception:
        """The exception a ``task_failure`` raises, fresh when ``error`` is a class or factory."""
        if self.error is None:
            return RuntimeError("injected task failure")
        if isinstance(self.error, Exception):
            return self.error.with_traceback(None)  # raised again: do not grow the last traceback
        made = self.error()
        if not isinstance(made, Exception):
            raise InvalidRequest(f"the error factory of a task_failure fault returned {shown(made)}, not an Exception")
        return made


def _faults(value: Iterable[Fault]) -> tuple[Fault, ...]:
    if isinstance(value, Fault) or not isinstance(value, Iterable):
        raise InvalidRequest(f"a FaultPlan takes a list of Fault, got {shown(value)}")
    faults = tuple(value)
    for fault in faults:
        if not isinstance(fault, Fault):
            raise InvalidRequest(f"a FaultPlan takes a list of Fault, got {shown(fault)} in it")
    return faults


def _seed(_plan: object, _attribute: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"seed must be a whole number, got {shown(value)}")


@frozen
class FaultPlan:
    """The faults to inject, and the ``seed`` that makes random ones reproducible.

    Immutable, so one plan can drive any number of backends; each backend counts its
    own calls and draws its own random numbers, from the same start.

    Example::

        FaultPlan([Fault("submit_failure", on_calls={2, 5}), Fault("latency", seconds=0.05, probability=0.5)], seed=7)
    """

    faults: tuple[Fault, ...] = field(default=(), converter=_faults)
    seed: int = field(default=0, kw_only=True, validator=_seed)


@frozen
class InjectedFault:
    """A fault that fired: its kind, the operation and that operation's call number, and on what.

    ``target`` is the task id (``run``), the reservation id (``reserve``, ``release``),
    or ``None`` (``snapshot``). ``call`` counts every call of the operation, filtered
    or not, from 1.
    """

    kind: FaultKind
    operation: Operation
    call: int
    target: str | None


class FaultyBackend(Backend):
    """A backend that delegates to ``inner`` and injects the faults of ``plan``.

    See the module docstring for each kind of fault. ``injected`` lists what fired, in
    order; ``calls`` counts the calls of each operation. ``inner`` is the wrapped
    backend, for tests that ask the engine itself what it still holds or runs.

    On its own, without a grid (the caller starts and closes it)::

        faulty = FaultyBackend(LocalBackend(capacity="cpu=2"), plan=FaultPlan([Fault("node_lost", seconds=0.1)]))
        await faulty.start()
        try:
            await faulty.run(TaskSpec(work), None)       # raises BackendError: the node was lost
        finally:
            await faulty.aclose()
    """

    def __init__(self, inner: Backend, *, plan: FaultPlan) -> None:
        if not isinstance(inner, Backend):
            raise InvalidRequest(f"FaultyBackend wraps a gridboost.abc.Backend, got {shown(inner)}")
        if not isinstance(plan, FaultPlan):
            raise InvalidRequest(f"plan must be a FaultPlan, got {shown(plan)}")
        self.inner = inner
        self.plan = plan
        self.name = f"faulty-{inner.name}"
        self.injected: list[InjectedFault] = []
        self.calls: Counter[Operation] = Counter()
        # Per fault, so that one fault's numbering and draws never depend on what other
        # operations (or tasks it filters out) did in between.
        self._applied = [0] * len(plan.faults)
        self._random = [random.Random(f"{plan.seed}:{index}") for index in range(len(plan.faults))]
        self._lost: Callable[[str, BaseException], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        return f"<FaultyBackend over {self.inner!r}, {len(self.plan.faults)} fault(s), {len(self.injected)} injected>"

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property
    def task_prefix(self) -> str | None:
        return self.inner.task_prefix

    def check_reservation(self, request: ReservationRequest) -> None:
        self.inner.check_reservation(request)

    @property
    def available(self) -> Resources:
        """The inner backend's free capacity, where it keeps such books (the local backend does)."""
        return getattr(self.inner, "available", Resources())

    # -- choosing faults -----------------------------------------------------------

    def _choose(
        self, operation: Operation, target: str | None, task: TaskSpec | None = None
    ) -> tuple[float, Fault | None, int]:
        """Count the call and decide its faults: the total delay, the failure if any, and the call number.

        Synchronous, before any await, so the numbering is the order in which calls arrive.
        """
        self.calls[operation] += 1
        call = self.calls[operation]
        delay = 0.0
        failure: Fault | None = None
        for index, fault in enumerate(self.plan.faults):
            if fault.operation != operation or not fault.applies_to(task):
                continue
            self._applied[index] += 1
            if fault.on_calls is not None:
                fires = self._applied[index] in fault.on_calls
            elif fault.probability is not None:
                fires = self._random[index].random() < fault.probability
            else:
                fires = True
            if not fires:
                continue
            if fault.kind in _DELAYS:
                delay += fault.seconds
            elif failure is None:
                failure = fault
            else:
                continue  # a call fails once; the first failure in the plan is the one it shows
            self.injected.append(InjectedFault(fault.kind, operation, call, target))
        return delay, failure, call

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    # -- seeing ---------------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        delay, _, _ = self._choose("snapshot", None)
        if delay:
            await anyio.sleep(delay)
        return await self.inner.snapshot()

    # -- reserving ------------------------------------------------------------------

    async def reserve(self, request: ReservationRequest) -> Reservation:
        delay, _, _ = self._choose("reserve", request.id)
        if delay:
            await anyio.sleep(delay)
        return await self.inner.reserve(request)

    async def _give_back(self, operation: Operation, what: str, target: str) -> None:
        """The faults of a giving-back operation (``release``, ``unpark``): its delays, then its failure, if any."""
        delay, failure, call = self._choose(operation, target)
        if delay:
            await anyio.sleep(delay)
        if failure is not None:
            if failure.seconds:
                await anyio.sleep(failure.seconds)
            raise BackendError(
                f"{what} could not be released; the {self.inner.name} engine still holds it "
                f"(injected {failure.kind}, call {call} to {operation})"
            )

    async def release(self, reservation: Reservation) -> None:
        await self._give_back("release", f"reservation {reservation.id}", reservation.id)
        await self.inner.release(reservation)

    async def extend(self, reservation: Reservation, ttl: float) -> None:
        await self.inner.extend(reservation, ttl)

    # -- parked data ----------------------------------------------------------------

    async def park(self, key: str, value: Any, reservation: Reservation | None) -> Any:
        return await self.inner.park(key, value, reservation)

    async def unpark(self, key: str, token: Any) -> None:
        await self._give_back("unpark", key, key)
        await self.inner.unpark(key, token)

    async def fetch(self, token: Any) -> Any:
        return await self.inner.fetch(token)

    async def reservations(self) -> Sequence[Reservation]:
        return await self.inner.reservations()

    async def leases(self) -> Sequence[Lease]:
        return await self.inner.leases()

    async def watch(self, lost: Callable[[str, BaseException], Awaitable[None]]) -> None:
        self._lost = lost
        try:
            await self.inner.watch(lost)
            await anyio.sleep_forever()  # stay ready for lose_reservation until the grid stops us
        finally:
            self._lost = None

    async def preempt_reservation(self, reservation_id: str, grace: float, reason: str = "injected preemption") -> None:
        """Report ``reservation_id`` taken back for another owner, with ``grace`` seconds for its work, as a lease
        registry that preempts would; the inner backend still holds it until the grid releases it."""
        await self._report(reservation_id, BoostPreempted(reason, grace=grace))

    async def lose_reservation(self, reservation_id: str, reason: str = "injected reservation loss") -> None:
        """Report ``reservation_id`` lost, as an engine whose node died would; the inner one still holds it.

        Needs a grid watching this backend (``Grid`` does from start to teardown; its
        watch may take a moment to begin after the grid opens).
        """
        await self._report(reservation_id, BackendError(reason))

    async def _report(self, reservation_id: str, error: BaseException) -> None:
        with anyio.move_on_after(1):
            while self._lost is None:  # noqa: ASYNC110 - the watch has no event to await
                await anyio.sleep(0.01)
        if self._lost is None:
            raise InvalidRequest("no grid is watching this backend; open the grid first")
        await self._lost(reservation_id, error)

    # -- running --------------------------------------------------------------------

    def check_task(self, task: TaskSpec) -> None:
        self.inner.check_task(task)

    async def run(
        self, task: TaskSpec, reservation: Reservation | None, *, on_start: Callable[[], None] | None = None
    ) -> Any:
        delay, failure, call = self._choose("run", task.id, task)
        if delay:
            await anyio.sleep(delay)
        if failure is None:
            return await self.inner.run(task, reservation, on_start=on_start)
        if on_start is not None:  # the failures below happen to work that has started
            on_start()
        if failure.kind == "node_lost":
            await self._lose_node(task, reservation, failure.seconds, call)
        if failure.seconds:
            await anyio.sleep(failure.seconds)
        if failure.kind == "submit_failure":
            raise BackendError(
                f"task {task.id} ({task.name}) could not be submitted to the {self.inner.name} engine "
                f"(injected submit_failure, call {call} to run)"
            )
        raise failure.make_error()

    async def _lose_node(self, task: TaskSpec, reservation: Reservation | None, after: float, call: int) -> NoReturn:
        # The scope's own deadline is the node dying: the wrapped run is cancelled the
        # way the grid cancels any run, so the engine stops the work itself.
        with anyio.move_on_after(after):
            try:
                await self.inner.run(task, reservation)
            except GridboostError:
                raise  # the engine refused the work, or failed first: there was nothing to lose
            except Exception:  # the work's own outcome is lost with its node
                pass
        # Should the grid be cancelling us too, its cancellation must win over our error.
        await anyio.lowlevel.checkpoint_if_cancelled()
        node = f"node {reservation.placements[0]}" if reservation is not None and reservation.placements else "the node"
        raise BackendError(
            f"{node} running task {task.id} ({task.name}) was lost; its work was cancelled "
            f"(injected node_lost, call {call} to run)"
        )


class FaultyPlugin:
    """A plugin that provides a :class:`FaultyBackend` under ``name``, for ``Grid(name, plugins=[...])``.

    ``inner`` is the backend to wrap: the name of an installed one (built in, or from an
    entry point), or a :class:`~gridboost.abc.BackendSpec` for one the process cannot
    find by name (a test's own backend class). The faulty spec accepts exactly the
    options the inner spec declares, and passes them on to it, so the grid checks them
    as it would for the inner backend::

        async with gb.Grid("faulty", plugins=[FaultyPlugin(plan, inner="local")], capacity="cpu=2") as grid:
            faulty = grid.backend              # the FaultyBackend; faulty.inner is the LocalBackend

    Every grid the plugin serves gets a fresh backend, counting calls from 1.
    """

    def __init__(self, plan: FaultPlan, *, inner: str | BackendSpec = "local", name: str = "faulty") -> None:
        if not isinstance(plan, FaultPlan):
            raise InvalidRequest(f"plan must be a FaultPlan, got {shown(plan)}")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"name must be a non-empty string, got {shown(name)}")
        if isinstance(inner, str):
            inner = _installed_spec(inner)
        elif not isinstance(inner, BackendSpec):
            raise InvalidRequest(f"inner must be a backend name or a BackendSpec, got {shown(inner)}")
        if inner.name == name:
            raise InvalidRequest(f"the faulty backend needs a name of its own, not the inner one's ({shown(name)})")
        self.plan = plan
        self.name = name
        self.inner = inner

    def __repr__(self) -> str:
        return f"<FaultyPlugin {self.name!r} over {self.inner.name!r}>"

    @property
    def spec(self) -> BackendSpec:
        """The backend this plugin provides."""
        return BackendSpec(
            name=self.name,
            factory=self._make,
            description=f"the {self.inner.name} backend, with injected faults",
            options=self.inner.options,
        )

    def _make(self, **options: Any) -> FaultyBackend:
        return FaultyBackend(self.inner.factory(**options), plan=self.plan)

    @hookimpl
    def gridboost_backends(self) -> Iterator[BackendSpec]:
        yield self.spec


def _installed_spec(name: str) -> BackendSpec:
    specs = GridPluginManager.for_grid().backend_specs()
    if name not in specs:
        raise UnknownBackend(name, sorted(specs), GridPluginManager.install_hint(name))
    return specs[name]
