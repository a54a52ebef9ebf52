"""The timers a conversation's turns armed are recorded in its state, so a turn cancels only those
that may be pending (a turn of a flow without timers sends no cancel to the store at all); and,
end to end, an `expect` answered in time is still cancelled for good."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import httpx

from middleware.engine import Engine, Resources, load_flows
from middleware.model import ConversationState, Inbound, MessageType, Sender, TurnResult
from tests.conftest import fake_platform, generic_config, message, running

FLOW = """\
flow: t
states:
  start:
    routes:
      - when: {text: {equals: ask}}
        do:
          - reply: "What is your name?"
          - expect: {timeout: 400ms, do: [{reply: "Still there?"}]}
      - when: {text: {equals: wait}}
        do: [{reply: "waiting"}, {goto: slow}]
      - do: [{reply: "echo {{ message.text }}"}]
  slow:
    timeout: {after: 10m, do: [{reply: "too slow"}]}
    routes:
      - do: [{reply: "back"}, {goto: start}]
"""


class Conversation:
    def __init__(self, tmp_path: Path, state: ConversationState | None = None) -> None:
        (tmp_path / "t.yaml").write_text(FLOW)
        self.engine = Engine(load_flows(tmp_path), Resources())
        self.state = state if state is not None else ConversationState()
        self.ids = itertools.count(1)

    async def turn(self, text: str, kind: MessageType = "text", **payload: object) -> TurnResult:
        inbound = Inbound("myapp", f"m-{next(self.ids)}", "c-1", Sender("u-1"), kind, text, dict(payload))
        result = await self.engine.decide(inbound, self.state, time.monotonic() + 30)
        self.state = result.state
        return result


async def test_a_flow_without_timers_cancels_nothing(tmp_path: Path) -> None:
    c = Conversation(tmp_path)
    for text in ("hello", "again"):
        result = await c.turn(text)
        assert (result.timers, result.cancel_timers, result.state.timers) == ((), (), [])


async def test_armed_timers_are_recorded_and_cancelled_once(tmp_path: Path) -> None:
    c = Conversation(tmp_path)
    armed = await c.turn("ask")
    assert [t.name for t in armed.timers] == ["expect"] and armed.cancel_timers == ()
    assert armed.state.timers == ["expect"]
    answered = await c.turn("Ana")
    assert answered.cancel_timers == ("expect",) and answered.state.timers == []
    assert (await c.turn("more")).cancel_timers == ()
    # a state timeout is re-armed by every turn in its state: cancelled, armed again
    assert (await c.turn("wait")).state.timers == ["state-timeout"]
    back = await c.turn("hi")
    assert back.cancel_timers == ("state-timeout",) and back.state.timers == []


async def test_a_timer_that_fired_stays_recorded_until_a_turn_cancels_it(tmp_path: Path) -> None:
    """Recorded names are a superset of the pending timers: a fired one costs a needless cancel,
    never a missed one (its name may have been armed again meanwhile)."""
    c = Conversation(tmp_path)
    await c.turn("ask")
    fired = await c.turn("", "event", event="timer", name="expect", flow="t", ref="states.start.routes[0].do[1]")
    assert fired.state.timers == ["expect"]
    assert (await c.turn("here")).cancel_timers == ("expect",)


async def test_a_state_stored_before_timers_were_recorded_cancels_everything(tmp_path: Path) -> None:
    stored = ConversationState(flow="t", state="start", turns=3).to_json()
    del stored["timers"]
    c = Conversation(tmp_path, ConversationState.from_json(stored))
    assert c.state.timers is None
    result = await c.turn("hello")
    assert set(result.cancel_timers) == {"expect", "state-timeout"} and result.state.timers is None
    assert ConversationState.from_json(result.state.to_json()).timers is None


async def test_an_expect_answered_in_time_never_fires(tmp_path: Path, client: httpx.AsyncClient) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "t.yaml").write_text(FLOW)
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(
            f"sqlite:///{tmp_path}/sb.db", platform_server.url, flows, "dispatch: {sweep_seconds: 0.1}\n"
        )
        async with running(settings) as (server, services):
            for n, text in ((1, "ask"), (2, "Ana")):
                body = {**message(n, "c-e"), "text": text}
                assert (await client.post(f"{server.url}/webhooks/myapp", json=body)).status_code == 200
                await fake.wait_for(lambda n=n: any(c.body.get("reply_to") == f"m-{n}" for c in fake.delivered()), 10)
            await asyncio.sleep(1.0)  # the expect's 400 ms, and the sweep's firing, twice over
            assert [c.body.get("text") for c in fake.delivered()] == ["What is your name?", "echo Ana"]
            assert await services.store.pending_timers("myapp:c-e") == []
