"""joblib's ``"gridboost"`` backend: ``joblib.Parallel`` (and scikit-learn's ``n_jobs``) runs on a grid.

``import gridboost.joblib`` registers the backend with joblib (:func:`register` does it again, for code that
replaced joblib's registry); ``import gridboost`` alone never imports joblib. Then::

    with joblib.parallel_config(backend="gridboost", grid_options={"backend": "dask", "address": ...}):
        Parallel(n_jobs=-1)(delayed(fit)(fold) for fold in folds)      # a grid of its own, per Parallel call

    async with grid.boost("cpu=8", ttl=600):
        executor = grid.executor()                                      # bound to the boost of the block
        with joblib.parallel_config(backend="gridboost", executor=executor):
            await anyio.to_thread.run_sync(run_the_search)              # every batch runs inside the lease

How it maps onto joblib (modelled on joblib's own backends and its Dask backend):

* **Batches are tasks.** Each batch of joblib's auto-batching (its ``BatchedCalls``) is submitted through the
  executor as one gridboost task, placed, counted and torn down like any other; joblib sizes the batches from how
  long they take (``AutoBatchingMixin``), so short calls travel many to a task.
* **n_jobs.** A negative ``n_jobs`` counts back from :meth:`GridExecutor.capacity <gridboost.Executor.capacity>`:
  ``-1`` is every CPU the grid can use now (this machine's and the cluster's, active boosts included; a bound
  executor's boost's alone), ``-2`` all but one. A positive ``n_jobs`` is taken as given: the grid queues what does
  not fit. ``n_jobs=1`` runs in the caller, as with every joblib backend, and starts no grid.
* **Lifetime.** With ``grid_options`` (the keywords of :class:`gridboost.Executor`), the backend starts an
  executor, and with it a grid, when a ``Parallel`` call begins and shuts both down, awaited, when it ends (when
  its ``with Parallel(...)`` block ends, for a managed one). With ``executor``, it uses that executor and never
  shuts it down: its owner does, and many ``Parallel`` calls share its grid.
* **Errors.** A task's exception comes back with its own type. On the first error, or a ``timeout``, joblib
  aborts: the batches not yet running are cancelled; those that run finish (shutting down an owned executor waits
  for them, as the grid's teardown guarantee says).
* **Threads.** Futures complete in the grid's event loop thread; joblib's completion callbacks (which dispatch
  the next batches, pulling the caller's iterator) run in one relay thread per call instead, so the loop never runs
  the caller's code, and the relay ends with the call.
* **Memory.** Tasks may run in another process or on another node, so the backend does not claim shared memory:
  ``require="sharedmem"`` makes joblib fall back to its threading backend. A ``Parallel`` nested inside a task runs
  there in threads, joblib's default for every backend.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

from joblib.parallel import (  # type: ignore[import-untyped]
    AutoBatchingMixin,
    BatchedCalls,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    register_parallel_backend,
)

from ._futures import GridExecutor
from ._sync import Executor
from ._text import shown
from .exceptions import InvalidRequest

__all__ = ["NAME", "GridboostBackend", "register"]

#: The name joblib knows the backend by: ``parallel_config(backend="gridboost")``.
NAME = "gridboost"

_log = logging.getLogger(__name__)
_BATCH_CODE = BatchedCalls.__call__.__code__  # where the frames of a batch begin

# What every Parallel call hands its backend's configure; a memory-mapping pool reads them, this backend has no use
# for them. Any other keyword of Parallel(...) is meant for a pool of joblib's (initializer=, idle_worker_timeout=).
_PARALLEL_OPTIONS = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "verbose", "context"})


class GridboostBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``"gridboost"`` backend: each batch of a ``Parallel`` call runs as one task of a gridboost grid.

    joblib builds it from ``parallel_config(backend="gridboost", ...)``'s keywords. ``executor``: a live
    :class:`gridboost.Executor`, or one from ``grid.executor()``, to run on (never shut down here). Or
    ``grid_options``: the keywords of :class:`gridboost.Executor` (``backend``, ``boost`` and the grid's options)
    for an executor of each ``Parallel`` call. Neither: a local grid, as ``grid_options={}``. Anything else
    raises :class:`~gridboost.exceptions.InvalidRequest`.
    """

    #: ``Parallel()`` with no ``n_jobs`` uses every CPU the grid can use, as joblib's Dask backend does.
    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        *,
        executor: GridExecutor | None = None,
        grid_options: Mapping[str, Any] | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise InvalidRequest(
                f"the {NAME} joblib backend takes executor= or grid_options=, not {', '.join(sorted(unknown))}"
            )
        if executor is not None and grid_options is not None:
            raise InvalidRequest(f"the {NAME} joblib backend takes executor= or grid_options=, not both")
        if executor is not None and not isinstance(executor, GridExecutor):
            raise InvalidRequest(f"executor= takes a gridboost.Executor or grid.executor(), got {shown(executor)}")
        if grid_options is not None and (
            not isinstance(grid_options, Mapping) or not all(isinstance(key, str) for key in grid_options)
        ):
            raise InvalidRequest(
                f"grid_options= takes a mapping of gridboost.Executor's keywords, got {shown(grid_options)}"
            )
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._bound = executor
        self._grid_options: dict[str, Any] = dict(grid_options or {})
        # What runs the batches now; named as joblib's own backends name their pool, which joblib's tests read.
        self._workers: GridExecutor | None = executor
        self._owned: Executor | None = None  # the executor of the current Parallel call, when this backend made it
        self._measured: int | None = None  # capacity of a grid from grid_options, for joblib.effective_n_jobs
        self._lock = threading.Lock()
        self._pending: set[futures.Future[Any]] = set()  # submitted, not done: what an abort cancels
        self._relay: _Relay | None = None

    def __repr__(self) -> str:
        how = "bound" if self._bound is not None else f"grid_options={self._grid_options!r}"
        return f"<{type(self).__name__} {how}>"

    # -- sizing ------------------------------------------------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches run at once: ``n_jobs``, a negative one counted back from the grid's CPUs."""
        if n_jobs == 0:
            raise InvalidRequest("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:  # joblib.effective_n_jobs(None) under parallel_config(n_jobs=None): what Parallel() gets
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return int(n_jobs)
        return max(self._capacity() + 1 + int(n_jobs), 1)

    def _capacity(self) -> int:
        executor = self._workers
        if executor is not None:
            return executor.capacity()
        # Outside a Parallel call (joblib.effective_n_jobs, which scikit-learn asks): measure a grid of these
        # options once, and keep the figure for this backend's life (one parallel_config block).
        if self._measured is None:
            with Executor(**self._grid_options) as probe:
                self._measured = probe.capacity()
        return self._measured

    # -- one Parallel call (or one managed `with Parallel(...)` block) ----------------------------------------------

    def configure(
        self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **options: Any
    ) -> int:
        """Start an executor from ``grid_options`` (none when bound) and return how many batches run at once."""
        if unknown := set(options) - _PARALLEL_OPTIONS:
            raise InvalidRequest(
                f"the {NAME} joblib backend takes none of Parallel's pool keywords {', '.join(sorted(unknown))} "
                "(those are loky's and multiprocessing's)"
            )
        self.parallel = parallel
        if n_jobs == 0:
            self.effective_n_jobs(n_jobs)  # raises, before a grid starts for nothing
        if n_jobs == 1:  # joblib runs these in the caller: no grid to start
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        if self._workers is None:
            self._owned = Executor(**self._grid_options)
            self._workers = self._owned
        try:
            n = self.effective_n_jobs(n_jobs)
        except BaseException:
            self._shutdown_owned()
            raise
        if n == 1:
            self._shutdown_owned()
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        return n

    def start_call(self) -> None:
        self._relay_of_call()

    def stop_call(self) -> None:
        self._close_relay()

    def terminate(self) -> None:
        """The call is over: shut down an executor this backend started (awaited); a bound one goes on."""
        self._close_relay()
        self._shutdown_owned()
        self.reset_batch_stats()

    def _shutdown_owned(self) -> None:
        owned, self._owned = self._owned, None
        self._workers = self._bound
        if owned is not None:
            owned.shutdown(wait=True, cancel_futures=True)

    def _relay_of_call(self) -> _Relay:
        with self._lock:
            if self._relay is None:
                self._relay = _Relay()
            return self._relay

    def _close_relay(self) -> None:
        with self._lock:
            relay, self._relay = self._relay, None
        if relay is not None:
            relay.close()

    # -- batches -----------------------------------------------------------------------------------------------------

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None) -> futures.Future[Any]:
        """Run one batch as one task of the grid; ``callback`` runs in the relay thread once it is done."""
        executor = self._workers
        if executor is None:
            raise InvalidRequest(f"the {NAME} joblib backend was given a batch outside a Parallel call")
        future = executor.submit(func)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            relay = self._relay_of_call()  # joblib called start_call first; a caller that did not gets one here
            future.add_done_callback(lambda done: relay.post(callback, done))
        return future

    # joblib before 1.5 calls apply_async; from 1.5 it calls submit, and apply_async is deprecated.
    apply_async = submit

    def retrieve_result_callback(self, out: futures.Future[Any]) -> Any:
        """The batch's results, or the exception of its first failing call, with its own type."""
        try:
            return out.result()
        except BaseException as error:
            _keep_frames(error)
            raise

    def _forget(self, future: futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """An error or a timeout ended the call: cancel every batch that has not started (running ones finish)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.cancel()


def _keep_frames(error: BaseException) -> None:
    """Keep, as a note, the frames of a batch that raised ``error`` in this process (a task in a thread).

    joblib drops the traceback of what a batch raised (it would hold the ``Parallel`` call), so the user would see
    none of their own frames; joblib's own pools send the text instead. A batch that ran in another process or on a
    cluster has no frames here: its engine's traceback came with it (a note, or its cause).
    """
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code is not _BATCH_CODE:
        tb = tb.tb_next
    if tb is not None:
        frames = "".join(traceback.format_tb(tb)).rstrip()
        error.add_note(f"The batch's traceback (most recent call last):\n{frames}")


class _Relay:
    """A thread that runs joblib's completion callbacks in order, off the grid's loop thread, until closed."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], Any], Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gridboost-joblib-callbacks", daemon=True)
        self._thread.start()

    def post(self, callback: Callable[[Any], Any], future: Any) -> None:
        self._queue.put((callback, future))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, future = item
            try:
                callback(future)
            except Exception:  # joblib's callback records a batch's own errors; this is joblib failing
                _log.exception("a joblib completion callback raised")

    def close(self) -> None:
        """Run what was posted, then end the thread (awaited, unless called from the thread itself)."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def register() -> None:
    """Register the backend with joblib as ``"gridboost"`` (importing this module already did)."""
    register_parallel_backend(NAME, GridboostBackend)


register()
