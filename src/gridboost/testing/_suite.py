"""``BackendSuite``: what every backend must do, checked against the engine's own state.

Subclass it in your backend's tests and provide five fixtures::

    class TestMyBackend(BackendSuite):
        @pytest.fixture
        def backend_name(self): return "mine"

        @pytest.fixture
        def grid_options(self): return {"address": cluster_address}

        @pytest.fixture
        def probe(self): return MyEngineProbe()      # reads the engine, not gridboost

        @pytest.fixture
        def unit(self): return Resources(cpu=1)       # a small amount the cluster holds...

        @pytest.fixture
        def capacity_units(self): return 4            # ...exactly this many times over

Every test sends work with ``where="cluster"`` so that the backend under test, not
the host, runs it. Checks that depend on a capability the backend declares false
(running commands, interrupting a running callable, reserving) are skipped with
that reason; everything else must pass.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import psutil
import pytest

from .._boost import Boost
from .._grid import Grid
from .._records import BoostState, Command, Priority
from .._resources import Resources
from ..exceptions import (
    BoostUnavailable,
    CommandFailed,
    CommandNotFound,
    GridClosed,
    InvalidRequest,
    InvalidResources,
    InvalidTask,
    TaskCancelled,
)
from ._probe import EngineProbe
from ._work import (
    SuiteError,
    add,
    fail_if_odd,
    fail_until,
    fail_until_item,
    fail_with,
    mark_and_nap,
    nap,
    nap_then_size,
    where_item,
)

__all__ = ["BackendSuite", "SuiteError"]

# Engines report some state a little after the fact (Ray's GCS, Dask's scheduler):
# the suite waits this long for the engine to agree before it calls something a leak.
# A subclass may change it with the class attribute ``SETTLE``.
SETTLE = 15.0
# How long a process of the suite's own may take to start and say its pid (a loaded CI box is slow).
START = 30.0


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


def _sleeper(pid_file: Path, seconds: float) -> list[str]:
    """A command that writes its pid, then sleeps."""
    return _script(f"import os,time; open({str(pid_file)!r},'w').write(str(os.getpid())); time.sleep({seconds})")


async def _read_pid(path: Path, timeout: float) -> int:
    with anyio.fail_after(timeout):
        while True:
            text = await anyio.Path(path).read_text() if await anyio.Path(path).exists() else ""
            if text:
                return int(text)
            await anyio.sleep(0.02)


def _process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class BackendSuite:
    """The conformance suite. Subclass it and provide the fixtures named in the module docstring."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    #: Seconds to wait for the engine to agree (a release to show, a process to go).
    SETTLE = SETTLE

    # -- fixtures a backend's tests provide -------------------------------------------

    @pytest.fixture
    def backend_name(self) -> str:
        pytest.fail("a BackendSuite subclass must provide the `backend_name` fixture")

    @pytest.fixture
    def grid_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def probe(self) -> EngineProbe:
        pytest.fail("a BackendSuite subclass must provide the `probe` fixture (an EngineProbe)")

    @pytest.fixture
    def unit(self) -> Resources:
        return Resources(cpu=1)

    @pytest.fixture
    def capacity_units(self) -> int:
        pytest.fail("a BackendSuite subclass must provide `capacity_units`: how many `unit`s the cluster holds")

    # -- fixtures of the suite --------------------------------------------------------

    @pytest.fixture
    async def grid(self, backend_name: str, grid_options: dict[str, Any], probe: EngineProbe) -> AsyncIterator[Grid]:
        """The grid under test; after the test, the engine must hold and run nothing of it."""
        async with Grid(backend_name, **grid_options) as grid:
            yield grid
        await self.assert_engine_clean(probe, grid)

    async def assert_engine_clean(self, probe: EngineProbe, grid: Grid) -> None:
        async def clean() -> bool:
            return not await probe.reservations(grid) and not await probe.running(grid)

        async def state() -> str:
            held, running = await probe.reservations(grid), await probe.running(grid)
            return f"the engine still holds {sorted(held)} and runs {sorted(running)} of the closed grid"

        await self.eventually(clean, state)

    async def eventually(self, check: Callable[[], Awaitable[bool]], what: Callable[[], Awaitable[str]]) -> None:
        """Wait (up to ``SETTLE``) until the engine agrees; fail with ``await what()`` if it never does."""
        with anyio.move_on_after(self.SETTLE):
            while not await check():
                await anyio.sleep(0.05)
            return
        pytest.fail(f"after {self.SETTLE:g}s: {await what()}")

    @staticmethod
    def need(grid: Grid, capability: str) -> None:
        if not getattr(grid.backend.capabilities, capability):
            pytest.skip(f"the {grid.backend.name} backend declares {capability}=False")

    # -- life cycle and seeing --------------------------------------------------------

    async def test_start_and_close(self, backend_name: str, grid_options: dict[str, Any], probe: EngineProbe) -> None:
        """A grid starts, answers, and closes; afterwards it refuses work and the engine holds nothing of it."""
        async with Grid(backend_name, **grid_options) as grid:
            open_inside = not grid.closed
            assert await grid.offload(add, 1, 2, where="cluster") == 3
        assert open_inside
        assert grid.closed
        with pytest.raises(GridClosed):
            await grid.offload(add, 1, where="cluster")
        await self.assert_engine_clean(probe, grid)

    async def test_snapshot_shape_and_totals(self, grid: Grid, unit: Resources) -> None:
        """The snapshot lists live nodes with unique ids; totals add up and what is free fits in what exists."""
        snapshot = await grid.snapshot()
        assert snapshot.alive, "a snapshot must list at least one live node"
        ids = [node.id for node in snapshot.nodes]
        assert len(ids) == len(set(ids)), f"node ids are not unique: {ids}"
        assert sum(node.is_local for node in snapshot.nodes) <= 1
        for node in snapshot.alive:
            assert node.available.fits_in(node.total), f"{node.id}: available {node.available} > total {node.total}"
        assert snapshot.total == sum((n.total for n in snapshot.alive), Resources())
        assert unit.fits_in(snapshot.total)

    # -- reserving --------------------------------------------------------------------

    async def test_reserve_places_where_asked_and_release_removes_it(
        self, grid: Grid, probe: EngineProbe, unit: Resources
    ) -> None:
        """A boost aimed at a node is held by the engine on that node, and gone from the engine once released."""
        self.need(grid, "reserve")
        snapshot = await grid.snapshot()
        target = next(n for n in reversed(snapshot.alive) if unit.fits_in(n.available))
        boost = await grid.request_boost(unit, ttl=60, nodes=[target.id])
        assert boost.is_active
        assert boost.id in await probe.reservations(grid), "the engine does not hold the boost"
        assert set(await probe.reservation_nodes(grid, boost.id)) == {target.id}
        assert set(boost.placements) == {target.id}
        await boost.release()
        await boost.release()
        assert boost.state is BoostState.RELEASED

        async def gone() -> bool:
            return boost.id not in await probe.reservations(grid)

        async def held() -> str:
            return f"the engine still holds released boost {boost.id}"

        await self.eventually(gone, held)

    async def test_leases_list_held_boosts(self, grid: Grid, unit: Resources) -> None:
        """The engine's lease registry lists a held boost with its owner and expiry, and not once released."""
        self.need(grid, "reserve")
        before = time.time()
        boost = await grid.request_boost(unit, ttl=90, priority=Priority.HIGH)
        leases = {lease.id: lease for lease in await grid.leases()}
        assert boost.id in leases, f"the engine lists no lease for boost {boost.id}: {list(leases)}"
        lease = leases[boost.id]
        assert (lease.state, lease.priority, lease.resources) == ("active", Priority.HIGH, unit)
        assert lease.owner.endswith(f":{os.getpid()}")
        assert before + 90 - 1 <= lease.expires_at <= time.time() + 90 + 1
        await boost.release()

        async def gone() -> bool:
            return all(le.id != boost.id or le.state != "active" for le in await grid.leases())

        async def listed() -> str:
            return f"the engine still lists released boost {boost.id} as active: {await grid.leases()}"

        await self.eventually(gone, listed)

    async def test_work_of_a_boost_runs_inside_it(self, grid: Grid, probe: EngineProbe, unit: Resources) -> None:
        """Work submitted into a boost runs on the boost's node."""
        self.need(grid, "reserve")
        async with grid.boost(unit, ttl=60) as boost:
            node = await grid.offload(probe.whereami, where=boost)
            assert node in set(await probe.reservation_nodes(grid, boost.id))

    async def test_boost_expires_at_its_ttl(self, grid: Grid, probe: EngineProbe, unit: Resources) -> None:
        """A boost past its TTL is expired by the grid and released on the engine."""
        self.need(grid, "reserve")
        boost = await grid.request_boost(unit, ttl=0.5)
        assert boost.id in await probe.reservations(grid)

        async def expired() -> bool:
            return boost.state is BoostState.EXPIRED and boost.id not in await probe.reservations(grid)

        async def state() -> str:
            return f"boost {boost.id} is {boost.state}; engine holds it: {boost.id in await probe.reservations(grid)}"

        await self.eventually(expired, state)

    async def test_pending_boosts_are_granted_in_priority_order(
        self, grid: Grid, unit: Resources, capacity_units: int
    ) -> None:
        """With the cluster full, pending boosts are granted highest priority first, then oldest first."""
        self.need(grid, "reserve")
        blockers = [await grid.request_boost(unit, ttl=120) for _ in range(capacity_units)]
        granted: list[str] = []

        async def ask(name: str, priority: Priority) -> None:
            boost = await grid.request_boost(unit, ttl=120, priority=priority, wait=4 * self.SETTLE)
            granted.append(name)
            await anyio.sleep(0.1)
            await boost.release()

        with anyio.fail_after(6 * self.SETTLE):
            async with anyio.create_task_group() as tg:
                for name, priority in [("low", Priority.LOW), ("normal", Priority.NORMAL), ("high", Priority.HIGH)]:
                    tg.start_soon(ask, name, priority)
                    await anyio.sleep(0.1)  # a known arrival order
                assert granted == [], f"granted while the cluster was full: {granted}"
                await blockers[0].release()
        assert granted == ["high", "normal", "low"]

    async def test_a_boost_larger_than_the_cluster_fails_at_once(self, grid: Grid) -> None:
        """A boost no node set can hold raises BoostUnavailable without waiting, and the grid stays usable."""
        self.need(grid, "reserve")
        if grid.backend.capabilities.grow:
            pytest.skip("the backend can grow the cluster, so it decides what is impossible")
        total = (await grid.snapshot()).total
        with anyio.fail_after(10), pytest.raises(BoostUnavailable, match="missing"):
            await grid.request_boost(total + Resources(cpu=1), ttl=60, wait=300)
        assert await grid.offload(add, 1, where="cluster") == 1

    # -- running ----------------------------------------------------------------------

    async def test_submit_offload_and_map_return_results(self, grid: Grid) -> None:
        """Results come back from submit, offload and map, with arguments intact."""
        assert await grid.submit(add, 2, b=3, where="cluster") == 5
        assert await grid.offload(add, 40, b=2, where="cluster") == 42
        results = [r async for r in grid.map(add, range(10), where="cluster", max_in_flight=4)]
        assert results == list(range(10))

    async def test_user_exception_keeps_its_type(self, grid: Grid) -> None:
        """The function's exception reaches the caller with its own type and attributes."""
        with pytest.raises(SuiteError) as info:
            await grid.offload(fail_with, 7, where="cluster")
        assert info.value.code == 7

    async def test_retries_rerun_failed_work(self, grid: Grid, tmp_path: Path) -> None:
        """``retries`` reruns failing work; it runs once more per retry and no more."""
        counter = tmp_path / "calls"
        assert await grid.offload(fail_until, str(counter), 2, retries=2, where="cluster") == 3
        hopeless = tmp_path / "hopeless"
        with pytest.raises(SuiteError):
            await grid.offload(fail_until, str(hopeless), 10, retries=1, where="cluster")
        assert hopeless.read_text() == "2"

    async def test_timeout_raises_and_stops_the_work(self, grid: Grid, probe: EngineProbe) -> None:
        """Work over its timeout raises TimeoutError promptly, and the engine stops running it."""
        interruptible = grid.backend.capabilities.interrupt_running
        # A backend that cannot interrupt a running callable runs it to its end: keep that short.
        seconds = 60.0 if interruptible else 2.0
        with anyio.fail_after(0.5 + self.SETTLE), pytest.raises(TimeoutError):
            await grid.offload(nap, seconds, timeout=0.5, where="cluster")

        async def stopped() -> bool:
            return not await probe.running(grid)

        async def running() -> str:
            return f"the engine still runs the timed-out work: {await probe.running(grid)}"

        await self.eventually(stopped, running)

    async def test_cancel_queued_work_drops_it(
        self, grid: Grid, probe: EngineProbe, unit: Resources, capacity_units: int, tmp_path: Path
    ) -> None:
        """Work cancelled while it waits for capacity never runs, and the engine confirms it is not running."""
        self.need(grid, "commands")
        blockers = [
            grid.submit(Command(_sleeper(tmp_path / f"blocker-{i}", 60)), resources=unit, where="cluster")
            for i in range(capacity_units)
        ]
        for i in range(capacity_units):
            await _read_pid(tmp_path / f"blocker-{i}", START)
        marker = tmp_path / "queued-ran"
        queued = grid.submit(Command(_script(f"open({str(marker)!r}, 'w').close()")), resources=unit, where="cluster")
        await anyio.sleep(0.5)
        assert queued.id not in await probe.running(grid), "the queued work runs although the cluster is full"
        queued.cancel()
        with anyio.fail_after(self.SETTLE), pytest.raises(TaskCancelled):
            await queued
        for blocker in blockers:
            blocker.cancel()
        with anyio.fail_after(self.SETTLE):
            for blocker in blockers:
                with pytest.raises(TaskCancelled):
                    await blocker
        await anyio.sleep(0.5)
        assert not marker.exists(), "cancelled queued work ran anyway"

    async def test_cancel_running_command_stops_its_process(
        self, grid: Grid, probe: EngineProbe, tmp_path: Path
    ) -> None:
        """Cancelling a running command stops its process, and the engine stops counting it as running."""
        self.need(grid, "commands")
        pid_file = tmp_path / "pid"
        handle = grid.submit(Command(_sleeper(pid_file, 30)), where="cluster")
        pid = await _read_pid(pid_file, START)

        async def seen() -> bool:  # engines report what runs a little after the fact
            return handle.id in await probe.running(grid)

        async def unseen() -> str:
            return f"the engine never reported the running command {handle.id}: {await probe.running(grid)}"

        await self.eventually(seen, unseen)
        handle.cancel()
        with anyio.fail_after(self.SETTLE), pytest.raises(TaskCancelled):
            await handle

        async def stopped() -> bool:
            return _process_gone(pid) and handle.id not in await probe.running(grid)

        async def alive() -> str:
            return (
                f"cancelled command: pid {pid} alive={not _process_gone(pid)}, engine runs {await probe.running(grid)}"
            )

        await self.eventually(stopped, alive)

    async def test_cancel_running_callable(self, grid: Grid, probe: EngineProbe) -> None:
        """Cancelling a running callable releases the caller, and the engine stops running it."""
        handle = grid.submit(nap, 30.0 if grid.backend.capabilities.interrupt_running else 2.0, where="cluster")

        async def started() -> bool:
            return handle.id in await probe.running(grid)

        async def never() -> str:
            return "the callable never started"

        await self.eventually(started, never)
        handle.cancel()
        with anyio.fail_after(self.SETTLE), pytest.raises(TaskCancelled):
            await handle

        async def stopped() -> bool:
            return handle.id not in await probe.running(grid)

        async def still() -> str:
            return f"the engine still runs the cancelled callable: {await probe.running(grid)}"

        await self.eventually(stopped, still)

    # -- maps in chunks -----------------------------------------------------------------

    async def test_a_map_in_chunks_delivers_each_item_with_its_own_outcome(self, grid: Grid) -> None:
        """Items of one chunk deliver, in order, while one of them raises its own exception."""
        results = grid.map(fail_if_odd, range(8), batch_size=4, where="cluster")
        seen: list[object] = []
        for _ in range(8):
            try:
                seen.append(await anext(results))
            except SuiteError as error:
                seen.append(("failed", error.code))
        assert seen == [0, ("failed", 1), 2, ("failed", 3), 4, ("failed", 5), 6, ("failed", 7)]
        with pytest.raises(StopAsyncIteration):
            await anext(results)
        unordered = [r async for r in grid.map(add, range(40), batch_size=8, ordered=False, where="cluster")]
        assert sorted(unordered) == list(range(40))

    async def test_a_map_in_chunks_retries_only_the_items_that_failed(self, grid: Grid, tmp_path: Path) -> None:
        """With ``retries``, an item that failed runs again, alone; the items of its chunk that did not, once."""
        items = [(str(tmp_path / f"item-{i}"), 1 if i in (2, 5) else 0) for i in range(8)]
        results = [r async for r in grid.map(fail_until_item, items, batch_size=4, retries=1, where="cluster")]
        assert results == [2 if i in (2, 5) else 1 for i in range(8)]
        assert [int((tmp_path / f"item-{i}").read_text()) for i in range(8)] == results

    async def test_a_map_in_chunks_runs_inside_a_boost(self, grid: Grid, probe: EngineProbe, unit: Resources) -> None:
        """Chunks of a map placed in a boost run on the boost's nodes."""
        self.need(grid, "reserve")
        async with grid.boost(unit, ttl=60) as boost:
            nodes = {n async for n in grid.map(where_item, [probe.whereami] * 8, batch_size=2, where=boost)}
            assert nodes <= set(await probe.reservation_nodes(grid, boost.id))

    async def test_cancelling_a_map_in_chunks_stops_its_chunks_on_the_engine(
        self, grid: Grid, probe: EngineProbe, tmp_path: Path
    ) -> None:
        """Cancelling a map's consumer cancels its chunks: the engine stops running them, and no other chunk starts."""
        long = 30.0 if grid.backend.capabilities.interrupt_running else 2.0
        marks = [tmp_path / f"ran-{i}" for i in range(40)]
        items = [(str(mark), long) for mark in marks]

        async def started() -> bool:
            return any(mark.exists() for mark in marks)

        async def not_started() -> str:
            return "no item of the map started"

        with anyio.fail_after(self.SETTLE + long / 2):
            async with grid.map(mark_and_nap, items, batch_size=2, max_in_flight=2, where="cluster") as results:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(results.__anext__)
                    await self.eventually(started, not_started)
                    tg.cancel_scope.cancel()  # the consumer is cancelled while the first chunks run
        await self.eventually(lambda: _none(probe.running(grid)), lambda: _say("still running", probe.running(grid)))
        ran = sum(mark.exists() for mark in marks)
        assert 0 < ran <= 4, f"{ran} items of 40 ran; only the first item of each of the 2 chunks should have"

    # -- parked data -------------------------------------------------------------------------

    async def test_parked_data_reaches_the_work_as_its_object(self, grid: Grid) -> None:
        """A handle passed to offload, to submit by keyword, and as map items (chunked or not) arrives as its object."""
        data = bytes(range(256)) * 256
        handle = await grid.put(data)
        assert handle.size == len(data)
        assert await grid.offload(len, handle, where="cluster") == len(data)
        assert await grid.submit(nap_then_size, data=handle, where="cluster") == len(data)
        chunked = [n async for n in grid.map(len, [handle, b"ab", handle, handle], batch_size=2, where="cluster")]
        one_by_one = [n async for n in grid.map(len, [handle, b"abc"], batch_size=1, where="cluster")]
        assert (chunked, one_by_one) == ([len(data), 2, len(data), len(data)], [len(data), 3])
        await handle.release()
        with pytest.raises(InvalidRequest, match="released"):
            grid.submit(len, handle, where="cluster")
        assert await grid.offload(add, 2, 3, where="cluster") == 5

    async def test_parked_data_is_stored_once_for_every_task_using_it(self, grid: Grid, probe: EngineProbe) -> None:
        """Tasks in flight with the same handle share the engine's one stored object: it is not shipped per task."""
        size = 4 * 2**20
        handle = await grid.put(os.urandom(size))
        handles = [grid.submit(nap_then_size, handle, 1.0, where="cluster") for _ in range(3)]

        async def started() -> bool:
            return bool(await probe.running(grid))

        await self.eventually(started, lambda: _say("running", probe.running(grid)))
        assert await probe.big_objects(grid, size) == 1
        assert [await h for h in handles] == [size] * 3
        await handle.release()

    async def test_released_parked_data_is_freed_on_the_engine(self, grid: Grid, probe: EngineProbe) -> None:
        """After ``release()`` (twice: it is idempotent) the engine no longer stores the object."""
        handle = await grid.put(os.urandom(2**20))
        assert await probe.parked_nodes(grid, handle)
        await handle.release()
        await handle.release()
        assert handle.released
        await self.eventually(
            lambda: _none(probe.parked_nodes(grid, handle)), lambda: _say("stored", probe.parked_nodes(grid, handle))
        )

    async def test_parked_data_in_a_boost_lives_there_and_ends_with_it(
        self, grid: Grid, probe: EngineProbe, unit: Resources
    ) -> None:
        """Data put under a boost is stored on the boost's nodes, used there, and freed when the boost ends."""
        self.need(grid, "reserve")
        async with grid.boost(unit, ttl=60) as boost:
            handle = await grid.put(os.urandom(2**20), boost=boost)
            nodes = set(await probe.parked_nodes(grid, handle))
            assert nodes, f"the engine does not store {handle.id}"
            assert nodes <= set(await probe.reservation_nodes(grid, boost.id))
            assert await grid.offload(len, handle, where=boost) == 2**20
        assert handle.released
        await self.eventually(
            lambda: _none(probe.parked_nodes(grid, handle)), lambda: _say("stored", probe.parked_nodes(grid, handle))
        )

    async def test_teardown_frees_parked_data(
        self, backend_name: str, grid_options: dict[str, Any], probe: EngineProbe
    ) -> None:
        """A handle nobody released is released when the grid closes, and the engine frees its object."""
        async with Grid(backend_name, **grid_options) as grid:
            handle = await grid.put(os.urandom(2**20))
            assert await probe.parked_nodes(grid, handle)
        assert handle.released
        await self.eventually(
            lambda: _none(probe.parked_nodes(grid, handle)), lambda: _say("stored", probe.parked_nodes(grid, handle))
        )

    async def test_commands_return_status_and_output(self, grid: Grid) -> None:
        """A command's status, stdout and stderr come back; env reaches it; check=True raises CommandFailed."""
        self.need(grid, "commands")
        script = "import os,sys; print(os.environ['SUITE_X']); sys.stderr.write('err'); sys.exit(3)"
        result = await grid.run_command(_script(script), env={"SUITE_X": "42"}, where="cluster")
        assert (result.returncode, result.stdout.strip(), result.stderr) == (3, b"42", b"err")
        assert result.node
        with pytest.raises(CommandFailed, match="status 3"):
            await grid.run_command(_script(script), env={"SUITE_X": "1"}, check=True, where="cluster")

    async def test_a_missing_program_raises_command_not_found(self, grid: Grid) -> None:
        """A program that does not exist where the command runs raises CommandNotFound; the grid stays usable."""
        self.need(grid, "commands")
        with pytest.raises(CommandNotFound, match="no such program") as info:
            await grid.run_command(["gridboost-suite-no-such-program", "x"], where="cluster")
        assert isinstance(info.value, FileNotFoundError)
        assert info.value.filename == "gridboost-suite-no-such-program"
        assert (await grid.run_command(_script("pass"), where="cluster")).returncode == 0

    async def test_command_timeout_kills_it(self, grid: Grid, tmp_path: Path) -> None:
        """A command over its timeout raises TimeoutError and its process is gone."""
        self.need(grid, "commands")
        pid_file = tmp_path / "pid"
        async with anyio.create_task_group() as tg:
            pids: list[int] = []

            async def watch() -> None:
                pids.append(await _read_pid(pid_file, START))

            tg.start_soon(watch)
            with anyio.fail_after(2.0 + self.SETTLE), pytest.raises(TimeoutError):
                await grid.run_command(_sleeper(pid_file, 60), timeout=2.0, where="cluster")

        async def gone() -> bool:
            return _process_gone(pids[0])

        async def alive() -> str:
            return f"timed-out command pid {pids[0]} is still alive"

        await self.eventually(gone, alive)

    # -- teardown with work in flight -------------------------------------------------

    async def _fill(self, grid: Grid, unit: Resources, capacity_units: int) -> list[Any]:
        handles: list[Any] = [grid.submit(nap, 1.0, resources=unit, where="cluster") for _ in range(capacity_units * 2)]
        if grid.backend.capabilities.commands:
            handles.append(grid.submit(Command(_script("import time; time.sleep(60)")), where="cluster"))
        if grid.backend.capabilities.reserve:
            handles.append(await grid.request_boost(unit, ttl=120, wait=60))
        await anyio.sleep(0.5)
        return handles

    async def test_exception_with_work_in_flight_leaves_nothing_on_the_engine(
        self,
        backend_name: str,
        grid_options: dict[str, Any],
        probe: EngineProbe,
        unit: Resources,
        capacity_units: int,
    ) -> None:
        """An exception in the grid's block leaves no reservation and no running work on the engine."""

        class Boom(Exception):
            pass

        with anyio.fail_after(120), pytest.raises(Boom):
            async with Grid(backend_name, **grid_options) as grid:
                in_flight = await self._fill(grid, unit, capacity_units)
                raise Boom
        assert all(isinstance(x, Boost) or x.cancelled() or x.done() for x in in_flight)
        await self.assert_engine_clean(probe, grid)

    async def test_cancellation_with_work_in_flight_leaves_nothing_on_the_engine(
        self,
        backend_name: str,
        grid_options: dict[str, Any],
        probe: EngineProbe,
        unit: Resources,
        capacity_units: int,
    ) -> None:
        """Cancelling the grid's block leaves no reservation and no running work on the engine."""
        with anyio.fail_after(120):
            with anyio.CancelScope() as scope:
                async with Grid(backend_name, **grid_options) as grid:
                    await self._fill(grid, unit, capacity_units)
                    scope.cancel()
                    await anyio.sleep(60)
        assert scope.cancelled_caught
        await self.assert_engine_clean(probe, grid)

    # -- bad input --------------------------------------------------------------------

    BAD_INPUT: ClassVar[list[tuple[str, Callable[[Grid], Awaitable[Any]], type[Exception], str]]] = [
        ("negative", lambda g: g.offload(add, 1, resources={"cpu": -1}, where="cluster"), InvalidResources, "cpu"),
        ("nan", lambda g: g.offload(add, 1, resources={"cpu": float("nan")}, where="cluster"), InvalidResources, "nan"),
        (
            "inf",
            lambda g: g.offload(add, 1, resources={"memory": float("inf")}, where="cluster"),
            InvalidResources,
            "inf",
        ),
        ("string", lambda g: g.offload(add, 1, resources={"gpu": "one"}, where="cluster"), InvalidResources, "one"),
        ("not-callable", lambda g: g.offload(42, where="cluster"), InvalidTask, "callable"),  # type: ignore[arg-type]
        ("argv-string", lambda g: g.run_command("echo hi", where="cluster"), InvalidTask, "not a string"),
        ("ttl-zero", lambda g: g.request_boost("cpu=1", ttl=0), InvalidRequest, "ttl"),
        ("ttl-negative", lambda g: g.request_boost("cpu=1", ttl=-1), InvalidRequest, "ttl"),
        ("bad-where", lambda g: g.offload(add, 1, where="moon"), InvalidRequest, "where"),  # type: ignore[arg-type]
    ]

    @pytest.mark.parametrize(("case", "call", "error", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
    async def test_bad_input_is_refused_and_the_grid_stays_usable(
        self,
        grid: Grid,
        probe: EngineProbe,
        case: str,
        call: Callable[[Grid], Awaitable[Any]],
        error: type[Exception],
        message: str,
    ) -> None:
        """Bad input raises a typed error naming the problem, reaches no engine, and leaves the grid usable."""
        with pytest.raises(error, match=message):
            await call(grid)
        assert not await probe.reservations(grid)
        assert await grid.offload(add, 1, 1, where="cluster") == 2


async def _none(found: Awaitable[Collection[str]]) -> bool:
    return not await found


async def _say(what: str, found: Awaitable[Collection[str]]) -> str:
    return f"{what}: {sorted(await found)}"
