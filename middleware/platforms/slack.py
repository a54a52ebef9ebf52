"""Slack: the Events API and block_actions interactivity in; chat.postMessage with blocks out."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx

from middleware.model import Attachment, Inbound, MessageType, Outgoing, Reply, Sender
from middleware.platforms.base import (
    DeliveryError,
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    as_dict,
    as_list,
    as_text,
    decode_json,
    json_bytes,
    loads_json,
    response_object,
    retry_after_seconds,
)
from middleware.ratelimit import RateLimit

log = logging.getLogger("switchboard.platforms.slack")

SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
# "If the request timestamp is more than five minutes from local time, it could be a replay attack"
# (https://docs.slack.dev/authentication/verifying-requests-from-slack)
REPLAY_WINDOW = 300
#: message subtypes that are a person writing; every other subtype (edits, deletions, joins...) is ignored
USER_SUBTYPES = frozenset({"file_share", "thread_broadcast", "me_message"})
#: chat.postMessage errors that say "try again later" rather than "this request is wrong"
TRANSIENT_ERRORS = frozenset({"ratelimited", "service_unavailable", "internal_error", "team_added_to_org"})
# Block Kit limits (https://docs.slack.dev/reference/block-kit/blocks): 50 blocks a message, 3000
# characters of section text, 25 elements in an actions block; buttons take 75 characters of text
# and 2000 of value.
MAX_BLOCKS, MAX_SECTION, MAX_ELEMENTS, MAX_BUTTON_TEXT, MAX_BUTTON_VALUE = 50, 3000, 25, 75, 2000


class SlackConfig(PlatformConfig):
    type: str = "slack"
    #: the bot token (xoxb-...) with chat:write
    bot_token: str
    #: the app's Signing Secret (Basic Information page)
    signing_secret: str
    #: the bot's own user id (U...); taken from each event's `authorizations` when not set
    bot_user_id: str | None = None
    api_base: str = "https://slack.com/api"


class SlackPlatform(Platform):
    """A Slack app on the Events API (message.im / message.channels / app_mention) with interactivity.

    Inbound: signed requests (v0 HMAC, 5-minute replay window); `url_verification` is answered
    with its challenge; user messages (with files as attachments) become text/image/file
    messages and button clicks (`block_actions`, sent to the Interactivity Request URL, which may
    be this same URL) become postbacks. Bot messages (ours and other bots') and edits, deletions
    and other subtypes are ignored. The conversation is the channel, or `channel:thread_ts` for a
    message in a thread, so the bot answers in the thread it was asked in. The dedupe key is
    `channel:ts`, the message's own id, so Slack's retries (X-Slack-Retry-Num) and the second copy
    of a message that arrives both as `message` and `app_mention` are duplicates.
    Outbound: chat.postMessage, with blocks (sections, images, an actions block of buttons) and
    `text` as the notification fallback. Slack bots on the Events API have no typing indicator
    and no read receipts.
    """

    # chat.postMessage: "1 message per second per channel", short bursts allowed
    # (https://api.slack.com/methods/chat.postMessage#rate_limiting)
    default_rate_limit = RateLimit(conversation_per_second=1, conversation_burst=3)

    Config = SlackConfig
    config: SlackConfig
    supports_typing = False
    supports_read = False

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, SlackConfig)
        self._base = config.api_base.rstrip("/")

    # -- inbound -----------------------------------------------------------------------------

    def parse(self, request: WebhookRequest) -> Parsed:
        if request.method != "POST":
            raise Rejected(405, "Slack requests are POSTs")
        self._verify(request)
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":
            return self._interaction(request.body)
        data = decode_json(request)
        if not isinstance(data, dict):
            raise Rejected(400, "body must be a JSON object")
        kind = data.get("type")
        if kind == "url_verification":
            challenge = data.get("challenge")
            if not isinstance(challenge, str):
                raise Rejected(400, "challenge is required", "challenge")
            return Parsed([], response={"challenge": challenge})
        if kind != "event_callback":
            return Parsed([])  # app_rate_limited and other notices carry no message
        event = data.get("event")
        if not isinstance(event, dict):
            raise Rejected(400, "event must be an object", "event")
        message = self._event(event, data)
        return Parsed([message] if message is not None else [])

    def _verify(self, request: WebhookRequest) -> None:
        presented = request.headers.get(SIGNATURE_HEADER.lower())
        stamp = request.headers.get(TIMESTAMP_HEADER.lower())
        if not presented or not stamp:
            raise Rejected(401, f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:  # int() takes "١٢٣", "1_0" and 10**5000
            raise Rejected(401, f"{TIMESTAMP_HEADER} is not a Unix time")
        if abs(time.time() - int(stamp)) > REPLAY_WINDOW:
            raise Rejected(401, f"{TIMESTAMP_HEADER} is more than 5 minutes off: a replayed request, or a skewed clock")
        base = b"v0:" + stamp.encode() + b":" + request.body
        expected = "v0=" + hmac.new(self.config.signing_secret.encode(), base, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), presented.strip().encode()):
            raise Rejected(401, f"bad {SIGNATURE_HEADER} (is signing_secret the app's Signing Secret?)")

    def _bot_user(self, envelope: dict[str, Any]) -> str | None:
        if self.config.bot_user_id:
            return self.config.bot_user_id
        for auth in as_list(envelope.get("authorizations")):
            if isinstance(auth, dict) and auth.get("is_bot") and isinstance(auth.get("user_id"), str):
                return str(auth["user_id"])
        return None

    def _event(self, event: dict[str, Any], envelope: dict[str, Any]) -> Inbound | None:
        if event.get("type") not in ("message", "app_mention"):
            return None
        subtype = event.get("subtype")
        if subtype is not None and (not isinstance(subtype, str) or subtype not in USER_SUBTYPES):
            return None
        bot_user = self._bot_user(envelope)
        user = event.get("user")
        if event.get("bot_id") or subtype == "bot_message" or not isinstance(user, str) or user == bot_user:
            return None  # bots, ourselves included: no reply loops
        channel = _required(event, "channel", "event.")
        ts = _required(event, "ts", "event.")
        text = _unescape(as_text(event.get("text")) or "")
        if bot_user and text.startswith(f"<@{bot_user}>"):
            text = text[len(bot_user) + 3 :].lstrip()
        attachments = tuple(
            Attachment(
                "image" if str(f.get("mimetype", "")).startswith("image/") else "file",
                str(f["url_private"]),
                f.get("name") if isinstance(f.get("name"), str) else None,
            )
            for f in as_list(event.get("files"))
            if isinstance(f, dict) and isinstance(f.get("url_private"), str)
        )
        mtype: MessageType = ("image" if attachments[0].type == "image" else "file") if attachments else "text"
        thread_ts = event.get("thread_ts")
        team = envelope.get("team_id")
        return Inbound(
            platform=self.name,
            message_id=f"{channel}:{ts}",
            conversation_id=f"{channel}:{thread_ts}" if isinstance(thread_ts, str) and thread_ts else channel,
            sender=Sender(user, None, {"team": team} if team else {}),
            type=mtype,
            text=text,
            attachments=attachments,
            timestamp=_timestamp(ts),
            channel=team if isinstance(team, str) else None,
        )

    def _interaction(self, body: bytes) -> Parsed:
        # Interactivity requests are forms with one `payload` field holding JSON
        # (https://docs.slack.dev/interactivity/handling-user-interaction); Slack wants an empty 200 within 3 s.
        try:
            raw = parse_qs(body.decode(), strict_parsing=False, max_num_fields=100).get("payload", [""])[0]
        except (UnicodeDecodeError, ValueError) as exc:
            raise Rejected(400, "interactivity request without a JSON payload field", "payload") from exc
        try:
            payload = loads_json(raw)
        except Rejected as exc:
            raise Rejected(400, f"interactivity payload: {exc.message}", "payload") from exc
        if not isinstance(payload, dict) or payload.get("type") != "block_actions":
            return Parsed([], response="")  # shortcuts, modals and the rest are not messages
        user = as_dict(payload.get("user"))
        container = as_dict(payload.get("container"))
        channel_obj = as_dict(payload.get("channel"))
        message = as_dict(payload.get("message"))
        channel = channel_obj.get("id") or container.get("channel_id")
        action = next(
            (a for a in as_list(payload.get("actions")) if isinstance(a, dict) and a.get("type") == "button"), None
        )
        if action is None or not isinstance(channel, str) or not isinstance(user.get("id"), str):
            return Parsed([], response="")  # selects, date pickers, or a click outside a channel message
        title = as_dict(action.get("text")).get("text")
        value = as_text(action.get("value")) or ""
        thread_ts = message.get("thread_ts") or container.get("thread_ts")
        stamp = str(action.get("action_ts") or payload.get("trigger_id") or "")
        inbound = Inbound(
            platform=self.name,
            message_id=f"action:{channel}:{user['id']}:{stamp}",
            conversation_id=f"{channel}:{thread_ts}" if isinstance(thread_ts, str) and thread_ts else channel,
            sender=Sender(str(user["id"]), as_text(user.get("name"))),
            type="postback",
            text=as_text(title) or value,
            payload={"payload": value},
            timestamp=_timestamp(stamp),
            channel=as_text(as_dict(payload.get("team")).get("id")),
        )
        return Parsed([inbound], response="")

    # -- outbound ----------------------------------------------------------------------------

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        if item.kind != "message" or item.reply is None:
            return
        body = _message_body(item.reply)
        if body is None:
            return
        channel, _, thread_ts = item.conversation_id.partition(":")
        body["channel"] = channel
        if thread_ts:
            body["thread_ts"] = thread_ts
        await self._call("chat.postMessage", body)

    async def _call(self, method: str, body: dict[str, Any]) -> None:
        headers = {
            "content-type": "application/json; charset=utf-8",
            "authorization": f"Bearer {self.config.bot_token}",
        }
        try:
            response = await self.http.post(f"{self._base}/{method}", content=json_bytes(body), headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"{method}: timeout ({type(exc).__name__})", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{method}: connection error ({type(exc).__name__})", retryable=True) from exc
        status = response.status_code
        data = response_object(response)
        error = str(data.get("error") or response.text[:200] or status)
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        if status == 429:
            raise DeliveryError(f"{method}: 429 {error}", retryable=True, status=429, retry_after=retry_after)
        if status >= 500 or status == 408:
            raise DeliveryError(f"{method}: {status} {error}", retryable=True, status=status, retry_after=retry_after)
        if status >= 300:
            raise DeliveryError(f"{method}: {status} {error}", retryable=False, status=status)
        if data.get("ok") is True:
            return
        # Slack answers failures with HTTP 200 and {"ok": false, "error": "..."}
        # (https://docs.slack.dev/reference/methods/chat.postMessage#errors)
        if error in TRANSIENT_ERRORS:
            raise DeliveryError(f"{method}: {error}", retryable=True, status=status, retry_after=retry_after)
        raise DeliveryError(f"{method}: {error}", retryable=False, status=status)


def _message_body(reply: Reply) -> dict[str, Any] | None:
    """chat.postMessage's `text` (always: the notification and screen-reader fallback) and `blocks`."""
    fallback = _escape(reply.plain_text())
    if not fallback:
        log.warning("empty reply not sent")
        return None
    body: dict[str, Any] = {"text": fallback}
    if not reply.buttons and not reply.attachments:
        body["text"] = _escape(reply.text)
        return body
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": chunk}} for chunk in _sections(reply.text)
    ]
    for a in reply.attachments:
        if a.type == "image" and a.url.startswith(("https://", "http://")):
            blocks.append({"type": "image", "image_url": a.url, "alt_text": a.name or "image"})
        else:
            link = f"<{a.url}|{_escape(a.name)}>" if a.name else f"<{a.url}>"
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": link}})
    buttons = reply.buttons
    if buttons:
        if len(buttons) > MAX_ELEMENTS or any(
            not b.title or len(b.title) > MAX_BUTTON_TEXT or len(b.payload) > MAX_BUTTON_VALUE for b in buttons
        ):
            return body  # past Block Kit's limits: the numbered plain-text list alone
        elements = [
            {
                "type": "button",
                "text": {"type": "plain_text", "text": b.title},
                "value": b.payload,
                "action_id": f"sb-{i}",
            }
            for i, b in enumerate(buttons)
        ]
        blocks.append({"type": "actions", "elements": elements})
    if len(blocks) <= MAX_BLOCKS:
        body["blocks"] = blocks
    return body


def _sections(text: str) -> list[str]:
    """The escaped text in pieces of at most MAX_SECTION characters, never splitting an escape."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for char in text:
        escaped = _escape(char)
        if size + len(escaped) > MAX_SECTION:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(escaped)
        size += len(escaped)
    if current:
        pieces.append("".join(current))
    return pieces


def _escape(text: str | None) -> str:
    # Text a bot posts must escape &, < and > (https://docs.slack.dev/messaging/formatting-message-text);
    # unescaped, a user's "<!channel>" echoed back would notify the whole channel.
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _required(obj: dict[str, Any], key: str, at: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise Rejected(400, f"{at}{key} is required", f"{at}{key}")
    return value


def _timestamp(ts: str) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(ts), UTC)
    except (TypeError, ValueError, OverflowError):
        return None
