"""`import gridboost` stays cheap: what only some calls need is imported when first needed, not up front.

Before these modules were deferred, `import gridboost` took about 160 ms with bytecode cached (225 ms compiling)
against about 60 ms for anyio, attrs and pluggy; importlib.metadata (entry points, read when a grid starts) was a
fifth of it, psutil (read when pressure or capacity is) a tenth. The figures live in the benchmarks, never in a
test: this checks only what a fresh interpreter has imported once `import gridboost` returns.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Each is imported where it is used: a grid's start (entry points, psutil), a hint or a parse (difflib, fractions),
# the process executor (pickle), commands (subprocess), lease owners (socket), a trio wait (concurrent.futures).
DEFERRED = (
    "concurrent.futures",
    "difflib",
    "fractions",
    "gridboost._command",
    "gridboost._procpool",
    "hmac",
    "importlib.metadata",
    "json",
    "pickle",
    "psutil",
    "secrets",
    "socket",
    "subprocess",
    "urllib.parse",
)

PROBE = """
import sys
before = set(sys.modules)
import gridboost
print(" ".join(sorted(set(sys.modules) - before)))
"""


@pytest.fixture(scope="module")
def imported() -> set[str]:
    """The modules a fresh interpreter imports for `import gridboost` (those it had already are not counted)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_import_gridboost_imports_gridboost(imported: set[str]) -> None:
    assert {"gridboost", "gridboost._grid", "gridboost.abc"} <= imported


@pytest.mark.parametrize("module", DEFERRED)
def test_import_gridboost_leaves_a_rarely_needed_module_unimported(imported: set[str], module: str) -> None:
    assert module not in imported, f"`import gridboost` imports {module}; import it where it is used"


def test_what_was_deferred_still_works_when_used() -> None:
    """The deferred imports are reached: a parse, a hint, a lease owner, the machine's capacity."""
    code = """
import gridboost as gb
from gridboost import _local, _records, _text
assert gb.Resources.parse("memory=1.5GiB").memory == 3 * 2**29
assert "did you mean" in _text.did_you_mean("cpus", ["cpu", "gpu"])
assert _records.owner_name().endswith(":" + str(__import__("os").getpid()))
assert _local._machine_capacity().cpu >= 1
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
