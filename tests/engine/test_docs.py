"""docs/flows.md stays true: its YAML examples are loaded and run.

Every ```yaml block must be YAML. Blocks that are whole flows (`flow:` and `states:`) are loaded
together by the real loader, as one flows folder: they must have no mistake, and every condition,
action and `on:` event of the language must appear in one of them or in the doc's tables. Blocks
that are conversation test files (`tests:`) run against those flows. Blocks that are configs are
validated as configs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from middleware.conversation_tests import run_files
from middleware.engine import load_flows
from middleware.engine.actions import ACTIONS
from middleware.engine.conditions import CONDITIONS
from middleware.engine.loader import EVENTS
from middleware.settings import Settings, settings_from_text
from tests.conftest import REPO

DOC = REPO / "docs" / "flows.md"
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[int, str, Any]]:
    """(line of the block in the doc, its text, its parsed YAML) for every ```yaml block."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start(1)) + 1
        out.append((line, m.group(1), yaml.safe_load(m.group(1))))
    return out


def flows_blocks() -> list[tuple[int, str]]:
    return [(line, src) for line, src, data in blocks() if isinstance(data, dict) and "flow" in data]


def write_flows(folder: Path) -> dict[str, int]:
    """Each whole flow of the doc as a file named after the doc line it starts at."""
    names = {}
    for line, src in flows_blocks():
        (folder / f"doc_line_{line:04}.yaml").write_text(src, encoding="utf-8")
        names[yaml.safe_load(src)["flow"]] = line
    return names


def test_every_yaml_block_is_yaml() -> None:
    found = blocks()
    assert len(found) >= 20
    for line, src, data in found:
        comments = all(not ln.strip() or ln.lstrip().startswith("#") for ln in src.splitlines())
        assert data is not None or comments, f"docs/flows.md:{line}: an empty block"


def test_the_whole_flows_load_without_a_mistake(tmp_path: Path) -> None:
    names = write_flows(tmp_path)
    assert len(names) >= 12, names
    assert len(names) == len(flows_blocks()), "two examples share a flow name"
    flows = load_flows(tmp_path)  # raises ConfigError listing every problem, at the doc file's line
    assert set(flows) == set(names)


def test_the_examples_and_tables_cover_the_whole_language(tmp_path: Path) -> None:
    """Every condition, action and event is in the doc: in a flow that loads, or as `key` in a table."""
    text = DOC.read_text(encoding="utf-8")
    write_flows(tmp_path)
    load_flows(tmp_path)
    for name in [*CONDITIONS, *ACTIONS, *EVENTS]:
        assert f"| `{name}" in text or f"| [`{name}`]" in text, f"{name} has no row in the doc's tables"
    examples = "\n".join(src for _, src in flows_blocks())
    for event in EVENTS:
        assert f"  {event}:" in examples, f"no example flow handles `on: {event}`"
    for key in ("timeout:", "fallback:", "coalesce:", "hours:", "call:", "return", "user.", "nlu:", "counters."):
        assert key in examples, f"no example flow uses {key}"


async def test_the_test_file_example_passes_against_the_doc_flows(tmp_path: Path) -> None:
    write_flows(tmp_path)
    tests = [src for _, src, data in blocks() if isinstance(data, dict) and "tests" in data]
    assert tests, "the doc shows no conversation test file"
    files = []
    for i, src in enumerate(tests):
        files.append(tmp_path / f"doc_{i}.test.yaml")
        files[-1].write_text(src, encoding="utf-8")
    outcome = await run_files(files)
    report = [str(p) for p in outcome.problems] + [f"{f.where} {f.title}: {f.lines}" for f in outcome.failures]
    assert not report, "\n".join(report)
    assert outcome.passed >= 2


@pytest.mark.parametrize(
    "line",
    [line for line, _, data in blocks() if isinstance(data, dict) and data and set(data) <= set(Settings.model_fields)],
)
def test_config_examples_are_valid_configs(line: int) -> None:
    src = next(src for ln, src, _ in blocks() if ln == line)
    settings_from_text(src, f"docs/flows.md:{line}", env={})
