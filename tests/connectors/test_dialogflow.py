"""The `dialogflow` connector (ES and CX) against a fake Dialogflow and a fake Google token endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connectors.base import ConnectorAuthError, ConnectorBadResponse, ConnectorTimeout, ConnectorUnavailable
from connectors.dialogflow import DialogflowConfig, DialogflowConnector, session_id
from middleware.model import Attachment, Button, Card, Handoff, Reply, SetVariable
from tests.connectors.common import make_turn, run_flow
from tests.fakes.dialogflow import FakeDialogflow, ServiceAccount
from tests.fakes.engines import client

API = "http://dialogflow.test"
KEY_ENV = "SWITCHBOARD_TEST_DIALOGFLOW_KEY"


@pytest.fixture(scope="module")
def account() -> ServiceAccount:
    return ServiceAccount()


@pytest.fixture
def fake(account: ServiceAccount, monkeypatch: pytest.MonkeyPatch) -> FakeDialogflow:
    # the key names a token URI that does not exist: only `token_url` reaches the fake's /token
    monkeypatch.setenv(KEY_ENV, json.dumps(account.info("http://oauth.test/never")))
    return FakeDialogflow(account=account)


def connector(fake: FakeDialogflow, name: str = "df", **config: Any) -> DialogflowConnector:
    raw = {
        "type": "dialogflow",
        "project": "acme-support",
        "credentials_env": KEY_ENV,
        "api_url": API,
        "token_url": f"{API}/token",
        **config,
    }
    return DialogflowConnector(name, DialogflowConfig.model_validate(raw), client(fake.app()))


def cx(fake: FakeDialogflow, **config: Any) -> DialogflowConnector:
    return connector(
        fake, edition="cx", location="europe-west1", agent="133b0350-f2d2-4928-b0b3-5b8d6f0f9e0f", **config
    )


async def test_es_happy_path_request_shape_and_nlu(fake: FakeDialogflow) -> None:
    df = connector(fake, time_zone="Asia/Jakarta")
    result = await df.ask(make_turn("I know french", vars={"brand": "Acme", "bad-name": 1}))
    (request,) = fake.requests
    assert (
        request.path == "/v2/projects/acme-support/agent/sessions/sb-" + session_id("myapp:c-1")[3:] + ":detectIntent"
    )
    assert request.headers["authorization"] == "Bearer ya29.fake-1"
    body = request.body
    assert body["queryInput"] == {"text": {"text": "I know french", "languageCode": "en"}}
    (context,) = body["queryParams"]["contexts"]
    assert context["name"].endswith(f"/sessions/{session_id('myapp:c-1')}/contexts/switchboard")
    assert context["parameters"] == {"brand": "Acme"}, "names Dialogflow cannot take are left out"
    assert body["queryParams"]["payload"] == {"switchboard": {"conversation": "myapp:c-1", "platform": "myapp"}}
    assert body["queryParams"]["timeZone"] == "Asia/Jakarta"
    assert result.replies == (Reply("Wow! I didn't know you knew French. How long have you known French?"),)
    assert result.nlu is not None and result.nlu.intent == "set-language" and result.nlu.confidence == 1.0
    assert [(e.name, e.value) for e in result.nlu.entities] == [("language", "French")]
    assert result.actions == () and not result.end


async def test_es_rich_messages_platform_variants_and_variables_back(fake: FakeDialogflow) -> None:
    fake.answers["show me shirts"] = "es_rich_messages.json"
    result = await connector(fake).ask(make_turn("show me shirts", vars={"brand": "Acme"}))
    assert result.replies == (
        Reply("Here are our shirts."),
        Reply(
            cards=(
                Card(
                    "Oxford shirt", "Cotton, 39 EUR", "https://example.com/oxford.png", (Button("Buy", "buy oxford"),)
                ),
                Card("Linen shirt", "Linen, 45 EUR", "https://example.com/linen.png", (Button("Buy", "buy linen"),)),
            )
        ),
        Reply("Which size?", quick_replies=(Button("S", "S"), Button("M", "M"), Button("L", "L"))),
        Reply(attachments=(Attachment("image", "https://example.com/size-chart.png", "Size chart"),)),
    )
    # the context's changed parameter and the custom payload's `set`; brand did not change
    assert result.actions == (SetVariable("product", "shirt"), SetVariable("last_category", "shirts"))
    telegram = await connector(fake, channel="TELEGRAM").ask(make_turn("show me shirts"))
    assert [r.text for r in telegram.replies] == ["Telegram users see this instead."]


async def test_es_live_agent_handoff_and_end_interaction(fake: FakeDialogflow) -> None:
    fake.answers["I want to speak to someone"] = "es_handoff_end.json"
    result = await connector(fake, handoff_queue="tier1").ask(make_turn("I want to speak to someone"))
    assert result.replies == (Reply("Connecting you with an agent."),)
    assert result.actions == (Handoff("tier1", "dialogflow liveAgentHandoff"),)
    assert result.end


async def test_cx_happy_path_parameters_in_and_match(fake: FakeDialogflow) -> None:
    df = cx(fake, channel="web")
    result = await df.ask(make_turn("I want to buy a shirt", vars={"brand": "Acme"}))
    (request,) = fake.requests
    agent = "projects/acme-support/locations/europe-west1/agents/133b0350-f2d2-4928-b0b3-5b8d6f0f9e0f"
    assert request.path == f"/v3/{agent}/sessions/{session_id('myapp:c-1')}:detectIntent"
    assert request.body == {
        "queryInput": {"text": {"text": "I want to buy a shirt"}, "languageCode": "en"},
        "queryParams": {"parameters": {"brand": "Acme"}, "channel": "web"},
    }
    assert result.replies == (Reply("Ok, let's start a new order. Would you like a red or white shirt?"),)
    assert result.nlu is not None and (result.nlu.intent, result.nlu.confidence) == ("order.new", 1.0)


async def test_cx_rich_content_handoff_end_and_parameters_back(fake: FakeDialogflow) -> None:
    fake.answers["my card was charged twice"] = "cx_rich_handoff.json"
    result = await cx(fake).ask(make_turn("my card was charged twice", vars={"brand": "Acme", "issue": None}))
    assert result.replies == (
        Reply("Sorry about that. A billing specialist will take over."),
        Reply(
            quick_replies=(Button("Wait", "Wait"), Button("Call me", "tel:+31000000000")),
            cards=(
                Card(
                    "Case 4417",
                    "Double charge",
                    "https://example.com/case.png",
                    (Button("Open", "https://example.com/cases/4417"),),
                ),
            ),
        ),
        Reply(
            "While you wait\nRefunds take 3-5 days.\nNo need to pay again.",
            buttons=(Button("Refund policy", "https://example.com/refunds"),),
            attachments=(Attachment("image", "https://example.com/refund.png", "Refund timeline"),),
        ),
    )
    assert result.actions == (
        SetVariable("issue", "double charge"),
        SetVariable("case_id", 4417),
        Handoff("billing", "double charge"),
    )
    assert result.end
    assert result.nlu is not None and result.nlu.intent == "billing.double_charge"
    assert [(e.name, e.value) for e in result.nlu.entities] == [("issue", "double charge")]


async def test_cx_no_match_has_no_intent(fake: FakeDialogflow) -> None:
    fake.answers["purple elephants"] = "cx_no_match.json"
    nlu = await cx(fake).parse(make_turn("purple elephants"))
    assert nlu.intent is None and nlu.confidence == 0.0


def test_session_ids_fit_dialogflows_limit() -> None:
    assert session_id("short-key_1") == "short-key_1"
    long_key = "whatsapp:" + "6281234567890" * 5
    assert len(session_id(long_key)) <= 36 and session_id(long_key) == session_id(long_key)
    assert session_id("myapp:c-1") != session_id("myapp:c-2")
    assert all(c.isalnum() or c in "-_" for c in session_id("slack:T1/C2 thread"))


async def test_the_token_is_signed_cached_and_refreshed(fake: FakeDialogflow) -> None:
    df = connector(fake)
    for _ in range(3):
        await df.ask(make_turn("hi"))
    assert len(fake.token_requests) == 1, "one token serves until it is close to expiring"
    assert fake.token_requests[0]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    # google-auth refreshes tokens that expire within minutes: a 60 s token is fetched anew each call
    fake.expires_in = 60
    short = connector(fake)
    await short.ask(make_turn("hi"))
    await short.ask(make_turn("hi"))
    assert len(fake.token_requests) == 3


async def test_a_revoked_token_is_refreshed_once_then_auth_fails(fake: FakeDialogflow) -> None:
    df = connector(fake)
    await df.ask(make_turn("hi"))
    fake.revoked.add("ya29.fake-1")
    await df.ask(make_turn("hi"))
    assert [r.headers["authorization"] for r in fake.requests][-2:] == ["Bearer ya29.fake-1", "Bearer ya29.fake-2"]
    fake.revoked.add("ya29.fake-2")
    fake.revoked.add("ya29.fake-3")
    with pytest.raises(ConnectorAuthError, match="HTTP 401"):
        await df.ask(make_turn("hi"))


async def test_token_refused_and_missing_key_are_auth_errors(
    fake: FakeDialogflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.token_fail.append(400)
    with pytest.raises(ConnectorAuthError, match="token refused"):
        await connector(fake).ask(make_turn("hi"))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConnectorAuthError, match=f"{KEY_ENV} is not set"):
        await connector(fake).ask(make_turn("hi"))
    monkeypatch.setenv(KEY_ENV, "{not json")
    with pytest.raises(ConnectorAuthError, match="cannot read the service-account key: JSONDecodeError"):
        await connector(fake).ask(make_turn("hi"))


async def test_5xx_is_not_retried_timeout_and_malformed(fake: FakeDialogflow) -> None:
    df = connector(fake, timeout=0.5)
    await df.ask(make_turn("warm the token"))
    fake.requests.clear()
    fake.fail.append(503)
    with pytest.raises(ConnectorUnavailable, match="HTTP 503"):
        await df.ask(make_turn("hi"))
    assert len(fake.requests) == 1, "detectIntent is not idempotent"
    fake.fail.append(("slow", 3.0))
    with pytest.raises(ConnectorTimeout):
        await df.ask(make_turn("hi"))
    fake.fail.append("malformed")
    with pytest.raises(ConnectorBadResponse, match="not JSON"):
        await df.ask(make_turn("hi"))


async def test_the_fallback_chain_takes_over_in_a_flow(fake: FakeDialogflow, tmp_path: Path) -> None:
    fake.token_fail.extend([400, 400])
    primary = connector(fake, "primary")
    backup_fake = FakeDialogflow(account=fake.account)
    backup = connector(backup_fake, "backup")
    result = await run_flow(tmp_path, {"primary": primary, "backup": backup}, text="I know french")
    assert [r.text for r in result.replies] == ["Wow! I didn't know you knew French. How long have you known French?"]
    assert any("connector primary: ConnectorAuthError" in t for t in result.trace)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="agent"):
        DialogflowConfig.model_validate({"type": "dialogflow", "project": "p", "edition": "cx"})
    cfg = DialogflowConfig.model_validate({"type": "dialogflow", "project": "p", "edition": "cx", "agent": "a"})
    assert DialogflowConnector("x", cfg, client(FakeDialogflow().app())).api_url == "https://dialogflow.googleapis.com"
    regional = cfg.model_copy(update={"location": "europe-west1"})
    assert DialogflowConnector("x", regional, client(FakeDialogflow().app())).api_url == (
        "https://europe-west1-dialogflow.googleapis.com"
    )
