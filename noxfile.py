"""Developer sessions: ``nox -s tests`` (README command 2 runs exactly that), ``lint``, ``types``, ``bench``.

Backend plugins live in ``plugins/<name>/``, each its own distribution; the test and
bench sessions are parametrised over them (as hydra does), so ``nox -s tests`` runs
the core suite and every plugin's suite, each in a virtual environment of its own.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "types", "docs"]
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PLUGINS = sorted(p.name for p in (ROOT / "plugins").glob("*") if (p / "pyproject.toml").is_file())
PACKAGES = ["core", *PLUGINS]
#: Plugins that observe grids rather than provide a backend.
_OBSERVERS = {"gridboost-otel"}


def _install(session: nox.Session, package: str, group: str) -> None:
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, group))
    if package != "core":
        plugin = ROOT / "plugins" / package
        session.install(
            "-e", str(plugin), *nox.project.dependency_groups(nox.project.load_toml(plugin / "pyproject.toml"), group)
        )


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """Run the test suite of the core or of one plugin (warnings are errors)."""
    _install(session, package, "test")
    where = "tests" if package == "core" else f"plugins/{package}/tests"
    session.run("python", "-m", "pytest", where, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, over everything."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx + MyST), warnings as errors, into docs/_build/html."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run("python", "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict over the core package."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "types"))
    session.run("mypy")


@nox.session
@nox.parametrize("package", PACKAGES)
def bench(session: nox.Session, package: str) -> None:
    """Benchmarks, each a ratio against the raw engine (or its goal) measured in the same run.

    The core runs ``bench_local.py`` and ``bench_policy.py`` (placement, monitor; its burst part
    skips, saying why, without Ray). The Ray plugin's session also runs ``bench_policy.py --only
    burst``: the burst scenario needs a real remote backend. Each session then runs
    ``bench_peers.py`` on its engine (local, Ray or Dask): gridboost beside joblib, Ray's Pool,
    ``client.map``, raw tasks and thread pools; the plugins' ``bench`` groups bring joblib. The backend
    plugins' sessions end with ``bench_leases.py``: many small leases of many owners against the engine's
    registry. gridboost-otel is no engine: its session runs ``bench_otel.py`` alone (the local backend's
    offload throughput with and without the telemetry plugin).
    """
    name = "local" if package == "core" else package.removeprefix("gridboost-")
    script = ROOT / "benchmarks" / f"bench_{name}.py"
    if not script.is_file():
        session.skip(f"{package} has no benchmark yet ({script.relative_to(ROOT)})")
    _install(session, package, "bench")
    session.run("python", str(script), *session.posargs)
    if package in _OBSERVERS:  # no engine of its own: peers and lease registries are the engines' sessions'
        return
    policy = str(ROOT / "benchmarks" / "bench_policy.py")
    quick = [arg for arg in session.posargs if arg == "--quick"]  # the other options are the first script's
    if package == "core":
        session.run("python", policy, *quick)
    elif package == "gridboost-ray":
        session.run("python", policy, "--only", "burst", *quick)
    session.run("python", str(ROOT / "benchmarks" / "bench_peers.py"), "--engine", name, *quick)
    if package != "core":  # a shared cluster's lease registry: Ray's keeper, Dask's scheduler plugin
        session.run("python", str(ROOT / "benchmarks" / "bench_leases.py"), "--engine", name, *quick)
