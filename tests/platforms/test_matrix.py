from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.model import Attachment, Button, Inbound, Outgoing, Reply
from middleware.platforms import DeliveryError, Rejected, WebhookRequest
from middleware.platforms.base import FollowUp
from middleware.platforms.matrix import MatrixConfig, MatrixPlatform
from middleware.settings import Settings, settings_from_text
from tests.conftest import Server, running
from tests.platforms.contract import Case, ContractSuite, FakeApi

HS_TOKEN = "hs_token_test_456"
AS_TOKEN = "as_token_test_123"
BOT = "@bot_switchboard:localhost"
HOMESERVER = "http://matrix.test"
DATA = Path(__file__).resolve().parent.parent / "data" / "matrix"
CONFIG = {
    "type": "matrix",
    "homeserver_url": HOMESERVER,
    "as_token": AS_TOKEN,
    "hs_token": HS_TOKEN,
    "bot_user_id": BOT,
}


def event(event_id: str, room: str, content: dict[str, Any], sender: str = "@alice:localhost") -> dict[str, Any]:
    return {
        "content": content,
        "event_id": event_id,
        "origin_server_ts": 1795830304981,
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "unsigned": {"age": 72},
        "user_id": sender,
    }


def transaction(
    txn: str,
    *events: dict[str, Any],
    token: str | None = HS_TOKEN,
    method: str = "PUT",
    path: str | None = None,
    query: dict[str, str] | None = None,
) -> WebhookRequest:
    body = json.dumps({"events": list(events), "ephemeral": []}).encode()
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return WebhookRequest(method, body, headers, query or {}, path or f"_matrix/app/v1/transactions/{txn}")


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    return transaction(f"t-{mid}", event(mid, conv, {"msgtype": "m.text", "body": text}))


def forge(request: WebhookRequest) -> WebhookRequest:
    return WebhookRequest(
        request.method, request.body, {**request.headers, "authorization": "Bearer forged"}, {}, request.path
    )


def homeserver_ok(request: httpx.Request) -> httpx.Response:
    if "/send/" in request.url.path:
        return httpx.Response(200, json={"event_id": "$YUwRidLecu:example.com"})
    return httpx.Response(200, json={})


class TestMatrixContract(ContractSuite):
    case = Case(
        type="matrix",
        config=CONFIG,
        text_webhook=text_webhook,
        forge=forge,
        ok=homeserver_ok,
        rate_limited=lambda: httpx.Response(
            429, json={"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests", "retry_after_ms": 7000}
        ),
    )


def make() -> tuple[MatrixPlatform, FakeApi]:
    api = FakeApi(homeserver_ok)
    return MatrixPlatform("mx", MatrixConfig.model_validate(CONFIG), api.client()), api


def recorded(name: str) -> WebhookRequest:
    data = json.loads((DATA / name).read_text())
    headers = {"content-type": "application/json", "authorization": f"Bearer {HS_TOKEN}"}
    return WebhookRequest(data["method"], json.dumps(data["body"]).encode(), headers, {}, data["path"])


# -- authorization --------------------------------------------------------------------------------


def test_hs_token_as_bearer_or_legacy_query_parameter() -> None:
    platform, _ = make()
    hello = event("$1", "!r", {"msgtype": "m.text", "body": "hi"})
    assert len(platform.parse(transaction("1", hello)).messages) == 1
    assert len(platform.parse(transaction("1", hello, token=None, query={"access_token": HS_TOKEN})).messages) == 1
    # a homeserver that sends an empty Bearer beside the query parameter
    legacy = transaction("1", hello, token="", query={"access_token": HS_TOKEN})
    assert len(platform.parse(legacy).messages) == 1


@pytest.mark.parametrize(
    ("token", "query", "status", "errcode"),
    [
        (None, {}, 401, "M_MISSING_TOKEN"),
        ("forged", {}, 403, "M_FORBIDDEN"),
        (HS_TOKEN[:-1], {}, 403, "M_FORBIDDEN"),
        (HS_TOKEN, {"access_token": "forged"}, 403, "M_FORBIDDEN"),
        ("forged", {"access_token": HS_TOKEN}, 403, "M_FORBIDDEN"),
    ],
)
def test_missing_or_forged_hs_token_is_refused(
    token: str | None, query: dict[str, str], status: int, errcode: str
) -> None:
    platform, _ = make()
    with pytest.raises(Rejected) as err:
        platform.parse(
            transaction("1", event("$1", "!r", {"msgtype": "m.text", "body": "hi"}), token=token, query=query)
        )
    assert err.value.status == status
    assert err.value.body()["errcode"] == errcode
    assert HS_TOKEN not in json.dumps(err.value.body())


def test_authorization_that_is_not_bearer_is_refused() -> None:
    platform, _ = make()
    request = transaction("1")
    request = WebhookRequest(
        "PUT", request.body, {**request.headers, "authorization": f"Basic {HS_TOKEN}"}, {}, request.path
    )
    with pytest.raises(Rejected) as err:
        platform.parse(request)
    assert err.value.status == 403


def test_secrets_stay_out_of_the_config_repr() -> None:
    config = MatrixConfig.model_validate(CONFIG)
    assert AS_TOKEN not in repr(config) and HS_TOKEN not in repr(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [("bot_user_id", "bot_switchboard"), ("homeserver_url", "matrix.test"), ("msgtype", "m.emote")],
)
def test_config_mistakes_are_named(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=key):
        MatrixConfig.model_validate({**CONFIG, key: value})


# -- routes -----------------------------------------------------------------------------------------


def test_routes_answer_as_the_application_service_api_says() -> None:
    platform, _ = make()
    ping = platform.parse(recorded("spec-ping.json"))
    assert (ping.messages, ping.response, ping.status) == ([], {}, 200)
    legacy = platform.parse(recorded("spec-legacy-transaction.json"))
    assert legacy.response == {} and len(legacy.messages) == 1
    query = platform.parse(
        WebhookRequest("GET", b"", {"authorization": f"Bearer {HS_TOKEN}"}, {}, "_matrix/app/v1/users/%40x")
    )
    assert query.status == 404 and query.response == {"errcode": "M_NOT_FOUND", "error": "no such user"}
    with pytest.raises(Rejected) as err:
        platform.parse(transaction("1", method="GET"))
    assert err.value.status == 405 and err.value.body()["errcode"] == "M_UNRECOGNIZED"
    with pytest.raises(Rejected) as err:
        platform.parse(transaction("1", path="_matrix/app/v1/thirdparty/protocol/irc", method="GET"))
    assert err.value.status == 404 and err.value.body()["errcode"] == "M_UNRECOGNIZED"


def test_a_malformed_body_is_refused_but_a_malformed_event_is_only_skipped() -> None:
    platform, _ = make()
    headers = {"content-type": "application/json", "authorization": f"Bearer {HS_TOKEN}"}
    path = "_matrix/app/v1/transactions/9"
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("PUT", b"{nope", headers, {}, path))
    assert err.value.status == 400 and err.value.body()["errcode"] == "M_NOT_JSON"
    with pytest.raises(Rejected) as err:
        platform.parse(WebhookRequest("PUT", b'{"events": {}}', headers, {}, path))
    assert err.value.status == 400 and err.value.body()["errcode"] == "M_BAD_JSON"
    good = event("$ok", "!r", {"msgtype": "m.text", "body": "still here"})
    body = {"events": [42, {"type": "m.room.message"}, {**good, "content": "x"}, good]}
    parsed = platform.parse(WebhookRequest("PUT", json.dumps(body).encode(), headers, {}, path))
    assert [m.message_id for m in parsed.messages] == ["$ok"]


# -- dedupe -----------------------------------------------------------------------------------------


def test_dedupe_key_is_the_event_id_whatever_the_transaction_id() -> None:
    platform, _ = make()
    a = event("$A", "!r", {"msgtype": "m.text", "body": "first"})
    b = event("$B", "!r", {"msgtype": "m.text", "body": "second"})
    first = platform.parse(transaction("1", a)).messages
    resent = platform.parse(transaction("1", a)).messages
    renumbered_new = platform.parse(transaction("1", b)).messages  # after a homeserver restart
    renumbered_old = platform.parse(transaction("2", a)).messages
    assert [m.message_id for m in first] == [m.message_id for m in resent] == ["$A"]
    assert [m.message_id for m in renumbered_new] == ["$B"]
    assert [m.message_id for m in renumbered_old] == ["$A"]


def test_the_bots_own_events_are_ignored() -> None:
    platform, _ = make()
    assert platform.parse(recorded("synapse-13-bot-echo.json")).messages == []
    own = event("$own", "!r", {"msgtype": "m.text", "body": "echo hi"}, sender=BOT)
    other = event("$other", "!r", {"msgtype": "m.text", "body": "hi"})
    assert [m.message_id for m in platform.parse(transaction("5", own, other)).messages] == ["$other"]


# -- every recorded payload ---------------------------------------------------------------------------

ROOM = "!z4kD8d_9G40KBuNU7D0wuYMvS8bJuP25JZlY2ejah3Y"

#: file -> what it parses to: (type, text, attachments, payload) per message
EXPECTED: dict[str, list[tuple[str, str, list[tuple[str, str, str | None]], dict[str, Any]]]] = {
    "synapse-01-invite.json": [],
    "synapse-02-bot-join.json": [],
    "synapse-03-text.json": [("text", "hello bot", [], {})],
    "synapse-04-emote.json": [("text", "waves", [], {"emote": True})],
    "synapse-05-notice.json": [],
    "synapse-06-image.json": [("image", "", [("image", "mxc://localhost/abcCAT", "cat.png")], {})],
    "synapse-07-file.json": [("file", "", [("file", "mxc://localhost/abcPDF", "report.pdf")], {})],
    "synapse-08-location.json": [
        ("location", "Big Ben", [], {"latitude": 51.5008, "longitude": 0.1247, "name": "Big Ben"})
    ],
    "synapse-09-reply.json": [("text", "thanks", [], {})],
    "synapse-10-edit.json": [],
    "synapse-11-user-typing.json": [],
    "synapse-12-user-receipt.json": [],
    "synapse-13-bot-echo.json": [],
    "synapse-14-bot-typing-on.json": [],
    "synapse-15-bot-typing-off.json": [],
    "synapse-16-bot-receipt.json": [],
    "synapse-17-ping.json": [],
    "synapse-18-text-after-restart.json": [("text", "after restart", [], {})],
    "spec-transaction.json": [
        ("image", "", [("image", "mxc://example.org/JWEIFJgwEIhweiWJE", "filename.jpg")], {}),
    ],
    "spec-legacy-transaction.json": [
        ("image", "", [("image", "mxc://example.org/JWEIFJgwEIhweiWJE", "filename.jpg")], {}),
    ],
    "spec-sticker.json": [("image", "", [("image", "mxc://matrix.org/sHhqkFCvSkFwtmvtETOtKnLP", "Landing")], {})],
    "spec-ping.json": [],
}


def test_every_recorded_payload_has_an_expectation() -> None:
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_payload(name: str) -> None:
    platform, _ = make()
    data = json.loads((DATA / name).read_text())
    parsed = platform.parse(recorded(name))
    assert parsed.response == {} and parsed.status == 200
    got = [(m.type, m.text, [(a.type, a.url, a.name) for a in m.attachments], m.payload) for m in parsed.messages]
    assert got == EXPECTED[name]
    events = {e["event_id"]: e for e in data["body"].get("events", [])}
    for m in parsed.messages:
        source = events[m.message_id]
        assert m.conversation_id == source["room_id"]
        assert m.sender.id == source["sender"] != BOT
        assert m.timestamp is not None and m.timestamp.timestamp() == source["origin_server_ts"] / 1000
        assert Inbound.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_a_caption_is_the_text_of_a_media_message() -> None:
    platform, _ = make()
    content = {"msgtype": "m.image", "body": "look at this", "filename": "cat.png", "url": "mxc://localhost/c"}
    (msg,) = platform.parse(transaction("1", event("$c", "!r", content))).messages
    assert (msg.type, msg.text, msg.attachments) == (
        "image",
        "look at this",
        (Attachment("image", "mxc://localhost/c", "cat.png"),),
    )
    video = {"msgtype": "m.video", "body": "clip.mp4", "url": "mxc://localhost/v"}
    (clip,) = platform.parse(transaction("2", event("$v", "!r", video))).messages
    assert (clip.type, clip.attachments[0].type) == ("file", "video")
    encrypted = {"msgtype": "m.file", "body": "secret.pdf", "file": {"url": "mxc://localhost/e", "v": "v2"}}
    assert platform.parse(transaction("3", event("$e", "!r", encrypted))).messages == []


# -- delivery ---------------------------------------------------------------------------------------


async def test_reply_is_sent_as_the_bot_with_the_idempotency_key_as_transaction_id() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("message", "!room:localhost", Reply("hello"), "$e1"), "key-1")
    (call,) = api.calls
    url = httpx.URL(call.url)
    assert call.method == "PUT"
    assert url.path == "/_matrix/client/v3/rooms/!room:localhost/send/m.room.message/key-1"
    assert url.raw_path.startswith(b"/_matrix/client/v3/rooms/%21room%3Alocalhost/send/")
    assert url.params["user_id"] == BOT
    assert call.headers["authorization"] == f"Bearer {AS_TOKEN}"
    assert call.body == {"msgtype": "m.text", "body": "hello", "m.mentions": {}}


async def test_buttons_become_a_numbered_list_in_text_and_html() -> None:
    platform, api = make()
    reply = Reply("Pick <one>", buttons=(Button("Opening hours", "hours"), Button("Pricing & plans", "pricing")))
    await platform.deliver(Outgoing("message", "!r", reply), "k")
    (call,) = api.calls
    assert call.body["body"] == "Pick <one>\n1. Opening hours\n2. Pricing & plans"
    assert call.body["format"] == "org.matrix.custom.html"
    assert call.body["formatted_body"] == "Pick &lt;one&gt;<ol><li>Opening hours</li><li>Pricing &amp; plans</li></ol>"


async def test_mxc_media_are_sent_as_media_events_and_other_urls_as_links() -> None:
    platform, api = make()
    reply = Reply(
        "Here",
        attachments=(
            Attachment("image", "mxc://localhost/cat", "cat.png"),
            Attachment("file", "https://example.org/a.pdf", "a.pdf"),
            Attachment("file", "mxc://localhost/doc"),
        ),
    )
    await platform.deliver(Outgoing("message", "!r", reply), "k")
    assert [httpx.URL(c.url).path.rsplit("/", 1)[1] for c in api.calls] == ["k", "k.1", "k.2"]
    text, image, doc = (c.body for c in api.calls)
    assert text["body"] == "Here\na.pdf: https://example.org/a.pdf"
    assert text["formatted_body"] == 'Here<br><a href="https://example.org/a.pdf">a.pdf</a>'
    assert image == {"msgtype": "m.image", "body": "cat.png", "url": "mxc://localhost/cat", "m.mentions": {}}
    assert doc == {"msgtype": "m.file", "body": "file", "url": "mxc://localhost/doc", "m.mentions": {}}


async def test_notice_msgtype_when_configured() -> None:
    api = FakeApi(homeserver_ok)
    platform = MatrixPlatform("mx", MatrixConfig.model_validate({**CONFIG, "msgtype": "m.notice"}), api.client())
    await platform.deliver(Outgoing("message", "!r", Reply("beep")), "k")
    assert api.calls[0].body["msgtype"] == "m.notice"


async def test_typing_and_read_receipt_calls() -> None:
    platform, api = make()
    await platform.deliver(Outgoing("typing", "!r:localhost", typing=True, message_id="$e"), "t1")
    await platform.deliver(Outgoing("typing", "!r:localhost", typing=False, message_id="$e"), "t2")
    await platform.deliver(Outgoing("read", "!r:localhost", message_id="$e/1:localhost"), "r1")
    on, off, read = api.calls
    assert (on.method, httpx.URL(on.url).path) == ("PUT", f"/_matrix/client/v3/rooms/!r:localhost/typing/{BOT}")
    assert on.body == {"typing": True, "timeout": 5000}
    assert off.body == {"typing": False}
    assert read.method == "POST" and read.body == {}
    assert httpx.URL(read.url).raw_path.split(b"?")[0].endswith(b"/receipt/m.read/%24e%2F1%3Alocalhost")
    assert all(httpx.URL(c.url).params["user_id"] == BOT for c in api.calls)


@pytest.mark.parametrize(
    ("response", "retryable", "retry_after", "words"),
    [
        (httpx.Response(429, json={"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 2500}), True, 2.5, "M_LIMIT"),
        (httpx.Response(429, headers={"Retry-After": "4"}, json={"errcode": "M_LIMIT_EXCEEDED"}), True, 4, "M_LIMIT"),
        (httpx.Response(502, text="bad gateway"), True, None, "502"),
        (
            httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "User @b:l not in room !r"}),
            False,
            None,
            "joined to the room",
        ),
        (httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid"}), False, None, "as_token"),
        (httpx.Response(400, json={"errcode": "M_BAD_JSON", "error": "bad"}), False, None, "400"),
    ],
)
async def test_homeserver_errors(
    response: httpx.Response, retryable: bool, retry_after: float | None, words: str
) -> None:
    platform, api = make()
    api.fail_with = response
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("message", "!r", Reply("x")), "k")
    assert err.value.retryable is retryable
    assert err.value.retry_after == retry_after
    assert words in str(err.value)


async def test_connection_failure_is_retryable() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    platform = MatrixPlatform(
        "mx", MatrixConfig.model_validate(CONFIG), httpx.AsyncClient(transport=httpx.MockTransport(down))
    )
    with pytest.raises(DeliveryError) as err:
        await platform.deliver(Outgoing("typing", "!r", typing=True), "k")
    assert err.value.retryable


# -- invitations: the bot joins -------------------------------------------------------------------


def member(room: str, membership: str, state_key: str = BOT, sender: str = "@alice:localhost") -> dict[str, Any]:
    return {
        "content": {"membership": membership},
        "event_id": f"$m-{membership}-{state_key}",
        "origin_server_ts": 1795830304981,
        "room_id": room,
        "sender": sender,
        "state_key": state_key,
        "type": "m.room.member",
    }


def test_an_invitation_of_the_bot_is_a_join_follow_up_not_a_message() -> None:
    platform, api = make()
    parsed = platform.parse(recorded("synapse-01-invite.json"))
    assert parsed.messages == [] and parsed.follow_ups == [FollowUp("join", ROOM)]
    others = transaction(
        "9",
        member("!a", "invite", state_key="@carol:localhost"),  # someone else is invited
        member("!b", "join"),  # the bot's own join coming back
        member("!c", "invite"),
        member("!c", "invite"),  # twice in one transaction: one join
        event("$t", "!c", {"msgtype": "m.text", "body": "hi"}),
    )
    parsed = platform.parse(others)
    assert parsed.follow_ups == [FollowUp("join", "!c")] and [m.text for m in parsed.messages] == ["hi"]
    assert api.calls == [], "parse makes no call"
    off = MatrixPlatform("mx", MatrixConfig.model_validate({**CONFIG, "auto_join": False}), api.client())
    assert off.parse(recorded("synapse-01-invite.json")).follow_ups == []


async def test_the_join_is_the_client_server_apis_join_as_the_bot() -> None:
    platform, api = make()
    await platform.follow_up(FollowUp("join", "!z4k:localhost"))
    (call,) = api.calls
    url = httpx.URL(call.url)
    assert call.method == "POST" and url.raw_path.split(b"?")[0] == b"/_matrix/client/v3/rooms/%21z4k%3Alocalhost/join"
    assert url.params["user_id"] == BOT and call.headers["authorization"] == f"Bearer {AS_TOKEN}"
    assert call.body == {}
    api.fail_with = httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "You are not invited to this room."})
    with pytest.raises(DeliveryError, match="cannot join !z4k:localhost") as err:
        await platform.follow_up(FollowUp("join", "!z4k:localhost"))
    assert not err.value.retryable


# -- end to end through Switchboard, with a fake homeserver -------------------------------------------


@dataclass
class FakeHomeserver:
    """The client-server API calls an application service makes, as Synapse answers them."""

    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # txn id -> content, first send only
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: rooms the bot was invited to (it may join them), and the answers to give join calls first
    invited: set[str] = field(default_factory=set)
    join_failures: list[Response] = field(default_factory=list)

    async def wait_for(self, predicate: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def app(self) -> Starlette:
        prefix = "/_matrix/client/v3/rooms/{room}"
        return Starlette(
            routes=[
                Route(prefix + "/send/{type}/{txn}", self.send, methods=["PUT"]),
                Route(prefix + "/typing/{user}", self.other, methods=["PUT"]),
                Route(prefix + "/receipt/{rtype}/{event}", self.other, methods=["POST"]),
                Route(prefix + "/join", self.join, methods=["POST"]),
            ]
        )

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {AS_TOKEN}" and request.query_params["user_id"] == BOT

    async def send(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."}, 401)
        txn = request.path_params["txn"]
        body = await request.json()
        self.calls.append(("send", unquote(request.path_params["room"]), body))
        self.sent.setdefault(txn, body)
        self.changed.set()
        return JSONResponse({"event_id": f"$reply-{list(self.sent).index(txn)}"})

    async def join(self, request: Request) -> Response:
        """POST /_matrix/client/v3/rooms/{roomId}/join, JSON body (optional `reason`, `third_party_signed`),
        200 {"room_id"}; 403 M_FORBIDDEN when the user may not join (not invited, banned); 429
        M_LIMIT_EXCEEDED with retry_after_ms. https://spec.matrix.org/latest/client-server-api/#post_matrixclientv3roomsroomidjoin"""
        if not self._authorized(request):
            return JSONResponse({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."}, 401)
        room = unquote(request.path_params["room"])
        self.calls.append(("join", room, await request.json()))
        self.changed.set()
        if self.join_failures:
            return self.join_failures.pop(0)
        if room not in self.invited:
            return JSONResponse({"errcode": "M_FORBIDDEN", "error": "You are not invited to this room."}, 403)
        return JSONResponse({"room_id": room})

    async def other(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."}, 401)
        kind = "typing" if "/typing/" in request.url.path else "read"
        self.calls.append((kind, request.path_params["room"], await request.json()))
        self.changed.set()
        return JSONResponse({})


def switchboard_settings(tmp_path: Path, flows: Path, homeserver_url: str) -> Settings:
    """Switchboard on SQLite with the one Matrix platform, pointed at the fake homeserver."""
    return settings_from_text(
        textwrap.dedent(
            f"""\
            store:
              url: "sqlite:///{tmp_path}/sb.db"
            flows: {flows}
            platforms:
              matrix:
                type: matrix
                homeserver_url: {homeserver_url}
                as_token: {AS_TOKEN}
                hs_token: {HS_TOKEN}
                bot_user_id: "{BOT}"
            """
        ),
        "<test config>",
    )


async def test_transactions_replayed_and_renumbered_through_switchboard(tmp_path: Path, echo_flows: Path) -> None:
    homeserver = FakeHomeserver()
    async with Server(homeserver.app()) as hs_server:
        settings = switchboard_settings(tmp_path, echo_flows, hs_server.url)
        async with running(settings) as (server, _), httpx.AsyncClient(timeout=10) as client:
            base = f"{server.url}/webhooks/matrix/_matrix/app/v1/transactions"
            headers = {"authorization": f"Bearer {HS_TOKEN}"}

            async def put(txn: str, *events: dict[str, Any]) -> httpx.Response:
                return await client.put(f"{base}/{txn}", json={"events": list(events)}, headers=headers)

            a = event("$A", "!room", {"msgtype": "m.text", "body": "alpha"})
            b = event("$B", "!room", {"msgtype": "m.text", "body": "beta"})
            echo = event("$E", "!room", {"msgtype": "m.text", "body": "echo alpha"}, sender=BOT)
            for response in [
                await put("1", a),
                await put("1", a),  # the ack was lost: the same transaction again
                await put("1", b),  # the homeserver restarted and numbers from 1 again, with a new event
                await put("2", a, echo),  # an old event under a new number, and the bot's own echo
            ]:
                assert response.status_code == 200 and response.json() == {}
            forged = await client.put(f"{base}/3", json={"events": []}, headers={"authorization": "Bearer x"})
            assert forged.status_code == 403 and forged.json()["errcode"] == "M_FORBIDDEN"

            await homeserver.wait_for(lambda: len(homeserver.sent) >= 2, 10)
            await asyncio.sleep(0.3)  # nothing more may come
            webhooks = {
                s.labels["result"]: s.value
                for family in text_string_to_metric_families((await client.get(f"{server.url}/metrics")).text)
                for s in family.samples
                if s.name == "switchboard_webhooks_total" and s.labels.get("platform") == "matrix"
            }
            assert webhooks == {"accepted": 2, "duplicate": 2, "rejected": 1}
        assert sorted(c["body"] for c in homeserver.sent.values()) == ["echo alpha", "echo beta"]
        assert len([c for c in homeserver.calls if c[0] == "send"]) == 2
        assert sorted(c[1] for c in homeserver.calls if c[0] == "read") == ["!room", "!room"]


async def test_invited_the_bot_joins_after_the_transaction_is_acknowledged(tmp_path: Path, echo_flows: Path) -> None:
    homeserver = FakeHomeserver(invited={ROOM, "!busy"})
    # the homeserver is busy once: the join is tried again after its retry_after_ms
    homeserver.join_failures.append(JSONResponse({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 50}, 429))
    async with Server(homeserver.app()) as hs_server:
        settings = switchboard_settings(tmp_path, echo_flows, hs_server.url)
        async with running(settings) as (server, _), httpx.AsyncClient(timeout=10) as client:
            invite = recorded("synapse-01-invite.json")
            url = f"{server.url}/webhooks/matrix/{invite.path}"
            response = await client.put(url, content=invite.body, headers=dict(invite.headers))
            assert response.status_code == 200 and response.json() == {}
            await homeserver.wait_for(lambda: len([c for c in homeserver.calls if c[0] == "join"]) >= 2, 10)
            # an invitation withdrawn before the join: refused, not tried again
            txn = {"events": [member("!gone", "invite")]}
            headers = {"authorization": f"Bearer {HS_TOKEN}"}
            response = await client.put(
                f"{server.url}/webhooks/matrix/_matrix/app/v1/transactions/2", json=txn, headers=headers
            )
            assert response.status_code == 200
            await homeserver.wait_for(lambda: len([c for c in homeserver.calls if c[0] == "join"]) >= 3, 10)
            await asyncio.sleep(0.2)
    assert [(c[0], c[1]) for c in homeserver.calls] == [("join", ROOM), ("join", ROOM), ("join", "!gone")]
