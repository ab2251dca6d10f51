"""Where a lease goes on Dask's workers: its bundles, and a worker for each (what the lease registry decides with).

Pure functions of amounts (flat mappings of resource names to numbers) and rooms (what each worker has, by address),
apart from the registry so that it can also ask them "would this request fit once those leases are gone" when it picks
leases to take back. Shipped *by value* with ``_worker`` (standard library only), so it runs on a scheduler that
does not have gridboost-dask installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["add", "fits", "missing", "place", "split"]

_EPS = 1e-9

Amounts = dict[str, float]


def fits(amounts: Mapping[str, float], room: Mapping[str, float]) -> bool:
    """Whether ``amounts`` fit in ``room`` (a name ``room`` lacks has none)."""
    return all(value <= room.get(key, 0.0) + _EPS for key, value in amounts.items() if value)


def add(into: Amounts, amounts: Mapping[str, float], sign: float = 1.0) -> None:
    """Add ``amounts`` (times ``sign``) into ``into``."""
    for key, value in amounts.items():
        into[key] = into.get(key, 0.0) + sign * value


def missing(amounts: Mapping[str, float], room: Mapping[str, float]) -> Amounts:
    """What ``room`` lacks of ``amounts``."""
    return {k: v - room.get(k, 0.0) for k, v in amounts.items() if v > room.get(k, 0.0) + _EPS}


def split(amounts: Mapping[str, float], strategy: str, one_node: bool) -> list[Amounts]:
    """The bundles of a lease, as for Ray's placement groups.

    ``strict_pack`` (and ``pack`` when one worker could hold it all): one bundle. Otherwise ``k`` equal bundles, ``k``
    being the lease's whole CPUs (its whole GPUs when it has no CPU; at least 1); memory stays in whole bytes.
    """
    if strategy == "strict_pack" or (strategy == "pack" and one_node):
        return [dict(amounts)]
    cpu, gpu = amounts.get("cpu", 0.0), amounts.get("GPU", 0.0)
    k = max(1, int(cpu) if cpu >= 1 else int(gpu))
    bundles: list[Amounts] = [{} for _ in range(k)]
    for key, value in amounts.items():
        if key == "memory":
            base, extra = divmod(int(value), k)
            for i, bundle in enumerate(bundles):
                bundle[key] = float(base + (i < extra))
        else:
            for bundle in bundles:
                bundle[key] = value / k
    return bundles


def place(bundles: Sequence[Mapping[str, float]], rooms: Mapping[str, Amounts], strategy: str) -> list[str] | None:
    """A worker for each bundle, or ``None``: pack fills the fullest worker first, spread uses each once first."""
    left = {addr: dict(room) for addr, room in rooms.items()}
    chosen: list[str] = []
    for bundle in bundles:
        fitting = [addr for addr, room in left.items() if fits(bundle, room)]
        if strategy == "strict_spread":
            fitting = [addr for addr in fitting if addr not in chosen]
        if not fitting:
            return None
        if strategy in ("spread", "strict_spread"):
            # Least used by this lease, then most room: spread out.
            addr = min(fitting, key=lambda a: (chosen.count(a), -left[a].get("cpu", 0.0), a))
        else:
            # Already used by this lease, then least room that fits: pack tight.
            addr = min(fitting, key=lambda a: (a not in chosen, left[a].get("cpu", 0.0), a))
        chosen.append(addr)
        add(left[addr], bundle, -1.0)
    return chosen
