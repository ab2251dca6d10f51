"""The process advisor: what on this machine could run elsewhere, and how hard moving it would be.

Advice only. The advisor reads (psutil for processes, NVML for their GPU memory) and
never stops, kills or moves anything; gridboost moves only its own queued work, and
only through placement.

What it reports, and how hard each is to move (``migration_complexity``):

* ``low`` — work of this grid still waiting for local capacity: it has not started, so
  placing it elsewhere loses nothing (the grid does it itself when room frees);
* ``medium`` — a command this grid runs here: gridboost can stop it and run it again
  elsewhere, but whatever it did so far is lost;
* ``high`` — any other process that uses a noticeable share of the machine: only its
  owner can move it.

``confidence`` starts from the complexity (0.9, 0.6, 0.3) and is halved when the best
destination lacks room on some dimension (or there is none known), and halved again
when the process could not be measured fully (another user's process, say).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import anyio
from attrs import field, frozen

from . import _nvml
from ._checks import bounded, whole
from ._resources import Resources
from ._spec import TaskSpec

if TYPE_CHECKING:
    from ._book import BoostBook
    from ._dispatch import Dispatch
    from ._runtime import Runtime

__all__ = ["OffloadRecommendation", "ResourceMatch", "scan_processes"]

Complexity = Literal["low", "medium", "high"]
_BASE_CONFIDENCE: Mapping[str, float] = {"low": 0.9, "medium": 0.6, "high": 0.3}
_ORDER = {"low": 0, "medium": 1, "high": 2}
# A process is worth a recommendation from this much use up: a fifth of a core, 5 % of
# the memory, or any GPU memory at all (GPUs are what the host runs short of first).
_MIN_CPU = 0.2
_MIN_MEMORY_SHARE = 0.05
_NOTHING = Resources()


@frozen
class ResourceMatch:
    """One dimension of a recommendation: what the work needs, and what its destination has free."""

    needed: float
    available: float | None  # None: unknown, or no destination

    @property
    def fits(self) -> bool:
        return self.available is not None and self.needed <= self.available + 1e-9


def _read_only(value: Mapping[str, ResourceMatch]) -> Mapping[str, ResourceMatch]:
    return MappingProxyType(dict(value))


@frozen
class OffloadRecommendation:
    """Something on this machine that could run elsewhere, where, and how hard moving it would be.

    ``kind`` is ``queued`` (this grid's work, not started), ``command`` (a command this
    grid runs here) or ``process`` (anything else). ``needed`` is what it declared or
    was measured to use; ``resource_match`` compares each needed dimension with what
    ``destination`` (``"boost <id>"``, ``"cluster"``, or ``None`` where there is
    nowhere else) has free.
    """

    kind: Literal["queued", "command", "process"]
    what: str
    needed: Resources
    resource_match: Mapping[str, ResourceMatch] = field(converter=_read_only)
    destination: str | None
    migration_complexity: Complexity
    confidence: float
    reason: str
    pid: int | None = None
    task_id: str | None = None

    @property
    def fits(self) -> bool:
        """Whether the destination has room for every dimension it needs."""
        return self.destination is not None and all(m.fits for m in self.resource_match.values())


@frozen
class _Measured:
    pid: int
    name: str
    cpu: float  # cores
    memory: int  # bytes, resident
    gpu_memory: int
    complete: bool  # every figure could be read


def _measure(command_pids: Mapping[int, str], window: float) -> tuple[list[_Measured], dict[str, _Measured]]:
    """Blocking: every process's use over ``window`` seconds; the commands' process trees added up by task id."""
    import psutil  # where used: not importing it keeps `import gridboost` cheap (tests/test_import_cost.py)

    me = os.getpid()
    processes = [p for p in psutil.process_iter(["name"]) if p.pid not in (0, me)]
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.cpu_percent(None)  # the baseline: the next call measures from here
    time.sleep(window)
    gpu = _nvml.process_memory()
    by_pid: dict[int, _Measured] = {}
    for process in processes:
        complete = True
        try:
            cpu = process.cpu_percent(None) / 100
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:
            cpu, complete = 0.0, False
        try:
            memory = int(process.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:
            memory, complete = 0, False
        name = process.info.get("name") or f"pid {process.pid}"
        by_pid[process.pid] = _Measured(process.pid, name, cpu, memory, gpu.get(process.pid, 0), complete)
    trees: dict[str, _Measured] = {}
    inside: set[int] = set()
    for pid, task_id in command_pids.items():
        try:
            members = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.Error:
            members = [pid]
        found = [by_pid[m] for m in members if m in by_pid]
        inside.update(members)
        trees[task_id] = _Measured(
            pid,
            found[0].name if found else f"pid {pid}",
            sum(m.cpu for m in found),
            sum(m.memory for m in found),
            sum(m.gpu_memory for m in found),
            all(m.complete for m in found),
        )
    others = [m for pid, m in by_pid.items() if pid not in inside]
    return others, trees


def _needed(measured: _Measured, declared: Resources = _NOTHING) -> Resources:
    return Resources(
        cpu=max(declared.cpu, round(measured.cpu, 2)),
        gpu=max(declared.gpu, 1.0 if measured.gpu_memory else 0.0),
        memory=max(declared.memory, measured.memory),
        gpu_memory=max(declared.gpu_memory, measured.gpu_memory),
        custom=declared.custom,
    )


def _destinations(runtime: Runtime, book: BoostBook, dispatch: Dispatch) -> list[tuple[str, Resources | None]]:
    """Where work could go, best first: active boosts of the grid, then the cluster."""
    if not runtime.remote:
        return []  # the backend is this machine: there is no elsewhere
    places: list[tuple[str, Resources | None]] = [
        (f"boost {b.id}", b.available) for b in book.boosts.values() if b.is_active
    ]
    places.append(("cluster", dispatch.cluster.free))
    return places


def _recommend(
    places: list[tuple[str, Resources | None]],
    *,
    kind: Literal["queued", "command", "process"],
    what: str,
    needed: Resources,
    complexity: Complexity,
    reason: str,
    complete: bool = True,
    pid: int | None = None,
    task_id: str | None = None,
) -> OffloadRecommendation:
    wanted = needed.as_dict()
    chosen: tuple[str, Resources | None] | None = None
    for name, free in places:
        if free is not None and needed.fits_in(free):
            chosen = (name, free)
            break
    else:
        if places:
            chosen = places[-1]  # the cluster: the place most likely to have room next
    free = chosen[1] if chosen is not None else None
    theirs = free.as_dict() if free is not None else None
    match = {k: ResourceMatch(v, None if theirs is None else theirs.get(k, 0.0)) for k, v in wanted.items()}
    fits = chosen is not None and all(m.fits for m in match.values())
    confidence = _BASE_CONFIDENCE[complexity] * (1.0 if fits else 0.5) * (1.0 if complete else 0.5)
    if chosen is None:
        reason += "; the backend is this machine, so there is nowhere else to run it"
    elif fits:
        reason += f"; {chosen[0]} has room for it"
    else:
        short = [k for k, m in match.items() if not m.fits]
        reason += f"; {chosen[0]} lacks room for {', '.join(short) or 'it'} now"
    return OffloadRecommendation(
        kind=kind,
        what=what,
        needed=needed,
        resource_match=match,
        destination=None if chosen is None else chosen[0],
        migration_complexity=complexity,
        confidence=round(confidence, 3),
        reason=reason,
        pid=pid,
        task_id=task_id,
    )


async def scan_processes(
    runtime: Runtime, book: BoostBook, dispatch: Dispatch, *, limit: int, window: float
) -> list[OffloadRecommendation]:
    """See :meth:`Grid.scan_processes`."""
    whole("limit", limit, 1)
    window = bounded("window", window, "seconds", 60)
    places = _destinations(runtime, book, dispatch)
    now = time.monotonic()
    advice: list[OffloadRecommendation] = []
    for run in list(runtime.runs):
        if run.is_waiting_locally:
            spec = run.spec
            advice.append(
                _recommend(
                    places,
                    kind="queued",
                    what=f"task {spec.id} ({spec.name})",
                    needed=spec.resources,
                    complexity="low",
                    reason=f"waiting for local capacity for {now - spec.submitted_at:.1f}s and not started",
                    task_id=spec.id,
                )
            )
    commands: dict[str, tuple[TaskSpec, int]] = {}
    running_commands: Any = getattr(runtime.host, "running_commands", None)
    if callable(running_commands):
        commands = running_commands()
    others, trees = await anyio.to_thread.run_sync(
        _measure, {pid: task_id for task_id, (_, pid) in commands.items()}, float(window)
    )
    for task_id, (spec, pid) in commands.items():
        measured = trees.get(task_id)
        if measured is None:
            continue
        advice.append(
            _recommend(
                places,
                kind="command",
                what=f"command {spec.name!r} (task {task_id}, pid {pid})",
                needed=_needed(measured, spec.resources),
                complexity="medium",
                reason="a command gridboost started here: it can be stopped and run again elsewhere, from the start",
                complete=measured.complete,
                pid=pid,
                task_id=task_id,
            )
        )
    import psutil

    memory_total = psutil.virtual_memory().total or 1
    heavy = [m for m in others if m.cpu >= _MIN_CPU or m.memory >= _MIN_MEMORY_SHARE * memory_total or m.gpu_memory > 0]
    heavy.sort(key=lambda m: max(m.cpu / (os.cpu_count() or 1), m.memory / memory_total, float(m.gpu_memory > 0)))
    for measured in reversed(heavy):
        advice.append(
            _recommend(
                places,
                kind="process",
                what=f"process {measured.pid} ({measured.name})",
                needed=_needed(measured),
                complexity="high",
                reason="not started by gridboost: only its owner can stop it and start it elsewhere "
                "(gridboost never touches it)",
                complete=measured.complete,
                pid=measured.pid,
            )
        )
    advice.sort(key=lambda r: (_ORDER[r.migration_complexity], -r.confidence))
    return advice[:limit]
