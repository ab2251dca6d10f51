"""What the benchmark scripts share: command-line helpers, interleaved runs and a private multi-node Ray cluster."""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def half_range(values: list[float]) -> float:
    """Half the min-max range of ``values``, relative to their median: how far to trust the median here."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle / 2 if middle else 0.0


async def interleaved(
    measures: Mapping[str, Callable[[int], Awaitable[float]]], calls: int, warm: int, reps: int
) -> dict[str, list[float]]:
    """Each measure once with ``warm`` calls, then ``reps`` rounds of all with ``calls``, in an order that rotates
    each round; the seconds each run took, by key. A burst of noise on a shared machine lands on several sides."""
    keys = list(measures)
    for key in keys:
        await measures[key](warm)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for rep in range(reps):
        shift = rep % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            gc.collect()  # start each run from the same heap state; GC during the run still counts
            samples[key].append(await measures[key](calls))
    return samples


@contextmanager
def private_ray_cluster(
    workers: int,
    worker_cpus: int,
    *,
    prefix: str,
    ships: ModuleType,
    system_config: dict[str, object] | None = None,
    resources: dict[str, float] | None = None,
) -> Iterator[str]:
    """A head (0 CPUs) and ``workers`` nodes of ``worker_cpus`` (and custom ``resources``), the driver joined;
    yields the address.

    Everything lives in a temporary directory of its own and is removed after; ``ships`` is the script's module,
    whose functions travel to Ray's workers by value (they cannot import a benchmark script). ``system_config`` is
    the head's ``_system_config`` (what ``ray start --system-config`` sets), which every process of the cluster uses.
    """
    session_dir = tempfile.mkdtemp(prefix=prefix)
    # Set before ray is imported (the nodes inherit them):
    # - RAY_TMPDIR: Cluster records its address in, and at shutdown deletes, "ray_current_cluster" in Ray's default
    #   temp dir; with this it is ours, not the machine's /tmp/ray, and no other Ray here is touched.
    # - RAY_AUTH_*: token authentication (Ray's default since 2.60) with a token that never touches ~/.ray.
    os.environ["RAY_TMPDIR"] = session_dir
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.pop("RAY_ADDRESS", None)
    cluster = None
    try:
        import ray
        import ray.cloudpickle
        from ray.cluster_utils import Cluster

        ray.cloudpickle.register_pickle_by_value(ships)  # type: ignore[no-untyped-call]
        temp_dir = os.path.join(session_dir, "ray")
        os.makedirs(temp_dir)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "dashboard_agent_listen_port": None,  # a free port, not the default one another Ray may hold
                "temp_dir": temp_dir,
                **({"_system_config": system_config} if system_config else {}),
            },
        )
        for _ in range(workers):
            cluster.add_node(num_cpus=worker_cpus, resources=resources or {})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield str(cluster.address)
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        if cluster is not None:
            cluster.shutdown()  # type: ignore[no-untyped-call]  # the processes its nodes started, and only those
        shutil.rmtree(session_dir, ignore_errors=True)
