from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from middleware.model import (
    EVENT_AGENT_RESOLVED,
    EVENT_CONVERSATION_STARTED,
    Attachment,
    Button,
    Handoff,
    Outgoing,
    Reply,
)
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.qiscus_multichannel import QiscusMultichannelConfig, QiscusMultichannelPlatform
from tests.platforms.contract import Case, ContractSuite, FakeApi

DATA = Path(__file__).resolve().parent.parent / "data" / "qiscus_multichannel"
TOKEN = "hook-7d1e"
APP = "kovof-123"
ADMIN = f"{APP}_admin@qismo.com"
BASE = "https://omnichannel.qiscus.test"

CONFIG: dict[str, Any] = {
    "type": "qiscus_multichannel",
    "app_code": APP,
    "secret_key": "mc-secret-55aa",
    "base_url": BASE,
    "webhook_token": TOKEN,
}


def bot_webhook(
    unique_temp_id: str | None,
    room: str,
    text: str,
    *,
    sender: str = "6281xxx132",
    source: str = "wa",
    message_id: int = 0,
    mtype: str = "text",
    payload: Any = None,
) -> dict[str, Any]:
    """The Bot Webhook as documented: ids 0 for WhatsApp, room.options a JSON string."""
    options = {"channel": source, "channel_details": {"channel_id": 963}, "is_resolved": False, "source": source}
    message: dict[str, Any] = {
        "id": message_id,
        "id_str": str(message_id),
        "payload": payload,
        "text": text,
        "timestamp": "2025-07-11T05:46:37Z",
        "type": mtype,
        "unix_timestamp": 1752212797,
    }
    if unique_temp_id is not None:
        message["unique_temp_id"] = unique_temp_id
    return {
        "app_code": APP,
        "channel": {"id": 963, "name": "Qiscus Cloud Group", "source": source},
        "payload": {
            "from": {"avatar_url": "https://x.test/a.svg", "email": sender, "id": 0, "id_str": "0", "name": "Harpi"},
            "message": message,
            "room": {"id": room, "id_str": room, "name": "Harpi", "options": json.dumps(options), "type": "group"},
            "type": "post_comment_mobile",
        },
        "type": "post_comment_mobile",
    }


def request(body: bytes | dict[str, Any], token: str | None = TOKEN) -> WebhookRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WebhookRequest("POST", raw, {"content-type": "application/json"}, {"token": token} if token else {})


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return request(bot_webhook(f"wa_wamid.{mid}", conv, text))


def forge(original: WebhookRequest) -> WebhookRequest:
    return WebhookRequest(original.method, original.body, original.headers, {"token": "guessed"})


def multichannel_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"status": 200, "data": {}})


class TestQiscusMultichannelContract(ContractSuite):
    case = Case(type="qiscus_multichannel", config=CONFIG, text_webhook=text_webhook, forge=forge, ok=multichannel_ok)


def make(**overrides: Any) -> tuple[QiscusMultichannelPlatform, FakeApi]:
    api = FakeApi(multichannel_ok)
    config = QiscusMultichannelConfig.model_validate({**CONFIG, **overrides})
    return QiscusMultichannelPlatform("mc", config, api.client()), api


# --- inbound ---------------------------------------------------------------------------------------

WA_ID = "wa_wamid.HBgNNjI4MTIxNzg0NDEzMhUCABIYIDJFMEFCQkEzRkVEEN0RFRjcyNTQ0ODkwMDJDQUM4MTU2AAAxaj=="
EXPECTED: dict[str, dict[str, Any] | None] = {
    "bot_webhook_wa_text.json": {
        "message_id": WA_ID,
        "conversation_id": "123",
        "sender": "6281xxx132",
        "text": "chat postman 2",
        "channel": "wa",
    },
    "bot_webhook_legacy_options_object.json": {"conversation_id": "1", "text": "ini pesan", "channel": "wa"},
    "bot_webhook_widget_file.json": {
        "message_id": "bq1669774323000",
        "conversation_id": "9312004",
        "type": "image",
        "text": "Tess",
        "channel": "qiscus",
    },
    "bot_webhook_widget_postback.json": {"type": "postback", "text": "Pricing", "payload": {"payload": "pricing"}},
    "bot_echo_admin.json": None,
    "mark_as_resolved.json": {
        "message_id": "resolved:123:244",
        "conversation_id": "123",
        "sender": "6281xxx132",
        "type": "event",
        "payload": {
            "event": EVENT_AGENT_RESOLVED,
            "agent": "agent.dewi@example.com",
            "notes": "order status answered",
        },
        "channel": "wa",
    },
    "new_session.json": {
        "conversation_id": "xx93xxxx",
        "type": "event",
        "payload": {"event": EVENT_CONVERSATION_STARTED},
        "channel": "wa",
    },
    "custom_agent_allocation.json": None,
}


def test_every_recorded_payload_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_payload_parses(name: str) -> None:
    platform, _ = make()
    raw = (DATA / name).read_bytes()
    parsed = platform.parse(request(raw))
    want = EXPECTED[name]
    if want is None:
        assert parsed.messages == [] and parsed.status == 200
        assert isinstance(parsed.response, dict) and parsed.response["ignored"]
        return
    [msg] = parsed.messages
    assert msg.platform == "mc" and msg.message_id and msg.sender.id
    assert msg.type == want.get("type", "text")
    for key in ("message_id", "conversation_id", "text", "payload", "channel"):
        if key in want:
            assert getattr(msg, key) == want[key], key
    if "sender" in want:
        assert msg.sender.id == want["sender"]
    assert platform.parse(request(raw)).messages[0].message_id == msg.message_id, "a retry keeps its dedupe key"


def test_unique_temp_id_is_the_dedupe_key_even_when_the_comment_has_an_id() -> None:
    platform, _ = make()
    [msg] = platform.parse(request(bot_webhook("bq123", "9", "hi", message_id=555))).messages
    assert msg.message_id == "bq123"
    [msg] = platform.parse(request(bot_webhook(None, "9", "hi", message_id=555))).messages
    assert msg.message_id == "555"


def test_the_file_attachment_of_a_whatsapp_message() -> None:
    platform, _ = make()
    body = bot_webhook(
        "wa_wamid.X", "9", "", mtype="file_attachment", payload={"caption": "struk", "url": "https://x.test/s.jpeg"}
    )
    [msg] = platform.parse(request(body)).messages
    assert msg.type == "image" and msg.text == "struk"
    assert msg.attachments == (Attachment("image", "https://x.test/s.jpeg"),)


def test_room_options_that_are_not_json_are_tolerated() -> None:
    platform, _ = make()
    body = bot_webhook("wa_wamid.Y", "9", "hi")
    body["payload"]["room"]["options"] = "{not json"
    [msg] = platform.parse(request(body)).messages
    assert msg.channel == "wa", "the channel comes from the top-level channel.source then"


@pytest.mark.parametrize(("query", "message"), [({}, "missing"), ({"token": "guessed"}, "bad")])
def test_a_webhook_without_the_url_token_is_refused(query: dict[str, str], message: str) -> None:
    platform, _ = make()
    body = json.dumps(bot_webhook("wa_1", "9", "hi")).encode()
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", body, {"content-type": "application/json"}, query))
    assert err.value.status == 401 and message in err.value.message


def test_without_a_webhook_token_any_webhook_is_taken() -> None:
    platform, _ = make(webhook_token=None)
    assert [m.text for m in platform.parse(request(bot_webhook("wa_1", "9", "hi"), token=None)).messages] == ["hi"]


def test_the_bots_own_replies_are_dropped() -> None:
    platform, _ = make(bot_email="bot@acme.test")
    for sender in ("bot@acme.test", "BOT@acme.test", ADMIN):
        parsed = platform.parse(request(bot_webhook("bq9", "9", "echo", sender=sender)))
        assert parsed.messages == [] and parsed.response == {
            "accepted": 0,
            "duplicates": 0,
            "ignored": "the bot's own message",
        }


def test_channels_limit_what_the_bot_takes() -> None:
    platform, _ = make(channels=["qiscus"])
    assert platform.parse(request(bot_webhook("wa_1", "9", "hi", source="wa"))).messages == []
    assert len(platform.parse(request(bot_webhook("bq1", "9", "hi", source="qiscus"))).messages) == 1


def test_mark_as_resolved_retries_keep_one_event() -> None:
    platform, _ = make()
    raw = (DATA / "mark_as_resolved.json").read_bytes()
    first, again = (platform.parse(request(raw)).messages[0] for _ in range(2))
    assert first.message_id == again.message_id
    other = json.loads(raw)
    other["service"]["id"] = 245
    assert platform.parse(request(other)).messages[0].message_id != first.message_id


def test_mark_as_resolved_needs_a_room() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(request({"service": {"id": 1}, "resolved_by": {}}))
    assert err.value.status == 400 and err.value.field == "service.room_id"


def test_malformed_bot_webhooks_name_the_field() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(request({"type": "post_comment_mobile"}))
    assert err.value.field == "payload"
    body = bot_webhook("wa_1", "9", "hi")
    del body["payload"]["from"]["email"]
    with pytest.raises(Rejected) as err:
        platform.parse(request(body))
    assert err.value.field == "payload.from.email"


# --- outbound --------------------------------------------------------------------------------------


async def test_a_reply_is_posted_to_the_bot_endpoint() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "123", Reply("Halo Harpi"), reply_to=WA_ID), "k")
    [call] = api.calls
    assert call.method == "POST" and call.url == f"{BASE}/{APP}/bot"
    assert call.headers["qiscus_sdk_secret"] == "mc-secret-55aa"
    assert call.headers["qiscus-app-id"] == APP and call.headers["qiscus-secret-key"] == "mc-secret-55aa"
    assert call.headers["content-type"] == "application/json"
    assert call.body == {"sender_email": ADMIN, "message": "Halo Harpi", "type": "text", "room_id": "123"}


async def test_buttons_are_numbered_text_unless_rich_messages_is_on() -> None:
    reply = Reply("Pilih", buttons=(Button("Jam buka", "hours"), Button("Harga", "pricing")))
    platform, api = make()
    await platform.deliver(Outgoing("message", "123", reply), "k")
    assert api.calls[0].body["type"] == "text" and api.calls[0].body["message"] == "Pilih\n1. Jam buka\n2. Harga"
    platform, api = make(rich_messages=True, bot_email="bot@acme.test")
    await platform.deliver(Outgoing("message", "123", reply), "k")
    body = api.calls[0].body
    assert body["type"] == "buttons" and body["sender_email"] == "bot@acme.test"
    assert [b["label"] for b in body["payload"]["buttons"]] == ["Jam buka", "Harga"]


async def test_an_attachment_is_a_file_attachment() -> None:
    platform, api = make()
    url = "https://x.test/katalog.pdf"
    await platform.deliver(
        Outgoing("message", "123", Reply("Katalog", attachments=(Attachment("file", url, "katalog.pdf"),))), "k"
    )
    [call] = api.calls
    assert call.body["type"] == "file_attachment"
    assert call.body["payload"] == {"url": url, "caption": "Katalog", "file_name": "katalog.pdf", "size": 0}
    assert call.body["attachment_url"] == url and call.body["caption"] == "Katalog"


async def test_handoff_turns_the_bot_off_and_asks_qiscus_for_an_agent() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("handoff", "123", handoff=Handoff("tier1", "asked")), "h")
    off, allocate = api.calls
    assert off.url == f"{BASE}/bot/123/activate" and off.body == {"is_active": "false"}
    assert off.headers["content-type"] == "application/x-www-form-urlencoded"
    assert off.headers["qiscus-app-id"] == APP and off.headers["qiscus-secret-key"] == "mc-secret-55aa"
    assert allocate.url == f"{BASE}/api/v1/admin/service/allocate_assign_agent"
    assert allocate.body == {"room_id": "123"}


async def test_handoff_can_ignore_agent_availability() -> None:
    platform, api = make(ignore_agent_availability=True)
    await platform.deliver(Outgoing("handoff", "123", handoff=Handoff()), "h")
    assert api.calls[1].body == {"room_id": "123", "ignore_agent_availability": "true"}


async def test_handoff_to_a_named_agent_per_queue() -> None:
    platform, api = make(allocation="assign", agents={"tier1": 22, "default": "31"})
    await platform.deliver(Outgoing("handoff", "123", handoff=Handoff("tier1")), "h1")
    await platform.deliver(Outgoing("handoff", "124", handoff=Handoff("billing")), "h2")
    assigns = [c for c in api.calls if c.url.endswith("/assign_agent")]
    assert [c.url for c in assigns] == [f"{BASE}/api/v1/admin/service/assign_agent"] * 2
    assert [c.body for c in assigns] == [{"room_id": "123", "agent_id": "22"}, {"room_id": "124", "agent_id": "31"}]


async def test_handoff_to_a_queue_without_an_agent_is_a_permanent_error() -> None:
    platform, api = make(allocation="assign", agents={"tier1": 22})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("handoff", "123", handoff=Handoff("billing")), "h")
    assert not err.value.retryable and "billing" in str(err.value)
    assert [c.url for c in api.calls] == [f"{BASE}/bot/123/activate"]


async def test_handoff_without_allocation_only_turns_the_bot_off() -> None:
    platform, api = make(allocation="none", admin_token="admin-token-1")
    await platform.deliver(Outgoing("handoff", "123", handoff=Handoff()), "h")
    [off] = api.calls
    assert off.headers["authorization"] == "admin-token-1" and "qiscus-secret-key" not in off.headers


async def test_release_turns_the_bot_back_on() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("release", "123"), "r")
    [on] = api.calls
    assert on.url == f"{BASE}/bot/123/activate" and on.body == {"is_active": "true"}


async def test_a_failed_handoff_step_is_named_and_keeps_its_retry_hint() -> None:
    platform, api = make()
    api.fail_with = httpx.Response(429, headers={"Retry-After": "4"})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("handoff", "123", handoff=Handoff()), "h")
    assert err.value.retryable and err.value.retry_after == 4 and str(err.value).startswith("bot off:")
    api.fail_with = httpx.Response(422, json={"errors": "no agent available"})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("handoff", "123", handoff=Handoff()), "h")
    assert not err.value.retryable


def test_assign_needs_agents() -> None:
    with pytest.raises(ValidationError, match="agents"):
        QiscusMultichannelConfig.model_validate({**CONFIG, "allocation": "assign"})


def test_capabilities() -> None:
    platform, _ = make()
    assert platform.supports_handoff and not platform.supports_typing and not platform.supports_read
