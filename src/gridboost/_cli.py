"""The ``gridboost`` command: look at a cluster, take and give back leases, check an install, run the demo.

Every command takes ``--backend`` / ``--address`` (or ``GRIDBOOST_BACKEND`` / ``GRIDBOOST_ADDRESS``) and ``--json``.
A user's mistake (an unknown backend, an unreachable address, ``cpu=-1``) ends in one line on stderr and exit status 1
(2 for a malformed command line); a traceback means a bug in gridboost.

``rich`` draws the tables and is imported only here, so the library itself never pays for it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import anyio

from ._grid import Grid
from ._plugins import quiet_engine_logs
from ._pressure import DIMENSIONS, Pressure
from ._records import ClusterSnapshot, Lease, Quota, priority_of
from ._resources import Resources
from .exceptions import GridboostError, InvalidRequest

__all__ = ["main"]

_WATCH_EVERY = 1.0  # seconds between redraws of `status --watch`
_ENGINES = {"ray": ("gridboost-ray", "ray"), "dask": ("gridboost-dask", "distributed")}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Any:
    """A table whose first column (an id: a lease, a node, a worker's address) is never cut, whatever the width."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for index, column in enumerate(columns):
        if index == 0:
            table.add_column(
                column, no_wrap=True, overflow="ignore", min_width=max((len(str(r[0])) for r in rows), default=1)
            )
        else:
            table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    return table


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def _human(resources: Resources) -> str:
    return resources.human()


# -- what the commands show ----------------------------------------------------------------------------------------


def _lease_json(lease: Lease) -> dict[str, Any]:
    return {
        "id": lease.id,
        "backend": lease.backend,
        "owner": lease.owner,
        "state": lease.state,
        "priority": lease.priority.name,
        "resources": str(lease.resources),
        "expires_at": lease.expires_at,
        "ttl_left": round(lease.ttl_left, 3),
        "placements": list(lease.placements),
        "token": lease.token,
        "tenant": lease.tenant,
        "preemptible": lease.preemptible,
        "waited": round(lease.waited, 3),
    }


def _lease_rows(leases: Sequence[Lease]) -> list[list[object]]:
    return [
        [
            le.id,
            le.state,
            le.priority.name + (" (preemptible)" if le.preemptible else ""),
            _human(le.resources),
            le.tenant,
            le.owner,
            le.token or "",
            f"waited {_seconds(le.waited)}" if le.state == "pending" else _seconds(le.ttl_left),
            ", ".join(le.placements),
        ]
        for le in leases
    ]


_LEASE_COLUMNS = ("lease", "state", "priority", "resources", "tenant", "owner", "token", "ttl left", "nodes")


def _quota_rows(quotas: Sequence[Quota]) -> list[list[object]]:
    return [[q.tenant, _human(q.limit), _human(q.used) if q.used else "nothing"] for q in quotas]


def _quota_json(quota: Quota) -> dict[str, Any]:
    return {"tenant": quota.tenant, "limit": str(quota.limit), "used": str(quota.used)}


def _snapshot_json(snapshot: ClusterSnapshot) -> list[dict[str, Any]]:
    return [
        {
            "id": n.id,
            "address": n.address,
            "alive": n.alive,
            "local": n.is_local,
            "total": str(n.total),
            "available": str(n.available),
            "labels": dict(n.labels),
        }
        for n in snapshot.nodes
    ]


# -- the commands --------------------------------------------------------------------------------------------------


async def _status(grid: Grid, args: argparse.Namespace) -> Any:
    if args.watch and not args.json:
        await _watch(grid)
        return None
    snapshot = await grid.snapshot()
    leases = list(await grid.leases())
    pressure = await grid.pressure()
    if args.json:
        return {
            "backend": snapshot.backend,
            "nodes": _snapshot_json(snapshot),
            "pressure": {
                "level": pressure.level,
                "high": sorted(pressure.high_dimensions),
                "utilization": {d: pressure.value(d) for d in DIMENSIONS if pressure.value(d) is not None},
            },
            "leases": [_lease_json(le) for le in leases],
        }
    console = _console()
    for part in _status_view(snapshot, leases, pressure):
        console.print(part)
    return None


async def _watch(grid: Grid) -> None:
    """Redraw the status every second until Ctrl-C, which ends it cleanly (the grid closed, exit 0)."""
    from rich.console import Group
    from rich.live import Live

    async def view() -> Any:
        return Group(*_status_view(await grid.snapshot(), list(await grid.leases()), await grid.pressure()))

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def until_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(until_signal)
            with Live(await view(), console=_console(), auto_refresh=False) as live:
                while True:
                    await anyio.sleep(_WATCH_EVERY)
                    live.update(await view(), refresh=True)


def _status_view(snapshot: ClusterSnapshot, leases: Sequence[Lease], pressure: Pressure) -> list[Any]:
    rows = [
        [
            n.id,
            "yes" if n.alive else "no",
            "yes" if n.is_local else "",
            _human(n.total),
            _human(n.available),
            ", ".join(f"{k}={v}" for k, v in n.labels.items() if not k.startswith("ray.io/")),
        ]
        for n in snapshot.nodes
    ]
    nodes = _table(f"{snapshot.backend}: nodes", ("node", "alive", "local", "total", "available", "labels"), rows)
    dims = ", ".join(f"{d} {v:.0%}" for d in DIMENSIONS if (v := pressure.value(d)) is not None)
    level = f"local pressure: [bold]{pressure.level}[/bold] ({dims or 'nothing measured'})"
    return [nodes, level, _table("leases", _LEASE_COLUMNS, _lease_rows(leases)) if leases else "leases: none"]


def _labels(pairs: Sequence[str]) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--label takes KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels or None


async def _boost_request(grid: Grid, args: argparse.Namespace) -> Any:
    lease = await grid.request_lease(
        args.resources,
        ttl=args.ttl,
        priority=priority_of(args.priority),
        wait=args.wait,
        strategy=args.strategy,
        nodes=args.node or None,
        labels=_labels(args.label),
        preemptible=args.preemptible,
    )
    if args.json:
        return _lease_json(lease)
    _console().print(
        f"lease [bold]{lease.id}[/bold]: {_human(lease.resources)} on {', '.join(lease.placements)}, "
        f"expires in {_seconds(lease.ttl_left)}"
    )
    return None


async def _boost_list(grid: Grid, args: argparse.Namespace) -> Any:
    leases = list(await grid.leases())
    if args.json:
        return [_lease_json(le) for le in leases]
    _console().print(_table("leases", _LEASE_COLUMNS, _lease_rows(leases)) if leases else "leases: none")
    return None


async def _quota_set(grid: Grid, args: argparse.Namespace) -> Any:
    await grid.set_quota(args.tenant_name, args.limit)
    return await _quota_list(grid, args)


async def _quota_clear(grid: Grid, args: argparse.Namespace) -> Any:
    await grid.set_quota(args.tenant_name, None)
    return await _quota_list(grid, args)


async def _quota_list(grid: Grid, args: argparse.Namespace) -> Any:
    quotas = list(await grid.quotas())
    if args.json:
        return [_quota_json(q) for q in quotas]
    _console().print(_table("quotas", ("tenant", "quota", "in use"), _quota_rows(quotas)) if quotas else "quotas: none")
    return None


async def _lease_id(grid: Grid, given: str) -> str:
    """The id of the one lease on the cluster whose id starts with ``given`` (a whole id is its own prefix)."""
    ids = [lease.id for lease in await grid.leases()]
    if given in ids:
        return given
    matches = [i for i in ids if i.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise InvalidRequest(f"no lease on this cluster has an id starting with {given!r} (see: gridboost boost list)")
    raise InvalidRequest(f"{given!r} starts {len(matches)} lease ids ({', '.join(matches[:4])}): give more of it")


async def _boost_renew(grid: Grid, args: argparse.Namespace) -> Any:
    lease = await grid.renew_lease(await _lease_id(grid, args.id), args.ttl)
    if args.json:
        return _lease_json(lease)
    _console().print(f"lease [bold]{lease.id}[/bold] renewed: expires in {_seconds(lease.ttl_left)}")
    return None


async def _boost_release(grid: Grid, args: argparse.Namespace) -> Any:
    lease_id = await _lease_id(grid, args.id)
    await grid.release_lease(lease_id)
    if args.json:
        return {"released": lease_id}
    _console().print(f"lease [bold]{lease_id}[/bold] released")
    return None


async def _scan(grid: Grid, args: argparse.Namespace) -> Any:
    found = await grid.scan_processes()
    if args.json:
        return [
            {
                "kind": r.kind,
                "what": r.what,
                "pid": r.pid,
                "task_id": r.task_id,
                "needed": str(r.needed),
                "destination": r.destination,
                "resource_match": {
                    k: {"needed": m.needed, "available": m.available} for k, m in r.resource_match.items()
                },
                "migration_complexity": r.migration_complexity,
                "confidence": r.confidence,
                "reason": r.reason,
            }
            for r in found
        ]
    rows = [
        [
            r.pid or r.task_id,
            r.what,
            r.needed,
            r.destination or "-",
            r.migration_complexity,
            f"{r.confidence:.0%}",
            r.reason,
        ]
        for r in found
    ]
    columns = ("pid / task", "what", "needs", "could go to", "migration", "confidence", "why")
    _console().print(_table("offload recommendations", columns, rows) if rows else "nothing worth offloading")
    return None


def _plugins(args: argparse.Namespace) -> Any:
    import warnings

    from ._plugins import GridPluginManager, builtin
    from ._policy import DefaultPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load failures are part of the report below
        pm = GridPluginManager.for_grid(policy=DefaultPolicy())
    owners = pm.backend_owners()
    plugins = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        backends = sorted(backend for backend, owner in owners.items() if owner == name)
        kind = "built-in" if builtin(name) else "entry point"
        plugins.append({"name": name, "kind": kind, "hooks": hooks, "backends": backends})
    failed = [{"name": name, "error": error} for name, error in pm.load_errors]
    if args.json:
        return {"plugins": plugins, "failed": failed}
    console = _console()
    rows = [[p["name"], p["kind"], ", ".join(p["backends"]), ", ".join(p["hooks"])] for p in plugins]
    console.print(_table("plugins", ("plugin", "kind", "backends", "hooks"), rows))
    for entry in failed:
        console.print(f"[red]failed to load[/red] {entry['name']}: {entry['error']}")
    return None


def _doctor(args: argparse.Namespace) -> Any:
    from . import _nvml
    from ._plugins import ENTRY_POINT_GROUP, install_hint, load_entry_point_plugins

    gpus = _nvml.inventory()
    _, failed = load_entry_point_plugins(os.environ.get("GRIDBOOST_LOAD_PLUGINS"))
    engines = {
        name: {"plugin": _version(plugin), "engine": _version(engine), "engine_package": engine}
        for name, (plugin, engine) in _ENGINES.items()
    }
    advice = []
    for name, info in engines.items():
        if info["plugin"] is None:
            advice.append(f"for the {name} backend: {install_hint(name)}")
    if not gpus:
        advice.append("no GPU seen through NVML (no NVIDIA driver here): GPU pressure reads as 'no GPU'")
    for name, error in failed:
        advice.append(f"plugin {name!r} (entry point group {ENTRY_POINT_GROUP!r}) fails to load: {error}")
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gridboost": _version("gridboost"),
        "engines": engines,
        "nvml": _version("nvidia-ml-py"),
        "gpus": [{"index": g.index, "name": g.name, "memory_total": g.memory_total} for g in gpus],
        "plugin_errors": [{"name": n, "error": e} for n, e in failed],
        "advice": advice,
    }
    if args.json:
        return report
    console = _console()
    console.print(f"Python {report['python']} on {report['platform']}; gridboost {report['gridboost']}")
    rows = [
        [name, info["plugin"] or "not installed", f"{info['engine_package']} {info['engine'] or '-'}"]
        for name, info in engines.items()
    ]
    console.print(_table("engines", ("backend", "plugin", "engine"), rows))
    console.print(
        f"NVML bindings (nvidia-ml-py): {report['nvml'] or 'not installed'}; GPUs: "
        + (", ".join(f"{g.index}: {g.name}" for g in gpus) or "none")
    )
    for line in advice:
        console.print(f"- {line}")
    return None


# -- wiring --------------------------------------------------------------------------------------------------------


def _common(*, defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes. Only the top level has defaults: a subcommand's copy with defaults of its
    own would overwrite what was given before the command (argparse applies a subparser's defaults last)."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        default=default(None),
        help="backend name: local, ray, dask (env GRIDBOOST_BACKEND; default local; for the demo, dask when its "
        "plugin is installed)",
    )
    common.add_argument(
        "--address",
        default=default(os.environ.get("GRIDBOOST_ADDRESS") or None),
        help="cluster address for the backend (env GRIDBOOST_ADDRESS; default: its embedded engine)",
    )
    common.add_argument(
        "--connect-timeout",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="seconds to reach the cluster before giving up (default: the backend's own)",
    )
    common.add_argument(
        "--tenant",
        default=default(None),
        help="whose quota the leases taken here count against (default: user@host)",
    )
    common.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of tables")
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    parser = argparse.ArgumentParser(
        prog="gridboost",
        description="See pressure, boost capacity, offload work — and tear it all down for sure.",
        parents=[_common(defaults=True)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", parents=[common], help="nodes, local pressure, and the cluster's leases")
    status.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")

    boost = commands.add_parser("boost", parents=[common], help="take, list, renew and release leases")
    actions = boost.add_subparsers(dest="action", required=True, metavar="ACTION")
    request = actions.add_parser("request", parents=[common], help="take a lease that lasts until its TTL")
    request.add_argument("resources", help='what to hold, e.g. "cpu=2,memory=4GiB"')
    request.add_argument("--ttl", type=float, required=True, help="seconds the lease lasts unless renewed")
    request.add_argument("--priority", default="normal", help="low, normal, high or critical (default normal)")
    request.add_argument("--wait", type=float, default=30.0, help="seconds to wait for capacity (default 30)")
    request.add_argument("--strategy", default="pack", help="pack, spread, strict_pack or strict_spread")
    request.add_argument("--label", action="append", default=[], help="KEY=VALUE a node must carry (repeatable)")
    request.add_argument("--node", action="append", default=[], help="a node id or address to use (repeatable)")
    request.add_argument(
        "--preemptible", action="store_true", help="a higher-priority request of another owner may take it back"
    )
    actions.add_parser("list", parents=[common], help="every lease on the cluster, of any owner")
    renew = actions.add_parser("renew", parents=[common], help="extend a lease to TTL seconds from now")
    renew.add_argument("id", help="the lease's id, or a prefix of it that only it has")
    renew.add_argument("--ttl", type=float, required=True)
    release = actions.add_parser("release", parents=[common], help="give a lease back now")
    release.add_argument("id", help="the lease's id, or a prefix of it that only it has")

    quota = commands.add_parser("quota", parents=[common], help="cap what a tenant's leases may hold together")
    quotas = quota.add_subparsers(dest="action", required=True, metavar="ACTION")
    setting = quotas.add_parser("set", parents=[common], help="set a tenant's quota")
    setting.add_argument("tenant_name", metavar="TENANT", help="the tenant, e.g. team-a (default tenants: user@host)")
    setting.add_argument("limit", metavar="RESOURCES", help='what its leases may hold together, e.g. "cpu=8,gpu=1"')
    quotas.add_parser("list", parents=[common], help="every quota, with what its tenant's leases hold now")
    clearing = quotas.add_parser("clear", parents=[common], help="remove a tenant's quota")
    clearing.add_argument("tenant_name", metavar="TENANT")

    commands.add_parser("plugins", parents=[common], help="installed plugins, their hooks and backends, load errors")
    commands.add_parser("doctor", parents=[common], help="Python, engines, NVML and GPUs, and what to install")
    commands.add_parser("scan", parents=[common], help="processes of this machine worth offloading")
    demo = commands.add_parser("demo", parents=[common], help="a burst of work, a boost, and everything given back")
    demo.add_argument("--tasks", type=int, default=48, help="how many tasks the burst has (default 48)")
    return parser


_ON_A_GRID: Mapping[tuple[str, str | None], Callable[[Grid, argparse.Namespace], Awaitable[Any]]] = {
    ("status", None): _status,
    ("boost", "request"): _boost_request,
    ("boost", "list"): _boost_list,
    ("boost", "renew"): _boost_renew,
    ("boost", "release"): _boost_release,
    ("quota", "set"): _quota_set,
    ("quota", "list"): _quota_list,
    ("quota", "clear"): _quota_clear,
    ("scan", None): _scan,
}


# Leases from these outlive the command: on a private engine that ends with the command, they would be a lie.
_NEED_A_CLUSTER = {("boost", "request"), ("boost", "renew"), ("boost", "release"), ("quota", "set"), ("quota", "clear")}


async def _on_a_grid(command: Callable[[Grid, argparse.Namespace], Awaitable[Any]], args: argparse.Namespace) -> Any:
    if args.address is not None and args.backend == "local":
        raise InvalidRequest("--address names a cluster, and the local backend is this machine: add --backend ray|dask")
    options: dict[str, Any] = {} if args.address is None else {"address": args.address}
    if args.connect_timeout is not None and args.backend != "local":
        options["connect_timeout"] = args.connect_timeout
    grid = Grid(args.backend, tenant=args.tenant, **options)
    private = args.address is None and grid.backend.capabilities.remote
    if private and (args.command, getattr(args, "action", None)) in _NEED_A_CLUSTER:
        raise InvalidRequest(
            f"a lease must live on a running {args.backend} cluster: give --address (or GRIDBOOST_ADDRESS); "
            f"without it the {args.backend} backend starts a private engine that ends with this command"
        )
    async with grid:
        return await command(grid, args)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Log records below ERROR dropped while a command runs: stderr carries the command's own error line, not an
    engine's chatter (Ray logs "Connecting to existing Ray cluster..." and a warning on every ``ray.init``)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _default_backend(command: str) -> str:
    """The environment's backend, else local; the demo shows the real thing, on Dask, when its plugin is there."""
    chosen = os.environ.get("GRIDBOOST_BACKEND")
    if chosen:
        return chosen
    if command == "demo" and _version(_ENGINES["dask"][0]) is not None:
        return "dask"
    return "local"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.backend is None:
        args.backend = _default_backend(args.command)
    if args.command != "plugins":  # `plugins` reports load failures itself
        quiet_engine_logs()
    try:
        with _quiet_logs():
            if args.command == "demo":
                from ._demo import run_demo

                return run_demo(backend=args.backend, tasks=args.tasks, address=args.address)
            if args.command == "plugins":
                result = _plugins(args)
            elif args.command == "doctor":
                result = _doctor(args)
            else:
                command = _ON_A_GRID[(args.command, getattr(args, "action", None))]
                result = anyio.run(_on_a_grid, command, args)
    except (GridboostError, ValueError) as exc:  # InvalidRequest is a ValueError; both name the problem
        print(f"gridboost: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gridboost: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0
