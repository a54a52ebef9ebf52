"""Every condition and action of the flow language, through conversation tests (tests/engine/flows),
plus the shipped example flows' own tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from middleware.conversation_tests import run_files
from middleware.conversation_tests import test_files as find_tests
from middleware.schema import config_schema, flow_schema
from tests.conftest import REPO

HERE = Path(__file__).parent


@pytest.mark.parametrize("folder", [HERE / "flows", REPO / "flows"], ids=["features", "shipped"])
async def test_conversation_tests_pass(folder: Path) -> None:
    files = find_tests([folder])
    assert files, f"no *.test.yaml under {folder}"
    outcome = await run_files(files)
    report = [str(p) for p in outcome.problems] + [f"{f.where} {f.title}: {f.lines}" for f in outcome.failures]
    assert not report, "\n".join(report)
    assert outcome.passed >= 3


async def test_a_wrong_expectation_fails_with_a_diff(tmp_path: Path) -> None:
    (tmp_path / "demo.yaml").write_text((REPO / "flows" / "demo.yaml").read_text())
    (tmp_path / "x.test.yaml").write_text(
        "tests:\n  - name: wrong\n    steps:\n      - user: hours\n        expect: {reply: closed, state: nowhere}\n"
    )
    outcome = await run_files([tmp_path / "x.test.yaml"])
    assert outcome.passed == 0 and len(outcome.failures) == 1
    lines = outcome.failures[0].lines
    assert "  - closed" in lines
    assert "  + We are open Monday to Friday, 09:00-17:00 (Jakarta time). Right now we are open." in lines
    assert any(line.startswith("state: expected 'nowhere'") for line in lines)


def test_shipped_schema_files_are_current() -> None:
    hint = "regenerate with: switchboard schema --out schema"
    assert json.loads((REPO / "schema" / "flow.json").read_text()) == flow_schema(), hint
    assert json.loads((REPO / "schema" / "config.json").read_text()) == config_schema(), hint


def test_flow_schema_lists_what_the_loader_accepts() -> None:
    from middleware.engine.actions import ACTIONS
    from middleware.engine.conditions import CONDITIONS
    from middleware.engine.loader import FLOW_KEYS, ROUTE_KEYS, STATE_KEYS

    schema = flow_schema()
    assert set(schema["properties"]) == set(FLOW_KEYS)
    assert set(schema["$defs"]["route"]["properties"]) == set(ROUTE_KEYS)
    assert set(schema["$defs"]["state"]["properties"]) == set(STATE_KEYS)
    assert set(schema["$defs"]["condition"]["properties"]) == set(CONDITIONS)
    keys = {next(iter(o["properties"])) for o in schema["$defs"]["action"]["oneOf"] if o["type"] == "object"}
    assert keys == set(ACTIONS)


def test_a_flow_that_sets_or_saves_a_user_variable_is_user_scoped(tmp_path: Path) -> None:
    """The service loads a user's variables only for user-scoped flows: `set` and `save_as` count."""
    from middleware.engine import load_flows

    (tmp_path / "sets.yaml").write_text(
        "flow: sets\nstates:\n  start:\n    routes:\n      - do: [{set: {user.language: id}}]\n"
    )
    (tmp_path / "saves.yaml").write_text(
        "flow: saves\nstates:\n  start:\n    routes:\n      - do: [{http: {url: 'https://x', save_as: user.last}}]\n"
    )
    (tmp_path / "plain.yaml").write_text("flow: plain\nstates:\n  start:\n    routes:\n      - do: [{set: {a: 1}}]\n")
    flows = load_flows(tmp_path)
    assert (flows["sets"].user_scope, flows["saves"].user_scope, flows["plain"].user_scope) == (True, True, False)


def test_every_shipped_flow_has_the_schema_line_and_its_tests() -> None:
    shipped = sorted(p for p in (REPO / "flows").glob("*.yaml") if not p.name.endswith(".test.yaml"))
    assert {p.stem for p in shipped} >= {"demo", "support", "faq_llm"}
    for flow in shipped:
        assert flow.read_text().startswith("# yaml-language-server: $schema=../schema/flow.json\n"), flow.name
        assert flow.with_name(f"{flow.stem}.test.yaml").exists(), f"{flow.name} has no conversation tests"
