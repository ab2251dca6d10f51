"""What the docs promise about Dask, run as a user would: the scheduler snippet of ``docs/dask.md`` against the
session's cluster, and every block of ``docs/tutorial.md`` with ``gb.Grid(...)`` changed to ``gb.Grid("dask", ...)``.

Blocks are found as the core's ``tests/test_docs.py`` finds them: ```` ```python ```` fences, each run in a process of
its own, as a script file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from distributed import Client

from conftest import SETTLE, held_anywhere
from gridboost import Grid

DOCS = Path(__file__).resolve().parents[3] / "docs"
#: Seconds one block may take, as a guard against a hang: an embedded cluster starts worker processes, slowly under load.
BLOCK_TIMEOUT = 180
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(page: Path) -> list[str]:
    """The code of every ```python block of a page, in order."""
    return _BLOCK.findall(page.read_text(encoding="utf-8"))


def run_script(code: str, where: Path, name: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as the script ``where/name`` (this session's environment, no GRIDBOOST_* of the developer's)."""
    script = where / name
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in {"GRIDBOOST_BACKEND", "GRIDBOOST_ADDRESS"}}
    try:
        return subprocess.run(
            [sys.executable, script.name],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it (ours)
        pytest.fail(f"{name} ran past {BLOCK_TIMEOUT}s\n{exc.stdout!s:.3000}\n{exc.stderr!s:.3000}")


def on_dask(code: str) -> str:
    """A tutorial block with its grid on Dask: ``gb.Grid()`` → ``gb.Grid("dask")``, ``gb.Grid(x`` → ``gb.Grid("dask", x``."""
    return re.sub(r"gb\.Grid\((\)?)", lambda m: 'gb.Grid("dask")' if m[1] else 'gb.Grid("dask", ', code)


def test_on_dask_changes_only_the_backend() -> None:
    """The rewrite names the backend and keeps every argument the tutorial gives."""
    assert on_dask("gb.Grid() gb.Grid(plugins=[Log()])") == 'gb.Grid("dask") gb.Grid("dask", plugins=[Log()])'


TUTORIAL = python_blocks(DOCS / "tutorial.md")


def test_every_tutorial_block_guards_its_run_for_spawned_processes() -> None:
    """Each block runs its ``main`` under ``if __name__ == "__main__":``, which Dask's spawned workers need."""
    # A worker process of an embedded cluster imports the script it was started from: an unguarded grid at the top
    # level would start again in each worker ("Nanny failed to start").
    assert TUTORIAL and all('if __name__ == "__main__":' in block for block in TUTORIAL)


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("index", range(len(TUTORIAL)), ids=lambda i: f"block-{i + 1}")
def test_the_tutorial_runs_on_dask_with_only_the_backend_changed(index: int, tmp_path: Path) -> None:
    """A tutorial block saved as a script, its ``gb.Grid(`` given ``"dask"`` and nothing else, exits 0."""
    code = on_dask(TUTORIAL[index])
    assert code.count('gb.Grid("dask"') == TUTORIAL[index].count("gb.Grid(") > 0
    done = run_script(code, tmp_path, f"tutorial_{index + 1}.py")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_scheduler_snippet_shows_a_held_lease(
    grid: Grid, cluster_address: str, dask_client: Client, tmp_path: Path
) -> None:
    """The dask.md snippet that reads leases with Dask's public client prints, for a boost held, the worker it is on,
    the lease's resource name and its units, as the scheduler's own books have them."""
    snippet = next(code for code in python_blocks(DOCS / "dask.md") if "scheduler_info(" in code)
    assert snippet.count("tcp://10.0.0.5:8786") == 1
    async with grid.boost("cpu=2", ttl=60) as boost:
        name = f"{grid.backend.lease_prefix}{boost.id}"  # type: ignore[attr-defined]  # the Dask backend's
        assert await anyio.to_thread.run_sync(held_anywhere, dask_client, boost.id) == list(boost.placements)
        with anyio.fail_after(BLOCK_TIMEOUT + SETTLE):
            done = await anyio.to_thread.run_sync(
                run_script, snippet.replace("tcp://10.0.0.5:8786", cluster_address), tmp_path, "snippet.py"
            )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    assert all([address, name, "2.0"] in lines for address in boost.placements), done.stdout
