from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.model import Attachment, Button, Card, Outgoing, Reply
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.base import hmac_sha256_hex
from middleware.platforms.qiscus import MAX_MESSAGE_CHARS, QiscusConfig, QiscusPlatform
from middleware.settings import settings_from_text
from tests.conftest import Server, free_port, running
from tests.platforms.contract import Case, ContractSuite, FakeApi

DATA = Path(__file__).resolve().parent.parent / "data" / "qiscus"
SIGNATURE_TOKEN = "sig-token-8f2c"
BOT = "bot@qiscus.com"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
MQTT_URL = f"mqtt://{MQTT_HOST}:{MQTT_PORT}"
# .ci/run (and the machine, before a session) start the broker with this command
MQTT_START = "mosquitto -d -c /etc/mosquitto/mosquitto.conf"

CONFIG: dict[str, Any] = {
    "type": "qiscus",
    "app_id": "sdksample",
    "secret_key": "sdk-secret-2820ae",
    "bot_user_id": BOT,
    "base_url": "https://api.qiscus.test",
    "signature_secret": SIGNATURE_TOKEN,
    "mqtt_url": MQTT_URL,
}


def numeric_id(mid: str) -> str:
    """Qiscus comment ids are numbers; the contract's "m-1" becomes a stable one."""
    return str(zlib.crc32(mid.encode()) + 1000)


def comment(
    mid: str | int | None,
    room: str,
    text: str,
    *,
    sender: str = "guest@qiscus.com",
    kind: str = "post_comment_mobile",
    mtype: str = "text",
    payload: Any = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": mtype,
        "text": text,
        "payload": payload,
        "timestamp": "2025-07-11T05:46:37Z",
        "unique_temp_id": f"bq{mid}",
        "unix_timestamp": 1752212797,
    }
    if mid is not None:
        message |= {"id": mid, "id_str": str(mid)}
    return {
        "type": kind,
        "payload": {
            "from": {"avatar_url": "https://image.url/a.jpeg", "email": sender, "id": 140220, "name": "Qiscus Demo"},
            "room": {"id": room, "id_str": room, "is_public_channel": False, "name": "Demo", "type": "single"},
            "message": message,
            "type": kind,
        },
    }


def signed(body: bytes | dict[str, Any], secret: str = SIGNATURE_TOKEN) -> WebhookRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", "qiscus-sdk-signature": hmac_sha256_hex(secret, raw)}
    return WebhookRequest("POST", raw, headers)


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return signed(comment(numeric_id(mid), conv, text))


def forge(request: WebhookRequest) -> WebhookRequest:
    return WebhookRequest("POST", request.body, {**request.headers, "qiscus-sdk-signature": "0" * 64})


def qiscus_ok(request: httpx.Request) -> httpx.Response:
    """The documented answers: post_comment's results.comment, get_user_token's results.token."""
    path = request.url.path
    if path.endswith("/get_user_token"):
        return httpx.Response(200, json={"results": {"token": "bot-token-1"}, "status": 200})
    if path.endswith("/post_comment"):
        sent = json.loads(request.content)
        comment = {"message": sent["message"], "payload": sent.get("payload"), "type": sent.get("type", "text")}
        return httpx.Response(200, json={"results": {"comment": comment}, "status": 200})
    return httpx.Response(200, json={"results": {}, "status": 200})


# --- MQTT helpers (the real Mosquitto on 127.0.0.1:1883) ---------------------------------------------


@contextlib.asynccontextmanager
async def mqtt_subscriber(topic: str) -> AsyncIterator[aiomqtt.Client]:
    async with contextlib.AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=f"test-sub-{uuid.uuid4().hex[:8]}", timeout=5)
            )
        except aiomqtt.MqttError as exc:
            pytest.fail(f"Mosquitto is not reachable on {MQTT_HOST}:{MQTT_PORT} ({exc}); start it: {MQTT_START}")
        await client.subscribe(topic, qos=1)
        yield client


async def received(client: aiomqtt.Client, n: int, seconds: float = 5.0) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    async def collect() -> None:
        async for m in client.messages:
            assert isinstance(m.payload, bytes | bytearray)
            out.append((str(m.topic), bytes(m.payload).decode()))
            if len(out) == n:
                return

    try:
        await asyncio.wait_for(collect(), seconds)
    except TimeoutError:
        pytest.fail(f"expected {n} MQTT messages, got {out}")
    return out


def typing_topic(room: str, user: str = BOT) -> str:
    return f"r/{room}/{room}/{user}/t"


class TestQiscusContract(ContractSuite):
    case = Case(type="qiscus", config=CONFIG, text_webhook=text_webhook, forge=forge, ok=qiscus_ok)

    async def test_typing_on_and_off(self) -> None:
        """Typing goes over MQTT, not HTTP: checked on the real broker instead of the fake API."""
        platform, api = self.make()
        msg = self.parse_one(platform, conv="70001")
        try:
            async with mqtt_subscriber(typing_topic("70001")) as sub:
                await platform.deliver(Outgoing("typing", "70001", typing=True, message_id=msg.message_id), "t-1")
                await platform.deliver(Outgoing("typing", "70001", typing=False, message_id=msg.message_id), "t-2")
                assert await received(sub, 2) == [(typing_topic("70001"), "1"), (typing_topic("70001"), "0")]
        finally:
            await platform.aclose()
        assert api.calls == []


def make(**overrides: Any) -> tuple[QiscusPlatform, FakeApi]:
    api = FakeApi(qiscus_ok)
    config = QiscusConfig.model_validate({**CONFIG, **overrides})
    return QiscusPlatform("qiscus", config, api.client()), api


# --- inbound ---------------------------------------------------------------------------------------

EXPECTED: dict[str, dict[str, Any] | None] = {
    "post_comment_mobile_doc.json": {"conversation_id": "1", "sender": "user1@gmail.com", "text": "ini pesan"},
    "post_comment_mobile_text.json": {
        "message_id": "1072186475",
        "conversation_id": "1375619",
        "sender": "guest@qiscus.com",
        "text": "Halo, saya mau tanya jam buka toko",
        "timestamp": "2025-07-11T05:46:37+00:00",
    },
    "post_comment_rest_bot_echo.json": None,
    "button_postback_response.json": {
        "message_id": "1072186533",
        "type": "postback",
        "text": "Opening hours",
        "payload": {"payload": "hours"},
    },
    "file_attachment.json": {
        "type": "image",
        "text": "Ini gambar siapa?",
        "attachments": [
            ("image", "https://res.cloudinary.com/qiscus/image/upload/USWiylE7Go/ios-15049438515185.png", None)
        ],
    },
    "file_attachment_pdf.json": {
        "type": "file",
        "text": "",
        "attachments": [
            (
                "file",
                "https://d1edrlpyc25xu0.cloudfront.net/sdksample/raw/upload/Ab3dEf/invoice-0042.pdf",
                "invoice-0042.pdf",
            )
        ],
    },
    "location.json": {"type": "location", "payload_has": {"latitude": -7.7531, "longitude": 110.3799}},
    "system_event.json": {
        "conversation_id": "2110",
        "type": "event",
        "text": "Admin is being set!",
        "payload": {"event": "qiscus.system_event", "system_event_type": "custom"},
    },
    "custom.json": {"type": "text", "payload": {"qiscus_type": "custom", "custom_type": "promo"}},
}


def test_every_recorded_payload_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_payload_parses(name: str) -> None:
    platform, _ = make()
    raw = (DATA / name).read_bytes()
    parsed = platform.parse(signed(raw))
    want = EXPECTED[name]
    if want is None:
        assert parsed.messages == []
        assert isinstance(parsed.response, dict) and parsed.response["ignored"]
        return
    assert len(parsed.messages) == 1
    msg = parsed.messages[0]
    assert msg.platform == "qiscus" and msg.message_id and msg.sender.id
    assert msg.type == want.get("type", "text")
    for key in ("message_id", "conversation_id", "text", "payload"):
        if key in want:
            assert getattr(msg, key) == want[key], key
    if "sender" in want:
        assert msg.sender.id == want["sender"]
    if "timestamp" in want:
        assert msg.timestamp is not None and msg.timestamp.isoformat() == want["timestamp"]
    if "attachments" in want:
        assert [(a.type, a.url, a.name) for a in msg.attachments] == want["attachments"]
    for key, value in want.get("payload_has", {}).items():
        assert msg.payload[key] == value
    again = platform.parse(signed(raw)).messages[0]
    assert again.message_id == msg.message_id, "a retried webhook must keep its dedupe key"


def test_documented_payload_without_ids_dedupes_on_its_bytes() -> None:
    platform, _ = make()
    raw = (DATA / "post_comment_mobile_doc.json").read_bytes()
    first = platform.parse(signed(raw)).messages[0]
    assert first.message_id.startswith("sha256:")
    assert platform.parse(signed(raw)).messages[0].message_id == first.message_id
    other = raw.replace(b"ini pesan", b"pesan lain")
    assert platform.parse(signed(other)).messages[0].message_id != first.message_id


def test_signature_is_hmac_sha256_hex_of_the_raw_body() -> None:
    platform, _ = make()
    raw = json.dumps(comment(101, "5", "hi"), indent=2).encode()
    assert len(platform.parse(signed(raw)).messages) == 1
    # the same JSON re-serialised is not what was signed
    reserialised = json.dumps(json.loads(raw)).encode()
    request = WebhookRequest("POST", reserialised, signed(raw).headers)
    with pytest.raises(Rejected) as err:
        platform.parse(request)
    assert err.value.status == 401
    # hex case does not matter
    upper = WebhookRequest(
        "POST",
        raw,
        {"content-type": "application/json", "qiscus-sdk-signature": hmac_sha256_hex(SIGNATURE_TOKEN, raw).upper()},
    )
    assert len(platform.parse(upper).messages) == 1


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"content-type": "application/json"}, "missing"),
        ({"content-type": "application/json", "qiscus-sdk-signature": ""}, "missing"),
        ({"content-type": "application/json", "qiscus-sdk-signature": "not-hex"}, "bad"),
    ],
)
def test_unsigned_or_forged_webhooks_are_refused(headers: dict[str, str], reason: str) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", json.dumps(comment(1, "5", "hi")).encode(), headers))
    assert err.value.status == 401 and reason in err.value.message
    assert "QISCUS-SDK-SIGNATURE" in err.value.message


def test_signed_with_another_token_is_refused() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(signed(comment(1, "5", "hi"), secret="someone-else"))
    assert err.value.status == 401


def test_without_a_signature_secret_unsigned_webhooks_are_taken() -> None:
    platform, _ = make(signature_secret=None)
    body = json.dumps(comment(7, "5", "hi")).encode()
    parsed = platform.parse(WebhookRequest("POST", body, {"content-type": "application/json"}))
    assert [m.text for m in parsed.messages] == ["hi"]


def test_the_bots_own_messages_are_dropped() -> None:
    platform, _ = make()
    for kind in ("post_comment_rest", "post_comment_mobile"):
        parsed = platform.parse(signed(comment(9, "5", "echo", sender=BOT, kind=kind)))
        assert parsed.messages == [] and parsed.status == 200
        assert parsed.response == {"accepted": 0, "duplicates": 0, "ignored": "the bot's own message"}


def test_rest_messages_from_other_servers_are_dropped_unless_accepted() -> None:
    body = comment(11, "5", "from another backend", sender="crm@qiscus.com", kind="post_comment_rest")
    platform, _ = make()
    parsed = platform.parse(signed(body))
    assert parsed.messages == [] and "REST" in str(parsed.response)
    platform, _ = make(accept_rest_messages=True)
    assert [m.text for m in platform.parse(signed(body)).messages] == ["from another backend"]


def test_unknown_webhook_types_are_acknowledged_and_ignored() -> None:
    platform, _ = make()
    parsed = platform.parse(signed({"type": "client_login", "payload": {}}))
    assert parsed.messages == [] and parsed.status == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payload": {}}, "type"),
        ({"type": "post_comment_mobile"}, "payload"),
        ({"type": "post_comment_mobile", "payload": {"from": {"email": "a"}, "message": {}}}, "payload.room"),
        (
            {"type": "post_comment_mobile", "payload": {"from": {}, "room": {"id": 3}, "message": {}}},
            "payload.from.email",
        ),
        (
            {"type": "post_comment_mobile", "payload": {"from": {"email": "a"}, "room": {"id": 0}, "message": {}}},
            "payload.room.id",
        ),
    ],
)
def test_malformed_webhooks_name_the_field(body: dict[str, Any], field: str) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(signed(body))
    assert err.value.status == 400 and err.value.field == field


def test_not_json() -> None:
    platform, _ = make(signature_secret=None)
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", b"{oops", {"content-type": "application/json"}))
    assert err.value.status == 400
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", b"a=b", {"content-type": "application/x-www-form-urlencoded"}))
    assert err.value.status == 415


def test_mqtt_url_is_validated() -> None:
    with pytest.raises(ValidationError, match="mqtt_url"):
        QiscusConfig.model_validate({**CONFIG, "mqtt_url": "http://mqtt.example"})
    assert QiscusConfig.model_validate({**CONFIG, "mqtt_url": None}).mqtt_url is None
    assert QiscusConfig.model_validate({k: v for k, v in CONFIG.items() if k != "mqtt_url"}).mqtt_url == (
        "wss://mqtt.qiscus.com:1886/mqtt"
    )
    platform, _ = make(mqtt_url=None)
    assert not platform.supports_typing


# --- outbound --------------------------------------------------------------------------------------


async def test_text_reply_is_a_post_comment_as_the_bot() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "1375619", Reply("Toko buka jam 09.00"), reply_to="1072186475"), "k")
    [call] = api.calls
    assert call.method == "POST" and call.url == "https://api.qiscus.test/api/v2.1/rest/post_comment"
    assert call.headers["qiscus-sdk-app-id"] == "sdksample"
    assert call.headers["qiscus-sdk-secret"] == "sdk-secret-2820ae"
    assert call.body == {"user_id": BOT, "room_id": "1375619", "message": "Toko buka jam 09.00", "type": "text"}


async def test_buttons_and_quick_replies_become_a_buttons_message() -> None:
    platform, api = make()
    reply = Reply("Pick one", buttons=(Button("Opening hours", "hours"),), quick_replies=(Button("Human", "agent"),))
    await platform.deliver(Outgoing("message", "5", reply), "k")
    [call] = api.calls
    assert call.body["type"] == "buttons" and call.body["message"] == "Pick one"
    assert call.body["payload"] == {
        "text": "Pick one",
        "buttons": [
            {
                "label": "Opening hours",
                "type": "postback",
                "postback_text": "Opening hours",
                "payload": {"url": "#", "method": "get", "payload": "hours"},
            },
            {
                "label": "Human",
                "type": "postback",
                "postback_text": "Human",
                "payload": {"url": "#", "method": "get", "payload": "agent"},
            },
        ],
    }


async def test_a_tapped_button_comes_back_as_its_postback() -> None:
    """What we send as a button's payload is what button_postback_response carries back."""
    platform, api = make()
    await platform.deliver(Outgoing("message", "5", Reply("Pick", buttons=(Button("Pricing", "pricing"),))), "k")
    button = api.calls[0].body["payload"]["buttons"][0]
    tap = comment(77, "5", button["postback_text"], mtype="button_postback_response", payload=button["payload"])
    [msg] = platform.parse(signed(tap)).messages
    assert (msg.type, msg.text, msg.payload) == ("postback", "Pricing", {"payload": "pricing"})


async def test_one_card_is_a_card_and_several_a_carousel() -> None:
    platform, api = make()
    card = Card("Blouse", "Rp 49.000", "http://url.com/gambar.jpg", (Button("Buy", "buy-1"),))
    await platform.deliver(Outgoing("message", "5", Reply("Special deal", cards=(card,))), "k1")
    await platform.deliver(Outgoing("message", "5", Reply(cards=(card, Card("Tunik", "Rp 59.000")))), "k2")
    one, many = (c.body for c in api.calls)
    assert one["type"] == "card" and one["message"] == "Special deal"
    assert one["payload"]["title"] == "Blouse" and one["payload"]["image"] == "http://url.com/gambar.jpg"
    assert one["payload"]["description"] == "Rp 49.000" and one["payload"]["text"] == "Special deal"
    assert one["payload"]["buttons"][0]["label"] == "Buy"
    assert many["type"] == "carousel" and [c["title"] for c in many["payload"]["cards"]] == ["Blouse", "Tunik"]
    assert "Blouse" in many["message"] and "Tunik" in many["message"]


async def test_an_attachment_with_text_is_one_file_attachment_with_a_caption() -> None:
    platform, api = make()
    url = "https://res.cloudinary.com/qiscus/image/upload/USWiylE7Go/ios-15049438515185.png"
    await platform.deliver(
        Outgoing("message", "5", Reply("Ini gambar siapa?", attachments=(Attachment("image", url, "a.png"),))), "k"
    )
    [call] = api.calls
    assert call.body["type"] == "file_attachment"
    assert call.body["message"] == f"[file] {url} [/file]"
    assert call.body["payload"] == {"url": url, "caption": "Ini gambar siapa?", "file_name": "a.png", "size": 0}


async def test_a_rich_reply_is_several_posts_in_order() -> None:
    platform, api = make()
    reply = Reply(
        "Here you go",
        buttons=(Button("More", "more"),),
        attachments=(Attachment("file", "https://x.test/a.pdf", "a.pdf"), Attachment("image", "https://x.test/b.png")),
    )
    await platform.deliver(Outgoing("message", "5", reply), "k")
    assert [c.body["type"] for c in api.calls] == ["buttons", "file_attachment", "file_attachment"]


async def test_text_longer_than_4000_characters_is_split() -> None:
    platform, api = make()
    text = "a" * MAX_MESSAGE_CHARS + "b" * 10
    await platform.deliver(Outgoing("message", "5", Reply(text)), "k")
    assert [c.body["message"] for c in api.calls] == ["a" * MAX_MESSAGE_CHARS, "b" * 10]


async def test_a_retried_reply_resends_only_the_parts_that_failed() -> None:
    platform, api = make()
    reply = Reply(
        "caption", attachments=(Attachment("file", "https://x.test/1.pdf"), Attachment("file", "https://x.test/2.pdf"))
    )
    failing_after = 2
    real_ok = api.ok

    def flaky(request: httpx.Request) -> httpx.Response:
        if len(api.calls) > failing_after:
            return httpx.Response(503, json={"error": "down"})
        return real_ok(request)

    api.ok = flaky
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "5", reply), "k-retry")
    assert err.value.retryable
    api.ok = real_ok
    await platform.deliver(Outgoing("message", "5", reply), "k-retry")
    sent = [c.body["message"] for c in api.calls]
    # text and first file accepted, second file 503; the retry sends only the second file
    first, second = "[file] https://x.test/1.pdf [/file]", "[file] https://x.test/2.pdf [/file]"
    assert sent == ["caption", first, second, second]


async def test_errors_map_to_retryable_and_permanent() -> None:
    platform, api = make()
    item = Outgoing("message", "5", Reply("x"))
    api.fail_with = httpx.Response(400, json={"status": 400, "error": {"message": "room not found"}})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(item, "k")
    assert not err.value.retryable and "room not found" in str(err.value)
    api.fail_with = httpx.Response(429, headers={"Retry-After": "3"})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(item, "k")
    assert err.value.retryable and err.value.retry_after == 3


async def test_read_receipt_marks_the_comment_read_as_the_bot() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("read", "1375619", message_id="1072186475"), "r-1")
    token_call, status_call = api.calls
    assert token_call.method == "GET"
    assert token_call.url == f"https://api.qiscus.test/api/v2.1/rest/get_user_token?user_id={BOT.replace('@', '%40')}"
    assert token_call.headers["qiscus-sdk-secret"] == "sdk-secret-2820ae"
    assert status_call.url == "https://api.qiscus.test/api/v2/sdk/update_comment_status"
    assert status_call.headers["qiscus-sdk-token"] == "bot-token-1"
    assert status_call.headers["qiscus-sdk-user-id"] == BOT
    assert status_call.headers["qiscus-sdk-app-id"] == "sdksample"
    assert status_call.body == {"room_id": "1375619", "last_comment_read_id": "1072186475"}
    await platform.deliver(Outgoing("read", "1375619", message_id="1072186480"), "r-2")
    assert len(api.calls) == 3, "the bot's token is fetched once"


async def test_a_refused_token_is_fetched_again_on_retry() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("read", "5", message_id="10"), "r-1")
    api.fail_with = httpx.Response(401, json={"error": "unauthorized"})
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("read", "5", message_id="11"), "r-2")
    assert err.value.retryable
    api.fail_with = None
    await platform.deliver(Outgoing("read", "5", message_id="11"), "r-2")
    assert [c.url.rsplit("/", 1)[-1].split("?")[0] for c in api.calls] == [
        "get_user_token",
        "update_comment_status",
        "update_comment_status",
        "get_user_token",
        "update_comment_status",
    ]


async def test_a_message_without_a_numeric_id_is_not_marked_read() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("read", "5", message_id="sha256:abcd"), "r")
    assert api.calls == []


async def test_read_receipts_can_be_turned_off() -> None:
    platform, _ = make(read_receipts=False)
    assert not platform.supports_read


# --- typing over MQTT (the real Mosquitto) ---------------------------------------------------------


async def test_typing_keeps_one_connection_and_reconnects_after_a_drop() -> None:
    platform, _ = make()
    assert platform.mqtt is not None
    room = str(90000 + uuid.uuid4().int % 10000)
    try:
        async with mqtt_subscriber(typing_topic(room)) as sub:
            for on in (True, False, True):
                await platform.deliver(Outgoing("typing", room, typing=on), "t")
            assert [p for _, p in await received(sub, 3)] == ["1", "0", "1"]
            assert platform.mqtt.connects == 1, "one long-lived connection, opened on first use"
            # The broker drops a client when another connects with its client id (a session
            # takeover): a real, unannounced disconnection.
            async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=platform.mqtt.client_id):
                for _ in range(100):
                    if platform.mqtt._client is None:
                        break
                    await asyncio.sleep(0.02)
            await platform.deliver(Outgoing("typing", room, typing=False), "t")
            assert [p for _, p in await received(sub, 1)] == ["0"]
            assert platform.mqtt.connects == 2
    finally:
        await platform.aclose()
    assert platform.mqtt._client is None
    with pytest.raises(DeliveryError):
        await platform.deliver(Outgoing("typing", room, typing=True), "t")


async def test_typing_when_the_broker_is_down_is_a_retryable_error() -> None:
    platform, _ = make(mqtt_url=f"mqtt://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(DeliveryError) as err:
            await platform.deliver(Outgoing("typing", "5", typing=True), "t")
        assert err.value.retryable and "unreachable" in str(err.value)
    finally:
        await platform.aclose()


# --- end to end: webhook in, post_comment out ------------------------------------------------------


@dataclass
class FakeQiscus:
    """The Qiscus server API as documented: post_comment, get_user_token, update_comment_status."""

    calls: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v2.1/rest/post_comment", self.post_comment, methods=["POST"]),
                Route("/api/v2.1/rest/get_user_token", self.get_user_token, methods=["GET"]),
                Route("/api/v2/sdk/update_comment_status", self.update_comment_status, methods=["POST"]),
            ]
        )

    def _record(self, request: Request, body: Any) -> None:
        self.calls.append((request.url.path, {k.lower(): v for k, v in request.headers.items()}, body))
        self.changed.set()

    async def post_comment(self, request: Request) -> Response:
        if request.headers.get("qiscus-sdk-secret") != "sdk-secret-2820ae":
            return JSONResponse({"status": 401, "error": {"message": "unauthorized"}}, status_code=401)
        body = await request.json()
        self._record(request, body)
        comment = {"message": body["message"], "type": body.get("type", "text"), "payload": body.get("payload")}
        return JSONResponse({"results": {"comment": comment}, "status": 200})

    async def get_user_token(self, request: Request) -> Response:
        self._record(request, dict(request.query_params))
        return JSONResponse({"results": {"token": "bot-token-e2e"}, "status": 200})

    async def update_comment_status(self, request: Request) -> Response:
        self._record(request, await request.json())
        return JSONResponse({"results": {"changed": True}, "status": 200})

    def posts(self) -> list[dict[str, Any]]:
        return [body for path, _, body in self.calls if path.endswith("/post_comment")]

    async def wait(self, predicate: Any, seconds: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), seconds)


async def test_end_to_end_webhook_in_post_comment_out(tmp_path: Path, echo_flows: Path) -> None:
    fake = FakeQiscus()
    room = str(80000 + uuid.uuid4().int % 10000)
    async with Server(fake.app()) as api:
        settings = settings_from_text(
            textwrap.dedent(
                f"""\
                store:
                  url: "sqlite:///{tmp_path}/switchboard.db"
                flows: {echo_flows}
                platforms:
                  qiscus:
                    type: qiscus
                    app_id: sdksample
                    secret_key: sdk-secret-2820ae
                    bot_user_id: {BOT}
                    base_url: {api.url}
                    signature_secret: {SIGNATURE_TOKEN}
                    mqtt_url: {MQTT_URL}
                """
            ),
            "<test config>",
        )
        async with (
            running(settings) as (server, _),
            httpx.AsyncClient(timeout=10) as client,
            mqtt_subscriber(typing_topic(room)) as typing,
        ):

            async def send(body: dict[str, Any]) -> httpx.Response:
                request = signed(body)
                return await client.post(
                    f"{server.url}/webhooks/qiscus", content=request.body, headers=dict(request.headers)
                )

            first = comment(1072186475, room, "hello")
            response = await send(first)
            assert response.status_code == 200 and response.json() == {"accepted": 1, "duplicates": 0}
            await fake.wait(lambda: len(fake.posts()) >= 1)
            path, headers, body = next(c for c in fake.calls if c[0].endswith("/post_comment"))
            assert path == "/api/v2.1/rest/post_comment"
            assert headers["qiscus-sdk-app-id"] == "sdksample" and headers["content-type"] == "application/json"
            assert body == {"user_id": BOT, "room_id": room, "message": "echo hello", "type": "text"}
            await fake.wait(lambda: any(c[0].endswith("/update_comment_status") for c in fake.calls))
            read = next(c for c in fake.calls if c[0].endswith("/update_comment_status"))
            assert read[2] == {"room_id": room, "last_comment_read_id": "1072186475"}
            assert read[1]["qiscus-sdk-token"] == "bot-token-e2e"

            # Qiscus retries the webhook, and echoes the bot's reply back: neither gets a turn
            again = await send(first)
            assert again.json() == {"accepted": 0, "duplicates": 1}
            echo = await send(comment(1072186480, room, "echo hello", sender=BOT, kind="post_comment_rest"))
            assert echo.json()["accepted"] == 0

            # a slow turn: typing on over MQTT, the reply, then typing off
            await send(comment(1072186490, room, "slow one"))
            await fake.wait(lambda: len(fake.posts()) >= 2)
            assert [p for _, p in await received(typing, 2)] == ["1", "0"]
            assert [p["message"] for p in fake.posts()] == ["echo hello", "slow slow one"]
