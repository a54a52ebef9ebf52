"""Property-based tests: random JSON trees, mutated recorded payloads and random bytes into every
platform's parser; random YAML into the flow loader; random user text into templates.

A parser may only answer `Parsed` (whose messages the store can hold) or `Rejected` with a 4xx:
anything else would be a 500 at the webhook. The flow loader may only give flows or a
`ConfigError` whose problems all point into the file. A template renders what a user wrote as
data: the text comes back unchanged, never evaluated.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.engine import Engine, Known, load_flows
from middleware.engine.actions import ACTIONS
from middleware.engine.conditions import CONDITIONS
from middleware.engine.loader import FLOW_KEYS, ROUTE_KEYS, STATE_KEYS
from middleware.ingress import check_messages
from middleware.model import ConversationState, Inbound, Sender
from middleware.platforms import Parsed, Rejected
from middleware.platforms.base import json_bytes
from middleware.yamlfile import ConfigError, parse_yaml
from tests.conftest import REPO
from tests.security.conftest import ThreadedApp
from tests.security.strategies import json_trees, keys_of, mutated
from tests.security.targets import BY_NAME, TARGETS, Hook, Target

IDS = [t.name for t in TARGETS]


def outcome(target: Target, hook: Hook) -> Parsed | Rejected:
    """Parse as the webhook would, then check what the edge checks; fail on anything unexpected."""
    platform = target.make()
    try:
        parsed = platform.parse(hook.request())
        check_messages(parsed.messages)
    except Rejected as exc:
        assert 400 <= exc.status < 500, exc.status
        json.dumps(exc.body())
        return exc
    json.dumps(parsed.response)
    for m in parsed.messages:
        assert isinstance(m, Inbound)
        stored = json_bytes(m.to_json())  # what the store writes: no lone surrogates, nothing unserialisable
        again = Inbound.from_json(json.loads(stored))
        assert json_bytes(again.to_json()) == stored
    return parsed


def seed_keys(target: Target) -> list[str]:
    keys: set[str] = set()
    for _, payload, _ in target.seed_bodies():
        keys_of(payload, keys)
    keys_of(target.valid("m-1", "c-1", "hi"), keys)
    return sorted(keys)


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_random_json_trees_are_parsed_or_rejected(target: Target) -> None:
    keys = seed_keys(target)

    @given(json_trees(keys))
    def run(tree: Any) -> None:
        outcome(target, target.hook(tree))

    run()


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_mutated_recorded_payloads_are_parsed_or_rejected(target: Target) -> None:
    keys = seed_keys(target)
    seeds = [(payload, form) for _, payload, form in target.seed_bodies()]
    seeds.append((target.valid("m-1", "c-1", "hi"), False))

    @given(st.data())
    def run(data: st.DataObject) -> None:
        payload, form = data.draw(st.sampled_from(seeds))
        tree = data.draw(mutated(payload, keys))
        outcome(target, target.seed_hook(tree, form))

    run()


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_random_bytes_are_rejected_or_parsed(target: Target) -> None:
    @given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
    def run(body: bytes) -> None:
        outcome(target, target.hook(body))

    run()


# -- the flow loader -------------------------------------------------------------------------------

FLOW_SOURCES = sorted((REPO / "flows").glob("*.yaml")) + sorted((REPO / "tests" / "engine" / "flows").glob("*.yaml"))
#: the flows as data, keys as the loader reads them (`on:` stays "on", not True)
FLOWS = [parse_yaml(p.read_text(), str(p)).data for p in FLOW_SOURCES if not p.name.endswith(".test.yaml")]
VOCABULARY = sorted(
    {*FLOW_KEYS, *STATE_KEYS, *ROUTE_KEYS, *ACTIONS, *CONDITIONS, "start", "states", "flow", "on"}
    | set().union(*(keys_of(f) for f in FLOWS))
)
YAML_TEXT = st.lists(
    st.sampled_from(
        [*":-{}[]#&*!|>'\"%@`,? \n\t\\$", "  ", "flow", "states", "start", "routes", "do", "reply", "{{", "}}"]
    )
    | st.characters(),
    max_size=120,
).map("".join)


def check_loaded(text: str) -> None:
    """`load_flows` gives flows, or a ConfigError whose every problem points into the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        lines = text.count("\n") + 2
        try:
            flows = load_flows(Path(folder), Known(connectors=frozenset({"rasa"}), queues=frozenset({"tier1"})))
        except ConfigError as exc:
            assert exc.problems
            for p in exc.problems:
                assert p.file == str(path) and isinstance(p.message, str) and p.message, p
                assert 1 <= p.line <= lines and p.col >= 1, p
            return
        assert flows and all(isinstance(name, str) for name in flows)


@given(YAML_TEXT)
def test_random_yaml_text_loads_or_fails_with_positions(text: str) -> None:
    check_loaded(text)


@given(st.data())
def test_mutated_flows_load_or_fail_with_positions(data: st.DataObject) -> None:
    flow = data.draw(st.sampled_from(FLOWS))
    tree = data.draw(mutated(flow, VOCABULARY))
    check_loaded(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))


@given(json_trees(VOCABULARY, max_leaves=40))
def test_random_flow_shaped_trees_load_or_fail_with_positions(tree: Any) -> None:
    check_loaded(yaml.safe_dump({"flow": "x", "states": tree}, allow_unicode=True))


# -- templates -------------------------------------------------------------------------------------

ECHO = """\
flow: echo
states:
  start:
    routes:
      - do:
          - reply: "said: {{ message.text }}"
          - set: {last: "{{ message.text }}", who: "{{ user.name }}"}
          - reply: "{{ vars.last }}|{{ vars.who }}"
"""
TEMPLATE_TEXT = st.text() | st.lists(
    st.sampled_from(["{{", "}}", "{%", "%}", "{#", "#}", " 7*7 ", " raw ", "endraw", "''.__class__", " self ", "x"]),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def echo_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = tmp_path_factory.mktemp("echo")
    (folder / "echo.yaml").write_text(ECHO)
    return Engine(load_flows(folder))


def test_user_text_in_templates_is_data(echo_engine: Engine) -> None:
    @given(TEMPLATE_TEXT, TEMPLATE_TEXT)
    def run(text: str, name: str) -> None:
        message = Inbound("t", "m-1", "c-1", Sender("u-1", name), text=text)
        result = asyncio.run(echo_engine.decide(message, ConversationState()))
        assert [r.text for r in result.replies] == [f"said: {text}", f"{text}|{name}"]

    run()


# -- the generic webhook, over HTTP ------------------------------------------------------------------


def test_generic_webhook_takes_or_refuses_random_json(hostile: ThreadedApp, client: httpx.Client) -> None:
    """Random trees of the protocol's own fields, and arrays of them, through the running app: 200 with
    every new message stored, or 400 with nothing stored; never anything else."""
    keys = seed_keys(BY_NAME["generic"])

    @given(json_trees(keys) | st.lists(json_trees(keys, max_leaves=10), min_size=1, max_size=3), st.booleans())
    @settings(max_examples=60)
    def run(tree: Any, signed: bool) -> None:
        target = BY_NAME["generic" if signed else "open"]
        hook = target.hook(tree)
        before = hostile.inbox_rows()
        r = client.post(hook.url(hostile.url, target.name), content=hook.body, headers=hook.headers)
        assert r.status_code in (200, 400), r.text
        stored = hostile.inbox_rows() - before
        if r.status_code == 400:
            assert stored == 0 and isinstance(r.json()["error"], str)
        else:
            assert stored == r.json()["accepted"]

    run()
