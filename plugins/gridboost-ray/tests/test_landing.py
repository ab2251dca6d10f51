"""Results handed to the event loop in batches (``_landing``): none lost, each with its own value or error type.

No Ray cluster: a stand-in ref completes through ``_on_completed`` from threads, as Ray's callback thread does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from gridboost_ray._landing import Landing, landing
from ray.exceptions import RayTaskError, WorkerCrashedError

# The landing serves asyncio only (trio runs await each ref's future through trio's token).
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


class _Ref:
    """What ``Landing.watch`` uses of an ObjectRef: a callback, later called with the result."""

    def __init__(self) -> None:
        self.callback: Callable[[Any], None] | None = None

    def _on_completed(self, callback: Callable[[Any], None]) -> None:
        self.callback = callback


class _Boom(ValueError):
    pass


def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("work", "Traceback: (remote)", cause)


async def test_every_result_from_many_threads_reaches_its_own_awaiter() -> None:
    hub = Landing(asyncio.get_running_loop())
    refs = [_Ref() for _ in range(2000)]
    futures = [hub.watch(ref) for ref in refs]

    def complete(part: list[tuple[int, _Ref]]) -> None:
        for i, ref in part:
            assert ref.callback is not None
            ref.callback(i)

    numbered = list(enumerate(refs))
    threads = [threading.Thread(target=complete, args=(numbered[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    results = await asyncio.wait_for(asyncio.gather(*futures), 30)
    for thread in threads:
        thread.join()
    assert results == list(range(2000))


async def test_errors_arrive_as_await_ref_raises_them() -> None:
    hub = Landing(asyncio.get_running_loop())
    task_ref, ray_ref, value_ref = _Ref(), _Ref(), _Ref()
    task_failed, ray_failed, returned = hub.watch(task_ref), hub.watch(ray_ref), hub.watch(value_ref)
    crashed = WorkerCrashedError()
    returned_error = _Boom("a value, not a failure")
    for ref, result in ((task_ref, _task_error(_Boom("bad item"))), (ray_ref, crashed), (value_ref, returned_error)):
        assert ref.callback is not None
        threading.Thread(target=ref.callback, args=(result,)).start()
    with pytest.raises(_Boom) as raised:  # the function's own type, as `await ref` raises it
        await asyncio.wait_for(task_failed, 30)
    assert isinstance(raised.value, RayTaskError)
    assert str(raised.value.cause) == "bad item"
    with pytest.raises(WorkerCrashedError):
        await asyncio.wait_for(ray_failed, 30)
    assert await asyncio.wait_for(returned, 30) is returned_error


async def test_a_result_for_a_cancelled_awaiter_is_dropped() -> None:
    hub = Landing(asyncio.get_running_loop())
    gone, kept = _Ref(), _Ref()
    cancelled, awaited = hub.watch(gone), hub.watch(kept)
    cancelled.cancel()
    for ref, value in ((gone, 1), (kept, 2)):
        assert ref.callback is not None
        threading.Thread(target=ref.callback, args=(value,)).start()
    assert await asyncio.wait_for(awaited, 30) == 2
    assert cancelled.cancelled()


async def test_this_ray_has_what_the_landing_needs() -> None:
    # Without ObjectRef._on_completed the backend falls back to `await ref`, slower: this says when that happens.
    assert landing(asyncio.get_running_loop()) is not None
