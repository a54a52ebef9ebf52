"""The Telegram platform: the contract, every recorded update shape, the Bot API calls, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import textwrap
from collections.abc import Callable
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

from middleware.model import Attachment, Button, Outgoing, Reply
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.telegram import TelegramConfig, TelegramPlatform
from middleware.settings import settings_from_text
from tests.conftest import Server, running
from tests.platforms.contract import Case, ContractSuite, FakeApi

TOKEN = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
SECRET = "sb-webhook_secret-1"
API = "https://tg.test"
CONFIG = {"type": "telegram", "token": TOKEN, "secret_token": SECRET, "api_base": API}
DATA = Path(__file__).resolve().parent.parent / "data" / "telegram"


def num(text: str) -> int:
    """A stable positive integer for a test id (Telegram ids are integers)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def webhook(body: dict[str, Any] | bytes, secret: str | None = SECRET, method: str = "POST") -> WebhookRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if secret is not None:
        headers["x-telegram-bot-api-secret-token"] = secret
    return WebhookRequest(method, raw, headers)


def text_update(mid: str, conv: str, text: str, update_id: int | None = None) -> dict[str, Any]:
    user = {"id": 555000111, "is_bot": False, "first_name": "Ana", "username": "ana"}
    chat = {"id": num(conv), "first_name": "Ana", "type": "private"}
    message = {"message_id": num(mid), "from": user, "chat": chat, "date": 1764291600, "text": text}
    return {"update_id": update_id if update_id is not None else num(mid), "message": message}


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return webhook(text_update(mid, conv, text))


def forge(request: WebhookRequest) -> WebhookRequest:
    return WebhookRequest("POST", request.body, {**request.headers, "x-telegram-bot-api-secret-token": "guessed"})


def bot_api_ok(request: httpx.Request) -> httpx.Response:
    """The Bot API's success answers: the sent Message, or True for sendChatAction."""
    method = request.url.path.rsplit("/", 1)[-1]
    if method == "sendChatAction":
        return httpx.Response(200, json={"ok": True, "result": True})
    body = json.loads(request.content)
    result = {"message_id": 9001, "date": 1764291601, "chat": {"id": body["chat_id"], "type": "private"}}
    return httpx.Response(200, json={"ok": True, "result": {**result, "text": body.get("text", "")}})


def flood_wait() -> httpx.Response:
    return httpx.Response(
        429,
        json={
            "ok": False,
            "error_code": 429,
            "description": "Too Many Requests: retry after 7",
            "parameters": {"retry_after": 7},
        },
    )


class TestTelegramContract(ContractSuite):
    case = Case(
        type="telegram",
        config=CONFIG,
        text_webhook=text_webhook,
        forge=forge,
        ok=bot_api_ok,
        conversation_of=lambda c: str(num(c)),
        rate_limited=flood_wait,
    )


def make() -> tuple[TelegramPlatform, FakeApi]:
    api = FakeApi(bot_api_ok)
    return TelegramPlatform("tg", TelegramConfig.model_validate(CONFIG), api.client()), api


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


# -- verification ------------------------------------------------------------------------------------


def test_unsigned_webhook_is_refused() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(load("message_text_private.json"), secret=None))
    assert err.value.status == 401 and "X-Telegram-Bot-Api-Secret-Token" in err.value.message


def test_forged_secret_is_refused_and_not_echoed() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(load("message_text_private.json"), secret=SECRET + "x"))
    assert err.value.status == 401 and SECRET not in err.value.message


def test_only_posts() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(b"", method="GET"))
    assert err.value.status == 405


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"not json", 400, None),
        (b"[]", 400, "update_id"),
        (json.dumps({"message": {}}).encode(), 400, "update_id"),
        (json.dumps({"update_id": 1, "message": {"message_id": 1}}).encode(), 400, "message.chat"),
        (
            json.dumps({"update_id": 1, "message": {"message_id": "1", "chat": {"id": 5}}}).encode(),
            400,
            "message.message_id",
        ),
        (json.dumps({"update_id": 1, "callback_query": {"from": {"id": 1}}}).encode(), 400, "callback_query.id"),
    ],
)
def test_malformed_updates_name_the_field(body: bytes, status: int, field: str | None) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(webhook(body))
    assert err.value.status == status
    assert err.value.field == field


def test_wrong_content_type_is_415() -> None:
    platform, _ = make()
    request = webhook(load("message_text_private.json"))
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("POST", request.body, {**request.headers, "content-type": "text/plain"}))
    assert err.value.status == 415


# -- every recorded update --------------------------------------------------------------------------

#: file -> (conversation, message id, type, text, payload, attachments) of the one message, or None for none
EXPECTED: dict[str, tuple[str, str, str, str, dict[str, Any], tuple[Attachment, ...]] | None] = {
    "message_text_private.json": ("111222333", "111222333:4401", "text", "hi there", {}, ()),
    "message_command_group.json": ("-4011223344", "-4011223344:98", "text", "/start@acme_support_bot", {}, ()),
    "message_forum_topic.json": (
        "-1001234567890/7702",
        "-1001234567890:7710",
        "text",
        "order 123456 has not arrived",
        {},
        (),
    ),
    "message_photo_caption.json": (
        "111222333",
        "111222333:4402",
        "image",
        "the box arrived like this",
        {},
        (Attachment("image", "tg-file:AgACAgQAAxkBAAIBaWdhlarge"),),
    ),
    "message_document.json": (
        "111222333",
        "111222333:4403",
        "file",
        "",
        {},
        (Attachment("file", "tg-file:BQACAgQAAxkBAAIBamdhdoc", "invoice-2026-11.pdf"),),
    ),
    "message_voice.json": (
        "111222333",
        "111222333:4404",
        "file",
        "",
        {},
        (Attachment("audio", "tg-file:AwACAgQAAxkBAAIBa2dhvoice"),),
    ),
    "message_sticker.json": (
        "111222333",
        "111222333:4405",
        "image",
        "",
        {},
        (Attachment("image", "tg-file:CAACAgIAAxkBAAIBbGdhsticker"),),
    ),
    "message_location.json": (
        "111222333",
        "111222333:4406",
        "location",
        "",
        {"latitude": -6.175392, "longitude": 106.827153},
        (),
    ),
    "message_venue.json": (
        "111222333",
        "111222333:4407",
        "location",
        "Monas",
        {"latitude": -6.175392, "longitude": 106.827153, "name": "Monas", "address": "Gambir, Central Jakarta"},
        (),
    ),
    "callback_query.json": (
        "111222333",
        "callback:4382bfdwdsb323b2d9",
        "postback",
        "Pricing",
        {"payload": "pricing"},
        (),
    ),
    "message_contact.json": None,
    "message_new_members.json": None,
    "message_from_self.json": None,
    "callback_query_inline.json": None,
    "edited_message.json": None,
    "channel_post.json": None,
    "my_chat_member.json": None,
}


def test_every_recorded_file_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_update(name: str) -> None:
    platform, _ = make()
    parsed = platform.parse(webhook(load(name)))
    expected = EXPECTED[name]
    if expected is None:
        assert parsed.messages == []
    else:
        assert len(parsed.messages) == 1
        msg = parsed.messages[0]
        conversation, message_id, mtype, text, payload, attachments = expected
        assert (msg.conversation_id, msg.message_id, msg.type, msg.text, msg.payload, msg.attachments) == (
            conversation,
            message_id,
            mtype,
            text,
            payload,
            attachments,
        )
        assert msg.platform == "tg" and msg.sender.id
    if "callback_query" in load(name):
        answer = {"method": "answerCallbackQuery", "callback_query_id": load(name)["callback_query"]["id"]}
        assert parsed.response == answer
    else:
        assert parsed.response is None


def test_sender_and_timestamp() -> None:
    platform, _ = make()
    msg = platform.parse(webhook(load("message_text_private.json"))).messages[0]
    assert msg.sender.id == "111222333" and msg.sender.name == "Ana Lima"
    assert msg.sender.attributes == {"username": "analima", "language_code": "pt-br", "is_bot": False}
    assert msg.timestamp is not None and msg.timestamp.isoformat() == "2025-11-28T01:00:00+00:00"


def test_redelivered_update_has_the_same_dedupe_key() -> None:
    """Telegram redelivers an update it got no 2xx for; the message id (chat:message) is the dedupe key."""
    platform, _ = make()
    first = platform.parse(webhook(text_update("m-1", "c-1", "hi", update_id=100))).messages[0]
    again = platform.parse(webhook(text_update("m-1", "c-1", "hi", update_id=100))).messages[0]
    same_number_other_chat = platform.parse(webhook(text_update("m-1", "c-2", "hi", update_id=101))).messages[0]
    assert first.message_id == again.message_id
    assert same_number_other_chat.message_id != first.message_id  # message ids are per chat


def test_another_bots_message_is_kept() -> None:
    """Only the bot's own messages are dropped (by the id in its token), not every bot's."""
    platform, _ = make()
    update = load("message_from_self.json")
    update["message"]["from"]["id"] = 42
    assert len(platform.parse(webhook(update)).messages) == 1


# -- sending -----------------------------------------------------------------------------------------


async def test_send_text() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "111222333", Reply("hello"), "111222333:1"), "k")
    (call,) = api.calls
    assert call.url == f"{API}/bot{TOKEN}/sendMessage"
    assert call.body == {"chat_id": 111222333, "text": "hello"}


async def test_buttons_are_an_inline_keyboard() -> None:
    platform, api = make()
    reply = Reply("Pick one", buttons=(Button("Opening hours", "hours"), Button("Pricing", "pricing")))
    await platform.deliver(Outgoing("message", "-1001234567890/7702", reply), "k")
    assert api.calls[0].body == {
        "chat_id": -1001234567890,
        "message_thread_id": 7702,
        "text": "Pick one",
        "reply_markup": {
            "inline_keyboard": [
                [{"text": "Opening hours", "callback_data": "hours"}],
                [{"text": "Pricing", "callback_data": "pricing"}],
            ]
        },
    }


async def test_payloads_over_64_bytes_become_a_reply_keyboard() -> None:
    platform, api = make()
    reply = Reply("Pick one", buttons=(Button("Long", "x" * 65), Button("Short", "s")))
    await platform.deliver(Outgoing("message", "5", reply), "k")
    markup = api.calls[0].body["reply_markup"]
    assert markup == {
        "keyboard": [[{"text": "Long"}], [{"text": "Short"}]],
        "one_time_keyboard": True,
        "resize_keyboard": True,
    }


async def test_buttons_without_text_still_send_a_text() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "5", Reply(buttons=(Button("Yes", "y"),))), "k")
    assert api.calls[0].body["text"] == "1. Yes"


async def test_single_attachment_uses_send_photo_or_document() -> None:
    platform, api = make()
    await platform.deliver(
        Outgoing("message", "5", Reply("look", attachments=(Attachment("image", "https://x.test/a.png"),))), "k1"
    )
    await platform.deliver(
        Outgoing("message", "5", Reply(attachments=(Attachment("file", "tg-file:BQACAgQ", "a.pdf"),))), "k2"
    )
    assert api.calls[0].url.endswith("/sendPhoto")
    assert api.calls[0].body == {"chat_id": 5, "photo": "https://x.test/a.png", "caption": "look"}
    assert api.calls[1].url.endswith("/sendDocument")
    assert api.calls[1].body == {"chat_id": 5, "document": "BQACAgQ"}


async def test_several_attachments_are_links_in_one_message() -> None:
    platform, api = make()
    reply = Reply(
        "files", attachments=(Attachment("file", "https://x.test/a"), Attachment("image", "https://x.test/b", "b"))
    )
    await platform.deliver(Outgoing("message", "5", reply), "k")
    assert api.calls[0].body["text"] == "files\nhttps://x.test/a\nb: https://x.test/b"


async def test_long_text_is_cut_to_4096() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "5", Reply("a" * 5000)), "k")
    text = api.calls[0].body["text"]
    assert len(text) == 4096 and text.endswith("…")


async def test_empty_reply_sends_nothing() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "5", Reply()), "k")
    assert api.calls == []


async def test_typing_on_is_send_chat_action_and_off_is_nothing() -> None:
    platform, api = make()
    assert platform.supports_typing and not platform.supports_read and platform.typing_ttl == 5
    await platform.deliver(Outgoing("typing", "-1001234567890/7702", typing=True), "t1")
    await platform.deliver(Outgoing("typing", "-1001234567890/7702", typing=False), "t2")
    (call,) = api.calls
    assert call.url == f"{API}/bot{TOKEN}/sendChatAction"
    assert call.body == {"chat_id": -1001234567890, "message_thread_id": 7702, "action": "typing"}


@pytest.mark.parametrize(
    ("response", "retryable", "retry_after", "words"),
    [
        (flood_wait(), True, 7.0, "retry after 7"),
        (httpx.Response(502, text="Bad Gateway"), True, None, "502"),
        (
            httpx.Response(
                403, json={"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}
            ),
            False,
            None,
            "blocked",
        ),
        (
            httpx.Response(
                400,
                json={
                    "ok": False,
                    "error_code": 400,
                    "description": "Bad Request: group chat was upgraded to a supergroup chat",
                    "parameters": {"migrate_to_chat_id": -1001234567890},
                },
            ),
            False,
            None,
            "-1001234567890",
        ),
        (httpx.Response(401, json={"ok": False, "error_code": 401, "description": "Unauthorized"}), False, None, "401"),
    ],
)
async def test_bot_api_errors(response: httpx.Response, retryable: bool, retry_after: float | None, words: str) -> None:
    platform, api = make()
    api.fail_with = response
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "5", Reply("x")), "k")
    assert err.value.retryable is retryable
    assert err.value.retry_after == retry_after
    assert words in str(err.value)


async def test_the_token_never_appears_in_errors() -> None:
    def echo_url(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"ok": False, "error_code": 404, "description": f"Not Found: {request.url}"})

    platform = TelegramPlatform(
        "tg", TelegramConfig.model_validate(CONFIG), httpx.AsyncClient(transport=httpx.MockTransport(echo_url))
    )
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "5", Reply("x")), "k")
    assert TOKEN not in str(err.value) and "<token>" in str(err.value)


@pytest.mark.parametrize("error", [httpx.ConnectTimeout("slow"), httpx.ConnectError("refused")])
async def test_transport_failures_are_retryable(error: httpx.HTTPError) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    platform = TelegramPlatform(
        "tg", TelegramConfig.model_validate(CONFIG), httpx.AsyncClient(transport=httpx.MockTransport(fail))
    )
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "5", Reply("x")), "k")
    assert err.value.retryable and TOKEN not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"), [("token", "not-a-token"), ("secret_token", "has spaces"), ("secret_token", "x" * 257)]
)
def test_config_is_checked(key: str, value: str) -> None:
    with pytest.raises(ValidationError) as err:
        TelegramConfig.model_validate({**CONFIG, key: value})
    assert key in str(err.value)


# -- end to end through Switchboard, with a fake Bot API ------------------------------------------------


@dataclass
class FakeBotApi:
    """The Bot API methods the platform calls, answered as api.telegram.org answers them."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/bot{token}/{method}", self.method, methods=["POST"])])

    async def method(self, request: Request) -> Response:
        if request.path_params["token"] != TOKEN:
            return JSONResponse({"ok": False, "error_code": 401, "description": "Unauthorized"}, 401)
        body = await request.json()
        name = request.path_params["method"]
        self.calls.append((name, body))
        self.changed.set()
        if name == "sendChatAction":
            return JSONResponse({"ok": True, "result": True})
        chat = {"id": body["chat_id"], "type": "private"}
        return JSONResponse(
            {"ok": True, "result": {"message_id": len(self.calls), "date": 1, "chat": chat, "text": body["text"]}}
        )

    async def wait_for(self, predicate: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def sent(self) -> list[dict[str, Any]]:
        return [body for name, body in self.calls if name == "sendMessage"]


async def test_webhook_in_reply_out_through_switchboard(tmp_path: Path, echo_flows: Path) -> None:
    bot_api = FakeBotApi()
    async with Server(bot_api.app()) as api_server:
        settings = settings_from_text(
            textwrap.dedent(
                f"""\
                store:
                  url: "sqlite:///{tmp_path}/sb.db"
                flows: {echo_flows}
                platforms:
                  tg:
                    type: telegram
                    token: "{TOKEN}"
                    secret_token: {SECRET}
                    api_base: {api_server.url}
                """
            ),
            "<test config>",
        )
        async with running(settings) as (server, _), httpx.AsyncClient(timeout=10) as client:
            url = f"{server.url}/webhooks/tg"
            headers = {"x-telegram-bot-api-secret-token": SECRET}
            hello = load("message_text_private.json")
            first = await client.post(url, json=hello, headers=headers)
            again = await client.post(url, json=hello, headers=headers)  # Telegram's redelivery
            forged = await client.post(url, json=hello, headers={"x-telegram-bot-api-secret-token": "nope"})
            unsigned = await client.post(url, json=hello)
            assert first.json() == {"accepted": 1, "duplicates": 0}
            assert again.json() == {"accepted": 0, "duplicates": 1}
            assert forged.status_code == 401 and unsigned.status_code == 401

            slow = text_update("slow-1", "c-9", "slow please")  # the echo flow waits 1.6 s: typing goes on
            assert (await client.post(url, json=slow, headers=headers)).status_code == 200
            click = await client.post(url, json=load("callback_query.json"), headers=headers)
            assert click.status_code == 200
            assert click.json() == {"method": "answerCallbackQuery", "callback_query_id": "4382bfdwdsb323b2d9"}

            await bot_api.wait_for(lambda: len(bot_api.sent()) >= 3, 15)
            await asyncio.sleep(0.3)  # nothing more may come
        sent = {(body["chat_id"], body["text"]) for body in bot_api.sent()}
        assert sent == {(111222333, "echo hi there"), (num("c-9"), "slow slow please"), (111222333, "echo Pricing")}
        assert len(bot_api.sent()) == 3
        typing = [body for name, body in bot_api.calls if name == "sendChatAction"]
        assert typing and all(t == {"chat_id": num("c-9"), "action": "typing"} for t in typing)
