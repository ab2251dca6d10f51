"""The executor: the one path every task takes, one way.

``Grid.offload``/``submit``/``run_command`` → :meth:`Executor.task` (the spec, checked
once by the backend that will run it) → :meth:`Executor.place` (the one place that
decides, through the ``gridboost_choose_placement`` hook) → dispatch claims its capacity
→ attempt(s) on the backend → the result, or the task's own exception, back to the
caller. A run that dispatch moves (it waited here, and room freed elsewhere) is
re-entered at its new placement by the same loop; nothing climbs back to the grid.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable
from typing import Any, Literal

import anyio

from ._book import BoostBook
from ._boost import Boost
from ._dispatch import Dispatch, Move
from ._parking import Parked, Parking
from ._plugins import call_decision
from ._policy import DefaultPolicy
from ._records import Command, CommandResult, TaskOutcome
from ._runtime import Runtime
from ._spec import Placement, TaskSpec
from ._task import Run, TaskHandle
from ._text import shown
from .abc import Backend
from .exceptions import (
    BackendError,
    CommandFailed,
    CommandNotFound,
    GridboostError,
    InvalidRequest,
    PolicyError,
    TaskCancelled,
)

__all__ = ["Executor"]

_PLACE_LOCAL = Placement("local", "asked for: where='local'")
_PLACE_CLUSTER = Placement("cluster", "asked for: where='cluster'")
log = logging.getLogger("gridboost")

_PLACED = {kind: f"placed.{kind}" for kind in ("local", "cluster", "boost")}
_TASKS = {status: f"tasks.{status}" for status in ("succeeded", "failed", "cancelled", "timed_out")}


def _not_found(command: Command, exc: FileNotFoundError) -> CommandNotFound:
    # Every backend's runner raises subprocess's FileNotFoundError, as the user's own
    # error would cross; it is gridboost's verdict on the command, typed the same everywhere.
    if isinstance(exc, CommandNotFound):
        return exc
    missing = exc.filename if isinstance(exc.filename, str) else command.argv[0]
    what = "working directory" if missing == command.cwd else "program"
    return CommandNotFound(errno.ENOENT, f"command {shown(command.argv[0], 40)} cannot start: no such {what}", missing)


class Executor:
    """Runs tasks: checks, places, claims, attempts, and accounts for each one."""

    def __init__(
        self, runtime: Runtime, book: BoostBook, dispatch: Dispatch, policy: DefaultPolicy, parking: Parking
    ) -> None:
        self._runtime, self._book, self._dispatch, self._policy = runtime, book, dispatch, policy
        book.on_preempted = self.boost_preempted
        self._parking = parking
        self._plugins = runtime.plugins
        self._default_version = -1
        self._default = True
        self._scope_class: type[anyio.CancelScope] | None = None

    # -- entry points ---------------------------------------------------------------

    def task(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> Run:
        """A run of ``target(*args, **kwargs)``; bad input raises here, before anything is placed."""
        self._runtime.check_open()
        run = Run(TaskSpec(target, args, kwargs, **options), self._new_scope())
        if Parked.issued and self._parking.check(run.spec):
            run.parked = True
        return run

    def _new_scope(self) -> anyio.CancelScope:
        # anyio.CancelScope() looks up the event loop's library on every call, about 1.5 µs of a task's own cost;
        # a grid lives in one event loop, so the class it returned once is made directly from then on.
        cls = self._scope_class
        if cls is None:
            scope = anyio.CancelScope()
            self._scope_class = type(scope)
            return scope
        return cls()

    def checked(self, run: Run) -> Run:
        """What the backend can refuse of a task whose placement waits until it starts, refused now.

        An explicit ``where`` names its backend; ``auto`` is checked against the host here,
        and against the cluster only if it is placed there (the default policy keeps work the
        cluster cannot run on this machine).
        """
        where = run.spec.where
        backend = self._runtime.host if where == "local" or where == "auto" else self._runtime.backend
        backend.check_task(run.spec)
        run.checked = backend
        return run

    def submit(self, run: Run) -> TaskHandle[Any]:
        """Place ``run`` now and start it in the grid's task group; return its handle."""
        self.decide(run)
        handle: TaskHandle[Any] = TaskHandle(run)
        self._runtime.runs.add(run)  # counted from now, so teardown waits for it even before it starts
        self._runtime.start_soon(self._run_handle, handle)
        return handle

    async def command(self, run: Run, command: Command, check: bool) -> CommandResult:
        result: CommandResult = await self.execute(run)
        if check and result.returncode != 0:
            raise CommandFailed(command.argv, result.returncode, result.stdout, result.stderr)
        return result

    # -- placement ------------------------------------------------------------------

    def decide(self, run: Run) -> None:
        """Place the run and claim its capacity there, now: the next decision sees that room taken."""
        spec = run.spec
        placement = self.place(spec)
        backend = self._runtime.host if placement.kind == "local" else self._runtime.backend
        if run.checked is not backend:
            backend.check_task(spec)
        run.placement = placement
        self._dispatch.claim(run)

    def place(self, spec: TaskSpec) -> Placement:
        """The one place a task's placement is decided: what ``where`` says, or the decision hook."""
        where = spec.where
        if where == "auto":
            if self._plugins.version != self._default_version:
                self._default = self._plugins.decision_is_default("gridboost_choose_placement")
                self._default_version = self._plugins.version
            if self._default:  # the hook's only implementation is ours: skip pluggy on the hot path
                placement = self._policy.place(spec)
            else:
                placement = call_decision(
                    self._plugins.hook.gridboost_choose_placement,
                    "gridboost_choose_placement",
                    grid=self._runtime.view,
                    task=spec,
                )
                if not isinstance(placement, Placement):
                    raise PolicyError(f"gridboost_choose_placement returned {placement!r}, not a Placement")
        elif where == "local":
            placement = _PLACE_LOCAL
        elif where == "cluster":
            placement = _PLACE_CLUSTER
        else:
            assert isinstance(where, Boost)
            placement = Placement("boost", "asked for: where=<boost>", where)
        if placement.boost is not None:
            if not self._book.owns(placement.boost):
                raise InvalidRequest(f"boost {placement.boost.id} belongs to another grid")
            placement.boost.require_active()
        return placement

    # -- running --------------------------------------------------------------------

    async def execute(self, run: Run) -> Any:
        # The hot path of every task. Each resumption of a coroutine walks every frame
        # of its await chain, so one attempt is awaited straight from here, with no
        # helper coroutine in between, and the clock is read only when someone needs it.
        spec = run.spec
        runtime = self._runtime
        if run.placement is None:  # an offload is placed as its coroutine starts: a burst is accounted task by task
            self.decide(run)
        runtime.runs.add(run)
        observed = runtime.observers.wanted("gridboost_task_finished")
        started = time.monotonic() if observed or spec.timeout is not None else 0.0
        status: Literal["succeeded", "failed", "cancelled", "timed_out"] = "cancelled"
        error: BaseException | None = None
        try:
            while True:
                self._enter(run)
                # A run cancelled before it starts must not reach the backend at all:
                # some engines submit before their first checkpoint.
                if run.cause is None:
                    with run.scope:
                        if run.parked:
                            assert run.placement is not None
                            run.sent = await self._parking.resolve(spec, self._backend(run.placement))
                        if spec.timeout is not None:
                            with anyio.fail_after(started + spec.timeout - time.monotonic()):
                                result = await self._attempts(run)
                        elif spec.retries:
                            result = await self._attempts(run)
                        else:
                            run.attempts += 1
                            result = await self._attempt(run)
                        status = "succeeded"
                        return result
                assert run.cause is not None  # only Run.cancel cancels run.scope, and it sets the cause
                if not isinstance(run.cause, Move):
                    raise run.cause
                self._leave(run)
                run.move_to(run.cause.placement)  # its capacity there was claimed when the move was decided
        except BaseException as exc:
            error = exc
            if exc is not run.cause and not isinstance(exc, anyio.get_cancelled_exc_class()):
                status = "timed_out" if spec.timeout is not None and isinstance(exc, TimeoutError) else "failed"
                if isinstance(exc, FileNotFoundError) and isinstance(spec.target, Command):
                    error = _not_found(spec.target, exc)
                    raise error from exc
            raise
        finally:
            if run.parked:  # the engine's references to parked data go with the run: a kept handle keeps none
                run.sent = spec
            self._leave(run)
            self._dispatch.release(run)
            runtime.runs.discard(run)
            runtime.counts[_TASKS[status]] += 1
            if observed:
                outcome = TaskOutcome(status, run.attempts, time.monotonic() - started, error)
                runtime.observers.notify("gridboost_task_finished", task=spec, placement=run.placement, outcome=outcome)

    async def _run_handle(self, handle: TaskHandle[Any]) -> None:
        handle.started_at = time.monotonic()
        try:
            result = await self.execute(handle._run)
        except anyio.get_cancelled_exc_class():  # cancelled from outside: the block holding the grid is being cancelled
            handle._settle(None, handle._run.cause or handle._run_cancelled())
            raise
        except BaseException as exc:
            # The work's own error, a KeyboardInterrupt or SystemExit raised in its thread included: the awaiter's to
            # see, as a pool's future holds it, not the grid's task group's (which it would tear down).
            handle._settle(None, exc)
        else:
            handle._settle(result, None)

    def _enter(self, run: Run) -> None:
        placement = run.placement
        assert placement is not None
        if placement.boost is not None:
            placement.boost.admit(run)
        counts = self._runtime.counts
        counts[_PLACED[placement.kind]] += 1
        if placement.waiting:
            counts["placed.waiting"] += 1
        observers = self._runtime.observers
        if observers.wanted("gridboost_task_placed"):
            observers.notify("gridboost_task_placed", task=run.spec, placement=placement)

    def _leave(self, run: Run) -> None:
        boost = run.placement.boost if run.placement is not None else None
        if boost is not None:
            boost.work.discard(run)

    def _backend(self, placement: Placement) -> Backend:
        return self._runtime.host if placement.kind == "local" and placement.boost is None else self._runtime.backend

    def _attempt(self, run: Run) -> Awaitable[Any]:
        """One attempt, as the backend's own coroutine (no frame of ours in the await chain)."""
        placement = run.placement
        assert placement is not None
        if placement.kind == "local" and placement.boost is None:
            # Only here does work wait for capacity where it can be moved before it starts.
            return self._runtime.host.run(run.sent, None, on_start=run.mark_started)
        if placement.boost is not None and run.spec.resources:
            return self._in_boost(run, placement.boost)
        run.mark_started()  # handed to the engine: it may queue there, but it no longer moves
        return self._runtime.backend.run(run.sent, None if placement.boost is None else placement.boost.reservation)

    async def _in_boost(self, run: Run, boost: Boost) -> Any:
        """One attempt inside a boost, once it has a slot there: until then the work is the grid's, not the
        engine's, so a preemption notice can still move it (the engine queues ``cluster_queue`` of the boost)."""
        slots = boost.slots(self._runtime.settings.cluster_queue)
        amount = run.spec.resources.capped(boost.resources)
        await slots.take(amount)
        try:
            run.mark_started()
            return await self._runtime.backend.run(run.sent, boost.reservation)
        finally:
            slots.give(amount)

    async def _attempts(self, run: Run) -> Any:
        """Attempts until one succeeds or ``retries`` are spent (the backend's own count, if it retries)."""
        placement = run.placement
        assert placement is not None
        retries = 0 if self._backend(placement).capabilities.native_retries else run.spec.retries
        while True:
            run.attempts += 1
            try:
                return await self._attempt(run)
            except Exception as exc:
                # The user's errors and the engine's failures (a lost node) are retried;
                # gridboost's verdicts on the request itself (bad input, no capacity) are not.
                if run.attempts > retries or (isinstance(exc, GridboostError) and not isinstance(exc, BackendError)):
                    raise

    def boost_preempted(self, boost: Boost) -> None:
        """A boost's preemption notice: its work still waiting in the grid for a slot is placed again as at submit
        (the policy, or the ``gridboost_choose_placement`` hook) and moves there. What the engine has finishes within
        the grace or gets ``BoostPreempted``; so does work pinned to the boost with ``where=boost``."""
        runtime = self._runtime
        if not runtime.settings.auto_offload or runtime.state != "open":
            return
        for run in list(boost.work):
            if not isinstance(run, Run) or run.started or run.cause is not None or run.spec.where != "auto":
                continue
            try:
                placement = self.place(run.spec)
                (runtime.host if placement.kind == "local" else runtime.backend).check_task(run.spec)
            except GridboostError as exc:  # no other place will take it: it stays, as pinned work does
                log.info("task %s stays in preempted boost %s: %s", run.spec.id, boost.id, exc)
                continue
            self._dispatch.move(run, placement)

    def cancel_all(self) -> None:
        """Cancel every task in flight (teardown): each one's awaiter sees ``TaskCancelled``."""
        for run in list(self._runtime.runs):
            run.cancel(TaskCancelled(f"task {run.spec.id} ({run.spec.name}) was cancelled: the grid closed"))
