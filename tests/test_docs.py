"""Every Python block in ``README.md`` and ``docs/*.md`` runs: test modules under ``pytest -W error``, the rest as scripts.

A block that is a fragment (a skeleton with ``...``, code against a cluster we do not have, a deliberate bug) is
marked so: ``<!-- not run -->`` on the line before its fence, or ``skip`` after the language (```` ```python skip ````).
A block that defines ``test_`` functions is a test module; it is run by pytest in a fresh interpreter, in an empty
project with no conftest, with the plugins loaded by name. Any other block runs with ``python -W error -c``. All of
them start at once, each in its own directory, so the whole check takes about as long as its slowest block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
NOT_RUN = "<!-- not run -->"
TIMEOUT = 120  # seconds for every block together; each takes a second or two
_FENCE = re.compile(r"^```\s*(?P<lang>[\w+-]*)(?P<flags>.*)$")
_TEST_FUNCTION = re.compile(r"^(async\s+)?def test_", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, from 1
    code: str
    run: bool

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def is_test_module(self) -> bool:
        return bool(_TEST_FUNCTION.search(self.code))


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, each with whether it is to be run."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    previous = ""  # the last non-blank line outside a block
    at = 0
    while at < len(lines):
        fence = _FENCE.match(lines[at])
        if fence is None:
            if lines[at].strip():
                previous = lines[at].strip()
            at += 1
            continue
        end = next((i for i in range(at + 1, len(lines)) if lines[i].rstrip() == "```"), None)
        assert end is not None, f"{path.name}:{at + 1}: a code block is never closed"
        if fence["lang"] == "python":
            skipped = "skip" in fence["flags"].split() or previous == NOT_RUN
            blocks.append(Block(path, at + 1, "\n".join(lines[at + 1 : end]) + "\n", run=not skipped))
        previous = ""
        at = end + 1
    return blocks


BLOCKS = [block for path in [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))] for block in python_blocks(path)]
RUN = [block for block in BLOCKS if block.run]


def _command(block: Block, where: Path) -> list[str]:
    if not block.is_test_module:
        return [sys.executable, "-W", "error", "-c", block.code]
    module = where / f"test_{block.path.stem.replace('-', '_')}_{block.line}.py"
    module.write_text(block.code, encoding="utf-8")
    # An ini file of its own makes the directory the rootdir, whatever lies above it.
    (where / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "error",
        "--strict-markers",
        "--strict-config",
        "-p",
        "anyio",
        "-p",
        "gridboost",
        module.name,
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Run every block at once; each block's exit status and output, by id."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    started: dict[str, subprocess.Popen[str]] = {}
    try:
        for block in RUN:
            where = tmp_path_factory.mktemp(block.id.replace(":", "_").replace(".", "_"))
            started[block.id] = subprocess.Popen(
                _command(block, where),
                cwd=where,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        outcome: dict[str, tuple[int, str]] = {}
        for block_id, process in started.items():
            out, _ = process.communicate(timeout=TIMEOUT)
            outcome[block_id] = (process.returncode, out)
        return outcome
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.mark.parametrize("block", RUN, ids=[block.id for block in RUN])
def test_python_block_runs(block: Block, results: dict[str, tuple[int, str]]) -> None:
    """The block runs to success: a test module's tests pass under ``-W error``, a script exits 0."""
    status, out = results[block.id]
    assert status == 0, f"{block.id} ({'tests' if block.is_test_module else 'script'}) failed:\n{out}"
    if block.is_test_module:
        assert re.search(r"\b\d+ passed\b", out) and not re.search(r"\b(skipped|xfailed)\b", out), out


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.run], ids=[b.id for b in BLOCKS if not b.run])
def test_fragment_is_valid_python(block: Block) -> None:
    """A block that is not run still parses, so a typo in it is caught."""
    compile(block.code, block.id, "exec")


def test_the_testing_guide_is_mostly_run() -> None:
    """The extraction finds the guide's blocks, and only the fragments are left out."""
    guide = [block for block in BLOCKS if block.path.name == "testing.md"]
    assert sum(block.run for block in guide) >= 4
    assert all("BackendSuite" not in block.code for block in guide if block.run)


def test_a_fragment_marker_applies_to_the_next_block_only(tmp_path: Path) -> None:
    """``<!-- not run -->`` and ``python skip`` leave out one block each; text between them resets the marker."""
    page = tmp_path / "page.md"
    page.write_text(
        "\n".join(
            [
                NOT_RUN,
                "```python",
                "left_out = 1",
                "```",
                "```python",
                "run = 1",
                "```",
                NOT_RUN,
                "Some prose in between.",
                "```python",
                "run = 2",
                "```",
                "```python skip",
                "left_out = 2",
                "```",
                "```toml",
                "not = 'python'",
                "```",
            ]
        ),
        encoding="utf-8",
    )
    assert [(block.line, block.run) for block in python_blocks(page)] == [
        (2, False),
        (5, True),
        (10, True),
        (13, False),
    ]


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "page",
    [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md", *sorted(DOCS.parent.glob("plugins/*/README.md"))],
    ids=lambda p: str(p.relative_to(DOCS.parent)),
)
def test_no_dead_link(page: Path) -> None:
    """Every relative link leads to a file that exists; a site page's links stay inside the site (docs/)."""
    for target in _LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if page.parent == DOCS:
            assert path.is_relative_to(DOCS.resolve()), f"{page.name} links outside the site: {target}"
