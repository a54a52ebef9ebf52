"""Chatwoot agent bots: webhook events in; the Application API (messages, typing, status) out."""

from __future__ import annotations

import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import Field, field_validator

from middleware.model import (
    EVENT_AGENT_ASSIGNED,
    EVENT_AGENT_RESOLVED,
    EVENT_CONVERSATION_STARTED,
    Attachment,
    Inbound,
    MessageType,
    Outgoing,
    Reply,
    Sender,
)
from middleware.platforms.base import (
    DeliveryError,
    HttpAnswer,
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    decode_json,
    from_unix,
    post_json,
    signature_matches,
)

log = logging.getLogger("switchboard.platforms.chatwoot")

SIGNATURE_HEADER = "X-Chatwoot-Signature"
TIMESTAMP_HEADER = "X-Chatwoot-Timestamp"
TOKEN_PARAM = "token"
#: statuses in which the bot answers. Chatwoot's own bots answer only `pending` conversations
#: (lib/integrations/bot_processor_service.rb: `return unless conversation.pending?`); `bot` is the
#: name `pending` had before Chatwoot renamed it.
BOT_STATUSES = frozenset({"pending", "bot"})
#: status -> the event Switchboard's flows see when a conversation reaches it
_STATUS_EVENTS = {"open": EVENT_AGENT_ASSIGNED, "resolved": EVENT_AGENT_RESOLVED, "pending": EVENT_AGENT_RESOLVED}


class ChatwootConfig(PlatformConfig):
    type: str = "chatwoot"
    #: the Chatwoot installation, e.g. https://app.chatwoot.com
    base_url: str
    account_id: int
    #: the agent bot's access token (Settings -> Bots), sent as `api_access_token`
    bot_token: str = Field(repr=False)
    #: the agent bot's webhook secret (Chatwoot 4.13+): every webhook must carry a valid X-Chatwoot-Signature
    webhook_secret: str | None = Field(default=None, repr=False)
    #: a shared secret in the bot's outgoing URL (`...?token=...`), for Chatwoot versions that do not sign
    webhook_token: str | None = Field(default=None, repr=False)
    #: seconds a signed webhook's X-Chatwoot-Timestamp may differ from our clock
    signature_tolerance: float = 300.0
    #: typing indicator through toggle_typing_status
    typing: bool = True
    #: buttons as Chatwoot "options" (input_select), or as numbered text for inboxes that cannot show them
    buttons: Literal["input_select", "text"] = "input_select"
    #: handoff queue name -> Chatwoot team id; a handoff to a listed queue also assigns the team
    teams: dict[str, int] = Field(default_factory=dict)
    #: on handoff, leave the reason as a private note for the agent
    handoff_note: bool = True

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https:// (e.g. https://app.chatwoot.com)")
        return v.rstrip("/")

    @field_validator("webhook_secret", "webhook_token")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty; leave it out instead")
        return v


class ChatwootPlatform(Platform):
    """A Chatwoot agent bot: its outgoing URL points at `/webhooks/{name}`.

    Inbound: a contact's messages (`message_created`, text and attachments; locations), a choice
    made in the bot's options (`message_updated` with `submitted_values`, as a postback), a new
    conversation (`conversation_created`, or `webwidget_triggered` on an existing one) as
    `conversation.started`, and status changes: `open` (a human took it) as `agent.assigned`,
    `resolved` or a hand-back to `pending` as `agent.resolved`. The bot stays silent unless the
    conversation is `pending`: messages in a conversation a human owns are acknowledged and dropped.
    Agents' messages, private notes and the bot's own messages are dropped. Webhooks are
    authenticated by X-Chatwoot-Signature (`webhook_secret`) and/or a `?token=` in the URL
    (`webhook_token`).

    Outbound: messages (buttons as `input_select` options, attachments as links), typing
    (`toggle_typing_status`), handoff (`toggle_status` to `open`, optionally a team and a private
    note) and release (`toggle_status` to `pending`). No read receipts: the bot token may not call
    `update_last_seen`.
    """

    Config = ChatwootConfig
    config: ChatwootConfig
    supports_typing = True
    supports_read = False
    supports_handoff = True
    # Chatwoot shows the indicator until typing_status "off"; the refresh only bounds a lost "off".
    typing_ttl = 20.0

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, ChatwootConfig)
        self.supports_typing = config.typing
        self._api = f"{config.base_url}/api/v1/accounts/{config.account_id}/conversations"
        self._headers = {"api_access_token": config.bot_token}
        if config.webhook_secret is None and config.webhook_token is None:
            log.warning(
                "chatwoot platform accepts unauthenticated webhooks; set webhook_secret or webhook_token",
                extra={"platform": name},
            )

    # -- inbound -----------------------------------------------------------------------------

    def parse(self, request: WebhookRequest) -> Parsed:
        if request.method != "POST":
            raise Rejected(405, "Chatwoot webhooks are POST requests")
        self._authenticate(request)
        data = decode_json(request)
        if not isinstance(data, dict):
            raise Rejected(400, "body must be a JSON object (a Chatwoot webhook event)")
        event = data.get("event")
        if event == "message_created":
            return self._message_created(data)
        if event == "message_updated":
            return self._message_updated(data)
        if event in ("conversation_created", "webwidget_triggered"):
            return self._started(data, event)
        if event in ("conversation_status_changed", "conversation_opened", "conversation_resolved"):
            return self._status(data, event)
        # conversation_updated, contact_updated, typing and the rest carry nothing to answer; a 4xx here
        # would make Chatwoot mark a message failed and open the conversation to humans (lib/webhooks/trigger.rb).
        return _ignored(f"event {event!r} is not handled")

    def _authenticate(self, request: WebhookRequest) -> None:
        token = self.config.webhook_token
        if token is not None:
            presented = request.query.get(TOKEN_PARAM)
            if not presented:
                raise Rejected(401, f"missing ?{TOKEN_PARAM}= in the webhook URL")
            if not hmac.compare_digest(presented.encode(), token.encode()):
                raise Rejected(401, f"bad ?{TOKEN_PARAM}=")
        secret = self.config.webhook_secret
        if secret is None:
            return
        signature = request.headers.get(SIGNATURE_HEADER.lower())
        stamp = request.headers.get(TIMESTAMP_HEADER.lower())
        if not signature or not stamp:
            raise Rejected(401, f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
        if not (stamp.strip().isascii() and stamp.strip().isdigit()) or len(stamp.strip()) > 12:
            raise Rejected(401, f"bad {TIMESTAMP_HEADER}")  # int() would take "١٢٣", "1_0" and 10**5000
        if abs(time.time() - int(stamp.strip())) > self.config.signature_tolerance:
            raise Rejected(401, f"{TIMESTAMP_HEADER} is outside the allowed window (replayed or clock skew)")
        # The signed string is "{timestamp}.{raw body}", not the body alone (https://github.com/chatwoot/chatwoot/pull/13573).
        signed = stamp.strip().encode() + b"." + request.body
        if not signature_matches(secret, signed, signature, prefix="sha256="):
            raise Rejected(401, f"bad {SIGNATURE_HEADER}")

    def _message_created(self, data: dict[str, Any]) -> Parsed:
        kind = data.get("message_type")
        # message_type is "incoming" in webhook payloads; 0 in Chatwoot's integer enum form.
        incoming = kind == "incoming" or (kind == 0 and not isinstance(kind, bool))
        if not incoming or data.get("private") is True:
            return _ignored("not a contact's message (outgoing, note, template or activity)")
        conversation = _obj(data, "conversation")
        status = conversation.get("status")
        if _human_owns(status):
            # A human owns the conversation (open, snoozed) or it is closed: Chatwoot shows the message
            # to the agent, and the bot stays silent, as Chatwoot's own bots do.
            return _ignored(f"conversation is {str(status)[:40]!r}: a human owns it")
        conv_id = _id(conversation, "id", "conversation.")
        message_id = _id(data, "id", "")
        text = data.get("content")
        if text is not None and not isinstance(text, str):
            raise Rejected(400, "content must be a string", "content")
        attachments, location = _attachments(data.get("attachments"))
        mtype: MessageType = "text"
        payload: dict[str, Any] = {}
        if location is not None:
            mtype, payload = "location", location
            text = text or location.get("title") or ""
        elif attachments:
            mtype = "image" if attachments[0].type == "image" else "file"
        return Parsed(
            [
                Inbound(
                    platform=self.name,
                    message_id=message_id,
                    conversation_id=conv_id,
                    sender=_contact(data.get("sender"), conversation),
                    type=mtype,
                    text=text or "",
                    payload=payload,
                    attachments=attachments,
                    timestamp=_time(data.get("created_at")),
                    channel=_inbox(data, conversation),
                )
            ]
        )

    def _message_updated(self, data: dict[str, Any]) -> Parsed:
        attributes = data.get("content_attributes")
        submitted = attributes.get("submitted_values") if isinstance(attributes, dict) else None
        if data.get("content_type") != "input_select" or not isinstance(submitted, list) or not submitted:
            return _ignored("message update without a choice in the bot's options")
        choice = submitted[0]
        if not isinstance(choice, dict) or "value" not in choice:
            raise Rejected(400, "content_attributes.submitted_values[0].value is required", "content_attributes")
        conversation = _obj(data, "conversation")
        status = conversation.get("status")
        if _human_owns(status):
            return _ignored(f"conversation is {str(status)[:40]!r}: a human owns it")
        conv_id = _id(conversation, "id", "conversation.")
        value = str(choice["value"])
        title = choice.get("title")
        return Parsed(
            [
                Inbound(
                    platform=self.name,
                    # one choice per options message: the widget locks the options once one is submitted
                    message_id=f"{_id(data, 'id', '')}:submitted",
                    conversation_id=conv_id,
                    sender=_contact(None, conversation),
                    type="postback",
                    text=title if isinstance(title, str) and title else value,
                    payload={"payload": value},
                    timestamp=None,
                    channel=_inbox(data, conversation),
                )
            ]
        )

    def _started(self, data: dict[str, Any], event: str) -> Parsed:
        if event == "webwidget_triggered":
            conversation = data.get("current_conversation")
            if not isinstance(conversation, dict):
                # The widget opened before any conversation exists: there is nothing to post into yet.
                return _ignored("widget opened without a conversation")
            contact = data.get("contact")
        else:
            conversation, contact = data, None
        status = conversation.get("status")
        if _human_owns(status):
            return _ignored(f"conversation is {str(status)[:40]!r}: a human owns it")
        conv_id = _id(conversation, "id", "conversation." if event == "webwidget_triggered" else "")
        return Parsed(
            [
                Inbound(
                    platform=self.name,
                    # once per conversation, whichever of the two events announces it
                    message_id=f"{EVENT_CONVERSATION_STARTED}:{conv_id}",
                    conversation_id=conv_id,
                    sender=_contact(contact, conversation),
                    type="event",
                    payload={"event": EVENT_CONVERSATION_STARTED},
                    timestamp=_time(conversation.get("created_at")),
                    channel=_inbox(data, conversation),
                )
            ]
        )

    def _status(self, data: dict[str, Any], event: str) -> Parsed:
        if event == "conversation_resolved":
            status: Any = "resolved"
        elif event == "conversation_opened":
            status = "open"
        else:
            status = data.get("status")
        name = _STATUS_EVENTS.get(status) if isinstance(status, str) else None
        if name is None:
            return _ignored(f"status {status!r} needs no turn")
        if status == "pending" and _previous_status(data) not in ("open", "snoozed"):
            # pending after resolved is the contact writing again (the message itself follows);
            # only open -> pending is an agent handing the conversation back to the bot.
            return _ignored("pending without a human handing it back")
        conv_id = _id(data, "id", "")
        payload: dict[str, Any] = {"event": name, "status": status}
        assignee = _get(data, "meta", "assignee")
        if name == EVENT_AGENT_ASSIGNED and isinstance(assignee, dict) and assignee.get("id") is not None:
            payload["agent"] = {"id": str(assignee["id"]), "name": assignee.get("name")}
        # conversation_status_changed and the legacy conversation_resolved/opened both announce one
        # change: keyed on the conversation's own clock, they dedupe to one event.
        stamp = data.get("updated_at") or f"{data.get('timestamp')}:{data.get('agent_last_seen_at')}"
        return Parsed(
            [
                Inbound(
                    platform=self.name,
                    message_id=f"{name}:{conv_id}:{status}:{stamp}",
                    conversation_id=conv_id,
                    sender=_contact(None, data),
                    type="event",
                    payload=payload,
                    timestamp=_time(data.get("updated_at") or data.get("timestamp")),
                    channel=_inbox(data, data),
                )
            ]
        )

    # -- outbound ----------------------------------------------------------------------------

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        url = f"{self._api}/{item.conversation_id}"
        if item.kind == "message":
            assert item.reply is not None
            await self._post(f"{url}/messages", self._message_body(item.reply), "message")
        elif item.kind == "typing":
            if self.supports_typing:
                await self._typing(url, item.typing)
        elif item.kind == "handoff":
            await self._post(f"{url}/toggle_status", {"status": "open"}, "handoff")
            handoff = item.handoff
            team = self.config.teams.get(handoff.queue) if handoff is not None else None
            if team is not None:
                await self._post(f"{url}/assignments", {"team_id": team}, "team assignment")
            if handoff is not None and handoff.reason and self.config.handoff_note:
                note = {"content": f"Handoff: {handoff.reason}", "message_type": "outgoing", "private": True}
                await self._post(f"{url}/messages", note, "handoff note")
        elif item.kind == "release":
            await self._post(f"{url}/toggle_status", {"status": "pending"}, "release")

    def _message_body(self, reply: Reply) -> dict[str, Any]:
        options = reply.buttons + reply.quick_replies
        if not options or self.config.buttons == "text":
            return {"content": reply.plain_text(), "message_type": "outgoing", "private": False}
        # Options render in the web widget, API, WhatsApp Cloud and Telegram inboxes
        # (https://www.chatwoot.com/docs/product/others/interactive-messages); elsewhere use buttons: text.
        rest = Reply(reply.text, attachments=reply.attachments, cards=reply.cards)
        return {
            "content": rest.plain_text(),
            "message_type": "outgoing",
            "private": False,
            "content_type": "input_select",
            "content_attributes": {"items": [{"title": b.title, "value": b.payload} for b in options]},
        }

    async def _typing(self, url: str, on: bool) -> None:
        try:
            await self._post(f"{url}/toggle_typing_status", {"typing_status": "on" if on else "off"}, "typing")
        except DeliveryError as exc:
            if exc.status not in (401, 403):
                raise
            # Chatwoot versions whose bot-token allowlist lacks toggle_typing_status answer 401
            # (app/controllers/concerns/access_token_auth_helper.rb, BOT_ACCESSIBLE_ENDPOINTS).
            self.supports_typing = False
            log.warning("typing turned off: Chatwoot refused toggle_typing_status for the bot token: %s", exc)

    async def _post(self, url: str, body: dict[str, Any], what: str) -> HttpAnswer:
        try:
            return await post_json(self.http, url, body, self._headers)
        except DeliveryError as exc:
            hint = _HINTS.get(exc.status or 0)
            if hint is None:
                raise
            raise DeliveryError(
                f"{what}: {hint}: {exc}", retryable=exc.retryable, status=exc.status, retry_after=exc.retry_after
            ) from exc


_HINTS = {
    401: "Chatwoot refused the bot_token (or this call is not allowed for agent-bot tokens)",
    403: "Chatwoot refused the bot_token for this conversation",
    404: "no such conversation in this account (check account_id)",
}


def _human_owns(status: Any) -> bool:
    """The conversation's status says a human owns it (or is not one the bot answers in)."""
    return status is not None and (not isinstance(status, str) or status not in BOT_STATUSES)


def _ignored(reason: str) -> Parsed:
    return Parsed([], {"accepted": 0, "duplicates": 0, "ignored": reason})


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise Rejected(400, f"{key} is required and must be an object", key)
    return value


def _get(data: dict[str, Any], *keys: str) -> Any:
    value: Any = data
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _id(data: dict[str, Any], key: str, at: str) -> str:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise Rejected(400, f"{at}{key} is required", f"{at}{key}")
    return str(value)


def _contact(sender: Any, conversation: dict[str, Any]) -> Sender:
    """The contact: the message's sender, else the conversation's (`meta.sender`, `contact_inbox.contact_id`)."""
    if not isinstance(sender, dict) or sender.get("id") is None:
        sender = _get(conversation, "meta", "sender")
    if isinstance(sender, dict) and sender.get("id") is not None:
        custom = sender.get("custom_attributes")
        attributes: dict[str, Any] = dict(custom) if isinstance(custom, dict) else {}
        for key in ("email", "phone_number", "identifier"):
            if sender.get(key):
                attributes[key] = sender[key]
        name = sender.get("name")
        return Sender(str(sender["id"]), name if isinstance(name, str) else None, attributes)
    contact_id = _get(conversation, "contact_inbox", "contact_id")
    if contact_id is None:
        raise Rejected(400, "sender.id is required", "sender.id")
    return Sender(str(contact_id))


def _inbox(data: dict[str, Any], conversation: dict[str, Any]) -> str | None:
    inbox = _get(data, "inbox", "id")
    if inbox is None:
        inbox = conversation.get("inbox_id")
    return str(inbox) if isinstance(inbox, int | str) and not isinstance(inbox, bool) else None


def _attachments(raw: Any) -> tuple[tuple[Attachment, ...], dict[str, Any] | None]:
    """Files as attachments; a location as a payload `{latitude, longitude, title}`."""
    if not isinstance(raw, list):
        return (), None
    files: list[Attachment] = []
    location: dict[str, Any] | None = None
    for item in raw:
        if not isinstance(item, dict):
            continue
        kind = item.get("file_type")
        if kind == "location":
            location = {"latitude": item.get("coordinates_lat"), "longitude": item.get("coordinates_long")}
            if item.get("fallback_title"):
                location["title"] = item["fallback_title"]
            continue
        url = item.get("data_url")
        if isinstance(url, str) and url:
            files.append(Attachment(kind if kind in ("image", "audio", "video") else "file", url))
    return tuple(files), location


def _previous_status(data: dict[str, Any]) -> Any:
    changed = data.get("changed_attributes")
    for entry in changed if isinstance(changed, list) else [changed]:
        status = entry.get("status") if isinstance(entry, dict) else None
        if isinstance(status, dict):
            return status.get("previous_value")
    return None


def _time(value: Any) -> datetime | None:
    """Chatwoot sends ISO 8601 ("2021-07-23T18:02:48.000Z"), "2020-03-03 13:05:57 UTC", or unix seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return from_unix(value)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
