"""Qiscus Chat SDK: the "On Post Message" webhook in, the server REST API and MQTT out.

The comment (message) parsing and the rich-reply building here are shared with the Qiscus
Multichannel platform (`qiscus_multichannel.py`), whose bot webhook carries the same comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import httpx
from pydantic import field_validator

from middleware.model import Attachment, Button, Card, Inbound, MessageType, Outgoing, Reply, Sender
from middleware.platforms.base import (
    DeliveryError,
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    check_status,
    decode_json,
    from_unix,
    loads_json,
    post_json,
    signature_matches,
)

log = logging.getLogger("switchboard.platforms.qiscus")

SIGNATURE_HEADER = "QISCUS-SDK-SIGNATURE"
MAX_ID_LENGTH = 256
# https://documentation.qiscus.com/v2.1/chat-server-api/message: "Max message content is 4000 chars"
MAX_MESSAGE_CHARS = 4000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".heic")
EVENT_SYSTEM = "qiscus.system_event"
# The broker the Qiscus web SDK connects to by default (qiscus/qiscus-sdk-web-core src/storage.ts).
DEFAULT_MQTT_URL = "wss://mqtt.qiscus.com:1886/mqtt"


class QiscusConfig(PlatformConfig):
    type: str = "qiscus"
    app_id: str
    secret_key: str
    #: the Qiscus user id (its "email") the bot posts as
    bot_user_id: str
    base_url: str = "https://api.qiscus.com"
    #: the dashboard's webhook signature token; with it, QISCUS-SDK-SIGNATURE is required
    signature_secret: str | None = None
    #: the MQTT broker for typing indicators (mqtt://, mqtts://, ws://, wss://); null turns typing off
    mqtt_url: str | None = DEFAULT_MQTT_URL
    #: mark the user's message read as the bot (needs the bot user's SDK token)
    read_receipts: bool = True
    #: take messages other servers post through the REST API (post_comment_rest); off, no reply loops
    accept_rest_messages: bool = False

    @field_validator("mqtt_url")
    @classmethod
    def _valid_mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            MqttTarget.parse(value)
        return value


class QiscusPlatform(Platform):
    """Qiscus Chat SDK apps (the realtime chat backend, not Multichannel).

    Inbound: the dashboard's "On Post Message" webhook (`post_comment_mobile`, and
    `post_comment_rest` when `accept_rest_messages` is on), verified with QISCUS-SDK-SIGNATURE
    when `signature_secret` is set. The bot's own messages are dropped.
    Outbound: `POST /api/v2.1/rest/post_comment` as `bot_user_id` (text, buttons, card,
    carousel, file_attachment); typing over MQTT (Qiscus has no REST typing API); read
    receipts through the SDK's `update_comment_status` with the bot user's token.
    """

    Config = QiscusConfig
    config: QiscusConfig

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, QiscusConfig)
        self.supports_typing = config.mqtt_url is not None
        self.supports_read = config.read_receipts
        base = config.base_url.rstrip("/")
        self.rest_url = f"{base}/api/v2.1/rest"
        self.sdk_url = f"{base}/api/v2/sdk"
        self.mqtt = (
            MqttPublisher(MqttTarget.parse(config.mqtt_url), f"switchboard-{name}-{uuid.uuid4().hex[:12]}")
            if config.mqtt_url is not None
            else None
        )
        self.parts = SentParts()
        self._token: str | None = None

    def parse(self, request: WebhookRequest) -> Parsed:
        if self.config.signature_secret:
            presented = request.headers.get(SIGNATURE_HEADER.lower())
            if not presented:
                raise Rejected(401, f"missing {SIGNATURE_HEADER} header")
            if not signature_matches(self.config.signature_secret, request.body, presented.lower()):
                raise Rejected(401, f"bad {SIGNATURE_HEADER}")
        data = decode_json(request)
        if not isinstance(data, dict):
            raise Rejected(400, "body must be a JSON object")
        kind = data.get("type")
        if not isinstance(kind, str):
            raise Rejected(400, "type is required: post_comment_mobile or post_comment_rest", "type")
        if kind not in ("post_comment_mobile", "post_comment_rest"):
            return ignored(f"webhook type {kind[:60]!r} is not a message")
        payload = data.get("payload")
        if not isinstance(payload, dict):
            raise Rejected(400, "payload is required and must be an object", "payload")
        comment = parse_comment(payload, "payload.", request.body)
        if comment.sender.id == self.config.bot_user_id:
            return ignored("the bot's own message")
        if kind == "post_comment_rest" and not self.config.accept_rest_messages and comment.type != "event":
            return ignored("posted through the REST API (accept_rest_messages is off)")
        return Parsed([comment.inbound(self.name, comment.message_id)])

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        if item.kind == "message":
            assert item.reply is not None
            await send_parts(
                self.parts, idempotency_key, comment_parts(item.reply, rich=True), self._post_comment(item)
            )
        elif item.kind == "typing":
            await self._typing(item)
        elif item.kind == "read":
            await self._read(item)

    def _post_comment(self, item: Outgoing) -> Callable[[CommentPart], Awaitable[None]]:
        async def post(part: CommentPart) -> None:
            body: dict[str, Any] = {
                "user_id": self.config.bot_user_id,
                "room_id": item.conversation_id,
                "message": part.message,
                "type": part.type,
            }
            if part.payload is not None:
                body["payload"] = part.payload
            await post_json(self.http, f"{self.rest_url}/post_comment", body, self._rest_headers())

        return post

    def _rest_headers(self) -> dict[str, str]:
        return {"QISCUS-SDK-APP-ID": self.config.app_id, "QISCUS-SDK-SECRET": self.config.secret_key}

    async def _typing(self, item: Outgoing) -> None:
        if self.mqtt is None:
            return
        # The SDKs publish "1"/"0" to r/{roomId}/{roomId}/{userId}/t: qiscus/qiscus-sdk-web-core
        # src/adapters/mqtt.ts sendTyping; qiscus/qiscus-chat-sdk-flutter lib/src/features/realtime/topic_builder.dart.
        topic = f"r/{item.conversation_id}/{item.conversation_id}/{self.config.bot_user_id}/t"
        await self.mqtt.publish(topic, "1" if item.typing else "0")

    async def _read(self, item: Outgoing) -> None:
        # update_comment_status takes numeric comment ids; a message known only by its
        # unique_temp_id (or a content hash) cannot be marked.
        if not item.message_id or not item.message_id.isdigit():
            return
        # The server REST API has no "mark as read"; the client SDK's update_comment_status does it
        # for the user whose token it carries (qiscus/qiscus-sdk-web-core src/api.ts, src/provider.ts),
        # and get_user_token gives a server the bot user's token (qiscus/qiscus-sdk-rest authentication.md).
        token = await self._bot_token()
        headers = {
            "qiscus-sdk-app-id": self.config.app_id,
            "qiscus-sdk-user-id": self.config.bot_user_id,
            "qiscus-sdk-token": token,
        }
        body = {"room_id": item.conversation_id, "last_comment_read_id": item.message_id}
        try:
            await post_json(self.http, f"{self.sdk_url}/update_comment_status", body, headers)
        except DeliveryError as exc:
            if exc.status in (401, 403):
                self._token = None
                raise DeliveryError(f"bot token refused ({exc}); fetching a new one", retryable=True) from exc
            raise

    async def _bot_token(self) -> str:
        if self._token is not None:
            return self._token
        try:
            response = await self.http.get(
                f"{self.rest_url}/get_user_token",
                params={"user_id": self.config.bot_user_id},
                headers=self._rest_headers(),
            )
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timeout: {type(exc).__name__}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"connection: {type(exc).__name__}: {exc}", retryable=True) from exc
        check_status(response)
        try:
            token = response.json()["results"]["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DeliveryError(
                f"get_user_token answered without results.token: {response.text[:200]}", retryable=True
            ) from exc
        if not isinstance(token, str) or not token:
            raise DeliveryError("get_user_token answered an empty token", retryable=True)
        self._token = token
        return token

    async def aclose(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.aclose()


@dataclass(frozen=True, slots=True)
class Comment:
    """A Qiscus comment, decoded from a webhook's `payload` (`from`, `room`, `message`)."""

    message_id: str
    room_id: str
    sender: Sender
    type: MessageType
    text: str
    payload: dict[str, Any]
    attachments: tuple[Attachment, ...]
    timestamp: datetime | None
    #: the comment's unique_temp_id, and its id when non-zero
    unique_temp_id: str | None
    comment_id: str | None
    #: room.options, decoded (a JSON string in Multichannel webhooks)
    room_options: dict[str, Any]

    def inbound(self, platform: str, message_id: str, channel: str | None = None) -> Inbound:
        return Inbound(
            platform=platform,
            message_id=message_id,
            conversation_id=self.room_id,
            sender=self.sender,
            type=self.type,
            text=self.text,
            payload=self.payload,
            attachments=self.attachments,
            timestamp=self.timestamp,
            channel=channel,
        )


def ignored(reason: str) -> Parsed:
    """A webhook that carries nothing to answer: 200, so that the platform does not retry it."""
    return Parsed([], {"accepted": 0, "duplicates": 0, "ignored": reason})


def parse_comment(payload: dict[str, Any], at: str, raw: bytes, *, prefer_unique_temp_id: bool = False) -> Comment:
    """Decode `payload.from/room/message`; ids come as numbers or strings, so parse leniently."""
    sender = _object(payload, "from", at)
    room = _object(payload, "room", at)
    message = _object(payload, "message", at)
    room_id = _first_id(room, ("id_str", "id"))
    if room_id is None:
        raise Rejected(400, f"{at}room.id is required", f"{at}room.id")
    sender_id = sender.get("email")
    if not isinstance(sender_id, str) or not sender_id:
        raise Rejected(400, f"{at}from.email (the Qiscus user id) is required", f"{at}from.email")
    name = sender.get("name") or sender.get("username")
    attributes = {"avatar_url": sender["avatar_url"]} if isinstance(sender.get("avatar_url"), str) else {}
    comment_id = _first_id(message, ("id_str", "id"))
    temp = message.get("unique_temp_id")
    unique_temp_id = temp if isinstance(temp, str) and temp else None
    candidates = [unique_temp_id, comment_id] if prefer_unique_temp_id else [comment_id, unique_temp_id]
    message_id = next((c for c in candidates if c and len(c) <= MAX_ID_LENGTH), None)
    if message_id is None:
        # The documented minimal payload has no message id: the body's hash is stable across retries.
        message_id = "sha256:" + hashlib.sha256(raw).hexdigest()[:40]
    mtype, text, extra, attachments = _content(message)
    return Comment(
        message_id=message_id,
        room_id=room_id[:MAX_ID_LENGTH],
        sender=Sender(sender_id, name if isinstance(name, str) else None, attributes),
        type=mtype,
        text=text,
        payload=extra,
        attachments=attachments,
        timestamp=_timestamp(message),
        unique_temp_id=unique_temp_id,
        comment_id=comment_id,
        room_options=room_options(room),
    )


def room_options(room: dict[str, Any]) -> dict[str, Any]:
    """room.options: a JSON string in current webhooks, an object in older ones."""
    options = room.get("options")
    if isinstance(options, str) and options:
        try:
            options = loads_json(options)
        except Rejected:
            return {}
    return options if isinstance(options, dict) else {}


def _content(message: dict[str, Any]) -> tuple[MessageType, str, dict[str, Any], tuple[Attachment, ...]]:
    qtype = _str(message, "type") or "text"
    text = _str(message, "text")
    raw_payload = message.get("payload")
    payload: dict[str, Any] = raw_payload if isinstance(raw_payload, dict) else {}
    if qtype == "button_postback_response":
        # A tapped postback button sends its postback_text as the text and its payload object as
        # the payload (qiscus/qiscus-sdk-android QMessage.generatePostBackMessage).
        value = payload.get("payload")
        return "postback", text, {"payload": value if isinstance(value, str) else text}, ()
    if qtype == "file_attachment":
        url = payload.get("url")
        if isinstance(url, str) and url:
            file_name = _str(payload, "file_name")
            kind: MessageType = "image" if _is_image(file_name or url) else "file"
            caption = _str(payload, "caption")
            return kind, caption, {}, (Attachment(kind, url, file_name or None),)
    if qtype == "location":
        place: dict[str, Any] = {
            k: payload[k] for k in ("latitude", "longitude", "name", "address", "map_url") if k in payload
        }
        return "location", text, place, ()
    if qtype == "system_event":
        subtype = _str(payload, "type") or "unknown"
        return "event", text, {"event": EVENT_SYSTEM, "system_event_type": subtype}, ()
    if qtype == "custom":
        return "text", text, {"qiscus_type": "custom", "custom_type": _str(payload, "type")}, ()
    if qtype == "text":
        return "text", text, {}, ()
    return "text", text, {"qiscus_type": qtype[:60]}, ()


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _is_image(name: str) -> bool:
    path = urlsplit(name).path if "://" in name else name
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _object(parent: dict[str, Any], key: str, at: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise Rejected(400, f"{at}{key} is required and must be an object", f"{at}{key}")
    return value


def _first_id(obj: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first present, non-zero id among `keys` (Multichannel sends id 0 for WhatsApp messages)."""
    for key in keys:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, str | int):
            continue
        text = str(value)
        if text and text != "0":
            return text
    return None


def _timestamp(message: dict[str, Any]) -> datetime | None:
    raw = message.get("timestamp") or message.get("created_at")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    unix = message.get("unix_timestamp")
    return from_unix(unix) if isinstance(unix, str | int) else None


@dataclass(frozen=True, slots=True)
class CommentPart:
    """One post: a Qiscus message `type` with its `message` text and type-specific `payload`."""

    type: str
    message: str
    payload: dict[str, Any] | None = None


def comment_parts(reply: Reply, *, rich: bool) -> list[CommentPart]:
    """A reply as Qiscus posts, in order: text or buttons, card or carousel, then files.

    With `rich` off, buttons and cards become numbered text (channels that render no Qiscus
    buttons); attachments are always `file_attachment`, which every channel takes.
    """
    buttons = reply.buttons + reply.quick_replies
    parts: list[CommentPart] = []
    if not rich:
        text = replace(reply, attachments=()).plain_text()
        parts += [CommentPart("text", chunk) for chunk in _chunks(text)]
    elif len(reply.cards) == 1 and not buttons:
        parts.append(_card(reply.cards[0], reply.text))
    else:
        chunks = _chunks(reply.text)
        if buttons:
            *before, last = chunks or [""]
            parts += [CommentPart("text", chunk) for chunk in before]
            summary = last or replace(reply, attachments=(), cards=()).plain_text()
            parts.append(CommentPart("buttons", summary, {"text": last, "buttons": _buttons(buttons)}))
        else:
            parts += [CommentPart("text", chunk) for chunk in chunks]
        if len(reply.cards) == 1:
            parts.append(_card(reply.cards[0], ""))
        elif reply.cards:
            parts.append(_carousel(reply.cards))
    files = [_file(a, "") for a in reply.attachments]
    if len(files) == 1 and len(parts) == 1 and parts[0].type == "text":
        # one file with a short text: the text is the file's caption, one post instead of two
        return [_file(reply.attachments[0], parts[0].message)]
    return parts + files


def _chunks(text: str) -> list[str]:
    return [text[i : i + MAX_MESSAGE_CHARS] for i in range(0, len(text), MAX_MESSAGE_CHARS)]


def _buttons(buttons: tuple[Button, ...]) -> list[dict[str, Any]]:
    # Postback buttons as in https://documentation.qiscus.com/v2.1/chat-server-api/message (type buttons);
    # the tap comes back as button_postback_response carrying this payload object.
    return [
        {
            "label": b.title,
            "type": "postback",
            "postback_text": b.title,
            "payload": {"url": "#", "method": "get", "payload": b.payload},
        }
        for b in buttons
    ]


def _card(card: Card, text: str) -> CommentPart:
    payload: dict[str, Any] = {
        "text": text,
        "image": card.image_url or "",
        "title": card.title,
        "description": card.text,
        "url": "",
        "buttons": _buttons(card.buttons),
    }
    return CommentPart("card", (text or card.title)[:MAX_MESSAGE_CHARS], payload)


def _carousel(cards: tuple[Card, ...]) -> CommentPart:
    payload = {
        "cards": [
            {"image": c.image_url or "", "title": c.title, "description": c.text, "buttons": _buttons(c.buttons)}
            for c in cards
        ]
    }
    summary = Reply(cards=cards).plain_text()
    return CommentPart("carousel", summary[:MAX_MESSAGE_CHARS], payload)


def _file(attachment: Attachment, caption: str) -> CommentPart:
    # The web SDK posts files as "[file] <url> [/file]" with the details in the payload
    # (qiscus/qiscus-sdk-web-core src/main.ts sendFileMessage).
    payload = {"url": attachment.url, "caption": caption, "file_name": attachment.name or "", "size": 0}
    return CommentPart("file_attachment", f"[file] {attachment.url} [/file]", payload)


class SentParts:
    """Which parts of a multi-post reply went out, by idempotency key, so that a retry resends only the rest.

    Kept in memory (bounded); after a restart a retried reply may repeat its earlier parts.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._done: OrderedDict[str, int] = OrderedDict()

    def done(self, key: str) -> int:
        return self._done.get(key, 0)

    def mark(self, key: str, n: int) -> None:
        self._done[key] = n
        self._done.move_to_end(key)
        while len(self._done) > self.limit:
            self._done.popitem(last=False)

    def forget(self, key: str) -> None:
        self._done.pop(key, None)


async def send_parts(
    parts_log: SentParts, key: str, parts: list[CommentPart], post: Callable[[CommentPart], Awaitable[None]]
) -> None:
    for i in range(parts_log.done(key), len(parts)):
        await post(parts[i])
        parts_log.mark(key, i + 1)
    parts_log.forget(key)


@dataclass(frozen=True, slots=True)
class MqttTarget:
    """A broker address from a URL: mqtt://, mqtts://, ws:// or wss://, with optional user:password@."""

    host: str
    port: int
    transport: str
    tls: bool
    path: str | None
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> MqttTarget:
        parts = urlsplit(url)
        defaults = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883, "ws": 80, "wss": 443}
        if parts.scheme not in defaults:
            raise ValueError(f"mqtt_url must start with mqtt://, mqtts://, ws:// or wss://, not {url[:40]!r}")
        if not parts.hostname:
            raise ValueError(f"mqtt_url has no host: {url[:40]!r}")
        try:
            port = parts.port or defaults[parts.scheme]
        except ValueError as exc:
            raise ValueError(f"mqtt_url has a bad port: {url[:40]!r}") from exc
        websockets = parts.scheme in ("ws", "wss")
        return cls(
            host=parts.hostname,
            port=port,
            transport="websockets" if websockets else "tcp",
            tls=parts.scheme in ("mqtts", "ssl", "wss"),
            path=(parts.path or "/mqtt") if websockets else None,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class MqttPublisher:
    """One long-lived MQTT connection per platform instance.

    Opened on the first publish, reopened on the next publish after a drop (a task watches the
    connection), closed by `aclose`. Failures become retryable `DeliveryError`s.
    """

    def __init__(self, target: MqttTarget, client_id: str, timeout: float = 10.0) -> None:
        self.target = target
        self.client_id = client_id
        self.timeout = timeout
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.connects = 0

    async def publish(self, topic: str, payload: str) -> None:
        for attempt in (1, 2):
            client = await self._connected()
            try:
                await client.publish(topic, payload, qos=1, timeout=self.timeout)
                return
            except aiomqtt.MqttError as exc:
                await self._drop(client)
                if attempt == 2:
                    raise DeliveryError(f"MQTT publish to {self.target} failed: {exc}", retryable=True) from exc

    async def _connected(self) -> aiomqtt.Client:
        async with self._lock:
            if self._closed:
                raise DeliveryError("the MQTT connection is closed (shutting down)", retryable=True)
            if self._client is not None:
                return self._client
            t = self.target
            client = aiomqtt.Client(
                t.host,
                t.port,
                username=t.username,
                password=t.password,
                identifier=self.client_id,
                transport="websockets" if t.transport == "websockets" else "tcp",
                websocket_path=t.path,
                tls_context=ssl.create_default_context() if t.tls else None,
                timeout=self.timeout,
                keepalive=30,
            )
            stack = contextlib.AsyncExitStack()
            try:
                await asyncio.wait_for(stack.enter_async_context(client), self.timeout)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                raise DeliveryError(
                    f"MQTT broker {t} unreachable: {exc or type(exc).__name__}", retryable=True
                ) from exc
            self.connects += 1
            self._client, self._stack = client, stack
            self._watch = asyncio.create_task(self._watch_connection(client))
            return client

    async def _watch_connection(self, client: aiomqtt.Client) -> None:
        """Returns when the connection drops, forgetting it so that the next publish reconnects."""
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as exc:
            log.info("MQTT connection to %s dropped: %s", self.target, exc)
        await self._drop(client, from_watch=True)

    async def _drop(self, client: aiomqtt.Client, *, from_watch: bool = False) -> None:
        async with self._lock:
            if self._client is not client:
                return
            stack, watch = self._stack, self._watch
            self._client = self._stack = self._watch = None
        if watch is not None and not from_watch:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                await asyncio.wait_for(stack.aclose(), self.timeout)

    async def aclose(self) -> None:
        self._closed = True
        client = self._client
        if client is not None:
            await self._drop(client)
