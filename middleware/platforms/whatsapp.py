"""WhatsApp Cloud API: the `messages` webhook in; messages, interactive replies and read/typing out."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import httpx
from pydantic import Field

from middleware.model import EVENT_CONVERSATION_STARTED, Attachment, Inbound, MessageType, Outgoing, Reply, Sender
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
    from_unix,
    json_bytes,
    response_object,
    retry_after_seconds,
    signature_matches,
)
from middleware.ratelimit import RateLimit

log = logging.getLogger("switchboard.platforms.whatsapp")

SIGNATURE_HEADER = "X-Hub-Signature-256"
#: attachment URL scheme for received media: only its media id is known (a URL needs a Graph API call)
MEDIA_SCHEME = "wa-media:"
MAX_TEXT = 4096
MAX_CAPTION = 1024
# Interactive message limits: 3 reply buttons with 20-character titles and 256-character ids
# (https://developers.facebook.com/documentation/business-messaging/whatsapp/messages/interactive-reply-buttons-messages);
# lists take 10 rows in all, with 24-character titles and 200-character ids
# (https://developers.facebook.com/documentation/business-messaging/whatsapp/messages/interactive-list-messages);
# a body of 1024 characters.
MAX_BUTTONS, MAX_BUTTON_TITLE, MAX_BUTTON_ID, MAX_BUTTON_BODY = 3, 20, 256, 1024
MAX_ROWS, MAX_ROW_TITLE, MAX_ROW_ID, MAX_LIST_BODY = 10, 24, 200, 1024
#: Graph API error codes that mean "slow down": 4 (app), 80007 (account), 130429 (throughput),
#: 131048 (spam rate limit), 131056 (pair rate limit) (https://developers.facebook.com/documentation/business-messaging/whatsapp/support/error-codes)
RATE_LIMIT_CODES = frozenset({4, 80007, 130429, 131048, 131056})
#: temporary failures on Meta's side: 1 (unknown), 2 (service), 131000 (something went wrong),
#: 131016 (service unavailable), 133004 (server temporarily unavailable)
TRANSIENT_CODES = frozenset({1, 2, 131000, 131016, 133004})
OUTSIDE_WINDOW = 131047
_MEDIA = ("image", "sticker")
_FILES = ("document", "audio", "video")


class WhatsAppConfig(PlatformConfig):
    type: str = "whatsapp"
    #: a system-user access token with whatsapp_business_messaging
    access_token: str
    #: the Meta app's secret: webhooks are signed with it (X-Hub-Signature-256)
    app_secret: str
    #: the Verify Token typed into the app dashboard, echoed in the verification GET
    verify_token: str
    #: the business phone number replies are sent from
    phone_number_id: str
    # v26.0 is the current Graph API version; v21.0 is available until 2027-01-21
    # (https://developers.facebook.com/docs/graph-api/changelog)
    api_base: str = "https://graph.facebook.com/v26.0"
    #: the label of the button that opens a list of more than 3 options (at most 20 characters)
    list_button: str = Field(default="Options", min_length=1, max_length=20)


class WhatsAppPlatform(Platform):
    """A WhatsApp Business number on the Cloud API.

    Inbound: the `messages` webhook (signed with the app secret), with the GET verification
    handshake on the same URL. Text, interactive button and list replies and template quick
    replies (as postbacks), image/sticker and document/audio/video (attachments with
    `wa-media:<media id>` URLs), location, and `request_welcome` (a `conversation.started`
    event). Status webhooks carry no user message; failed ones are logged with their error code.
    Outbound: text, reply buttons (up to 3), lists (up to 10) and a plain-text fallback past
    those limits, a single image/document by link, and read receipts with the typing indicator.
    """

    Config = WhatsAppConfig
    # 80 messages/s per business number by default; a pair rate of about one message every 6 s to
    # one user, error 131056 (https://developers.facebook.com/documentation/business-messaging/whatsapp/throughput)
    default_rate_limit = RateLimit(per_second=80, burst=80, conversation_per_second=1 / 6, conversation_burst=5)
    config: WhatsAppConfig
    supports_typing = True
    supports_read = True
    #: the subscription handshake is a GET on the same URL
    methods = frozenset({"GET", "POST"})
    # "dismissed once you respond, or after 25 seconds"
    # (https://developers.facebook.com/documentation/business-messaging/whatsapp/typing-indicators/)
    typing_ttl = 25.0

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, WhatsAppConfig)
        self._base = config.api_base.rstrip("/")

    # -- inbound -----------------------------------------------------------------------------

    def parse(self, request: WebhookRequest) -> Parsed:
        if request.method == "GET":
            return self._verify(request)
        if request.method != "POST":
            raise Rejected(405, "WhatsApp webhooks are POST (and the GET verification)")
        presented = request.headers.get(SIGNATURE_HEADER.lower())
        if not presented:
            raise Rejected(401, f"missing {SIGNATURE_HEADER} header")
        if not signature_matches(self.config.app_secret, request.body, presented, prefix="sha256="):
            raise Rejected(401, f"bad {SIGNATURE_HEADER} (is app_secret the Meta app's secret?)")
        data = decode_json(request)
        if not isinstance(data, dict) or data.get("object") != "whatsapp_business_account":
            raise Rejected(400, "not a WhatsApp Business Account webhook", "object")
        entries = data.get("entry")
        if not isinstance(entries, list):
            raise Rejected(400, "entry must be an array", "entry")
        messages: list[Inbound] = []
        for i, entry in enumerate(entries):
            changes = entry.get("changes") if isinstance(entry, dict) else None
            if not isinstance(changes, list):
                raise Rejected(400, f"entry[{i}].changes must be an array", f"entry[{i}].changes")
            for j, change in enumerate(changes):
                if not isinstance(change, dict) or change.get("field") != "messages":
                    continue  # account, template and other subscriptions carry no user messages
                value = change.get("value")
                if not isinstance(value, dict):
                    raise Rejected(400, "value must be an object", f"entry[{i}].changes[{j}].value")
                messages += self._value(value, f"entry[{i}].changes[{j}].value.")
        return Parsed(messages)

    def _verify(self, request: WebhookRequest) -> Parsed:
        # https://developers.facebook.com/docs/graph-api/webhooks/getting-started:
        # answer hub.challenge as the body when hub.mode is subscribe and hub.verify_token matches.
        mode = request.query.get("hub.mode")
        token = request.query.get("hub.verify_token", "")
        challenge = request.query.get("hub.challenge")
        if mode != "subscribe" or challenge is None:
            raise Rejected(400, "not a webhook verification request (hub.mode=subscribe and hub.challenge expected)")
        if not hmac.compare_digest(token.encode(), self.config.verify_token.encode()):
            raise Rejected(403, "hub.verify_token does not match verify_token")
        return Parsed([], response=challenge)

    def _value(self, value: dict[str, Any], at: str) -> list[Inbound]:
        metadata = as_dict(value.get("metadata"))
        phone_number_id = str(metadata.get("phone_number_id") or self.config.phone_number_id)
        for status in as_list(value.get("statuses")):
            if isinstance(status, dict) and status.get("status") == "failed":
                for error in [as_dict(e) for e in as_list(status.get("errors")) or [{}]]:
                    log.warning(
                        "whatsapp message failed",
                        extra={
                            "platform": self.name,
                            "wamid": status.get("id"),
                            "code": error.get("code"),
                            "error": error.get("title") or error.get("message"),
                            "details": as_dict(error.get("error_data")).get("details"),
                        },
                    )
        for error in as_list(value.get("errors")):
            if isinstance(error, dict):
                log.warning(
                    "whatsapp webhook error",
                    extra={
                        "platform": self.name,
                        "code": error.get("code"),
                        "error": error.get("title") or error.get("message"),
                    },
                )
        contacts = [c for c in as_list(value.get("contacts")) if isinstance(c, dict)]
        out = []
        if value.get("messages") is not None and not isinstance(value["messages"], list):
            raise Rejected(400, "messages must be an array", f"{at}messages")
        for k, msg in enumerate(as_list(value.get("messages"))):
            if not isinstance(msg, dict):
                raise Rejected(400, "messages[] must be objects", f"{at}messages[{k}]")
            inbound = self._message(msg, contacts, phone_number_id, f"{at}messages[{k}].")
            if inbound is not None:
                out.append(inbound)
        return out

    def _message(
        self, msg: dict[str, Any], contacts: list[dict[str, Any]], phone_number_id: str, at: str
    ) -> Inbound | None:
        message_id = msg.get("id")
        if not isinstance(message_id, str) or not message_id:
            raise Rejected(400, f"{at}id is required", f"{at}id")
        if msg.get("group_id"):
            return None  # group chats are not supported: a reply would go to the sender alone
        phone = as_text(msg.get("from"))
        bsuid = as_text(msg.get("from_user_id"))
        # With WhatsApp usernames the phone number may be withheld; the business-scoped user id
        # (BSUID) then identifies the user and replies go to it ("recipient" instead of "to").
        user = phone or bsuid
        if user is None:
            raise Rejected(400, f"{at}from (or from_user_id) is required", f"{at}from")
        contact = next(
            (c for c in contacts if (phone and c.get("wa_id") == phone) or (bsuid and c.get("user_id") == bsuid)),
            contacts[0] if len(contacts) == 1 else {},
        )
        profile = as_dict(contact.get("profile"))
        attributes = {
            k: v for k, v in (("wa_id", phone), ("user_id", bsuid), ("username", profile.get("username"))) if v
        }
        sender = Sender(user, as_text(profile.get("name")), attributes)
        mtype: MessageType = "text"
        text = ""
        payload: dict[str, Any] = {}
        attachments: tuple[Attachment, ...] = ()
        kind = msg.get("type")
        body = as_dict(msg.get(kind)) if isinstance(kind, str) else {}
        if kind == "text":
            text = as_text(body.get("body")) or ""
        elif kind == "interactive":
            reply_kind = body.get("type")
            choice = body.get(reply_kind) if isinstance(reply_kind, str) else None
            if reply_kind not in ("button_reply", "list_reply") or not isinstance(choice, dict):
                return None  # flows (nfm_reply) and product replies are not postbacks
            mtype, text, payload = (
                "postback",
                as_text(choice.get("title")) or "",
                {"payload": str(choice.get("id", ""))},
            )
            if choice.get("description"):
                payload["description"] = choice["description"]
        elif kind == "button":  # a template's quick-reply button
            mtype, text, payload = (
                "postback",
                as_text(body.get("text")) or "",
                {"payload": str(body.get("payload", ""))},
            )
        elif kind in _MEDIA or kind in _FILES:
            media_id = as_text(body.get("id"))
            if media_id is None:
                raise Rejected(400, f"{at}{kind}.id is required", f"{at}{kind}.id")
            mtype = "image" if kind in _MEDIA else "file"
            attachment_type = "image" if kind in _MEDIA else "file" if kind == "document" else str(kind)
            attachments = (Attachment(attachment_type, MEDIA_SCHEME + media_id, as_text(body.get("filename"))),)
            text = as_text(body.get("caption")) or ""
        elif kind == "location":
            mtype = "location"
            payload = {k: body[k] for k in ("latitude", "longitude", "name", "address", "url") if k in body}
            text = as_text(body.get("name")) or ""
        elif kind == "request_welcome":  # the user opened the chat for the first time
            mtype, payload = "event", {"event": EVENT_CONVERSATION_STARTED}
        else:
            return None  # reactions, contacts, orders, system and unsupported messages
        own = phone_number_id == self.config.phone_number_id
        return Inbound(
            platform=self.name,
            message_id=message_id,
            # a message to another number of the same app is answered from that number
            conversation_id=user if own else f"{phone_number_id}:{user}",
            sender=sender,
            type=mtype,
            text=text,
            payload=payload,
            attachments=attachments,
            timestamp=from_unix(msg.get("timestamp")),
            channel=phone_number_id,
        )

    # -- outbound ----------------------------------------------------------------------------

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        phone_number_id, _, user = item.conversation_id.rpartition(":")
        phone_number_id = phone_number_id or self.config.phone_number_id
        base: dict[str, Any] = {"messaging_product": "whatsapp"}
        if item.kind == "message" and item.reply is not None:
            body = _message_body(item.reply, self.config.list_button)
            if body is None:
                return
            # a BSUID (US.1349...) goes in "recipient"; a phone number in "to"
            recipient = {"recipient": user} if "." in user else {"to": user}
            await self._post(phone_number_id, {**base, "recipient_type": "individual", **recipient, **body})
        elif item.kind in ("read", "typing") and item.message_id:
            if item.kind == "typing" and not item.typing:
                # There is no "typing off": the indicator goes when the reply arrives or after 25 s.
                return
            body = {**base, "status": "read", "message_id": item.message_id}
            if item.kind == "typing":
                body["typing_indicator"] = {"type": "text"}
            await self._post(phone_number_id, body)

    async def _post(self, phone_number_id: str, body: dict[str, Any]) -> None:
        url = f"{self._base}/{phone_number_id}/messages"
        headers = {"content-type": "application/json", "authorization": f"Bearer {self.config.access_token}"}
        try:
            response = await self.http.post(url, content=json_bytes(body), headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timeout ({type(exc).__name__})", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"connection error ({type(exc).__name__})", retryable=True) from exc
        status = response.status_code
        if status < 300:
            return
        error = as_dict(response_object(response).get("error"))
        code = error.get("code")
        details = as_dict(error.get("error_data")).get("details")
        detail = " ".join(str(x) for x in (error.get("message") or response.text[:200], details) if x)
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        if code == OUTSIDE_WINDOW:
            raise DeliveryError(
                f"outside WhatsApp's 24-hour customer service window (error {code}): the user last wrote more than "
                "24 hours ago, so only an approved template message can reach them",
                retryable=False,
                status=status,
            )
        if status == 429 or code in RATE_LIMIT_CODES:
            raise DeliveryError(
                f"rate limited (error {code}): {detail}", retryable=True, status=status, retry_after=retry_after
            )
        if status >= 500 or status == 408 or code in TRANSIENT_CODES:
            raise DeliveryError(
                f"{status} (error {code}): {detail}", retryable=True, status=status, retry_after=retry_after
            )
        raise DeliveryError(f"{status} (error {code}): {detail}", retryable=False, status=status)


def _message_body(reply: Reply, list_button: str) -> dict[str, Any] | None:
    """The type-specific part of a Cloud API message; None when the reply is empty."""
    text = reply.text
    buttons = reply.buttons
    if buttons and text:
        fits_buttons = len(buttons) <= MAX_BUTTONS and len(text) <= MAX_BUTTON_BODY and not reply.attachments
        if fits_buttons and all(
            0 < len(b.title) <= MAX_BUTTON_TITLE and 0 < len(b.payload) <= MAX_BUTTON_ID for b in buttons
        ):
            action: dict[str, Any] = {
                "buttons": [{"type": "reply", "reply": {"id": b.payload, "title": b.title}} for b in buttons]
            }
            return {"type": "interactive", "interactive": {"type": "button", "body": {"text": text}, "action": action}}
        fits_list = len(buttons) <= MAX_ROWS and len(text) <= MAX_LIST_BODY and not reply.attachments
        if fits_list and all(0 < len(b.title) <= MAX_ROW_TITLE and 0 < len(b.payload) <= MAX_ROW_ID for b in buttons):
            rows = [{"id": b.payload, "title": b.title} for b in buttons]
            action = {"button": list_button, "sections": [{"rows": rows}]}
            return {"type": "interactive", "interactive": {"type": "list", "body": {"text": text}, "action": action}}
    if len(reply.attachments) == 1 and not buttons and len(text) <= MAX_CAPTION:
        attachment = reply.attachments[0]
        kind = attachment.type if attachment.type in ("image", "video", "audio") else "document"
        source = attachment.url
        media: dict[str, Any] = (
            {"id": source.removeprefix(MEDIA_SCHEME)} if source.startswith(MEDIA_SCHEME) else {"link": source}
        )
        if text and kind != "audio":
            media["caption"] = text
        if kind == "document" and attachment.name:
            media["filename"] = attachment.name
        return {"type": kind, kind: media}
    plain = reply.plain_text()
    if not plain:
        log.warning("empty reply not sent")
        return None
    if len(plain) > MAX_TEXT:
        log.warning("reply of %d characters cut to WhatsApp's %d", len(plain), MAX_TEXT)
        plain = plain[: MAX_TEXT - 1] + "…"
    return {"type": "text", "text": {"body": plain, "preview_url": "://" in plain}}
