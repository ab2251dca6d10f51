"""Plugin discovery and the per-grid plugin manager.

Built-in plugins (the local backend, the default policy) register through the same
hooks as third-party ones; the only difference is that they need no entry point.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import pluggy

from . import hookspecs
from ._text import did_you_mean, shown
from .abc import Backend, BackendSpec
from .exceptions import InvalidRequest, PluginError, PolicyError, UnknownBackend
from .hookspecs import OBSERVERS

if TYPE_CHECKING:
    from pathlib import Path

# importlib.metadata, json, pathlib and urllib are imported where used (a grid's first start, a hint for a missing
# plugin): importlib.metadata alone is a fifth of what `import gridboost` would cost (tests/test_import_cost.py).

__all__ = ["GridPluginManager", "PluginLoadWarning", "hookimpl", "load_entry_point_plugins", "quiet_engine_logs"]

log = logging.getLogger("gridboost")

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)
"""Marker for hook implementations: ``@gridboost.hookimpl``."""

ENTRY_POINT_GROUP = "gridboost"
LOAD_ENV = "GRIDBOOST_LOAD_PLUGINS"
_BUILTINS = ("gridboost._local", "gridboost._policy")  # the policy: one bound instance per grid
# Called one implementation at a time (each isolated, see _observers), so a wrapper of one would wrap nothing.
_CALLED_ONE_BY_ONE = frozenset({"gridboost_backends", *OBSERVERS})
_PLUGIN_DISTRIBUTIONS = {"ray": "gridboost-ray", "dask": "gridboost-dask"}


def quiet_engine_logs(level: int = logging.ERROR, *, plugins: Iterable[object] = ()) -> None:
    """Keep the engines' log chatter off the terminal, as the ``gridboost`` command and its demo do.

    For every backend an installed plugin provides: its engine's loggers (Ray's
    ``SIGTERM handler is not set``, Dask's INFO lines) show only records at ``level`` and
    above, and the environment variables that quiet what the engine prints by other means
    (Ray's C++ core) are set, where the environment does not set them already. Call it
    once, before the first grid starts its engine; gridboost's own logger is left as it is.
    ``plugins`` are the app's own, as given to ``Grid(plugins=...)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plugin that fails to load says so when a grid loads it
        specs = GridPluginManager.for_grid(plugins).backend_specs()
    for spec in specs.values():
        for name in spec.loggers:
            logging.getLogger(name).setLevel(level)
        for key, value in spec.quiet_env.items():
            os.environ.setdefault(key, value)


def install_hint(backend: str) -> str | None:
    """A command that installs the plugin of ``backend`` from where the user stands.

    From a clone of the repository (the core installed from a folder that has the plugin's folder beside it, as pip
    records in ``direct_url.json``), the plugin's folder with the core's — a lone plugin folder would look for the
    core on the package index; elsewhere, the core's extra.
    """
    dist = _PLUGIN_DISTRIBUTIONS.get(backend)
    if dist is None:
        return None
    source = _installed_from()
    if source is not None and (source / "plugins" / dist / "pyproject.toml").is_file():
        core = _relative(source)
        return f"pip install {core} {_relative(source / 'plugins' / dist)}"
    return f'pip install "gridboost[{backend}]"'


def _installed_from() -> Path | None:
    """The local folder pip installed gridboost from, if it was one."""
    import importlib.metadata
    import json
    import urllib.parse
    from pathlib import Path

    try:
        record = importlib.metadata.distribution("gridboost").read_text("direct_url.json")
        url = str(json.loads(record or "{}").get("url", ""))
    except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError):
        return None
    if not url.startswith("file://"):
        return None
    folder = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return folder if folder.is_dir() else None


def _relative(path: Path) -> str:
    from pathlib import Path

    try:
        inside = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return "." if inside == Path() else f"./{inside}"


class PluginLoadWarning(UserWarning):
    """An installed gridboost plugin failed to load; the grid goes on without it."""


@functools.cache
def load_entry_point_plugins(
    selection: str | None,
) -> tuple[tuple[tuple[str, object], ...], tuple[tuple[str, str], ...]]:
    """Import the plugins of the ``gridboost`` entry-point group once per process.

    ``selection`` is the value of ``GRIDBOOST_LOAD_PLUGINS``: ``None`` loads all, an
    empty string none, a comma list those named. Returns (name, plugin) pairs and
    (name, error) pairs for plugins that failed to import.
    """
    import importlib.metadata

    wanted = None if selection is None else {s.strip() for s in selection.split(",") if s.strip()}
    loaded: list[tuple[str, object]] = []
    failed: list[tuple[str, str]] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        try:
            loaded.append((ep.name, ep.load()))
        except Exception as exc:  # a broken plugin must not take the host app down
            failed.append((ep.name, f"{type(exc).__name__}: {exc}"))
    return tuple(loaded), tuple(failed)


class GridPluginManager(pluggy.PluginManager):
    """A pluggy manager for one grid; remembers when its set of plugins changes.

    The grid caches per-hook implementation lists on the hot path; ``version``
    tells it when to look again.
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.version = 0
        self.load_errors: tuple[tuple[str, str], ...] = ()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        if name is None and not isinstance(plugin, ModuleType):
            # pluggy would name an instance by its id(); errors should name its class.
            name = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
            if self.has_plugin(name):
                name = f"{name}@{id(plugin):x}"
        result = super().register(plugin, name)
        self.version += 1
        refused = [
            caller.name
            for caller in self.get_hookcallers(plugin) or ()
            if caller.name in _CALLED_ONE_BY_ONE
            and any(impl.plugin is plugin and (impl.wrapper or impl.hookwrapper) for impl in caller.get_hookimpls())
        ]
        if refused:
            self.unregister(plugin)
            raise PluginError(
                f"plugin {shown(plugin)} wraps {refused[0]}, which gridboost calls one implementation at a time "
                "(an observer that fails must not stop the others): implement it as a plain hook"
            )
        return result

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        result = super().unregister(plugin, name)
        self.version += 1
        return result

    @classmethod
    def for_grid(cls, extra: Iterable[object] = (), *, policy: object = None) -> GridPluginManager:
        """Built-ins (the local backend; ``policy``, the grid's default policy, if given), then entry-point
        plugins (warning on failures), then the app's own."""
        pm = cls()
        pm.register(__import__("gridboost._local", fromlist=["_"]), name="gridboost._local")
        if policy is not None:
            pm.register(policy, name="gridboost._policy")
        loaded, failed = load_entry_point_plugins(os.environ.get(LOAD_ENV))
        for name, plugin in loaded:
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=f"entrypoint:{name}")
        for name, error in failed:
            warnings.warn(f"gridboost plugin {name!r} failed to load: {error}", PluginLoadWarning, stacklevel=3)
        pm.load_errors = failed
        if isinstance(extra, str | bytes | Mapping) or not isinstance(extra, Iterable):
            raise InvalidRequest(f"plugins must be a list of plugin objects or modules, got {shown(extra)}")
        for plugin in list(extra):
            if plugin is None or isinstance(plugin, str | bytes | int | float | list | dict | tuple | set):
                raise InvalidRequest(f"a plugin is an object or module with hook implementations, got {shown(plugin)}")
            try:
                pm.register(plugin)
            except PluginError:
                raise
            except Exception as exc:  # registered twice, a bad hookimpl, an object that breaks pluggy's own checks
                raise PluginError(f"plugin {shown(plugin)} cannot be registered: {shown(exc, 100)}") from exc
        return pm

    def backend_specs(self) -> dict[str, BackendSpec]:
        """Every backend every plugin provides, by name; a name given twice is an error."""
        return self._backends()[0]

    def backend_owners(self) -> dict[str, str]:
        """The name of the plugin that provides each backend."""
        return self._backends()[1]

    def _backends(self) -> tuple[dict[str, BackendSpec], dict[str, str]]:
        specs: dict[str, BackendSpec] = {}
        owners: dict[str, str] = {}
        for impl in self.hook.gridboost_backends.get_hookimpls():
            try:
                results = impl.function()
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in gridboost_backends: {exc!r}") from exc
            if isinstance(results, BackendSpec):  # returned one instead of yielding it: meant the same
                results = [results]
            for spec in cast("Iterable[object]", results or ()):
                if not isinstance(spec, BackendSpec):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} yielded {spec!r} from gridboost_backends, not a BackendSpec"
                    )
                if spec.name in specs:
                    raise PluginError(
                        f"backend {spec.name!r} is provided by both {owners[spec.name]!r} and {impl.plugin_name!r}"
                    )
                specs[spec.name] = spec
                owners[spec.name] = impl.plugin_name
        return specs, owners

    @staticmethod
    def install_hint(name: str) -> str | None:
        return install_hint(name)

    def make_backend(self, name: object, options: Mapping[str, Any], grid_options: Sequence[str]) -> Backend:
        """The backend ``name`` built with ``options``, each checked against the ones its plugin declares.

        ``grid_options`` are the grid's own keyword names, for the hint when an option was meant for it.
        """
        specs = self.backend_specs()
        if not isinstance(name, str):
            raise InvalidRequest(f"backend must be a backend's name (a string), got {shown(name)}")
        if name not in specs:
            raise UnknownBackend(name, sorted(specs), install_hint(name))
        spec = specs[name]
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise InvalidRequest(_unknown_options(name, unknown, spec.options, specs, grid_options))
        return spec.factory(**options)

    def plugin_names(self) -> Sequence[str]:
        return [name for name, _ in self.list_name_plugin()]

    def observer_impls(self, hook: str) -> list[tuple[Callable[..., Any], tuple[str, ...], str]]:
        """Each implementation of an observer ``hook`` as (function, argument names, plugin name), in pluggy's order."""
        impls = getattr(self.hook, hook).get_hookimpls()
        return [(impl.function, tuple(impl.argnames), impl.plugin_name) for impl in reversed(impls)]

    def decision_is_default(self, hook: str) -> bool:
        """Whether the grid's default policy is the only implementation of decision ``hook``."""
        impls = getattr(self.hook, hook).get_hookimpls()
        return len(impls) == 1 and impls[0].plugin_name == "gridboost._policy"


def _unknown_options(
    backend: str,
    unknown: Sequence[str],
    accepted: Iterable[str],
    specs: Mapping[str, BackendSpec],
    grid_options: Sequence[str],
) -> str:
    """One line: the first unknown option, what was likely meant, and the names accepted (never their descriptions)."""
    first = unknown[0]
    named = first if first.isidentifier() and len(first) < 40 else shown(first, 40)
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    listing = f"it accepts: {', '.join(accepted) or 'none'}"
    others = [name for name, spec in specs.items() if first in spec.options]
    if others:  # Grid(address=...) meant for a cluster backend
        return f"the {backend} backend has no option {named}{more}; {listing} ({named} is for: {', '.join(others)})"
    everyone = {option for spec in specs.values() for option in spec.options}
    hint = did_you_mean(first, [*accepted, *grid_options, *sorted(everyone - set(accepted))])
    return f"the {backend} backend has no option {named}{more}" + (f"{hint} ({listing})" if hint else f"; {listing}")


def call_decision(hook: pluggy.HookCaller, what: str, /, **kwargs: Any) -> Any:
    """Call a ``firstresult`` hook; any exception becomes a ``PolicyError`` chained to it."""
    try:
        return hook(**kwargs)
    except Exception as exc:
        raise PolicyError(f"{what} hook failed: {type(exc).__name__}: {exc}") from exc


def builtin(name: str) -> bool:
    """Whether the plugin registered as ``name`` is one of gridboost's own."""
    return name in _BUILTINS
