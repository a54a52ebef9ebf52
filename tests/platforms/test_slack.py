"""The Slack platform: the contract, every recorded request shape, chat.postMessage, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.model import Attachment, Button, Outgoing, Reply
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.slack import SlackConfig, SlackPlatform
from middleware.settings import settings_from_text
from tests.conftest import Server, running
from tests.platforms.contract import Case, ContractSuite, FakeApi

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy"
API = "https://slack.test/api"
CONFIG = {"type": "slack", "bot_token": BOT_TOKEN, "signing_secret": SIGNING_SECRET, "api_base": API}
DATA = Path(__file__).resolve().parent.parent / "data" / "slack"
#: interactivity payloads arrive form-encoded; the rest are Events API JSON bodies
FORM_FILES = {"block_actions.json", "block_actions_in_thread.json", "view_submission.json"}


def num(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def channel_of(conv: str) -> str:
    return f"C{num(conv):010d}"


def sign(raw: bytes, stamp: str, secret: str = SIGNING_SECRET) -> str:
    return "v0=" + hmac.new(secret.encode(), b"v0:" + stamp.encode() + b":" + raw, hashlib.sha256).hexdigest()


def request(
    body: dict[str, Any] | bytes,
    *,
    form: bool = False,
    stamp: str | None = None,
    signature: str | None = "auto",
    headers: dict[str, str] | None = None,
) -> WebhookRequest:
    if isinstance(body, bytes):
        raw = body
    elif form:
        raw = urlencode({"payload": json.dumps(body)}).encode()
    else:
        raw = json.dumps(body).encode()
    stamp = stamp or str(int(time.time()))
    all_headers = {
        "content-type": "application/x-www-form-urlencoded" if form else "application/json",
        "x-slack-request-timestamp": stamp,
        **(headers or {}),
    }
    if signature == "auto":
        all_headers["x-slack-signature"] = sign(raw, stamp)
    elif signature is not None:
        all_headers["x-slack-signature"] = signature
    return WebhookRequest("POST", raw, all_headers)


def message_event(mid: str, conv: str, text: str, **extra: Any) -> dict[str, Any]:
    ts = f"{num(mid)}.000100"
    event = {"type": "message", "channel": channel_of(conv), "user": "U2147483697", "text": text, "ts": ts}
    return {
        "token": "XXYYZZ",
        "team_id": "T061EG9R6",
        "api_app_id": "A0PNCHHK2",
        "event": {**event, "event_ts": ts, "channel_type": "channel", **extra},
        "type": "event_callback",
        "event_id": f"Ev{num(mid)}",
        "event_time": 1764291600,
        "authorizations": [{"team_id": "T061EG9R6", "user_id": "U0BOTUSER1", "is_bot": True}],
    }


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return request(message_event(mid, conv, text))


def forge(req: WebhookRequest) -> WebhookRequest:
    stamp = req.headers["x-slack-request-timestamp"]
    return WebhookRequest("POST", req.body, {**req.headers, "x-slack-signature": sign(req.body, stamp, "guess")})


def web_api_ok(req: httpx.Request) -> httpx.Response:
    body = json.loads(req.content)
    message = {
        "type": "message",
        "subtype": "bot_message",
        "text": body["text"],
        "ts": "1764291601.000200",
        "bot_id": "B0BOTID01",
    }
    return httpx.Response(
        200, json={"ok": True, "channel": body["channel"], "ts": "1764291601.000200", "message": message}
    )


def rate_limited() -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": "7"}, json={"ok": False, "error": "ratelimited"})


class TestSlackContract(ContractSuite):
    case = Case(
        type="slack",
        config=CONFIG,
        text_webhook=text_webhook,
        forge=forge,
        ok=web_api_ok,
        conversation_of=channel_of,
        rate_limited=rate_limited,
    )


def make(**config: Any) -> tuple[SlackPlatform, FakeApi]:
    api = FakeApi(web_api_ok)
    return SlackPlatform("sl", SlackConfig.model_validate({**CONFIG, **config}), api.client()), api


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def recorded(name: str, **kwargs: Any) -> WebhookRequest:
    return request(load(name), form=name in FORM_FILES, **kwargs)


# -- verification ------------------------------------------------------------------------------------


def test_url_verification_is_answered_with_the_challenge() -> None:
    platform, _ = make()
    parsed = platform.parse(recorded("url_verification.json"))
    assert parsed.messages == []
    assert parsed.response == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"signature": None},
        {"signature": "v0=" + "0" * 64},
        {"signature": "v1=abc"},
        {"stamp": "yesterday"},
    ],
    ids=["unsigned", "forged", "other scheme", "bad timestamp"],
)
def test_unsigned_and_forged_requests_are_refused(kwargs: dict[str, Any]) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(recorded("url_verification.json", **kwargs))
    assert err.value.status == 401


@pytest.mark.parametrize("offset", [-301, 301, -3600])
def test_requests_outside_the_five_minute_window_are_refused(offset: int) -> None:
    """A correctly signed request is refused when its timestamp is more than 5 minutes off (a replay)."""
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(recorded("message_im.json", stamp=str(int(time.time()) + offset)))
    assert err.value.status == 401 and "5 minutes" in err.value.message


def test_a_request_inside_the_window_is_accepted() -> None:
    platform, _ = make()
    assert len(platform.parse(recorded("message_im.json", stamp=str(int(time.time()) - 290))).messages) == 1


def test_the_signature_covers_the_timestamp() -> None:
    platform, _ = make()
    good = recorded("message_im.json")
    moved = {**good.headers, "x-slack-request-timestamp": str(int(good.headers["x-slack-request-timestamp"]) - 1)}
    with pytest.raises(Rejected):
        platform.parse(WebhookRequest("POST", good.body, moved))


def test_only_posts() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("GET", b"", {}))
    assert err.value.status == 405


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "event_callback"}, "event"),
        ({"type": "event_callback", "event": {"type": "message", "user": "U1", "ts": "1.2"}}, "event.channel"),
        ({"type": "url_verification"}, "challenge"),
    ],
)
def test_malformed_events_name_the_field(body: dict[str, Any], field: str) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(request(body))
    assert err.value.status == 400 and err.value.field == field


def test_interactivity_without_payload_is_400() -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(request(b"payload=not-json", form=True))
    assert err.value.status == 400 and err.value.field == "payload"


# -- duplicates ---------------------------------------------------------------------------------------


def test_retries_are_duplicates() -> None:
    """Slack retries an event with X-Slack-Retry-Num; the retry has the same dedupe key."""
    platform, _ = make()
    first = platform.parse(recorded("message_channel.json")).messages[0]
    retry = platform.parse(
        recorded("message_channel.json", headers={"x-slack-retry-num": "1", "x-slack-retry-reason": "http_timeout"})
    ).messages[0]
    assert first.message_id == retry.message_id == "C2147483705:1355517523.000005"


def test_message_and_app_mention_of_one_message_are_duplicates() -> None:
    platform, _ = make()
    mention = platform.parse(recorded("app_mention.json")).messages[0]
    message = platform.parse(recorded("message_mention_same_ts.json")).messages[0]
    assert mention.message_id == message.message_id
    assert mention.text == message.text == "what are your opening hours?"


# -- every recorded request ---------------------------------------------------------------------------

#: file -> (conversation, message id, type, text, payload, attachments) of the one message, or None for none
EXPECTED: dict[str, tuple[str, str, str, str, dict[str, Any], tuple[Attachment, ...]] | None] = {
    "message_channel.json": ("C2147483705", "C2147483705:1355517523.000005", "text", "Live long and prospect.", {}, ()),
    "message_im.json": (
        "D024BE91L",
        "D024BE91L:1355517600.000008",
        "text",
        "Is the order 123456 on its way? <urgent> & thanks",
        {},
        (),
    ),
    "message_thread_reply.json": (
        "C2147483705:1355517523.000005",
        "C2147483705:1355517700.000010",
        "text",
        "and the second question",
        {},
        (),
    ),
    "app_mention.json": (
        "C2147483705",
        "C2147483705:1515449522.000016",
        "text",
        "what are your opening hours?",
        {},
        (),
    ),
    "message_mention_same_ts.json": (
        "C2147483705",
        "C2147483705:1515449522.000016",
        "text",
        "what are your opening hours?",
        {},
        (),
    ),
    "message_file_share.json": (
        "D024BE91L",
        "D024BE91L:1355517800.000012",
        "image",
        "the box arrived like this",
        {},
        (Attachment("image", "https://files.slack.com/files-pri/T061EG9R6-F0S43PZDF/box.jpg", "box.jpg"),),
    ),
    "block_actions.json": (
        "C2147483705",
        "action:C2147483705:U2147483697:1355517920.840180",
        "postback",
        "Pricing",
        {"payload": "pricing"},
        (),
    ),
    "block_actions_in_thread.json": (
        "C2147483705:1355517523.000005",
        "action:C2147483705:U2147483697:1355517960.840181",
        "postback",
        "Opening hours",
        {"payload": "hours"},
        (),
    ),
    "url_verification.json": None,
    "message_bot_own.json": None,
    "message_from_app_bot_user.json": None,
    "message_changed.json": None,
    "message_deleted.json": None,
    "member_joined_channel.json": None,
    "app_rate_limited.json": None,
    "view_submission.json": None,
}


def test_every_recorded_file_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_request(name: str) -> None:
    platform, _ = make()
    parsed = platform.parse(recorded(name))
    expected = EXPECTED[name]
    if expected is None:
        assert parsed.messages == []
    else:
        (msg,) = parsed.messages
        assert (msg.conversation_id, msg.message_id, msg.type, msg.text, msg.payload, msg.attachments) == expected
        assert msg.platform == "sl" and msg.sender.id == "U2147483697" and msg.timestamp is not None
        assert msg.channel == "T061EG9R6"
    if name in FORM_FILES:
        assert parsed.response == ""  # Slack wants an empty 200 for interactivity


def test_bot_user_id_from_config_when_events_carry_no_authorizations() -> None:
    platform, _ = make(bot_user_id="U0BOTUSER1")
    own = load("message_from_app_bot_user.json")
    del own["authorizations"], own["event"]["bot_id"], own["event"]["bot_profile"]
    mention = load("app_mention.json")
    del mention["authorizations"]
    assert platform.parse(request(own)).messages == []
    assert platform.parse(request(mention)).messages[0].text == "what are your opening hours?"


# -- sending -----------------------------------------------------------------------------------------


async def post(reply: Reply, conversation: str = "C2147483705") -> dict[str, Any]:
    platform, api = make()
    await platform.deliver(Outgoing("message", conversation, reply, "C2147483705:1.2"), "k")
    (call,) = api.calls
    assert call.url == f"{API}/chat.postMessage"
    assert call.headers["authorization"] == f"Bearer {BOT_TOKEN}"
    assert call.headers["content-type"] == "application/json; charset=utf-8"
    body: dict[str, Any] = call.body
    return body


async def test_plain_text_is_escaped() -> None:
    body = await post(Reply("echo <!channel> & <@U123>"))
    assert body == {"channel": "C2147483705", "text": "echo &lt;!channel&gt; &amp; &lt;@U123&gt;"}


async def test_replies_in_a_thread_go_to_the_thread() -> None:
    body = await post(Reply("yes"), "C2147483705:1355517523.000005")
    assert body == {"channel": "C2147483705", "thread_ts": "1355517523.000005", "text": "yes"}


async def test_buttons_are_blocks_with_a_text_fallback() -> None:
    body = await post(Reply("Pick one", buttons=(Button("Opening hours", "hours"), Button("Pricing", "pricing"))))
    assert body["text"] == "Pick one\n1. Opening hours\n2. Pricing"
    assert body["blocks"] == [
        {"type": "section", "text": {"type": "mrkdwn", "text": "Pick one"}},
        {
            "type": "actions",
            "elements": [
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": "Opening hours"},
                    "value": "hours",
                    "action_id": "sb-0",
                },
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": "Pricing"},
                    "value": "pricing",
                    "action_id": "sb-1",
                },
            ],
        },
    ]


async def test_attachments_are_image_blocks_and_links() -> None:
    reply = Reply(
        "Here",
        attachments=(
            Attachment("image", "https://acme.test/a.png", "map"),
            Attachment("file", "https://acme.test/b.pdf", "b.pdf"),
        ),
    )
    body = await post(reply)
    assert body["blocks"][1:] == [
        {"type": "image", "image_url": "https://acme.test/a.png", "alt_text": "map"},
        {"type": "section", "text": {"type": "mrkdwn", "text": "<https://acme.test/b.pdf|b.pdf>"}},
    ]


async def test_long_text_is_split_over_sections() -> None:
    body = await post(Reply("a" * 7000, buttons=(Button("ok", "ok"),)))
    sections = [b["text"]["text"] for b in body["blocks"] if b["type"] == "section"]
    assert [len(s) for s in sections] == [3000, 3000, 1000]


async def test_sections_never_split_an_escape() -> None:
    body = await post(Reply("a" * 2998 + "&b", buttons=(Button("ok", "ok"),)))
    sections = [b["text"]["text"] for b in body["blocks"] if b["type"] == "section"]
    assert sections == ["a" * 2998, "&amp;b"]


@pytest.mark.parametrize(
    "buttons",
    [tuple(Button(f"o{i}", f"o{i}") for i in range(26)), (Button("x" * 76, "x"),), (Button("x", "v" * 2001),)],
    ids=["26 buttons", "76-character title", "2001-character value"],
)
async def test_past_block_kit_limits_the_text_fallback_alone(buttons: tuple[Button, ...]) -> None:
    reply = Reply("Pick", buttons=buttons)
    body = await post(reply)
    assert "blocks" not in body and body["text"] == reply.plain_text()


async def test_no_typing_no_read() -> None:
    platform, api = make()
    assert not platform.supports_typing and not platform.supports_read
    await platform.deliver(Outgoing("typing", "C1", typing=True), "t")
    assert api.calls == []


@pytest.mark.parametrize(
    ("response", "retryable", "retry_after", "words"),
    [
        (rate_limited(), True, 7.0, "ratelimited"),
        (
            httpx.Response(200, headers={"Retry-After": "3"}, json={"ok": False, "error": "ratelimited"}),
            True,
            3.0,
            "ratelimited",
        ),
        (httpx.Response(200, json={"ok": False, "error": "service_unavailable"}), True, None, "service_unavailable"),
        (httpx.Response(503, text="upstream connect error"), True, None, "503"),
        (httpx.Response(200, json={"ok": False, "error": "channel_not_found"}), False, None, "channel_not_found"),
        (httpx.Response(200, json={"ok": False, "error": "not_in_channel"}), False, None, "not_in_channel"),
        (httpx.Response(200, json={"ok": False, "error": "invalid_auth"}), False, None, "invalid_auth"),
        (httpx.Response(200, json={"ok": False, "error": "fatal_error"}), False, None, "fatal_error"),
    ],
)
async def test_web_api_errors(response: httpx.Response, retryable: bool, retry_after: float | None, words: str) -> None:
    platform, api = make()
    api.fail_with = response
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "C1", Reply("x")), "k")
    assert err.value.retryable is retryable
    assert err.value.retry_after == retry_after
    assert words in str(err.value) and BOT_TOKEN not in str(err.value)


async def test_transport_failures_are_retryable() -> None:
    def fail(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    platform = SlackPlatform(
        "sl", SlackConfig.model_validate(CONFIG), httpx.AsyncClient(transport=httpx.MockTransport(fail))
    )
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "C1", Reply("x")), "k")
    assert err.value.retryable


# -- end to end through Switchboard, with a fake Web API -------------------------------------------------


@dataclass
class FakeWebApi:
    """chat.postMessage as slack.com answers it: HTTP 200 with ok true/false."""

    posted: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/api/chat.postMessage", self.post_message, methods=["POST"])])

    async def post_message(self, req: Request) -> Response:
        if req.headers.get("authorization") != f"Bearer {BOT_TOKEN}":
            return JSONResponse({"ok": False, "error": "invalid_auth"})
        body = await req.json()
        self.posted.append(body)
        self.changed.set()
        ts = f"1764291601.{len(self.posted):06d}"
        return JSONResponse(
            {"ok": True, "channel": body["channel"], "ts": ts, "message": {"text": body["text"], "ts": ts}}
        )

    async def wait_for(self, predicate: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def test_events_in_replies_out_through_switchboard(tmp_path: Path, echo_flows: Path) -> None:
    web_api = FakeWebApi()
    async with Server(web_api.app()) as api_server:
        settings = settings_from_text(
            textwrap.dedent(
                f"""\
                store:
                  url: "sqlite:///{tmp_path}/sb.db"
                flows: {echo_flows}
                platforms:
                  sl:
                    type: slack
                    bot_token: {BOT_TOKEN}
                    signing_secret: {SIGNING_SECRET}
                    api_base: {api_server.url}/api
                """
            ),
            "<test config>",
        )
        async with running(settings) as (server, _), httpx.AsyncClient(timeout=10) as client:
            url = f"{server.url}/webhooks/sl"

            async def send(name: str, **extra: str) -> httpx.Response:
                req = recorded(name, headers=extra)
                return await client.post(url, content=req.body, headers=dict(req.headers))

            challenge = await send("url_verification.json")
            assert challenge.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
            assert (await send("message_channel.json")).json() == {"accepted": 1, "duplicates": 0}
            retry = await send(
                "message_channel.json", **{"x-slack-retry-num": "1", "x-slack-retry-reason": "http_timeout"}
            )
            assert retry.json() == {"accepted": 0, "duplicates": 1}
            assert (await send("message_thread_reply.json")).json() == {"accepted": 1, "duplicates": 0}
            assert (await send("app_mention.json")).json() == {"accepted": 1, "duplicates": 0}
            assert (await send("message_mention_same_ts.json")).json() == {"accepted": 0, "duplicates": 1}
            assert (await send("message_from_app_bot_user.json")).json() == {"accepted": 0, "duplicates": 0}
            click = await send("block_actions.json")
            assert click.status_code == 200 and click.text == ""
            stale = recorded("message_im.json", stamp=str(int(time.time()) - 600))
            assert (await client.post(url, content=stale.body, headers=dict(stale.headers))).status_code == 401

            await web_api.wait_for(lambda: len(web_api.posted) >= 4, 15)
            await asyncio.sleep(0.3)  # nothing more may come
        assert sorted(web_api.posted, key=lambda b: b["text"]) == [
            {"channel": "C2147483705", "text": "echo Live long and prospect."},
            {"channel": "C2147483705", "text": "echo Pricing"},
            {"channel": "C2147483705", "thread_ts": "1355517523.000005", "text": "echo and the second question"},
            {"channel": "C2147483705", "text": "echo what are your opening hours?"},
        ]
