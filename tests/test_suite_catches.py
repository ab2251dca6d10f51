"""The conformance suite can fail: run against deliberately broken backends, it reports each breakage."""

from __future__ import annotations

import re
import textwrap

import pytest

HEAD = """
import anyio
import pytest

import gridboost as gb
from gridboost._local import LocalBackend
from gridboost.testing import BackendSuite, LocalProbe
"""

HARNESS = """
BROKEN = {broken}


class Plugin:
    @gb.hookimpl
    def gridboost_backends(self):
        yield gb.BackendSpec("under-test", BROKEN, options={{"capacity": "", "grace": ""}})


@pytest.fixture
def anyio_backend():
    return "asyncio"


class TestSuite(BackendSuite):
    SETTLE = 1.0

    @pytest.fixture
    def backend_name(self):
        return "under-test"

    @pytest.fixture
    def grid_options(self):
        return {{"plugins": [Plugin()], "capacity": "cpu=2,memory=4GiB", "grace": 0.5}}

    @pytest.fixture
    def probe(self):
        return LocalProbe()

    @pytest.fixture
    def capacity_units(self):
        return 2
"""

BACKENDS = {
    "correct": """
class Correct(LocalBackend):
    pass
""",
    "leaks": """
class LeaksReservations(LocalBackend):
    '''Forgets to give a reservation back on release.'''

    async def release(self, reservation):
        pass
""",
    "deaf": """
class IgnoresCancel(LocalBackend):
    '''Runs callables to the end whatever the caller asks.'''

    async def run(self, task, reservation, **kwargs):
        if task.is_command:
            return await super().run(task, reservation, **kwargs)
        with anyio.CancelScope(shield=True):
            return await super().run(task, reservation, **kwargs)
""",
    "swallows": """
class SwallowsErrors(LocalBackend):
    '''Turns the user's exception into a None result.'''

    async def run(self, task, reservation, **kwargs):
        try:
            return await super().run(task, reservation, **kwargs)
        except Exception:
            return None
""",
}

# What each breakage must be caught by (more tests may fail too; these must).
EXPECTED = {
    "leaks": {"test_reserve_places_where_asked_and_release_removes_it", "test_boost_expires_at_its_ttl"},
    "deaf": {"test_cancel_running_callable", "test_timeout_raises_and_stops_the_work"},
    "swallows": {"test_user_exception_keeps_its_type", "test_retries_rerun_failed_work"},
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Run the suite once against every backend above, in a fresh interpreter; outcome by backend and test."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("suite-catches")
    for name, source in BACKENDS.items():
        cls = re.search(r"class (\w+)", source).group(1)  # type: ignore[union-attr]
        module = HEAD + textwrap.dedent(source) + HARNESS.format(broken=cls)
        (root / f"test_{name}.py").write_text(module)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "--timeout=120",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    found: dict[str, dict[str, str]] = {name: {} for name in BACKENDS}
    for status, name, test in re.findall(r"^(PASSED|FAILED|ERROR) test_(\w+)\.py::TestSuite::(\w+)", proc.stdout, re.M):
        previous = found[name].get(test)
        found[name][test] = status if previous in (None, "PASSED") else previous
    assert found["correct"], f"the harness ran nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return found


def test_the_correct_backend_passes_in_the_same_harness(outcomes: dict[str, dict[str, str]]) -> None:
    """The control passes everything, so the failures below come from the breakage, not from the harness."""
    failing = {test: status for test, status in outcomes["correct"].items() if status != "PASSED"}
    assert failing == {}


@pytest.mark.parametrize("backend", sorted(EXPECTED))
def test_the_suite_reports_the_breakage(outcomes: dict[str, dict[str, str]], backend: str) -> None:
    """Each broken backend fails the tests that check what it breaks."""
    failing = {test for test, status in outcomes[backend].items() if status in ("FAILED", "ERROR")}
    missed = EXPECTED[backend] - failing
    assert not missed, f"the suite did not catch backend {backend!r} in {sorted(missed)}; it failed {sorted(failing)}"
