"""Matrix, as an application service (https://spec.matrix.org/latest/application-service-api/)."""

from __future__ import annotations

import hmac
import html
import logging
import re
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field, field_validator

from middleware.model import Attachment, Inbound, MessageType, Outgoing, Reply, Sender
from middleware.platforms.base import (
    DeliveryError,
    FollowUp,
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    check_status,
    decode_json,
    from_unix,
    id_problem,
    json_bytes,
    retry_after_seconds,
)

log = logging.getLogger("switchboard.platforms.matrix")

TRANSACTION = re.compile(r"^(?:_matrix/app/v1/)?transactions/([^/]+)$")
QUERY = re.compile(r"^(?:_matrix/app/v1/)?(users|rooms)/([^/]+)$")
PING = "_matrix/app/v1/ping"
MEDIA = {"m.image": "image", "m.file": "file", "m.audio": "audio", "m.video": "video"}


class MatrixConfig(PlatformConfig):
    type: str = "matrix"
    #: the client-server API base, e.g. https://matrix.example.org
    homeserver_url: str
    #: the registration's `as_token` (Switchboard -> homeserver) and `hs_token` (homeserver -> Switchboard)
    as_token: str = Field(repr=False)
    hs_token: str = Field(repr=False)
    #: the user the bot speaks as, in the registration's namespace: @bot_switchboard:example.org
    bot_user_id: str
    #: m.notice marks replies as automated, so other bots don't answer them (and loop)
    msgtype: str = Field(default="m.text", pattern=r"^m\.(text|notice)$")
    #: seconds a typing notification lasts at the homeserver without a refresh
    typing_ttl: float = Field(default=5.0, gt=0, le=120)
    #: join a room when the bot is invited to it (after the transaction is acknowledged)
    auto_join: bool = True

    @field_validator("bot_user_id")
    @classmethod
    def _user_id(cls, value: str) -> str:
        if not re.fullmatch(r"@[^:\s]+:\S+", value):
            raise ValueError("must be a full Matrix user id such as @bot_switchboard:example.org")
        return value

    @field_validator("homeserver_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class MatrixRejected(Rejected):
    """A refusal in the Matrix error shape: `{"errcode": "M_...", "error": "..."}`."""

    def __init__(self, status: int, errcode: str, message: str) -> None:
        super().__init__(status, message)
        self.errcode = errcode

    def body(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.message}


class MatrixPlatform(Platform):
    """A Matrix bot as an application service: the homeserver pushes transactions, the bot answers as its user.

    The homeserver PUTs `{url}/_matrix/app/v1/transactions/{txnId}` (and the legacy `/transactions/{txnId}`)
    with `Authorization: Bearer <hs_token>`, where `url` is `https://switchboard.example/webhooks/{name}`.
    Every `m.room.message` from someone else becomes an `Inbound` whose message id is the event id and whose
    conversation is the room, so a transaction that is sent again, even under a new transaction id after a
    homeserver restart, only yields duplicates. Replies, typing notifications and read receipts go through
    the client-server API with the `as_token`, as `bot_user_id`; a reply's client transaction id is its
    idempotency key, so a resend after a crash gives back the first event instead of a second message.
    An invitation of the bot (`m.room.member`, `membership: invite`, `state_key` = the bot) is a
    follow-up: once the transaction is accepted, the bot joins the room (`auto_join`).
    """

    Config = MatrixConfig
    config: MatrixConfig
    supports_typing = True
    supports_read = True
    #: the homeserver PUTs transactions and GETs user/room queries under the webhook URL
    methods = frozenset({"GET", "POST", "PUT"})
    subpaths = True

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, MatrixConfig)
        self.typing_ttl = config.typing_ttl
        self._api = f"{config.homeserver_url}/_matrix/client/v3"
        self._hs_token = config.hs_token.encode()

    def parse(self, request: WebhookRequest) -> Parsed:
        self._authorize(request)
        path = request.path.strip("/")
        if TRANSACTION.match(path):
            _method(request, "PUT")
            messages, invited = self._transaction(request)
            return Parsed(messages, {}, follow_ups=[FollowUp("join", room) for room in invited])
        if path == PING:
            _method(request, "POST")
            return Parsed([], {})
        if match := QUERY.match(path):
            # The homeserver asks whether a user or room alias in our namespace exists; Switchboard makes
            # none on demand, so: no. https://spec.matrix.org/latest/application-service-api/#querying
            _method(request, "GET")
            kind = "user" if match.group(1) == "users" else "room alias"
            return Parsed([], {"errcode": "M_NOT_FOUND", "error": f"no such {kind}"}, 404)
        raise MatrixRejected(404, "M_UNRECOGNIZED", f"unrecognised application service endpoint /{path}")

    def _authorize(self, request: WebhookRequest) -> None:
        # The hs_token comes as `Authorization: Bearer`; older homeservers send the `access_token` query
        # parameter instead or as well, and then both must match. Some send an empty Bearer beside it.
        # https://spec.matrix.org/latest/application-service-api/#authorization
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme and scheme.lower() != "bearer":
            raise MatrixRejected(403, "M_FORBIDDEN", "the Authorization header must be `Bearer <hs_token>`")
        presented = [token.strip().encode()] if token.strip() else []
        legacy = request.query.get("access_token")
        if legacy:
            presented.append(legacy.encode())
        if not presented:
            raise MatrixRejected(401, "M_MISSING_TOKEN", "missing hs_token (Authorization: Bearer)")
        good = [hmac.compare_digest(token, self._hs_token) for token in presented]
        if not all(good):
            raise MatrixRejected(403, "M_FORBIDDEN", "bad hs_token")

    def _transaction(self, request: WebhookRequest) -> tuple[list[Inbound], list[str]]:
        """The transaction's messages, and the rooms the bot is invited to in it (to join)."""
        try:
            data = decode_json(request)
        except Rejected as exc:
            raise MatrixRejected(exc.status, "M_NOT_JSON", exc.message) from exc
        if not isinstance(data, dict) or not isinstance(data.get("events", []), list):
            raise MatrixRejected(400, "M_BAD_JSON", "a transaction is an object with an `events` array")
        # Events are skipped one by one, never refused as a whole: the homeserver resends a refused
        # transaction, unchanged, until it is accepted, and holds every later event behind it.
        # Ephemeral data (typing, receipts, presence of users) is not a message and is ignored too.
        out = []
        invited: list[str] = []
        for event in data.get("events", []):
            if not isinstance(event, dict):
                continue
            message = self._event(event)
            if message is not None:
                out.append(message)
            room = self._invited_to(event) if self.config.auto_join else None
            if room is not None and room not in invited:
                invited.append(room)
        return out, invited

    def _invited_to(self, event: dict[str, Any]) -> str | None:
        """The room an `m.room.member` invite of the bot is for, else None.
        https://spec.matrix.org/latest/client-server-api/#mroommember"""
        room_id, content = event.get("room_id"), event.get("content")
        if event.get("type") != "m.room.member" or event.get("state_key") != self.config.bot_user_id:
            return None
        if not isinstance(content, dict) or content.get("membership") != "invite":
            return None
        if not isinstance(room_id, str) or id_problem(room_id) or not room_id.startswith("!"):
            return None
        return room_id

    async def follow_up(self, item: FollowUp) -> None:
        if item.kind != "join":
            raise NotImplementedError(f"matrix has no follow-up {item.kind!r}")
        # POST /_matrix/client/v3/rooms/{roomId}/join (`{}` body: no third-party invite, no reason), answered
        # 200 {"room_id"}; joining a room the bot is in already changes nothing, so a resent invite is harmless.
        # https://spec.matrix.org/latest/client-server-api/#post_matrixclientv3roomsroomidjoin
        try:
            await self._call("POST", f"/rooms/{quote(item.target, safe='')}/join", {})
        except DeliveryError as exc:
            if exc.status == 403:  # the invite was withdrawn, or the bot is banned there
                raise DeliveryError(f"cannot join {item.target}: {exc}", retryable=False, status=403) from exc
            raise
        log.info("joined room %s, invited", item.target, extra={"platform": self.name})

    def _event(self, event: dict[str, Any]) -> Inbound | None:
        event_id, room_id, sender = event.get("event_id"), event.get("room_id"), event.get("sender")
        if not (isinstance(event_id, str) and isinstance(room_id, str) and isinstance(sender, str)):
            return None
        if any(id_problem(x) for x in (event_id, room_id, sender)):
            return None  # not ids a homeserver makes (at most 255 bytes); skipped, as a refusal holds every later event
        if sender == self.config.bot_user_id or "state_key" in event:
            return None  # our own echo, memberships and other state
        content = event.get("content")
        if not isinstance(content, dict):
            return None
        if event.get("type") not in ("m.room.message", "m.sticker"):
            return None
        msgtype = "m.image" if event.get("type") == "m.sticker" else content.get("msgtype")
        body = content.get("body")
        if not isinstance(msgtype, str) or not isinstance(body, str):
            return None  # redacted, or not a message
        relates = content.get("m.relates_to")
        relation = relates if isinstance(relates, dict) else {}
        if relation.get("rel_type") == "m.replace":
            return None  # an edit of a message that was already answered
        if msgtype in ("m.notice", "m.key.verification.request"):
            # Automated agents must never answer m.notice (it is how bots avoid answering each other).
            # https://spec.matrix.org/latest/client-server-api/#mnotice
            return None
        kind: MessageType = "text"
        text = body
        payload: dict[str, Any] = {}
        attachments: tuple[Attachment, ...] = ()
        if msgtype in MEDIA:
            url = content.get("url")
            if not isinstance(url, str):
                return None  # encrypted media (`file`), which this bot cannot read
            filename = content.get("filename")
            name = filename if isinstance(filename, str) and filename else body
            # Since Matrix 1.10 `body` is a caption when `filename` is set and differs from it.
            text = body if isinstance(filename, str) and filename and filename != body else ""
            kind = "image" if msgtype == "m.image" else "file"
            attachments = (Attachment(MEDIA[msgtype], url, name or None),)
        elif msgtype == "m.location":
            point = _geo(content.get("geo_uri"))
            if point is None:
                return None
            kind = "location"
            payload = {"latitude": point[0], "longitude": point[1], "name": body}
        elif msgtype == "m.emote":
            payload = {"emote": True}
        if "m.in_reply_to" in relation:
            text = _strip_reply_fallback(text)
        ts = event.get("origin_server_ts")
        return Inbound(
            platform=self.name,
            message_id=event_id,
            conversation_id=room_id,
            sender=Sender(sender),
            type=kind,
            text=text,
            payload=payload,
            attachments=attachments,
            timestamp=from_unix(ts, 1000) if isinstance(ts, int) else None,
        )

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        room = quote(item.conversation_id, safe="")
        if item.kind == "message":
            assert item.reply is not None
            contents = self._contents(item.reply)
            for i, content in enumerate(contents):
                # The client transaction id makes a resend return the first event instead of a new one.
                # https://spec.matrix.org/latest/client-server-api/#transaction-identifiers
                txn = idempotency_key if i == 0 else f"{idempotency_key}.{i}"
                await self._call("PUT", f"/rooms/{room}/send/m.room.message/{quote(txn, safe='')}", content)
        elif item.kind == "typing":
            user = quote(self.config.bot_user_id, safe="")
            body = {"typing": True, "timeout": int(self.typing_ttl * 1000)} if item.typing else {"typing": False}
            await self._call("PUT", f"/rooms/{room}/typing/{user}", body)
        elif item.kind == "read" and item.message_id:
            await self._call("POST", f"/rooms/{room}/receipt/m.read/{quote(item.message_id, safe='')}", {})

    def _contents(self, reply: Reply) -> list[dict[str, Any]]:
        """A reply as m.room.message contents: the text (buttons as a numbered list), then mxc:// media."""
        media = [a for a in reply.attachments if a.url.startswith("mxc://")]
        links = [a for a in reply.attachments if not a.url.startswith("mxc://")]
        contents: list[dict[str, Any]] = []
        text = Reply(reply.text, reply.buttons, tuple(links)).plain_text()
        if text:
            content: dict[str, Any] = {"msgtype": self.config.msgtype, "body": text, "m.mentions": {}}
            if reply.buttons or links:
                content["format"] = "org.matrix.custom.html"
                content["formatted_body"] = _html(reply, links)
            contents.append(content)
        for a in media:
            msgtype = {"image": "m.image", "audio": "m.audio", "video": "m.video"}.get(a.type, "m.file")
            contents.append({"msgtype": msgtype, "body": a.name or a.type, "url": a.url, "m.mentions": {}})
        return contents

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> None:
        try:
            response = await self.http.request(
                method,
                self._api + path,
                params={"user_id": self.config.bot_user_id},
                content=json_bytes(body),
                headers={"content-type": "application/json", "authorization": f"Bearer {self.config.as_token}"},
            )
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timeout: {type(exc).__name__}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"connection: {type(exc).__name__}: {exc}", retryable=True) from exc
        _check(response, self.config.bot_user_id)


def _check(response: httpx.Response, bot: str) -> None:
    status = response.status_code
    if status < 300:
        return
    try:
        error = response.json()
    except ValueError:
        error = None
    errcode = error.get("errcode", "") if isinstance(error, dict) else ""
    message = error.get("error", "") if isinstance(error, dict) else ""
    if status == 429:
        # The hint is `retry_after_ms` in the body; MSC4041 adds a Retry-After header (seconds) and deprecates
        # the body field, so homeservers may send either. https://github.com/matrix-org/matrix-spec-proposals/pull/4041
        ms = error.get("retry_after_ms") if isinstance(error, dict) else None
        after = ms / 1000 if isinstance(ms, int | float) and ms >= 0 else None
        raise DeliveryError(
            f"{status} {errcode or 'rate limited'}: {message}",
            retryable=True,
            status=status,
            retry_after=after if after is not None else retry_after_seconds(response.headers.get("retry-after")),
        )
    if status == 401 and errcode == "M_UNKNOWN_TOKEN":
        raise DeliveryError("401 M_UNKNOWN_TOKEN: the homeserver refused the as_token", retryable=False, status=401)
    if status == 403 and errcode == "M_FORBIDDEN":
        raise DeliveryError(
            f"403 M_FORBIDDEN: {message or 'forbidden'} (is {bot} joined to the room?)", retryable=False, status=403
        )
    check_status(response)


def _method(request: WebhookRequest, allowed: str) -> None:
    if request.method != allowed:
        raise MatrixRejected(405, "M_UNRECOGNIZED", f"{request.method} is not supported here; use {allowed}")


def _geo(uri: Any) -> tuple[float, float] | None:
    if not isinstance(uri, str):
        return None
    match = re.match(r"^geo:(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)", uri)
    if match is None:
        return None
    return float(match.group(1)), float(match.group(2))


def _strip_reply_fallback(body: str) -> str:
    # Replies from older clients start with the quoted message ("> <@user:server> text") and a blank
    # line; clients must strip it. https://spec.matrix.org/latest/client-server-api/#fallbacks-for-rich-replies
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    if i < len(lines) and lines[i] == "":
        i += 1
    return "\n".join(lines[i:])


def _html(reply: Reply, links: list[Attachment]) -> str:
    out = html.escape(reply.text).replace("\n", "<br>")
    if reply.buttons:
        out += "<ol>" + "".join(f"<li>{html.escape(b.title)}</li>" for b in reply.buttons) + "</ol>"
    for a in links:
        out += ("<br>" if out and not out.endswith("</ol>") else "") + (
            f'<a href="{html.escape(a.url)}">{html.escape(a.name or a.url)}</a>'
        )
    return out
