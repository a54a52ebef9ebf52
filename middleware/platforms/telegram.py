"""Telegram Bot API: webhook updates in; sendMessage, sendPhoto/sendDocument and sendChatAction out."""

from __future__ import annotations

import hmac
import logging
import re
from typing import Any

import httpx
from pydantic import field_validator

from middleware.model import Attachment, Button, Inbound, MessageType, Outgoing, Reply, Sender
from middleware.platforms.base import (
    DeliveryError,
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    as_dict,
    as_text,
    decode_json,
    from_unix,
    json_bytes,
    response_object,
    retry_after_seconds,
)
from middleware.ratelimit import RateLimit

log = logging.getLogger("switchboard.platforms.telegram")

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: attachment URL scheme for files that only have a Telegram file_id (a URL needs a getFile call)
FILE_SCHEME = "tg-file:"
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64
_SECRET_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_BOT_TOKEN = re.compile(r"^\d+:[A-Za-z0-9_-]+$")
_MEDIA_METHOD = {
    "image": ("sendPhoto", "photo"),
    "video": ("sendVideo", "video"),
    "audio": ("sendAudio", "audio"),
}


class TelegramConfig(PlatformConfig):
    type: str = "telegram"
    #: the bot token from @BotFather, "123456:ABC-..."
    token: str
    #: the `secret_token` given to setWebhook; Telegram sends it back in every webhook
    secret_token: str
    api_base: str = "https://api.telegram.org"

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _BOT_TOKEN.match(v):
            raise ValueError("token must look like 123456:ABC-DEF (the bot token from @BotFather)")
        return v

    @field_validator("secret_token")
    @classmethod
    def _secret(cls, v: str) -> str:
        # https://core.telegram.org/bots/api#setwebhook: 1-256 characters A-Z, a-z, 0-9, _ and -
        if not _SECRET_TOKEN.match(v):
            raise ValueError("secret_token must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return v


class TelegramPlatform(Platform):
    """A Telegram bot behind a webhook (setWebhook with `secret_token`).

    Inbound: messages (text, photo, document and other media as attachments with
    `tg-file:<file_id>` URLs, location and venue) and callback queries from inline keyboards
    (as postbacks, answered at once in the webhook response). Edited messages, channel posts
    and the other update kinds are acknowledged and ignored. Outbound: sendMessage with an
    inline keyboard for buttons, sendPhoto/sendDocument for a single attachment, and
    sendChatAction for typing. Telegram has no read receipts for bots.
    """

    Config = TelegramConfig
    # "avoid sending more than one message per second" in a chat, "not more than 30 messages per
    # second" in bulk (https://core.telegram.org/bots/faq#my-bot-is-hitting-limits-how-do-i-avoid-this)
    default_rate_limit = RateLimit(per_second=30, burst=30, conversation_per_second=1, conversation_burst=3)
    config: TelegramConfig
    supports_typing = True
    supports_read = False
    # sendChatAction: "The status is set for 5 seconds or less" (https://core.telegram.org/bots/api#sendchataction)
    typing_ttl = 5.0

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, TelegramConfig)
        self.bot_id = config.token.split(":", 1)[0]
        self._base = f"{config.api_base.rstrip('/')}/bot{config.token}/"

    # -- inbound -----------------------------------------------------------------------------

    def parse(self, request: WebhookRequest) -> Parsed:
        if request.method != "POST":
            raise Rejected(405, "Telegram webhooks are POST requests")
        presented = request.headers.get(SECRET_HEADER.lower())
        if not presented:
            raise Rejected(401, f"missing {SECRET_HEADER} header (set secret_token with setWebhook)")
        if not hmac.compare_digest(presented.encode(), self.config.secret_token.encode()):
            raise Rejected(401, f"bad {SECRET_HEADER}")
        update = decode_json(request)
        if not isinstance(update, dict) or isinstance(update.get("update_id"), bool):
            raise Rejected(400, "body is not a Telegram Update object", "update_id")
        if not isinstance(update.get("update_id"), int):
            raise Rejected(400, "update_id is required and must be an integer", "update_id")
        if "message" in update:
            message = self._message(_obj(update, "message", ""))
            return Parsed([message] if message is not None else [])
        if "callback_query" in update:
            return self._callback(_obj(update, "callback_query", ""))
        # edited_message is ignored: answering an edit would run a second turn for one user message;
        # channel posts, inline queries, chat member changes and the rest carry no user message to answer.
        return Parsed([])

    def _message(self, msg: dict[str, Any]) -> Inbound | None:
        at = "message."
        chat = _obj(msg, "chat", at)
        chat_id = _int(chat, "id", f"{at}chat.")
        message_id = _int(msg, "message_id", at)
        sender = msg.get("from")
        if isinstance(sender, dict):
            if sender.get("is_bot") and str(sender.get("id")) == self.bot_id:
                return None  # our own message: no reply loops
            user = _sender(sender)
        elif isinstance(msg.get("sender_chat"), dict):
            sender_chat = msg["sender_chat"]
            user = Sender(str(sender_chat.get("id")), as_text(sender_chat.get("title")), {"chat": True})
        else:
            user = Sender(str(chat_id))
        text = as_text(msg.get("text")) or as_text(msg.get("caption")) or ""
        mtype: MessageType = "text"
        attachments: list[Attachment] = []
        payload: dict[str, Any] = {}
        if isinstance(msg.get("photo"), list) and msg["photo"]:
            # PhotoSize array, smallest first (https://core.telegram.org/bots/api#message)
            largest = msg["photo"][-1]
            mtype = "image"
            attachments.append(Attachment("image", FILE_SCHEME + _file_id(largest, f"{at}photo[-1].")))
        elif isinstance(msg.get("sticker"), dict):
            mtype = "image"
            attachments.append(Attachment("image", FILE_SCHEME + _file_id(msg["sticker"], f"{at}sticker.")))
        elif media := next(
            (k for k in ("document", "video", "animation", "audio", "voice", "video_note") if k in msg), None
        ):
            item = _obj(msg, media, at)
            mtype = "file"
            kind = (
                "video"
                if media in ("video", "animation", "video_note")
                else "audio"
                if media in ("audio", "voice")
                else "file"
            )
            attachments.append(
                Attachment(kind, FILE_SCHEME + _file_id(item, f"{at}{media}."), as_text(item.get("file_name")))
            )
        elif isinstance(msg.get("location"), dict):
            mtype = "location"
            loc = msg["location"]
            payload = {"latitude": loc.get("latitude"), "longitude": loc.get("longitude")}
            venue = msg.get("venue")
            if isinstance(venue, dict):
                payload.update({"name": venue.get("title"), "address": venue.get("address")})
                text = text or as_text(venue.get("title")) or ""
        elif not text:
            return None  # contacts, polls, dice, service messages (members joined, pinned...): nothing to answer
        return Inbound(
            platform=self.name,
            message_id=f"{chat_id}:{message_id}",
            conversation_id=_conversation(chat_id, msg),
            sender=user,
            type=mtype,
            text=text,
            payload=payload,
            attachments=tuple(attachments),
            timestamp=from_unix(msg.get("date")),
        )

    def _callback(self, query: dict[str, Any]) -> Parsed:
        at = "callback_query."
        query_id = query.get("id")
        if not isinstance(query_id, str) or not query_id:
            raise Rejected(400, f"{at}id is required", f"{at}id")
        # Answered in the webhook response itself ("Making requests when getting updates",
        # https://core.telegram.org/bots/api#making-requests-when-getting-updates): the button's
        # progress bar stops at once, with no API call, whatever the flow takes to reply.
        answer = {"method": "answerCallbackQuery", "callback_query_id": query_id}
        message = query.get("message")
        data = query.get("data")
        if not isinstance(message, dict) or not isinstance(data, str):
            return Parsed([], response=answer)  # inline-mode messages and game buttons: no chat to answer in
        chat_id = _int(_obj(message, "chat", f"{at}message."), "id", f"{at}message.chat.")
        user = _sender(_obj(query, "from", at))
        title = _button_title(message.get("reply_markup"), data)
        inbound = Inbound(
            platform=self.name,
            message_id=f"callback:{query_id}",
            conversation_id=_conversation(chat_id, message),
            sender=user,
            type="postback",
            text=title or data,
            payload={"payload": data},
        )
        return Parsed([inbound], response=answer)

    # -- outbound ----------------------------------------------------------------------------

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        chat_id, thread_id = _split(item.conversation_id)
        target: dict[str, Any] = {"chat_id": chat_id}
        if thread_id is not None:
            target["message_thread_id"] = thread_id
        if item.kind == "typing":
            if not item.typing:
                # Telegram has no "typing off": the indicator stops when the bot's message arrives
                # or after 5 s (https://core.telegram.org/bots/api#sendchataction).
                return
            await self._call("sendChatAction", {**target, "action": "typing"})
        elif item.kind == "message" and item.reply is not None:
            method, body = _message_call(item.reply)
            if method:
                await self._call(method, {**target, **body})

    async def _call(self, method: str, body: dict[str, Any]) -> None:
        try:
            response = await self.http.post(
                self._base + method, content=json_bytes(body), headers={"content-type": "application/json"}
            )
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"{method}: timeout ({type(exc).__name__})", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{method}: connection error ({type(exc).__name__})", retryable=True) from exc
        data = response_object(response)
        status = response.status_code
        if status < 300 and data.get("ok", True) is not False:
            return
        # The bot token is part of the URL; keep it out of anything that is stored or logged.
        detail = str(data.get("description") or response.text[:200]).replace(self.config.token, "<token>")
        params = as_dict(data.get("parameters"))
        if status == 429 or data.get("error_code") == 429:
            # 429s carry the wait in the body, `parameters.retry_after` (https://core.telegram.org/bots/api#responseparameters)
            hint = params.get("retry_after")
            retry_after = (
                float(hint)
                if isinstance(hint, int | float) and not isinstance(hint, bool)
                else retry_after_seconds(response.headers.get("retry-after"))
            )
            raise DeliveryError(f"{method}: 429 {detail}", retryable=True, status=429, retry_after=retry_after)
        if status >= 500 or status == 408:
            raise DeliveryError(f"{method}: {status} {detail}", retryable=True, status=status)
        if "migrate_to_chat_id" in params:
            detail += f" (the group is now the supergroup {params['migrate_to_chat_id']})"
        raise DeliveryError(
            f"{method}: {status if status >= 300 else 'ok=false'} {detail}", retryable=False, status=status
        )


def _message_call(reply: Reply) -> tuple[str, dict[str, Any]]:
    """The Bot API method and body for a reply; ("", {}) when there is nothing to send."""
    markup = _keyboard(reply.buttons)
    extra: dict[str, Any] = {"reply_markup": markup} if markup else {}
    text = reply.text
    if len(reply.attachments) == 1 and len(text) <= MAX_CAPTION:
        attachment = reply.attachments[0]
        method, field = _MEDIA_METHOD.get(attachment.type, ("sendDocument", "document"))
        source = attachment.url.removeprefix(FILE_SCHEME)
        body: dict[str, Any] = {field: source, **extra}
        if text:
            body["caption"] = text
        return method, body
    lines = [text] if text else []
    lines += [a.url if not a.name else f"{a.name}: {a.url}" for a in reply.attachments]
    text = "\n".join(lines) or (reply.plain_text() if reply.buttons else "")
    if not text:
        log.warning("empty reply not sent")
        return "", {}
    if len(text) > MAX_TEXT:
        log.warning("reply of %d characters cut to Telegram's %d", len(text), MAX_TEXT)
        text = text[: MAX_TEXT - 1] + "…"
    return "sendMessage", {"text": text, **extra}


def _keyboard(buttons: tuple[Button, ...]) -> dict[str, Any] | None:
    if not buttons:
        return None
    if all(0 < len(b.payload.encode()) <= MAX_CALLBACK_DATA for b in buttons):
        return {"inline_keyboard": [[{"text": b.title, "callback_data": b.payload}] for b in buttons]}
    # callback_data is 1-64 bytes (https://core.telegram.org/bots/api#inlinekeyboardbutton); for longer
    # payloads a one-time reply keyboard still offers the choices, and a tap sends the title as text.
    return {
        "keyboard": [[{"text": b.title}] for b in buttons],
        "one_time_keyboard": True,
        "resize_keyboard": True,
    }


def _button_title(markup: Any, data: str) -> str | None:
    """The title of the inline button that carried `data`, from the message the button was on."""
    if not isinstance(markup, dict) or not isinstance(markup.get("inline_keyboard"), list):
        return None
    for row in markup["inline_keyboard"]:
        for button in row if isinstance(row, list) else ():
            if isinstance(button, dict) and button.get("callback_data") == data and isinstance(button.get("text"), str):
                return str(button["text"])
    return None


def _conversation(chat_id: int, msg: dict[str, Any]) -> str:
    """The chat, or chat/topic for a message in a forum topic (replies must name the topic)."""
    thread = msg.get("message_thread_id")
    if msg.get("is_topic_message") and isinstance(thread, int):
        return f"{chat_id}/{thread}"
    return str(chat_id)


def _split(conversation_id: str) -> tuple[int | str, int | None]:
    chat, _, thread = conversation_id.partition("/")
    chat_id: int | str = int(chat) if chat.lstrip("-").isdigit() else chat
    return chat_id, int(thread) if thread.isdigit() else None


def _sender(user: dict[str, Any]) -> Sender:
    name = " ".join(n for n in (as_text(user.get("first_name")), as_text(user.get("last_name"))) if n) or None
    attributes: dict[str, Any] = {k: user[k] for k in ("username", "language_code", "is_bot") if k in user}
    return Sender(str(user.get("id")), name, attributes)


def _obj(parent: dict[str, Any], key: str, at: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise Rejected(400, f"{at}{key} must be an object", f"{at}{key}")
    return value


def _int(parent: dict[str, Any], key: str, at: str) -> int:
    value = parent.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Rejected(400, f"{at}{key} is required and must be an integer", f"{at}{key}")
    return value


def _file_id(item: Any, at: str) -> str:
    file_id = item.get("file_id") if isinstance(item, dict) else None
    if not isinstance(file_id, str) or not file_id:
        raise Rejected(400, f"{at}file_id is required", f"{at}file_id")
    return file_id
