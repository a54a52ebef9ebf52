"""The `rasa` connector against a fake Rasa (REST channel, /model/parse), and Switchboard's own Rasa
action endpoint (`POST /rasa/webhook`) answering real Rasa 3.6 action-server requests."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.base import ConnectorAuthError, ConnectorBadResponse, ConnectorTimeout, ConnectorUnavailable
from connectors.rasa import RasaConfig, RasaConnector, rasa_message
from middleware.model import Attachment, Button, Card, Handoff, Reply, SetVariable
from middleware.services import Services
from tests.conftest import Server, fake_platform, generic_config, message, running
from tests.connectors.common import make_turn, run_flow, wait_for
from tests.fakes.engines import client
from tests.fakes.platform import FakePlatform
from tests.fakes.rasa import FakeRasa, recorded

URL = "http://rasa.test"
ADMIN = "admin-token"
#: Switchboard's action endpoint takes calls with this token (actions.token) in the tests below
ACTIONS = "act-secret"


def connector(fake: FakeRasa, name: str = "rasa", **config: Any) -> RasaConnector:
    cfg = RasaConfig.model_validate({"type": "rasa", "url": URL, "backoff": 0.01, **config})
    return RasaConnector(name, cfg, client(fake.app()))


async def test_a_turn_posts_the_rest_channel_shape_and_maps_buttons() -> None:
    answer = [{k: v for k, v in m.items() if k != "recipient_id"} for m in recorded("rest_buttons.json")]
    fake = FakeRasa(answers={"hello": answer})
    rasa = connector(fake)
    result = await rasa.ask(make_turn("hello", vars={"brand": "Acme", "order": 7}))
    (request,) = fake.requests
    assert request.path == "/webhooks/rest/webhook"
    assert request.body["sender"] == "myapp:c-1"
    assert request.body["message"] == "hello"
    assert request.body["metadata"]["brand"] == "Acme" and request.body["metadata"]["order"] == 7
    assert request.body["metadata"]["switchboard"]["conversation"] == "myapp:c-1"
    assert result.replies == (
        Reply(
            "Hello from Rasa! What can I do for you?",
            buttons=(Button("Talk to a person", "/human"), Button("Say goodbye", "/goodbye")),
        ),
    )
    assert result.actions == () and not result.end


def test_every_rest_channel_reply_shape() -> None:
    text, image = recorded("rest_text_and_image.json")
    assert rasa_message(text) == (Reply("Goodbye!"), [])
    assert rasa_message(image) == (Reply(attachments=(Attachment("image", "https://example.com/bye.png"),)), [])
    assert rasa_message({"attachment": "https://example.com/a.pdf"})[0] == Reply(
        attachments=(Attachment("file", "https://example.com/a.pdf"),)
    )
    assert rasa_message({"attachment": {"type": "video", "payload": {"url": "https://v.test/x.mp4"}}})[0] == Reply(
        attachments=(Attachment("video", "https://v.test/x.mp4"),)
    )
    custom = {
        "custom": {
            "text": "Pick one",
            "quick_replies": [{"title": "Yes", "payload": "/affirm"}, {"title": "No", "payload": "/deny"}],
            "elements": [{"title": "Shirt", "subtitle": "Cotton", "image_url": "https://i.test/s.png", "buttons": []}],
        }
    }
    assert rasa_message(custom)[0] == Reply(
        "Pick one",
        quick_replies=(Button("Yes", "/affirm"), Button("No", "/deny")),
        cards=(Card("Shirt", "Cotton", "https://i.test/s.png"),),
    )
    assert rasa_message({"custom": {"blocks": [1, 2]}}) == (None, [])
    handoff = {"custom": {"switchboard": {"handoff": {"queue": "billing", "reason": "refund"}, "set": {"tier": 2}}}}
    assert rasa_message(handoff) == (None, [SetVariable("tier", 2), Handoff("billing", "refund")])
    assert rasa_message({"buttons": [{"title": "Docs", "url": "https://docs.test"}], "text": "See"})[0] == Reply(
        "See", buttons=(Button("Docs", "https://docs.test"),)
    )


async def test_a_custom_switchboard_payload_hands_off_and_a_resolve_ends() -> None:
    fake = FakeRasa(
        answers={
            "agent": [{"text": "One moment."}, {"custom": {"switchboard": {"handoff": "tier2"}}}],
            "bye": [{"custom": {"switchboard": {"resolve": True}}}],
        }
    )
    rasa = connector(fake)
    result = await rasa.ask(make_turn("agent"))
    assert result.replies == (Reply("One moment."),)
    assert result.actions == (Handoff("tier2", "rasa"),)
    ended = await rasa.ask(make_turn("bye"))
    assert ended.end and ended.actions == () and ended.replies == ()


async def test_a_postback_sends_its_payload() -> None:
    fake = FakeRasa()
    await connector(fake).ask(make_turn("Talk to a person", type="postback", payload={"payload": "/human"}))
    assert fake.requests[0].body["message"] == "/human"


async def test_parse_reads_intent_and_entities_with_the_api_token() -> None:
    fake = FakeRasa(token="s3cret")
    rasa = connector(fake, token="s3cret")
    nlu = await rasa.parse(make_turn("my favourite colour is blue"))
    assert nlu.intent == "favourite_colour" and nlu.confidence == pytest.approx(0.997, abs=0.001)
    assert [(e.name, e.value) for e in nlu.entities] == [("colour", "blue")]
    assert fake.requests[0].query == {"token": "s3cret"}
    with pytest.raises(ConnectorAuthError):
        await connector(fake, token="wrong").parse(make_turn("hi"))


async def test_parse_is_retried_on_5xx_and_429_but_the_rest_channel_is_not() -> None:
    fake = FakeRasa()
    fake.fail.extend([503, 429])
    rasa = connector(fake)
    nlu = await rasa.parse(make_turn("my favourite colour is blue"))
    assert nlu.intent == "favourite_colour" and len(fake.requests) == 3
    assert rasa.guard.stats.retries == 2
    fake.requests.clear()
    fake.fail.append(500)
    with pytest.raises(ConnectorUnavailable, match="HTTP 500"):
        await rasa.ask(make_turn("hello"))
    assert len(fake.requests) == 1, "a message Rasa may have processed is never sent twice"


async def test_timeout_malformed_json_and_odd_answers() -> None:
    fake = FakeRasa()
    rasa = connector(fake, timeout=0.3)
    fake.fail.append(("slow", 2.0))
    with pytest.raises(ConnectorTimeout):
        await rasa.ask(make_turn("hello"))
    fake.fail.append("malformed")
    with pytest.raises(ConnectorBadResponse, match="not JSON"):
        await rasa.ask(make_turn("hello"))
    fake.answers["odd"] = [{"text": "x"}]
    fake.fail.append(404)
    with pytest.raises(ConnectorBadResponse, match="HTTP 404"):
        await rasa.ask(make_turn("odd"))
    fake.fail.append("drop")
    with pytest.raises(ConnectorUnavailable):
        await rasa.ask(make_turn("hello"))
    assert rasa.guard.stats.errors == {"timeout": 1, "bad_response": 2, "unavailable": 1}


async def test_the_fallback_chain_takes_over_in_a_flow(tmp_path: Path) -> None:
    down, up = FakeRasa(), FakeRasa(answers={"hello": [{"text": "backup here"}]})
    down.fail.extend([500, 500])
    primary, backup = connector(down, "primary"), connector(up, "backup")
    result = await run_flow(tmp_path, {"primary": primary, "backup": backup})
    assert [r.text for r in result.replies] == ["backup here"]
    assert any("connector primary: ConnectorUnavailable" in t for t in result.trace)
    up.fail.append(("slow", 5))
    result = await run_flow(tmp_path, {"primary": primary, "backup": connector(up, "backup", timeout=0.2)})
    assert [r.text for r in result.replies] == ["Both engines are down."]
    assert result.actions == (Handoff("tier1", "flow"),)


# -- Switchboard's action endpoint, in the running app


@contextlib.asynccontextmanager
async def switchboard(
    tmp_path: Path, fake: FakeRasa, actions: str = f"{{token: {ACTIONS}}}", flow_do: str = "[{ask: {connector: rasa}}]"
) -> AsyncIterator[tuple[Server, Services, FakePlatform, httpx.AsyncClient]]:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "main.yaml").write_text(f"flow: main\nstates:\n  start:\n    routes:\n      - do: {flow_do}\n")
    async with (
        Server(fake.app()) as rasa_server,
        fake_platform() as (platform_server, platform),
        httpx.AsyncClient(timeout=10) as http,
    ):
        extra = f"""
            admin: {{token: {ADMIN}}}
            connectors:
              rasa:
                type: rasa
                url: {rasa_server.url}
                actions: {actions}
            """
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, flows, extra=extra)
        async with running(settings) as (server, services):
            fake.action_url = f"{server.url}/rasa/webhook"
            fake.action_token = ACTIONS if ACTIONS in actions else None
            fake.action_http = http
            yield server, services, platform, http


def texts(platform: FakePlatform) -> list[str]:
    return [c.body["text"] for c in platform.calls if c.path == "/messages"]


async def test_rasa_hands_off_through_switchboards_action_endpoint(tmp_path: Path) -> None:
    fake = FakeRasa(
        actions={"I want to talk to a human": "action_handoff"},
        answers={"I want to talk to a human": [{"text": "Let me find a person for you."}]},
    )
    async with switchboard(tmp_path, fake) as (server, services, platform, http):
        r = await http.post(f"{server.url}/webhooks/myapp", json=message(1, text="I want to talk to a human"))
        assert r.status_code == 200
        await wait_for(lambda: len(texts(platform)) >= 1)
        assert texts(platform) == ["Let me find a person for you."]
        assert fake.action_calls == [(200, {"events": [], "responses": []})]
        await wait_for(lambda: services.dispatcher.backlog == 0)
        conversation = await services.store.conversation("myapp:c-1")
        assert conversation is not None
        state = conversation["state"]
        # the recorded tracker's `handoff_queue` slot names the queue
        assert state["owner"] == "queued" and state["handoff"]["queue"] == "rasa-tier2"
        assert state["handoff"]["reason"] == "rasa action_handoff"
        listed = (
            await http.get(f"{server.url}/api/v1/connectors", headers={"authorization": f"Bearer {ADMIN}"})
        ).json()
        (rasa,) = listed["connectors"]
        assert rasa["type"] == "rasa" and rasa["breaker"]["state"] == "closed" and rasa["calls"] == 1
        assert "action_handoff" in rasa["actions"]
        assert "/api/v1/connectors" in (await http.get(f"{server.url}/api/v1/openapi.json")).json()["paths"]
        metrics = (await http.get(f"{server.url}/metrics")).text
        assert 'switchboard_connector_calls_total{connector="rasa",outcome="ok"} 1.0' in metrics


async def test_a_users_own_rasa_sdk_action_sets_variables_and_hands_off(tmp_path: Path) -> None:
    fake = FakeRasa(actions={"vip": "action_vip"}, answers={"vip": []})
    actions = f"{{modules: [tests.connectors.rasa_user_actions], token: {ACTIONS}}}"
    async with switchboard(tmp_path, fake, actions) as (server, services, platform, http):
        await http.post(f"{server.url}/webhooks/myapp", json=message(1, text="vip"))
        await wait_for(lambda: len(texts(platform)) >= 1)
        assert texts(platform) == ["VIP noted."]
        status, body = fake.action_calls[0]
        assert status == 200 and body["events"][0] == {"event": "slot", "timestamp": None, "name": "vip", "value": True}
        await wait_for(lambda: services.dispatcher.backlog == 0)
        conversation = await services.store.conversation("myapp:c-1")
        assert conversation is not None
        assert conversation["state"]["vars"]["vip"] is True
        assert conversation["state"]["handoff"]["queue"] == "vip-desk"


async def test_the_endpoint_answers_as_rasa_sdk_does(tmp_path: Path) -> None:
    fake = FakeRasa()
    actions = f"{{modules: [tests.connectors.rasa_user_actions], token: {ACTIONS}}}"
    async with switchboard(tmp_path, fake, actions) as (server, _, _platform, http):
        url = f"{server.url}/rasa/webhook?token={ACTIONS}"
        call = recorded("action_call_handoff.json")
        # no conversation of this process is in a turn: answered, and the handoff is dropped
        r = await http.post(url, json=call)
        assert r.status_code == 200 and r.json() == {"events": [], "responses": []}
        no_domain = {k: v for k, v in call.items() if k != "domain"}
        r = await http.post(url, json=no_domain)
        assert r.status_code == 449
        assert r.json()["error"].startswith("Missing domain context, assistant will retry the request")
        unknown = {**copy.deepcopy(call), "next_action": "action_nope"}
        r = await http.post(url, json=unknown)
        assert r.status_code == 404
        assert r.json() == {"error": "No registered action found for name 'action_nope'.", "action_name": "action_nope"}
        r = await http.post(url, json={**call, "next_action": "action_picky"})
        assert r.status_code == 400 and r.json() == {"error": "not now", "action_name": "action_picky"}
        r = await http.post(url, content=b"{not json")
        assert r.status_code == 400 and r.json() == {"error": "Invalid body request"}
        deflated = zlib.compress(json.dumps(recorded("action_call_set_variable.json")).encode())
        r = await http.post(url, content=deflated, headers={"content-encoding": "deflate"})
        assert r.status_code == 200 and r.json() == {"events": [], "responses": []}


async def test_the_endpoint_checks_rasas_token(tmp_path: Path) -> None:
    fake = FakeRasa()
    async with switchboard(tmp_path, fake) as (server, _, _platform, http):
        call = recorded("action_call_set_variable.json")
        assert (await http.post(f"{server.url}/rasa/webhook", json=call)).status_code == 401
        assert (await http.post(f"{server.url}/rasa/webhook?token=nope", json=call)).status_code == 401
        r = await http.post(f"{server.url}/rasa/webhook?token={ACTIONS}", json=call)
        assert r.status_code == 200


async def test_without_a_token_the_endpoint_is_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRasa(actions={"vip": "action_handoff"}, answers={"vip": [{"text": "ok"}]})
    actions = "{modules: [tests.connectors.rasa_user_actions]}"
    with caplog.at_level(logging.WARNING, logger="switchboard.connectors.rasa"):
        async with switchboard(tmp_path, fake, actions) as (server, services, platform, http):
            r = await http.post(f"{server.url}/rasa/webhook", json=recorded("action_call_handoff.json"))
            assert r.status_code == 403 and "actions.token" in r.json()["error"]
            await http.post(f"{server.url}/webhooks/myapp", json=message(1, text="vip"))
            await wait_for(lambda: texts(platform) == ["ok"])
            assert fake.action_calls[0][0] == 403, "Rasa's own action call is refused too"
            conversation = await services.store.conversation("myapp:c-1")
            assert conversation is not None and conversation["state"]["owner"] == "bot"
    assert "actions.modules are set but no actions.token" in caplog.text


async def test_unauthenticated_calls_only_by_explicit_opt_in_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRasa(actions={"human": "action_handoff"}, answers={"human": [{"text": "ok"}]})
    with caplog.at_level(logging.WARNING, logger="switchboard.connectors.rasa"):
        async with switchboard(tmp_path, fake, "{allow_unauthenticated: true}") as (server, services, platform, http):
            await http.post(f"{server.url}/webhooks/myapp", json=message(1, text="human"))
            await wait_for(lambda: texts(platform) == ["ok"])
            assert fake.action_calls == [(200, {"events": [], "responses": []})]
            await wait_for(lambda: services.dispatcher.backlog == 0)
            conversation = await services.store.conversation("myapp:c-1")
            assert conversation is not None and conversation["state"]["owner"] == "queued"
    assert "actions.allow_unauthenticated is true" in caplog.text


async def test_action_set_variable_copies_filled_slots(tmp_path: Path) -> None:
    fake = FakeRasa(actions={"my favourite colour is red": "action_set_variable"}, answers={})
    flow_do = '[{ask: {connector: rasa}}, {reply: "colour={{ vars.colour }}"}]'
    async with switchboard(tmp_path, fake, flow_do=flow_do) as (server, services, platform, http):
        await http.post(f"{server.url}/webhooks/myapp", json=message(1, text="my favourite colour is red"))
        await wait_for(lambda: "colour=red" in texts(platform))
        conversation = await services.store.conversation("myapp:c-1")
        assert conversation is not None
        variables = conversation["state"]["vars"]
        # the recorded tracker's slots: colour and handoff_queue are copied, Rasa's own are not
        assert variables["colour"] == "red"
        assert "session_started_metadata" not in variables and "handoff_queue" not in variables
