"""A newcomer's first hour: the mistakes a typo deserves to hear about, in one line."""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import gridboost as gb
from gridboost import _cli, _plugins
from gridboost._local import LocalBackend

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("cpus=4", "cpu"),
        ("GPU=1", "gpu"),
        ("mem=8GiB", "memory"),
        ("memroy=1GiB", "memory"),
        ("gpu_mem=1", "gpu_memory"),
    ],
)
def test_a_resource_name_like_a_builtin_gets_did_you_mean(text: str, meant: str) -> None:
    """A name that looks like a typo of a built-in is refused with the built-in it likely meant."""
    with pytest.raises(gb.InvalidResources, match=f"did you mean '{meant}'"):
        gb.Resources.parse(text)
    name = text.partition("=")[0]
    with pytest.raises(gb.InvalidResources, match=f"did you mean '{meant}'"):
        gb.Resources.coerce({name: 1})


def test_a_custom_resource_is_still_a_custom_resource() -> None:
    """Names unlike any built-in stay custom; ``custom={...}`` takes even a typo-like name as it is."""
    assert gb.Resources.parse("accel=2").custom == {"accel": 2}
    assert gb.Resources(custom={"mem": 1}).custom == {"mem": 1}


def test_gb_is_decimal_and_shows_as_gb() -> None:
    """``8GB`` is 8 * 10**9 bytes (GiB is 2**30) and prints back as ``8GB``."""
    eight = gb.Resources.parse("memory=8GB")
    assert eight.memory == 8 * 10**9
    assert str(eight) == "memory=8GB"
    assert gb.Resources.parse("memory=8GiB").memory == 8 * 2**30


@pytest.mark.parametrize(("option", "meant"), [("teardown_timout", "teardown_timeout"), ("gracee", "grace")])
def test_an_unknown_grid_option_gets_did_you_mean_in_one_short_line(option: str, meant: str) -> None:
    """A misspelt Grid option names what was likely meant and the accepted names, in one short line."""
    with pytest.raises(gb.InvalidRequest, match=f"did you mean '{meant}'") as info:
        gb.Grid(**{option: 1})
    assert len(str(info.value)) < 200
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("given", "level"), [("high", gb.Priority.HIGH), ("LOW", gb.Priority.LOW), (3, gb.Priority.CRITICAL)]
)
async def test_priority_is_accepted_by_name_as_the_cli_accepts_it(given: object, level: gb.Priority) -> None:
    """``priority="high"`` (any case) or its number is the same as ``Priority.HIGH``; a typo gets did you mean."""
    async with gb.Grid(capacity="cpu=2") as grid:
        async with grid.boost("cpu=1", ttl=30, priority=given) as boost:  # type: ignore[arg-type]
            assert boost.priority is level
        with pytest.raises(gb.InvalidRequest, match="did you mean 'high'"):
            await grid.request_boost("cpu=1", ttl=30, priority="hihg")  # type: ignore[arg-type]


def test_the_readmes_install_commands_name_real_folders_and_match_doctors_hints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each README install command installs the core's folder with the plugin's, as ``gridboost doctor`` advises."""
    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    readme = (root / "README.md").read_text()
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"`python -m pip install ([^`]+)`", section)
    assert commands[0] == "."
    for backend in ("ray", "dask"):
        folder = f"./plugins/gridboost-{backend}"
        assert (root / folder / "pyproject.toml").is_file()
        assert f". {folder}" in commands
        assert _plugins.install_hint(backend) == f"pip install . {folder}"
    assert 'pip install "gridboost[ray]"' in section and 'pip install "gridboost[dask]"' in section


def test_quiet_engine_logs_quiets_what_each_backend_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    """``quiet_engine_logs()`` raises each declared engine logger to ERROR and sets its quiet env, not overriding."""

    class Chatty:
        @gb.hookimpl
        def gridboost_backends(self) -> Iterator[gb.BackendSpec]:
            yield gb.BackendSpec(
                name="chatty",
                factory=LocalBackend,
                loggers=("chatty.engine",),
                quiet_env={"CHATTY_LOG_LEVEL": "error", "CHATTY_MODE": "quiet"},
            )

    monkeypatch.delenv("CHATTY_LOG_LEVEL", raising=False)
    monkeypatch.setenv("CHATTY_MODE", "loud")  # the user's own setting wins
    logger = logging.getLogger("chatty.engine")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    gb.quiet_engine_logs(plugins=[Chatty()])
    assert logger.level == logging.ERROR
    assert os.environ["CHATTY_LOG_LEVEL"] == "error"
    assert os.environ["CHATTY_MODE"] == "loud"
    assert logging.getLogger("gridboost").level == logging.NOTSET


def test_the_tutorial_uses_no_backend_option_so_changing_the_backend_is_all_it_takes() -> None:
    """Every ``gb.Grid(...)`` in the tutorial takes only the Grid's own arguments, which every backend accepts."""
    tutorial = (Path(__file__).parents[1] / "docs" / "tutorial.md").read_text()
    calls = re.findall(r"gb\.Grid\(([^)]*)\)", tutorial)
    assert len(calls) >= 5
    own = set(inspect.signature(gb.Grid).parameters) - {"backend", "options"}
    for call in calls:
        names = set(re.findall(r"(\w+)=", call))
        assert names <= own, (call, names - own)


async def test_task_prefix_is_public_and_none_where_the_engine_names_no_tasks() -> None:
    """``grid.task_prefix`` is the backend's: ``None`` on the local backend, which names no tasks in an engine."""
    async with gb.Grid() as grid:
        assert grid.task_prefix is None


def test_readme_command_1_installs_dask_and_runs_the_demo_and_command_2_is_what_ci_runs() -> None:
    """README command 1 installs the core with the Dask plugin's folder and runs the demo; CI runs command 2 verbatim."""
    root = Path(__file__).parents[1]
    first, second = re.findall(r"```console\n(.+?)\n```", (root / "README.md").read_text())[:2]
    assert first == "python -m pip install -q . ./plugins/gridboost-dask && python -m gridboost demo"
    assert (root / "plugins" / "gridboost-dask" / "pyproject.toml").is_file()
    assert second in (root / ".ci" / "run").read_text().splitlines()


def test_the_demo_runs_on_dask_when_its_plugin_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no --backend nor GRIDBOOST_BACKEND, the demo picks Dask when its plugin is installed, else local."""
    monkeypatch.delenv("GRIDBOOST_BACKEND", raising=False)
    monkeypatch.setattr(_cli, "_version", lambda dist: "0.1.0" if dist == "gridboost-dask" else None)
    assert _cli._default_backend("demo") == "dask"
    assert _cli._default_backend("status") == "local"
    monkeypatch.setattr(_cli, "_version", lambda dist: None)
    assert _cli._default_backend("demo") == "local"
    monkeypatch.setenv("GRIDBOOST_BACKEND", "ray")
    assert _cli._default_backend("demo") == "ray"
