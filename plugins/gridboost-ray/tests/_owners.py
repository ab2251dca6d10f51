"""Owners of a shared cluster for test_shared.py, and what the tests read of the engine.

:class:`Owner` is a lease owner process (``_fresh_process.py serve``, or ``chaos``), driven over stdin; what it
prints is kept by word until a test takes it. The readers look at Ray's own state (the placement group table, the
task events, the processes of its workers) and at the lease keeper's records, as the keeper itself holds them.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import anyio
import psutil
import pytest
import ray
from gridboost_ray._leases import KEEPER_NAME, KEEPER_NAMESPACE
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

HERE = Path(__file__).parent
SLOTS = 4
SETTLE = 30.0
WORDS = frozenset(
    {"READY", "GRANTED", "FAILED", "RELEASED", "NOTICE", "SUBMITTED", "DONE", "ERROR", "LEASE", "STEP", "REPORT"}
)
# Ray's TaskStatus numbers (ray.core.generated.common_pb2.TaskStatus): running, and the two of an attempt that ended.
RUNNING, FINISHED, FAILED = 8, 11, 12


class Owner:
    """A lease owner process, driven over stdin; what it prints is kept by word until a test takes it."""

    def __init__(self, address: str, log: Path, *more: str, action: str = "serve") -> None:
        self.log = log
        self._err: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "_fresh_process.py"), action, address, *more],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            bufsize=0,
        )
        self.said: list[tuple[str, dict[str, Any]]] = []
        self.pid = self.process.pid

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())

    def expect(self, word: str, name: str | None = None, within: float = SETTLE) -> dict[str, Any]:
        """The next ``word`` line (for ``name``) this owner printed, waiting up to ``within`` seconds for it."""
        out = self.process.stdout
        assert out is not None
        deadline = time.monotonic() + within
        while True:
            for i, (said, what) in enumerate(self.said):
                if said == word and (name is None or what.get("name") == name):
                    return self.said.pop(i)[1]
            left = deadline - time.monotonic()
            # select first: a silent owner must not hold readline() past the deadline (it prints whole lines).
            if left <= 0 or not select.select([out], [], [], left)[0]:
                pytest.fail(f"owner {self.pid} never said {word} {name or ''}; it said {self.said}\n{self.tail()}")
            line = out.readline().decode()
            if not line:
                pytest.fail(f"owner {self.pid} exited ({self.process.poll()}) before {word} {name}\n{self.tail()}")
            said, _, rest = line.strip().partition(" ")
            if said in WORDS:
                self.said.append((said, json.loads(rest)))

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # ours, by its pid
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout, self._err):
            if stream is not None:
                stream.close()


# -- reading the engine ---------------------------------------------------------------------------------------------


def keeper_all() -> list[dict[str, Any]]:
    """The keeper's records and its waiting tickets (``state`` pending), as the keeper itself holds them (none
    before an owner has started the keeper)."""
    try:
        keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    except ValueError:
        return []
    return list(ray.get(keeper.leases.remote(True), timeout=SETTLE))


def of(owner: Owner, state: str) -> list[dict[str, Any]]:
    """The keeper's entries of ``owner`` in ``state``, oldest grant first."""
    rows = [r for r in keeper_all() if r["owner"].endswith(f":{owner.pid}") and r["state"] == state]
    return sorted(rows, key=lambda r: r.get("token", 0))


def pg_state(pg_id: str) -> str:
    row = placement_group_table().get(pg_id)
    return str(row["state"]) if row else "REMOVED"


async def eventually(check: Callable[[], Any], what: str, within: float = SETTLE) -> Any:
    """Run ``check`` (blocking, in a thread) until it returns something true; return that."""
    with anyio.move_on_after(within):
        while not (found := await anyio.to_thread.run_sync(check)):
            await anyio.sleep(0.02)
        return found
    pytest.fail(f"after {within:g}s: {what}")


def hold_all() -> list[PlacementGroup]:
    """Fill every slot with a group of the test's own (placed before this returns)."""
    groups = [placement_group([{"slot": 1}]) for _ in range(SLOTS)]
    assert all(pg.wait(SETTLE) for pg in groups)
    return groups


def free(groups: list[PlacementGroup]) -> None:
    for pg in groups:
        remove_placement_group(pg)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def task_rows(ray_ids: list[str]) -> dict[str, tuple[set[int], int]]:
    """What Ray's task table shows of each task (by Ray task id, hex), its latest attempt: its states, and the pid of
    the worker process that ran it (0 if none did)."""
    from ray._private.state import state

    wanted = set(ray_ids)
    latest: dict[str, tuple[int, set[int]]] = {}
    pids: dict[str, int] = {}
    for event in state._get_all_task_events():
        task_id = event.task_id.hex() if isinstance(event.task_id, bytes) else str(event.task_id)
        if task_id not in wanted:
            continue
        seen = latest.get(task_id)
        states = set(event.state_updates.state_ts_ns)
        if event.state_updates.worker_pid:
            pids[task_id] = event.state_updates.worker_pid
        if seen is None or event.attempt_number > seen[0]:
            latest[task_id] = (event.attempt_number, states)
        elif event.attempt_number == seen[0]:
            seen[1].update(states)
    return {task_id: (states, pids.get(task_id, 0)) for task_id, (_, states) in latest.items()}


def task_groups(ray_ids: list[str]) -> dict[str, str]:
    """The placement group (id, hex; ``""`` for none) Ray's task table says each of these tasks was scheduled in."""
    from ray._private.state import state

    wanted, groups = set(ray_ids), {}
    for event in state._get_all_task_events():
        task_id = event.task_id.hex() if isinstance(event.task_id, bytes) else str(event.task_id)
        if task_id in wanted and event.HasField("task_info"):
            groups[task_id] = event.task_info.placement_group_id.hex()
    return groups


def task_states(ray_ids: list[str]) -> dict[str, set[int]]:
    """The states Ray's task table shows for each task (by Ray task id, hex) of its latest attempt."""
    return {task_id: states for task_id, (states, _) in task_rows(ray_ids).items()}


def running_worker(ray_ids: list[str]) -> int:
    """The pid of the worker process Ray's task table shows running one of these tasks (0: none yet)."""
    return next((pid for states, pid in task_rows(ray_ids).values() if RUNNING in states and pid), 0)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def all_ended(ray_ids: list[str]) -> bool:
    """Whether Ray's task table shows every one of these tasks ended (naps of minutes: cancelled, or killed)."""
    states = task_states(ray_ids)
    return len(states) == len(ray_ids) and all(s & {FINISHED, FAILED} for s in states.values())


def keeper_call(method: str, *args: Any) -> Any:
    keeper = ray.get_actor(KEEPER_NAME, namespace=KEEPER_NAMESPACE)
    return ray.get(getattr(keeper, method).remote(*args), timeout=SETTLE)


def preempted_count() -> int:
    """How many leases the keeper took back so far (none before it runs)."""
    try:
        return len(keeper_call("preempted_ids"))
    except ValueError:
        return 0


def sample() -> tuple[float, float, int]:
    """One look at the engine: the slots Ray's placed groups hold, the slots the keeper's held leases (those whose
    group Ray shows placed) hold, and how many of those leases there are; two held leases never share a token."""
    rows = keeper_all()
    table = placement_group_table()
    engine = sum(
        float(bundle.get("slot", 0.0))
        for row in table.values()
        if row["state"] == "CREATED"
        for bundle in row["bundles"].values()
    )
    held = [
        r
        for r in rows
        if r["state"] in ("active", "preempting") and table.get(r["pg_id"], {}).get("state") == "CREATED"
    ]
    tokens = [r["token"] for r in held]
    assert len(set(tokens)) == len(tokens), held
    return engine, sum(float(r["amounts"].get("slot", 0.0)) for r in held), len(held)


def until_step(owner: Owner, step: int) -> None:
    while owner.expect("STEP", within=90)["step"] < step:
        pass


def none_left(pids: list[int]) -> bool:
    """Whether the keeper holds no lease of these processes and Ray no group holding slots."""
    owners = {f":{pid}" for pid in pids}
    if any(r["owner"][r["owner"].rindex(":") :] in owners for r in keeper_all() if r["state"] != "pending"):
        return False
    table = placement_group_table()
    return not any(
        "slot" in bundle for row in table.values() if row["state"] != "REMOVED" for bundle in row["bundles"].values()
    )
