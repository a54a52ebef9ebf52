"""The Chatwoot agent-bot platform: the contract, the recorded payloads, signing, silence, handoff, end to end."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.model import (
    EVENT_AGENT_ASSIGNED,
    EVENT_AGENT_RESOLVED,
    EVENT_CONVERSATION_STARTED,
    Attachment,
    Button,
    Handoff,
    Outgoing,
    Reply,
)
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.chatwoot import ChatwootConfig, ChatwootPlatform
from middleware.settings import settings_from_text
from tests.conftest import Server, running
from tests.platforms.contract import Case, ContractSuite, FakeApi

DATA = Path(__file__).resolve().parent.parent / "data" / "chatwoot"
SECRET = "cw-bot-secret"
TOKEN = "url-token-123"
BOT_TOKEN = "bot-access-token"
BASE = "http://chatwoot.test"
CONFIG: dict[str, Any] = {
    "type": "chatwoot",
    "base_url": BASE,
    "account_id": 3,
    "bot_token": BOT_TOKEN,
    "webhook_secret": SECRET,
    "webhook_token": TOKEN,
}


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def sign(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if at is None else at)
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json; charset=utf-8",
        "x-chatwoot-timestamp": stamp,
        "x-chatwoot-signature": f"sha256={digest}",
        "x-chatwoot-delivery": "6f1c0a52-3f7e-4a55-9d1b-2a9c3e0b7d11",
    }


def webhook(data: dict[str, Any], token: str | None = TOKEN, **sign_args: Any) -> WebhookRequest:
    body = json.dumps(data).encode()
    return WebhookRequest("POST", body, sign(body, **sign_args), {"token": token} if token is not None else {})


def text_message(mid: str | int, conv: str | int, text: str, status: str = "pending") -> dict[str, Any]:
    data = payload("message_created_v4.json")
    data["id"] = mid
    data["content"] = text
    data["conversation"]["id"] = conv
    data["conversation"]["status"] = status
    return data


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return webhook(text_message(mid, conv, text))


def forge(request: WebhookRequest) -> WebhookRequest:
    return WebhookRequest(
        "POST", request.body, {**request.headers, "x-chatwoot-signature": "sha256=" + "0" * 64}, request.query
    )


def chatwoot_ok(request: httpx.Request) -> httpx.Response:
    """Chatwoot's documented success answers (developers.chatwoot.com/api-reference)."""
    path = request.url.path
    if path.endswith("/toggle_status"):
        status = json.loads(request.content)["status"]
        conv = int(path.split("/")[-2])
        return httpx.Response(
            200, json={"meta": {}, "payload": {"success": True, "current_status": status, "conversation_id": conv}}
        )
    if path.endswith("/messages"):
        body = json.loads(request.content)
        return httpx.Response(
            200, json={"id": 9001, "content": body.get("content"), "message_type": 1, "private": False}
        )
    return httpx.Response(200)


class TestChatwootContract(ContractSuite):
    case = Case(
        type="chatwoot",
        config=CONFIG,
        text_webhook=text_webhook,
        forge=forge,
        ok=chatwoot_ok,
        # Rack::Attack's throttled answer; Retry-After when the installation enables the header
        rate_limited=lambda: httpx.Response(429, headers={"Retry-After": "7"}, text="Retry later\n"),
    )


def make(**overrides: Any) -> tuple[ChatwootPlatform, FakeApi]:
    api = FakeApi(chatwoot_ok)
    config = ChatwootConfig.model_validate({**CONFIG, **overrides})
    return ChatwootPlatform("cw", config, api.client()), api


# -- every recorded payload -------------------------------------------------------------------

#: file -> (type, event or None) of the one Inbound it becomes, or None when it is acknowledged and dropped
EXPECTED: dict[str, tuple[str, str | None] | None] = {
    "message_created.json": ("text", None),
    "message_created_v4.json": ("text", None),
    "message_created_image.json": ("image", None),
    "message_created_location.json": ("location", None),
    "message_created_human_owned.json": None,
    "message_created_outgoing_agent.json": None,
    "message_created_outgoing_bot.json": None,
    "message_created_private_note.json": None,
    "message_created_template.json": None,
    "message_updated.json": None,
    "message_updated_input_select.json": ("postback", None),
    "conversation_created.json": ("event", EVENT_CONVERSATION_STARTED),
    "webwidget_triggered.json": None,
    "webwidget_triggered_existing.json": ("event", EVENT_CONVERSATION_STARTED),
    "conversation_status_changed.json": ("event", EVENT_AGENT_ASSIGNED),
    "conversation_status_changed_open.json": ("event", EVENT_AGENT_ASSIGNED),
    "conversation_status_changed_pending.json": ("event", EVENT_AGENT_RESOLVED),
    "conversation_status_changed_resolved.json": ("event", EVENT_AGENT_RESOLVED),
    "conversation_status_changed_reopened.json": None,
    "conversation_status_changed_snoozed.json": None,
    "conversation_resolved.json": ("event", EVENT_AGENT_RESOLVED),
    "conversation_opened.json": ("event", EVENT_AGENT_ASSIGNED),
    "conversation_updated.json": None,
    "conversation_typing_on.json": None,
}


def test_every_recorded_payload_is_listed() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_payload(name: str) -> None:
    platform, _ = make()
    parsed = platform.parse(webhook(payload(name)))
    assert parsed.status == 200
    expected = EXPECTED[name]
    if expected is None:
        assert parsed.messages == []
        assert isinstance(parsed.response, dict) and parsed.response["ignored"]
        return
    assert parsed.response is None
    [msg] = parsed.messages
    assert (msg.type, msg.payload.get("event")) == expected
    assert msg.platform == "cw" and msg.message_id and msg.sender.id and msg.conversation_id.isdigit()
    again = platform.parse(webhook(payload(name)))
    assert [m.message_id for m in again.messages] == [msg.message_id], "a redelivery must dedupe"
    assert type(msg).from_json(msg.to_json()) == msg


def test_text_message_fields() -> None:
    platform, _ = make()
    [msg] = platform.parse(webhook(payload("message_created_v4.json"))).messages
    assert (msg.message_id, msg.conversation_id, msg.text) == ("5001", "42", "Halo, saya mau tanya soal pesanan")
    assert msg.sender.id == "731" and msg.sender.name == "Rina Wijaya"
    assert msg.sender.attributes == {
        "plan": "gold",
        "email": "rina@example.com",
        "phone_number": "+6281234567890",
        "identifier": "cust-9001",
    }
    assert msg.channel == "7"
    assert msg.timestamp is not None and msg.timestamp.isoformat() == "2026-03-02T03:14:07.641000+00:00"


def test_documented_sample_fields() -> None:
    platform, _ = make()
    [msg] = platform.parse(webhook(payload("message_created.json"))).messages
    assert (msg.message_id, msg.conversation_id, msg.text, msg.sender.id) == ("118", "10", "hi", "14")
    assert msg.sender.name == "little-haze-776" and msg.channel == "1"


def test_attachments_and_location() -> None:
    platform, _ = make()
    [image] = platform.parse(webhook(payload("message_created_image.json"))).messages
    assert image.type == "image" and image.text == "receipt attached"
    assert image.attachments == (
        Attachment("image", payload("message_created_image.json")["attachments"][0]["data_url"]),
    )
    [place] = platform.parse(webhook(payload("message_created_location.json"))).messages
    assert place.payload == {"latitude": -6.2088, "longitude": 106.8456, "title": "Monas, Jakarta"}
    assert place.text == "Monas, Jakarta"


def test_options_choice_is_a_postback() -> None:
    platform, _ = make()
    [msg] = platform.parse(webhook(payload("message_updated_input_select.json"))).messages
    assert (msg.type, msg.text, msg.payload) == ("postback", "Opening hours", {"payload": "hours"})
    assert msg.message_id == "5008:submitted" and msg.sender.id == "731"


def test_events_carry_status_and_agent() -> None:
    platform, _ = make()
    [taken] = platform.parse(webhook(payload("conversation_status_changed_open.json"))).messages
    assert taken.payload == {"event": EVENT_AGENT_ASSIGNED, "status": "open", "agent": {"id": "5", "name": "Dewi"}}
    [back] = platform.parse(webhook(payload("conversation_status_changed_pending.json"))).messages
    assert back.payload == {"event": EVENT_AGENT_RESOLVED, "status": "pending"}
    [done] = platform.parse(webhook(payload("conversation_status_changed_resolved.json"))).messages
    assert done.payload == {"event": EVENT_AGENT_RESOLVED, "status": "resolved"}
    assert len({taken.message_id, back.message_id, done.message_id}) == 3
    assert taken.sender.id == back.sender.id == "731"


def test_legacy_and_new_status_events_for_one_change_dedupe() -> None:
    platform, _ = make()
    new = payload("conversation_status_changed_resolved.json")
    legacy = copy.deepcopy(new)
    legacy["event"] = "conversation_resolved"
    del legacy["changed_attributes"]
    [a] = platform.parse(webhook(new)).messages
    [b] = platform.parse(webhook(legacy)).messages
    assert a.message_id == b.message_id


def test_conversation_started_once_per_conversation() -> None:
    platform, _ = make()
    created = payload("conversation_created.json")
    widget = payload("webwidget_triggered_existing.json")
    [a] = platform.parse(webhook(created)).messages
    [b] = platform.parse(webhook(widget)).messages
    assert a.conversation_id == b.conversation_id == "42"
    assert a.message_id == b.message_id == f"{EVENT_CONVERSATION_STARTED}:42"


# -- the bot stays silent while a human owns the conversation --------------------------------


@pytest.mark.parametrize("status", ["open", "snoozed", "resolved"])
def test_silent_while_not_pending(status: str) -> None:
    platform, _ = make()
    parsed = platform.parse(webhook(text_message(77, 42, "are you there?", status=status)))
    assert parsed.messages == []
    assert parsed.status == 200, "any other answer makes Chatwoot mark the message failed"
    assert parsed.response == {
        "accepted": 0,
        "duplicates": 0,
        "ignored": f"conversation is {status!r}: a human owns it",
    }
    choice = payload("message_updated_input_select.json")
    choice["conversation"]["status"] = status
    assert platform.parse(webhook(choice)).messages == []
    started = payload("conversation_created.json")
    started["status"] = status
    assert platform.parse(webhook(started)).messages == []


def test_answers_when_handed_back() -> None:
    platform, _ = make()
    assert len(platform.parse(webhook(text_message(78, 42, "hello again", status="pending"))).messages) == 1
    legacy = text_message(79, 42, "old status name", status="bot")
    assert len(platform.parse(webhook(legacy)).messages) == 1


# -- authentication ----------------------------------------------------------------------------


def test_signed_webhook_is_accepted_and_verified_over_timestamp_and_body() -> None:
    platform, _ = make(webhook_token=None)
    assert len(platform.parse(webhook(text_message(1, 42, "hi"), token=None)).messages) == 1
    body = json.dumps(text_message(1, 42, "hi")).encode()
    # HMAC of the body alone (the common mistake) is not Chatwoot's signature
    body_only = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {**sign(body), "x-chatwoot-signature": body_only}
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", body, headers))
    assert err.value.status == 401


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, b: ({k: v for k, v in h.items() if k != "x-chatwoot-signature"}, b), id="no-signature"),
        pytest.param(lambda h, b: ({k: v for k, v in h.items() if k != "x-chatwoot-timestamp"}, b), id="no-timestamp"),
        pytest.param(lambda h, b: ({**h, "x-chatwoot-timestamp": "soon"}, b), id="bad-timestamp"),
        pytest.param(lambda h, b: (h, b.replace(b'"hi"', b'"hj"')), id="tampered-body"),
        pytest.param(
            lambda h, b: ({**h, "x-chatwoot-timestamp": str(int(h["x-chatwoot-timestamp"]) + 1)}, b),
            id="moved-timestamp",
        ),
        pytest.param(lambda h, b: (sign(b, secret="other"), b), id="wrong-secret"),
        pytest.param(lambda h, b: (sign(b, at=int(time.time()) - 3600), b), id="replayed-an-hour-later"),
        pytest.param(lambda h, b: ({**h, "x-chatwoot-signature": h["x-chatwoot-signature"][7:]}, b), id="no-prefix"),
    ],
)
def test_forged_or_stale_signatures_are_refused(
    tamper: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]],
) -> None:
    platform, _ = make(webhook_token=None)
    body = json.dumps(text_message(1, 42, "hi")).encode()
    headers, body = tamper(sign(body), body)
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", body, headers))
    assert err.value.status == 401


def test_url_token() -> None:
    platform, _ = make(webhook_secret=None)
    body = json.dumps(text_message(1, 42, "hi")).encode()
    plain = {"content-type": "application/json"}
    assert len(platform.parse(WebhookRequest("POST", body, plain, {"token": TOKEN})).messages) == 1
    for query in ({}, {"token": ""}, {"token": "url-token-124"}, {"token": TOKEN + "x"}):
        with pytest.raises(Rejected) as err:
            platform.parse(WebhookRequest("POST", body, plain, query))
        assert err.value.status == 401


def test_token_and_secret_are_both_required_when_both_are_set() -> None:
    platform, _ = make()
    body = json.dumps(text_message(1, 42, "hi")).encode()
    with pytest.raises(Rejected):
        platform.parse(WebhookRequest("POST", body, {"content-type": "application/json"}, {"token": TOKEN}))
    with pytest.raises(Rejected):
        platform.parse(WebhookRequest("POST", body, sign(body), {}))


def test_unauthenticated_when_nothing_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    platform, _ = make(webhook_secret=None, webhook_token=None)
    assert "unauthenticated" in caplog.text
    body = json.dumps(text_message(1, 42, "hi")).encode()
    assert len(platform.parse(WebhookRequest("POST", body, {"content-type": "application/json"})).messages) == 1


def test_retry_with_a_new_timestamp_dedupes() -> None:
    platform, _ = make()
    first = platform.parse(webhook(text_message(5001, 42, "hi"), at=int(time.time()) - 6)).messages
    retry = platform.parse(webhook(text_message(5001, 42, "hi"))).messages
    assert [m.message_id for m in first] == [m.message_id for m in retry] == ["5001"]


# -- malformed webhooks ------------------------------------------------------------------------


def test_malformed_webhooks() -> None:
    platform, _ = make(webhook_secret=None, webhook_token=None)
    plain = {"content-type": "application/json"}
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("GET", b"", plain))
    assert err.value.status == 405
    for body, status in [
        (b"[1]", 400),
        (b"{", 400),
        (b'{"event": "message_created", "message_type": "incoming"}', 400),
    ]:
        with pytest.raises(Rejected) as err:
            platform.parse(WebhookRequest("POST", body, plain))
        assert err.value.status == status
    no_id = text_message(1, 42, "hi")
    del no_id["conversation"]["id"]
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", json.dumps(no_id).encode(), plain))
    assert err.value.field == "conversation.id"
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", b"{}", {"content-type": "text/plain"}))
    assert err.value.status == 415
    assert platform.parse(WebhookRequest("POST", b'{"event": "contact_created"}', plain)).messages == []


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        ChatwootConfig.model_validate({**CONFIG, "base_url": "chatwoot.example"})
    with pytest.raises(ValidationError):
        ChatwootConfig.model_validate({**CONFIG, "webhook_secret": " "})
    with pytest.raises(ValidationError):
        ChatwootConfig.model_validate({**CONFIG, "account_id": "acme"})
    config = ChatwootConfig.model_validate({**CONFIG, "base_url": "https://chat.acme.example/"})
    assert config.base_url == "https://chat.acme.example"
    assert BOT_TOKEN not in repr(config) and SECRET not in repr(config) and TOKEN not in repr(config)


# -- outbound ----------------------------------------------------------------------------------


async def test_text_reply_request() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "42", Reply("hi Rina"), "5001"), "k")
    [call] = api.calls
    assert (call.method, call.url) == ("POST", f"{BASE}/api/v1/accounts/3/conversations/42/messages")
    assert call.headers["api_access_token"] == BOT_TOKEN
    assert call.body == {"content": "hi Rina", "message_type": "outgoing", "private": False}


async def test_buttons_as_options() -> None:
    platform, api = make()
    reply = Reply(
        "Pick one",
        buttons=(Button("Opening hours", "hours"),),
        quick_replies=(Button("Pricing", "pricing"),),
        attachments=(Attachment("file", "https://acme.example/menu.pdf", "Menu"),),
    )
    await platform.deliver(Outgoing("message", "42", reply), "k")
    assert api.calls[0].body == {
        "content": "Pick one\nMenu: https://acme.example/menu.pdf",
        "message_type": "outgoing",
        "private": False,
        "content_type": "input_select",
        "content_attributes": {
            "items": [{"title": "Opening hours", "value": "hours"}, {"title": "Pricing", "value": "pricing"}]
        },
    }


async def test_buttons_as_text() -> None:
    platform, api = make(buttons="text")
    await platform.deliver(
        Outgoing("message", "42", Reply("Pick one", buttons=(Button("Opening hours", "hours"),))), "k"
    )
    assert api.calls[0].body == {"content": "Pick one\n1. Opening hours", "message_type": "outgoing", "private": False}


async def test_typing_request_and_refusal() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("typing", "42", typing=True), "t1")
    await platform.deliver(Outgoing("typing", "42", typing=False), "t2")
    assert [(c.url.rsplit("/", 1)[-1], c.body) for c in api.calls] == [
        ("toggle_typing_status", {"typing_status": "on"}),
        ("toggle_typing_status", {"typing_status": "off"}),
    ]
    api.fail_with = httpx.Response(401, json={"error": "Invalid Access Token"})
    await platform.deliver(Outgoing("typing", "42", typing=True), "t3")
    assert platform.supports_typing is False
    await platform.deliver(Outgoing("typing", "42", typing=False), "t4")
    assert len(api.calls) == 3, "no more typing calls once Chatwoot refused them"
    off, _ = make(typing=False)
    assert off.supports_typing is False


async def test_handoff_and_release_requests() -> None:
    platform, api = make(teams={"billing": 5})
    await platform.deliver(Outgoing("handoff", "42", handoff=Handoff("billing", "asked for a person")), "h")
    await platform.deliver(Outgoing("release", "42"), "r")
    conv = f"{BASE}/api/v1/accounts/3/conversations/42"
    assert [(c.url, c.body) for c in api.calls] == [
        (f"{conv}/toggle_status", {"status": "open"}),
        (f"{conv}/assignments", {"team_id": 5}),
        (f"{conv}/messages", {"content": "Handoff: asked for a person", "message_type": "outgoing", "private": True}),
        (f"{conv}/toggle_status", {"status": "pending"}),
    ]
    assert all(c.headers["api_access_token"] == BOT_TOKEN for c in api.calls)


async def test_handoff_minimal() -> None:
    platform, api = make(handoff_note=False)
    await platform.deliver(Outgoing("handoff", "42", handoff=Handoff("tier1", "low confidence")), "h")
    assert [(c.url.rsplit("/", 1)[-1], c.body) for c in api.calls] == [("toggle_status", {"status": "open"})]
    assert platform.supports_handoff


async def test_errors_name_the_problem() -> None:
    platform, api = make()
    api.fail_with = httpx.Response(404, json={"error": "Resource could not be found"})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "999", Reply("x")), "k")
    assert not err.value.retryable and "account_id" in str(err.value)
    api.fail_with = httpx.Response(401, json={"error": "Invalid Access Token"})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("handoff", "42", handoff=Handoff()), "k")
    assert not err.value.retryable and "bot_token" in str(err.value) and BOT_TOKEN not in str(err.value)
    api.fail_with = httpx.Response(429, text="Retry later\n")
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("release", "42"), "k")
    assert err.value.retryable and err.value.retry_after is None


async def test_read_receipts_are_not_sent() -> None:
    platform, api = make()
    assert not platform.supports_read
    await platform.deliver(Outgoing("read", "42", message_id="5001"), "r")
    assert api.calls == []


# -- end to end: Switchboard between a fake Chatwoot and a flow ------------------------------


@dataclass
class FakeChatwoot:
    """Chatwoot's Application API as an agent bot sees it, echoing the bot's messages back to its webhook.

    Chatwoot fires `message_created` for every message the bot creates, so the bot's own replies
    reach its webhook again (signed like any other event); the bot must drop them.
    """

    webhook_url: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    echo_answers: list[int] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    next_id: int = 9000

    def app(self) -> Starlette:
        base = "/api/v1/accounts/{account_id:int}/conversations/{conversation_id:int}"
        return Starlette(
            routes=[
                Route(f"{base}/messages", self._message, methods=["POST"]),
                Route(f"{base}/toggle_typing_status", self._typing, methods=["POST"]),
                Route(f"{base}/toggle_status", self._status, methods=["POST"]),
            ]
        )

    async def _auth(self, request: Request) -> dict[str, Any] | None:
        if request.path_params["account_id"] != 3 or request.headers.get("api_access_token") != BOT_TOKEN:
            return None
        body: dict[str, Any] = await request.json()
        self.calls.append((request.url.path.rsplit("/", 1)[-1], body))
        return body

    async def _message(self, request: Request) -> Response:
        body = await self._auth(request)
        if body is None:
            return JSONResponse({"error": "Invalid Access Token"}, status_code=401)
        self.next_id += 1
        conv = request.path_params["conversation_id"]
        echo = text_message(self.next_id, conv, body["content"])
        echo.update(message_type="outgoing", sender={"id": 2, "name": "Switchboard", "type": "agent_bot"})
        echo["content_type"] = body.get("content_type", "text")
        echo["content_attributes"] = body.get("content_attributes", {})
        task = asyncio.create_task(self._echo(echo))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return JSONResponse(
            {"id": self.next_id, "content": body["content"], "message_type": 1, "conversation_id": conv}
        )

    async def _echo(self, data: dict[str, Any]) -> None:
        raw = json.dumps(data).encode()
        async with httpx.AsyncClient() as client:
            answer = await client.post(self.webhook_url, content=raw, headers=sign(raw))
        self.echo_answers.append(answer.status_code)

    async def _typing(self, request: Request) -> Response:
        if await self._auth(request) is None:
            return JSONResponse({"error": "Invalid Access Token"}, status_code=401)
        return Response(status_code=200)

    async def _status(self, request: Request) -> Response:
        body = await self._auth(request)
        if body is None:
            return JSONResponse({"error": "Invalid Access Token"}, status_code=401)
        conv = request.path_params["conversation_id"]
        return JSONResponse(
            {"meta": {}, "payload": {"success": True, "current_status": body["status"], "conversation_id": conv}}
        )

    def messages(self) -> list[dict[str, Any]]:
        return [body for path, body in self.calls if path == "messages"]


@pytest.fixture
async def chatwoot() -> AsyncIterator[tuple[Server, FakeChatwoot]]:
    fake = FakeChatwoot()
    async with Server(fake.app()) as server:
        yield server, fake


async def wait_for(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def test_end_to_end(tmp_path: Path, chatwoot: tuple[Server, FakeChatwoot], client: httpx.AsyncClient) -> None:
    cw_server, fake = chatwoot
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "cw.yaml").write_text(
        textwrap.dedent(
            """\
            flow: cw
            states:
              start:
                routes:
                  - when: {postback: hours}
                    do: [{reply: "We open at 9."}]
                  - when: {text: {matches: "^menu"}}
                    do:
                      - reply:
                          text: "Pick one"
                          buttons: [{title: "Opening hours", payload: hours}]
                  - do: [{reply: "echo {{ message.text }}"}]
            """
        )
    )
    settings = settings_from_text(
        textwrap.dedent(
            f"""\
            store:
              url: "sqlite:///{tmp_path}/sb.db"
            flows: {flows}
            platforms:
              cw:
                type: chatwoot
                base_url: {cw_server.url}
                account_id: 3
                bot_token: {BOT_TOKEN}
                webhook_secret: {SECRET}
                webhook_token: {TOKEN}
            """
        ),
        "<test config>",
    )
    async with running(settings) as (server, _services):
        url = f"{server.url}/webhooks/cw?token={TOKEN}"
        fake.webhook_url = url

        async def post(data: dict[str, Any], **sign_args: Any) -> httpx.Response:
            raw = json.dumps(data).encode()
            return await client.post(url, content=raw, headers=sign(raw, **sign_args))

        first = await post(text_message(101, 42, "hello"))
        assert (first.status_code, first.json()) == (200, {"accepted": 1, "duplicates": 0})
        await wait_for(lambda: len(fake.messages()) == 1)
        assert fake.messages()[0] == {"content": "echo hello", "message_type": "outgoing", "private": False}

        # Chatwoot retries (AgentBots::WebhookJob) with the same body and a fresh signature
        retry = await post(text_message(101, 42, "hello"), at=int(time.time()) - 3)
        assert (retry.status_code, retry.json()) == (200, {"accepted": 0, "duplicates": 1})

        # a human owns conversation 43: acknowledged, no turn
        silent = await post(text_message(102, 43, "hello?", status="open"))
        assert silent.status_code == 200 and silent.json()["ignored"]

        # options out, the contact's choice back as a postback
        await post(text_message(103, 42, "menu please"))
        await wait_for(lambda: len(fake.messages()) == 2)
        options = fake.messages()[1]
        assert options["content_type"] == "input_select"
        assert options["content_attributes"] == {"items": [{"title": "Opening hours", "value": "hours"}]}
        choice = payload("message_updated_input_select.json")
        choice["id"] = fake.next_id
        choice["conversation"]["id"] = 42
        choice["content_attributes"] = {
            **options["content_attributes"],
            "submitted_values": options["content_attributes"]["items"],
        }
        picked = await post(choice)
        assert picked.json() == {"accepted": 1, "duplicates": 0}
        await wait_for(lambda: len(fake.messages()) == 3)
        assert fake.messages()[2]["content"] == "We open at 9."

        # a forged webhook is refused before anything is stored
        raw = json.dumps(text_message(104, 42, "forged")).encode()
        forged = await client.post(url, content=raw, headers=sign(raw, secret="guess"))
        assert forged.status_code == 401

        # the bot's own messages came back to the webhook and were dropped: no reply loop
        await wait_for(lambda: len(fake.echo_answers) == 3)
        assert fake.echo_answers == [200, 200, 200]
        await asyncio.sleep(0.3)
        assert [m["content"] for m in fake.messages()] == ["echo hello", "Pick one", "We open at 9."]
        assert all(path == "messages" for path, _ in fake.calls), fake.calls
