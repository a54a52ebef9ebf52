"""The WhatsApp Cloud API platform: the contract, every recorded webhook shape, the API calls, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.model import EVENT_CONVERSATION_STARTED, Attachment, Button, Outgoing, Reply
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.whatsapp import WhatsAppConfig, WhatsAppPlatform
from middleware.settings import settings_from_text
from tests.conftest import Server, running
from tests.platforms.contract import Case, ContractSuite, FakeApi

APP_SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
VERIFY = "sb-verify-token"
ACCESS = "EAAGm0PX4ZCpsBAtest"
PNID = "106540352242922"
API = "https://graph.test/v26.0"
CONFIG = {
    "type": "whatsapp",
    "access_token": ACCESS,
    "app_secret": APP_SECRET,
    "verify_token": VERIFY,
    "phone_number_id": PNID,
    "api_base": API,
}
DATA = Path(__file__).resolve().parent.parent / "data" / "whatsapp"


def num(text: str) -> str:
    """Stable phone-number-like digits for a test id."""
    return str(10_000_000_000 + int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))


def sign(raw: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def webhook(body: dict[str, Any] | bytes, signature: str | None = "auto") -> WebhookRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if signature == "auto":
        headers["x-hub-signature-256"] = sign(raw)
    elif signature is not None:
        headers["x-hub-signature-256"] = signature
    return WebhookRequest("POST", raw, headers)


def text_body(mid: str, conv: str, text: str) -> dict[str, Any]:
    phone = num(conv)
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PNID},
        "contacts": [{"profile": {"name": "Sheena Nelson"}, "wa_id": phone}],
        "messages": [
            {"from": phone, "id": f"wamid.{mid}", "timestamp": "1749416383", "type": "text", "text": {"body": text}}
        ],
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1022", "changes": [{"value": value, "field": "messages"}]}],
    }


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return webhook(text_body(mid, conv, text))


def forge(request: WebhookRequest) -> WebhookRequest:
    return WebhookRequest("POST", request.body, {**request.headers, "x-hub-signature-256": sign(request.body, "guess")})


def cloud_api_ok(request: httpx.Request) -> httpx.Response:
    """The Cloud API's answers: {"success": true} for read/typing, the message id for a send."""
    body = json.loads(request.content)
    if body.get("status") == "read":
        return httpx.Response(200, json={"success": True})
    to = body.get("to") or body.get("recipient")
    return httpx.Response(
        200,
        json={
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": to}],
            "messages": [{"id": "wamid.HBgLMTY1MDU1NTEyMzQVAgARGBI5MDY3RkI2RTE3NkQ1QzNBQTQA"}],
        },
    )


def graph_error(status: int, code: int, message: str, details: str = "") -> httpx.Response:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbCdEf123"}
    if details:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return httpx.Response(status, json={"error": error})


class TestWhatsAppContract(ContractSuite):
    case = Case(
        type="whatsapp",
        config=CONFIG,
        text_webhook=text_webhook,
        forge=forge,
        ok=cloud_api_ok,
        conversation_of=num,
    )


def make() -> tuple[WhatsAppPlatform, FakeApi]:
    api = FakeApi(cloud_api_ok)
    return WhatsAppPlatform("wa", WhatsAppConfig.model_validate(CONFIG), api.client()), api


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


# -- verification ------------------------------------------------------------------------------------


def verification(query: dict[str, str]) -> WebhookRequest:
    return WebhookRequest("GET", b"", {}, query)


def test_verification_handshake_answers_the_challenge_as_text() -> None:
    platform, _ = make()
    parsed = platform.parse(
        verification({"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"})
    )
    assert parsed.messages == [] and parsed.response == "1158201444" and parsed.status == 200


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"}, 403),
        ({"hub.mode": "subscribe", "hub.challenge": "1"}, 403),
        ({"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"}, 400),
        ({}, 400),
    ],
)
def test_bad_verification_is_refused(query: dict[str, str], status: int) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(verification(query))
    assert err.value.status == status


def test_unsigned_webhook_is_refused() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(load("text.json"), signature=None))
    assert err.value.status == 401 and "X-Hub-Signature-256" in err.value.message


@pytest.mark.parametrize("signature", ["sha256=" + "0" * 64, "0" * 64, "sha1=abc", sign(b"{}")])
def test_forged_signatures_are_refused(signature: str) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(load("text.json"), signature=signature))
    assert err.value.status == 401


def test_a_reserialised_body_fails_the_signature() -> None:
    """The HMAC is over the raw bytes Meta sent; the same JSON spelled differently is another body."""
    platform, _ = make()
    raw = json.dumps(load("text.json")).encode()
    request = webhook(json.dumps(load("text.json"), indent=1).encode(), signature=sign(raw))
    with pytest.raises(Rejected):
        platform.parse(request)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"object": "page", "entry": []}, "object"),
        ({"object": "whatsapp_business_account"}, "entry"),
        ({"object": "whatsapp_business_account", "entry": [{"id": "1"}]}, "entry[0].changes"),
        (
            {
                "object": "whatsapp_business_account",
                "entry": [{"changes": [{"field": "messages", "value": {"messages": [{"type": "text"}]}}]}],
            },
            "entry[0].changes[0].value.messages[0].id",
        ),
        (
            {
                "object": "whatsapp_business_account",
                "entry": [{"changes": [{"field": "messages", "value": {"messages": [{"id": "wamid.1"}]}}]}],
            },
            "entry[0].changes[0].value.messages[0].from",
        ),
    ],
)
def test_malformed_webhooks_name_the_field(body: dict[str, Any], field: str) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(body))
    assert err.value.status == 400 and err.value.field == field


# -- every recorded webhook --------------------------------------------------------------------------

SHEENA = "16505551234"
BSUID = "US.13491208655302741918"
#: file -> [(conversation, message id, type, text, payload, attachments)] of the messages it carries
EXPECTED: dict[str, list[tuple[str, str, str, str, dict[str, Any], tuple[Attachment, ...]]]] = {
    "text.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
            "text",
            "Does it come in another color?",
            {},
            (),
        )
    ],
    "text_with_bsuid.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGCBBQzhDQjYzOUZDMDQ0OEU5QjA5MkYyNURFNkJENjcxMwA=",
            "text",
            "Hey",
            {},
            (),
        )
    ],
    "text_username_only.json": [
        (
            BSUID,
            "wamid.HBgLVVMuMTM0OTEyMDg2NTUzMDI3NDE5MTgVAgASGBQzRUIwQTk4QzZEMkIxNjdGNkQ0NwA=",
            "text",
            "hello from a username",
            {},
            (),
        )
    ],
    "interactive_button_reply.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQUNFRjcyNTM5OEUzMjA3RjQ3QQA=",
            "postback",
            "Pricing",
            {"payload": "pricing"},
            (),
        )
    ],
    "interactive_list_reply.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQTk5ODdDNTIxNkEwQTJDQjU4RAA=",
            "postback",
            "Jakarta",
            {"payload": "branch-jkt", "description": "Jl. Sudirman 1"},
            (),
        )
    ],
    "template_quick_reply_button.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQjY1QUU1MzJBMTM0OTg0QzQ4MgA=",
            "postback",
            "Stop promotions",
            {"payload": "STOP_PROMOTIONS"},
            (),
        )
    ],
    "image.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQTFBRkU5OTcyNTUzOEQ3RTU1NgA=",
            "image",
            "the box arrived like this",
            {},
            (Attachment("image", "wa-media:1003383421387256"),),
        )
    ],
    "sticker.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQUU3RDM0QjVFN0MwNkE5NzQ1RAA=",
            "image",
            "",
            {},
            (Attachment("image", "wa-media:1228563281623390"),),
        )
    ],
    "document.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQUM1RDY1MEM3NzRCMkQxMzBFQgA=",
            "file",
            "invoice",
            {},
            (Attachment("file", "wa-media:2049173145623867", "invoice-2026-11.pdf"),),
        )
    ],
    "audio_voice.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQUYwRDE1OUNFOEU3OTk1RUI4MAA=",
            "file",
            "",
            {},
            (Attachment("audio", "wa-media:1234567890987654"),),
        )
    ],
    "location.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQTJGNTg4QTU3NjdCMUJEQjkwNAA=",
            "location",
            "Facebook HQ",
            {
                "latitude": 37.4611978,
                "longitude": -122.2164385,
                "name": "Facebook HQ",
                "address": "1 Hacker Way, Menlo Park, CA 94025",
                "url": "https://maps.google.com/?cid=2000000000000000000",
            },
            (),
        )
    ],
    "request_welcome.json": [
        (
            SHEENA,
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQjNGMjg5RTE4NDI0NzVCMDM4MwA=",
            "event",
            "",
            {"event": EVENT_CONVERSATION_STARTED},
            (),
        )
    ],
    "two_messages_one_webhook.json": [
        (SHEENA, "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQTAwMDAwMDAwMDAwMDAwMDAwMQA=", "text", "first", {}, ()),
        (SHEENA, "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQTAwMDAwMDAwMDAwMDAwMDAwMgA=", "text", "second", {}, ()),
    ],
    "other_number.json": [
        (
            f"109876543210987:{SHEENA}",
            "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQTk5OTk5OTk5OTk5OTk5OTk5OQA=",
            "text",
            "to the other number",
            {},
            (),
        )
    ],
    "group_text.json": [],
    "reaction.json": [],
    "unsupported.json": [],
    "status_sent.json": [],
    "status_delivered.json": [],
    "status_read.json": [],
    "status_failed_outside_window.json": [],
    "template_status_update.json": [],
}


def test_every_recorded_file_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_webhook(name: str) -> None:
    platform, _ = make()
    parsed = platform.parse(webhook(load(name)))
    got = [(m.conversation_id, m.message_id, m.type, m.text, m.payload, m.attachments) for m in parsed.messages]
    assert got == EXPECTED[name]
    assert parsed.response is None
    for msg in parsed.messages:
        assert msg.platform == "wa" and msg.channel in (PNID, "109876543210987")
        assert msg.sender.name == "Sheena Nelson" and msg.timestamp is not None


def test_sender_carries_phone_bsuid_and_username() -> None:
    platform, _ = make()
    with_phone = platform.parse(webhook(load("text_with_bsuid.json"))).messages[0].sender
    username_only = platform.parse(webhook(load("text_username_only.json"))).messages[0].sender
    assert (with_phone.id, with_phone.attributes) == (SHEENA, {"wa_id": SHEENA, "user_id": BSUID})
    assert (username_only.id, username_only.attributes) == (BSUID, {"user_id": BSUID, "username": "@sheena"})


def test_failed_status_is_logged_with_its_code(caplog: pytest.LogCaptureFixture) -> None:
    platform, _ = make()
    with caplog.at_level(logging.WARNING, "switchboard.platforms.whatsapp"):
        parsed = platform.parse(webhook(load("status_failed_outside_window.json")))
    assert parsed.messages == []
    (record,) = caplog.records
    assert record.__dict__["code"] == 131047 and record.__dict__["error"] == "Re-engagement message"


def test_redelivered_webhook_has_the_same_dedupe_key() -> None:
    platform, _ = make()
    first = platform.parse(webhook(load("text.json"))).messages
    again = platform.parse(webhook(load("text.json"))).messages
    assert [m.message_id for m in first] == [m.message_id for m in again]


# -- sending -----------------------------------------------------------------------------------------


async def send(reply: Reply, conversation: str = SHEENA) -> dict[str, Any]:
    platform, api = make()
    await platform.deliver(Outgoing("message", conversation, reply, "wamid.IN"), "k")
    (call,) = api.calls
    assert call.headers["authorization"] == f"Bearer {ACCESS}"
    body: dict[str, Any] = call.body
    body["_url"] = call.url
    return body


async def test_send_text() -> None:
    body = await send(Reply("Hello https://acme.test"))
    assert body == {
        "_url": f"{API}/{PNID}/messages",
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": SHEENA,
        "type": "text",
        "text": {"body": "Hello https://acme.test", "preview_url": True},
    }


async def test_a_bsuid_goes_in_recipient() -> None:
    body = await send(Reply("hi"), BSUID)
    assert body["recipient"] == BSUID and "to" not in body


async def test_a_conversation_on_another_number_is_answered_from_it() -> None:
    body = await send(Reply("hi"), f"109876543210987:{SHEENA}")
    assert body["_url"] == f"{API}/109876543210987/messages" and body["to"] == SHEENA


async def test_up_to_three_buttons_are_reply_buttons() -> None:
    body = await send(Reply("Pick one", buttons=(Button("Opening hours", "hours"), Button("Pricing", "pricing"))))
    assert body["type"] == "interactive"
    assert body["interactive"] == {
        "type": "button",
        "body": {"text": "Pick one"},
        "action": {
            "buttons": [
                {"type": "reply", "reply": {"id": "hours", "title": "Opening hours"}},
                {"type": "reply", "reply": {"id": "pricing", "title": "Pricing"}},
            ]
        },
    }


async def test_more_than_three_options_are_a_list() -> None:
    buttons = tuple(Button(f"Branch {i}", f"b{i}") for i in range(5))
    body = await send(Reply("Where?", buttons=buttons))
    assert body["interactive"]["type"] == "list"
    assert body["interactive"]["action"] == {
        "button": "Options",
        "sections": [{"rows": [{"id": f"b{i}", "title": f"Branch {i}"} for i in range(5)]}],
    }


async def test_a_title_over_20_characters_moves_to_a_list() -> None:
    body = await send(Reply("Pick", buttons=(Button("Twenty-one characters", "x"),)))
    assert body["interactive"]["type"] == "list"


@pytest.mark.parametrize(
    "reply",
    [
        Reply("Pick", buttons=tuple(Button(f"o{i}", f"o{i}") for i in range(11))),
        Reply("Pick", buttons=(Button("A title of twenty-five c", "x"), Button("y" * 25, "y"))),
        Reply("x" * 1025, buttons=(Button("Yes", "y"),)),
    ],
    ids=["11 options", "titles over 24", "body over 1024"],
)
async def test_past_the_limits_buttons_fall_back_to_plain_text(reply: Reply) -> None:
    body = await send(reply)
    assert body["type"] == "text" and body["text"]["body"] == reply.plain_text()


async def test_single_attachments_go_as_media() -> None:
    image = await send(Reply("look", attachments=(Attachment("image", "https://acme.test/a.png"),)))
    doc = await send(Reply(attachments=(Attachment("file", "wa-media:2049173145623867", "invoice.pdf"),)))
    assert (image["type"], image["image"]) == ("image", {"link": "https://acme.test/a.png", "caption": "look"})
    assert (doc["type"], doc["document"]) == ("document", {"id": "2049173145623867", "filename": "invoice.pdf"})


async def test_long_text_is_cut_to_4096() -> None:
    body = await send(Reply("a" * 5000))
    assert len(body["text"]["body"]) == 4096


async def test_read_and_typing() -> None:
    platform, api = make()
    assert platform.supports_read and platform.supports_typing and platform.typing_ttl == 25
    await platform.deliver(Outgoing("read", SHEENA, message_id="wamid.IN"), "r")
    await platform.deliver(Outgoing("typing", SHEENA, typing=True, message_id="wamid.IN"), "t1")
    await platform.deliver(Outgoing("typing", SHEENA, typing=False, message_id="wamid.IN"), "t2")
    await platform.deliver(Outgoing("typing", SHEENA, typing=True), "t3")  # no message to tie it to
    assert [c.body for c in api.calls] == [
        {"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.IN"},
        {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": "wamid.IN",
            "typing_indicator": {"type": "text"},
        },
    ]
    assert all(c.url == f"{API}/{PNID}/messages" for c in api.calls)


@pytest.mark.parametrize(
    ("response", "retryable", "words"),
    [
        (
            graph_error(
                400,
                131047,
                "(#131047) Re-engagement message",
                "Message failed to send because more than 24 hours have passed since the customer last replied "
                "to this number.",
            ),
            False,
            "24-hour customer service window",
        ),
        (graph_error(400, 130429, "(#130429) Rate limit hit"), True, "rate limited"),
        (
            graph_error(400, 131056, "(#131056) (Business Account, Consumer Account) pair rate limit hit"),
            True,
            "pair rate limit",
        ),
        (graph_error(400, 80007, "(#80007) Rate limit issues"), True, "rate limited"),
        (graph_error(500, 131000, "(#131000) Something went wrong"), True, "131000"),
        (graph_error(503, 133004, "(#133004) Server temporarily unavailable"), True, "503"),
        (graph_error(401, 190, "Error validating access token: Session has expired"), False, "access token"),
        (graph_error(400, 131026, "(#131026) Message undeliverable"), False, "131026"),
        (
            graph_error(
                400, 100, "(#100) Invalid parameter", "Param text['body'] must be at most 4096 characters long."
            ),
            False,
            "4096",
        ),
    ],
)
async def test_cloud_api_errors(response: httpx.Response, retryable: bool, words: str) -> None:
    platform, api = make()
    api.fail_with = response
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", SHEENA, Reply("x")), "k")
    assert err.value.retryable is retryable
    assert words in str(err.value)
    assert ACCESS not in str(err.value)


async def test_transport_failures_are_retryable() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    platform = WhatsAppPlatform(
        "wa", WhatsAppConfig.model_validate(CONFIG), httpx.AsyncClient(transport=httpx.MockTransport(fail))
    )
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", SHEENA, Reply("x")), "k")
    assert err.value.retryable


# -- end to end through Switchboard, with a fake Cloud API -----------------------------------------------


@dataclass
class FakeCloudApi:
    """POST /{phone-number-id}/messages, answered as graph.facebook.com answers it."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v26.0/{phone_number_id}/messages", self.messages, methods=["POST"])])

    async def messages(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {ACCESS}":
            return JSONResponse(
                {"error": {"message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190}}, 401
            )
        body = await request.json()
        self.calls.append((request.path_params["phone_number_id"], body))
        self.changed.set()
        if body.get("status") == "read":
            return JSONResponse({"success": True})
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                "messages": [{"id": f"wamid.OUT{len(self.calls)}"}],
            }
        )

    async def wait_for(self, predicate: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def sent(self) -> list[dict[str, Any]]:
        return [body for _, body in self.calls if "type" in body]


async def test_webhook_in_reply_out_through_switchboard(tmp_path: Path, echo_flows: Path) -> None:
    cloud = FakeCloudApi()
    async with Server(cloud.app()) as api_server:
        settings = settings_from_text(
            textwrap.dedent(
                f"""\
                store:
                  url: "sqlite:///{tmp_path}/sb.db"
                flows: {echo_flows}
                platforms:
                  wa:
                    type: whatsapp
                    access_token: {ACCESS}
                    app_secret: {APP_SECRET}
                    verify_token: {VERIFY}
                    phone_number_id: "{PNID}"
                    api_base: {api_server.url}/v26.0
                """
            ),
            "<test config>",
        )
        async with running(settings) as (server, _), httpx.AsyncClient(timeout=10) as client:
            url = f"{server.url}/webhooks/wa"
            query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}
            handshake = await client.get(url, params=query)
            assert handshake.status_code == 200 and handshake.text == "1158201444"
            assert handshake.headers["content-type"].startswith("text/plain")
            wrong = await client.get(url, params={**query, "hub.verify_token": "guess"})
            assert wrong.status_code == 403

            raw = (DATA / "text.json").read_bytes()
            headers = {"content-type": "application/json", "x-hub-signature-256": sign(raw)}
            first = await client.post(url, content=raw, headers=headers)
            again = await client.post(url, content=raw, headers=headers)  # Meta redelivers
            forged = await client.post(url, content=raw, headers={**headers, "x-hub-signature-256": sign(raw, "x")})
            status = (DATA / "status_read.json").read_bytes()
            read = await client.post(url, content=status, headers={**headers, "x-hub-signature-256": sign(status)})
            assert first.json() == {"accepted": 1, "duplicates": 0}
            assert again.json() == {"accepted": 0, "duplicates": 1}
            assert forged.status_code == 401
            assert read.json() == {"accepted": 0, "duplicates": 0}

            await cloud.wait_for(lambda: len(cloud.sent()) >= 1, 15)
            await asyncio.sleep(0.3)  # nothing more may come
        wamid = load("text.json")["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
        assert cloud.sent() == [
            {
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": SHEENA,
                "type": "text",
                "text": {"body": "echo Does it come in another color?", "preview_url": False},
            }
        ]
        assert (
            "106540352242922",
            {"messaging_product": "whatsapp", "status": "read", "message_id": wamid},
        ) in cloud.calls
        assert {pnid for pnid, _ in cloud.calls} == {PNID}
