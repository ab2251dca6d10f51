"""What ``docs/telemetry.md`` promises, run as a user would: each of its examples as a script of its own.

The core's docs check runs every ```` ```python ```` block of ``docs/*.md`` in the core's environment, which has no
OpenTelemetry; so the page marks its examples ```` ```python skip ```` (the core only compiles them) and this suite,
whose environment has the plugin and the SDK, runs them. A block after ``<!-- not run -->`` is a fragment (it needs
a collector) and is only compiled.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gridboost_otel import METRICS

from conftest import run_script

PAGE = Path(__file__).resolve().parents[3] / "docs" / "telemetry.md"
NOT_RUN = "<!-- not run -->"
#: Seconds one block may take, as a guard against a hang (each takes about one).
BLOCK_TIMEOUT = 60
_BLOCK = re.compile(r"^```python(?P<flags>[^\n]*)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[int, str, bool]]:
    """(line, code, run) for each ```python block of the page."""
    text = PAGE.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, match["code"], not (before and before[-1].strip() == NOT_RUN)))
    return found


RUN = [(line, code) for line, code, run in blocks() if run]


def test_the_core_runs_none_of_the_pages_blocks() -> None:
    """Every block is ``skip`` or not run: the core's environment has no OpenTelemetry to run them with."""
    text = PAGE.read_text(encoding="utf-8")
    fences = re.findall(r"^```python(.*)$", text, re.MULTILINE)
    assert fences and all("skip" in flags.split() or flags == "" for flags in fences)
    assert len(RUN) == 3
    assert all(f"```python skip\n{code}" in text for _, code in RUN)


@pytest.mark.timeout(BLOCK_TIMEOUT + 30)
@pytest.mark.parametrize(("line", "code"), RUN, ids=[f"telemetry.md:{line}" for line, _ in RUN])
def test_each_example_runs_as_a_script(line: int, code: str, tmp_path: Path) -> None:
    """The block saved as a script exits 0 under ``-W error``, with no GRIDBOOST_ variable of the developer's."""
    done = run_script(code, tmp_path, name=f"telemetry_{line}.py", timeout=BLOCK_TIMEOUT)
    assert done.stderr == ""
    if "prometheus_port" in code:  # what the page says the scrape shows
        lines = done.stdout.splitlines()
        assert lines == [
            'gridboost_task_finished_total{backend="local",destination="local",otel_scope_name="gridboost_otel",'
            'otel_scope_schema_url="",otel_scope_version="0.1.0",status="succeeded"} 3.0'
        ]
    elif "GRIDBOOST_OTEL" in code:
        assert done.stdout.strip() == "['gridboost.task']"
    else:
        assert done.stdout.splitlines()[:4] == [
            "gridboost.task succeeded",
            "gridboost.boost released",
            "gridboost.task succeeded",
            "gridboost.task failed",
        ]


def test_the_page_documents_every_metric_and_its_unit() -> None:
    rows = {
        cells[0].strip("` "): cells[2].strip("` ")
        for cells in (line.strip("|").split("|") for line in PAGE.read_text(encoding="utf-8").splitlines())
        if len(cells) == 6 and cells[0].strip().startswith("`gridboost.")  # the metrics table's rows
    }
    assert rows == {name: unit for name, (_, unit, _) in METRICS.items()}
