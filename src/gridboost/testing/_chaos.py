"""A seeded random owner of leases: what the no-double-booking tests of a shared cluster run in several processes."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anyio

from .._boost import Boost
from .._records import Priority
from ..exceptions import GridboostError
from ._work import nap

__all__ = ["lease_chaos"]


async def lease_chaos(
    grid: Any,
    seed: int,
    ops: int,
    *,
    unit: str = "cpu",
    work: str | None = None,
    on_step: Callable[[int], None] = lambda step: None,
) -> dict[str, int]:
    """``ops`` seeded random steps on ``grid``: request a boost of one or two ``unit`` (random priority,
    preemptibility, short wait and TTL), release one held, renew one held, or run a short nap under one.

    Returns how often each outcome happened: ``granted``, ``released``, ``renewed``, ``worked``, or the name of the
    ``GridboostError`` a step raised (a boost not granted in time, one expired or taken back meanwhile). Every boost
    still held at the end is released. ``work`` is what a nap asks for (``"slot=1"`` where a boost holds no CPU);
    ``on_step(i)`` is called after each step, for a driver that stops or kills the process midway.
    """
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    held: list[Boost] = []

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    for step in range(ops):
        held = [b for b in held if b.is_active]
        roll = rng.random()
        try:
            if roll < 0.45 or not held:
                boost = await grid.request_boost(
                    f"{unit}={rng.choice((1, 1, 2))}",
                    ttl=rng.uniform(1.5, 4.0),
                    priority=rng.choice(list(Priority)),
                    preemptible=rng.random() < 0.5,
                    wait=rng.uniform(0.2, 1.5),
                )
                held.append(boost)
                count("granted")
            elif roll < 0.65:
                await held.pop(rng.randrange(len(held))).release()
                count("released")
            elif roll < 0.85:
                await held[rng.randrange(len(held))].renew(rng.uniform(1.5, 4.0))
                count("renewed")
            else:
                where = held[rng.randrange(len(held))]
                await grid.offload(nap, rng.uniform(0.05, 0.3), where=where, resources=work)
                count("worked")
        except GridboostError as exc:
            count(type(exc).__name__)
        on_step(step)
        await anyio.sleep(rng.uniform(0.0, 0.1))
    for boost in held:
        if boost.is_active:
            await boost.release()
            count("released")
    return counts
