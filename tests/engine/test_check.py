"""`switchboard check` on deliberately broken flows and configs: every mistake at its file:line:col.

The files are `tests/engine/broken/*.yaml` (flows) and `tests/engine/broken_config/*.yaml` (configs);
each lists what must be reported about it in `# expect: LINE:COL MESSAGE-PART` comments at its end.
The real command runs as a subprocess, and the report must be exactly those problems: each expected
one at its place, and nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent
BROKEN = HERE / "broken"
CONFIGS = HERE / "broken_config"
#: declares the connectors (rasa, llm) and queues (default, tier1, billing) the broken flows may name
CONFIG = CONFIGS / "switchboard.yaml"
#: a config with mistakes of its own (its `${...}` name must not be set)
ENV_CONFIG = CONFIGS / "env.yaml"
UNSET = "SWITCHBOARD_BROKEN_UNSET_SECRET"

pytestmark = pytest.mark.slow  # runs the command in a subprocess

EXPECT = re.compile(r"^# expect: (\d+):(\d+) (.+)$")
REPORTED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")

Where = tuple[Path, int, int]


def expectations(*files: Path) -> list[tuple[Where, str]]:
    out = []
    for file in files:
        for text in file.read_text(encoding="utf-8").splitlines():
            m = EXPECT.match(text)
            if m:
                out.append(((file.resolve(), int(m.group(1)), int(m.group(2))), m.group(3).strip()))
    return out


def switchboard(*args: Path) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "switchboard"
    command = [str(beside)] if beside.exists() else [sys.executable, "-m", "middleware.cli"]
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    return subprocess.run(
        [*command, "check", *(str(a) for a in args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def reported(out: str) -> list[tuple[Where, str]]:
    problems = []
    for text in out.splitlines():
        m = REPORTED.match(text)
        assert m, f"not file:line:col: message: {text!r}"
        file = Path(m["file"]) if Path(m["file"]).is_absolute() else REPO / m["file"]
        problems.append(((file.resolve(), int(m["line"]), int(m["col"])), m["message"]))
    return problems


def compare(expected: list[tuple[Where, str]], got: list[tuple[Where, str]]) -> list[str]:
    """Pair each expectation with a problem reported at its place holding its text; list what is left."""
    left = list(got)
    missing = []
    for where, part in expected:
        match = next((p for p in left if p[0] == where and part in p[1]), None)
        if match is None:
            at = [m for w, m in got if w == where]
            missing.append(
                f"missing {where[0].name}:{where[1]}:{where[2]}: {part}" + (f"  (there: {at})" if at else "")
            )
        else:
            left.remove(match)
    extra = [f"unexpected {w[0].name}:{w[1]}:{w[2]}: {m}" for w, m in left]
    return missing + extra


def test_the_broken_files_hold_at_least_25_distinct_mistakes() -> None:
    expected = expectations(*sorted(BROKEN.glob("*.yaml")), ENV_CONFIG)
    assert len(expected) >= 25
    assert len({where for where, _ in expected}) == len(expected), "two expectations at one place"
    # distinct kinds of mistake: the message without the names quoted in it
    kinds = {re.sub(r"'[^']*'|\(did you mean.*|at position \d+|; configured.*", "", part) for _, part in expected}
    assert len(kinds) >= 25, sorted(kinds)


def test_check_reports_every_mistake_at_its_line_and_column() -> None:
    result = switchboard(CONFIG, ENV_CONFIG)
    expected = expectations(*sorted(BROKEN.glob("*.yaml")), ENV_CONFIG)
    assert result.returncode == 1, result.stderr
    got = reported(result.stdout)
    assert compare(expected, got) == []
    assert f"{len(got)} problem(s)" in result.stderr


def test_without_a_config_connectors_and_queues_are_not_checked() -> None:
    """Checking the folder alone: the same mistakes, less the names only a config could know."""
    result = switchboard(BROKEN)
    assert result.returncode == 1, result.stderr
    expected = [
        (where, part)
        for where, part in expectations(*sorted(BROKEN.glob("*.yaml")))
        if not part.startswith(("unknown connector", "unknown queue"))
    ]
    assert compare(expected, reported(result.stdout)) == []


def test_each_file_checked_alone_reports_its_own_mistakes() -> None:
    """Files named one by one are read one by one: each reports what it does in the folder, less the
    names only a config knows and the flow name another file also uses."""
    files = sorted(BROKEN.glob("*.yaml"))
    result = switchboard(*files)
    assert result.returncode == 1, result.stderr
    expected = [
        (where, part)
        for where, part in expectations(*files)
        if not part.startswith(("unknown connector", "unknown queue", "flow name"))
    ]
    assert compare(expected, reported(result.stdout)) == []
