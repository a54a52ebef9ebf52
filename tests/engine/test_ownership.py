"""Turns around a handoff and the conversation's start, through the real engine (and, end to end,
through the generic platform's webhook):

- give-back keeps the history up to and including the handoff's turn, and drops the human part;
- while a person owns the conversation, events other than the agents' do not make the bot speak;
- `on: conversation.started` runs once, whether the platform sends its own event first or not.
"""

from __future__ import annotations

import itertools
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from middleware.engine import Engine, Resources, load_flows
from middleware.handoff import HandoffMachine, HandoffSettings
from middleware.model import ConversationState, Inbound, MessageType, Owner, Sender, TurnResult
from tests.conftest import fake_platform, generic_config, message, running
from tests.connectors.common import wait_for

FLOW = """\
flow: owned
on:
  conversation.started:
    - reply: "Welcome!"
  agent.resolved:
    - reply: "The bot is back."
always:
  - when: {text: {matches: "(?i)\\\\bhuman\\\\b"}}
    do:
      - reply: "Connecting you to a person."
      - handoff: {queue: tier1, reason: asked, resume: survey}
states:
  start:
    timeout: {after: 5m, do: [{reply: "Still there?"}]}
    routes:
      - when: {event: parcel.lost}
        do: [{reply: "Your parcel is lost."}]
      - do: [{reply: "Bot: {{ message.text }}"}, {schedule: {after: 1m, do: [{reply: "A follow-up."}]}}]
  survey:
    enter: [{reply: "How did we do?"}]
    routes:
      - do: [{goto: start}]
"""


class Conversation:
    """One conversation against the engine, its state carried from turn to turn."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "owned.yaml").write_text(FLOW)
        handoff = HandoffMachine(HandoffSettings.model_validate({"queues": {"tier1": {}}}))
        self.engine = Engine(load_flows(tmp_path), Resources(handoff=handoff))
        self.state = ConversationState()
        self.ids = itertools.count(1)
        self.timers: list[tuple[str, dict[str, Any]]] = []

    async def turn(self, kind: MessageType, text: str = "", /, **payload: Any) -> TurnResult:
        inbound = Inbound("myapp", f"m-{next(self.ids)}", "c-1", Sender("u-1"), kind, text, payload)
        result = await self.engine.decide(inbound, self.state, time.monotonic() + 30)
        self.state = result.state
        self.timers += [(t.name, {"event": "timer", "name": t.name, **t.payload}) for t in result.timers]
        return result

    async def say(self, text: str) -> list[str]:
        return [r.text for r in (await self.turn("text", text)).replies]

    async def event(self, name: str, /, **payload: Any) -> list[str]:
        return [r.text for r in (await self.turn("event", "", event=name, **payload)).replies]


async def test_give_back_keeps_the_handoff_request_and_drops_the_human_part(tmp_path: Path) -> None:
    c = Conversation(tmp_path)
    assert await c.say("hello") == ["Welcome!", "Bot: hello"]
    assert await c.say("I want a human") == ["Connecting you to a person."]
    assert await c.say("are you there?") == []
    assert await c.event("agent.message", agent="sam", text="Hi, Sam here.") == ["Hi, Sam here."]
    assert await c.say("my order is late") == []
    during = [tuple(h) for h in c.state.history]
    # each message once, the agent's as the agent's
    assert during[-3:] == [("user", "are you there?"), ("agent", "Hi, Sam here."), ("user", "my order is late")]
    assert await c.event("agent.resolved", agent="sam") == ["The bot is back.", "How did we do?"]
    assert [tuple(h) for h in c.state.history] == [
        ("user", "hello"),
        ("bot", "Welcome!"),
        ("bot", "Bot: hello"),
        ("user", "I want a human"),
        ("bot", "Connecting you to a person."),
        ("bot", "The bot is back."),
        ("bot", "How did we do?"),
    ]


async def test_the_give_back_cut_follows_the_history_when_it_is_trimmed(tmp_path: Path) -> None:
    c = Conversation(tmp_path)
    for i in range(10):
        await c.say(f"question {i}")
    await c.say("human please")
    for i in range(30):  # the history keeps 40 entries: the oldest go while people talk
        await c.say(f"to the person {i}")
    await c.event("agent.resolved")
    history = [tuple(h) for h in c.state.history]
    assert ("user", "human please") in history and ("bot", "Connecting you to a person.") in history
    assert not any(text.startswith("to the person") for _, text in history)
    assert history[-2:] == [("bot", "The bot is back."), ("bot", "How did we do?")]


async def test_while_a_person_owns_it_other_events_and_timers_keep_the_bot_silent(tmp_path: Path) -> None:
    c = Conversation(tmp_path)
    await c.say("hello")  # arms the state timeout and a scheduled follow-up
    armed = list(c.timers)
    assert {name for name, _ in armed} == {"state-timeout", "scheduled"}
    assert await c.say("human") == ["Connecting you to a person."]
    for owner in (Owner.QUEUED, Owner.AGENT):
        assert c.state.owner == owner
        assert await c.event("conversation.started") == [], "an `on:` handler"
        assert await c.event("parcel.lost") == [], "an event the routes would answer"
        for _, payload in armed:
            assert [r.text for r in (await c.turn("event", **payload)).replies] == []
        assert c.state.owner == owner and c.state.state == "start"
        await c.event("agent.assigned", agent="sam")
    assert await c.event("agent.resolved") == ["The bot is back.", "How did we do?"]
    assert await c.say("5") == [] and c.state.state == "start"
    assert await c.event("parcel.lost") == ["Your parcel is lost."], "the bot's again"


async def test_conversation_started_runs_once_after_the_platforms_own_event(tmp_path: Path) -> None:
    c = Conversation(tmp_path)
    assert await c.event("conversation.started") == ["Welcome!"]
    assert await c.say("hello") == ["Bot: hello"]
    assert await c.event("conversation.started") == []
    assert await c.say("again") == ["Bot: again"]
    other = Conversation(tmp_path)
    assert await other.event("parcel.lost") == ["Your parcel is lost."], "another event first"
    assert await other.say("hello") == ["Welcome!", "Bot: hello"]


def test_a_state_stored_before_started_existed_counts_its_turns() -> None:
    assert ConversationState.from_json({"turns": 3}).started
    assert not ConversationState.from_json({"turns": 0}).started
    state = ConversationState(started=True)
    assert ConversationState.from_json(state.to_json()).started


async def test_a_platforms_conversation_started_event_then_text_welcomes_once(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "owned.yaml").write_text(FLOW)
    extra = textwrap.dedent(
        """\
        handoff:
          queues: {tier1: {}}
        """
    )
    async with (
        fake_platform() as (platform_server, platform),
        running(generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, flows, extra=extra)) as (
            server,
            services,
        ),
        httpx.AsyncClient(timeout=10) as http,
    ):
        started = message(1, type="event", text="", payload={"event": "conversation.started"})
        assert (await http.post(f"{server.url}/webhooks/myapp", json=started)).status_code == 200
        await wait_for(lambda: services.dispatcher.backlog == 0)
        assert (await http.post(f"{server.url}/webhooks/myapp", json=message(2, text="hi"))).status_code == 200
        await wait_for(lambda: len([c for c in platform.calls if c.path == "/messages"]) >= 2)
        await wait_for(lambda: services.dispatcher.backlog == 0)
    texts = [c.body["text"] for c in platform.calls if c.path == "/messages"]
    assert texts == ["Welcome!", "Bot: hi"]
