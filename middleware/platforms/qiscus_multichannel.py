"""Qiscus Multichannel (Omnichannel): the bot webhook in, `/{app_code}/bot` out, handover to agents."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote, urlencode

import httpx
from pydantic import Field, model_validator

from middleware.model import EVENT_AGENT_RESOLVED, EVENT_CONVERSATION_STARTED, Inbound, Outgoing, Sender
from middleware.platforms.base import (
    DeliveryError,
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    decode_json,
    post_bytes,
    post_json,
)
from middleware.platforms.qiscus import (
    MAX_ID_LENGTH,
    Comment,
    CommentPart,
    SentParts,
    comment_parts,
    ignored,
    parse_comment,
    send_parts,
)


class QiscusMultichannelConfig(PlatformConfig):
    type: str = "qiscus_multichannel"
    #: the App ID (AppCode) on the Bot Integration page
    app_code: str
    #: the Qiscus Secret Key on the Bot Integration page
    secret_key: str
    base_url: str = "https://omnichannel.qiscus.com"
    #: who the bot's replies come from; Qiscus's own clients use "{app_code}_admin@qismo.com"
    bot_email: str | None = None
    #: an admin token (Authorization header) for the handover calls instead of the secret key
    admin_token: str | None = None
    #: a secret the webhook URLs carry as ?token=...; Multichannel signs none of its webhooks
    webhook_token: str | None = None
    #: only these channels (room.options.source: wa, qiscus, fb, ig, line, telegram, custom, ...)
    channels: list[str] | None = None
    #: buttons and cards as Qiscus buttons/card/carousel (the Qiscus widget renders them);
    #: off, as numbered text, which every channel shows
    rich_messages: bool = False
    #: on handoff, after turning the bot off for the room: "allocate_assign" (Qiscus picks and
    #: assigns the least busy agent), "assign" (the agent `agents` names for the handoff's queue),
    #: or "none" (the room waits in Qiscus's own queue)
    allocation: Literal["allocate_assign", "assign", "none"] = "allocate_assign"
    #: queue name -> Qiscus agent id, for `allocation: assign` ("default" catches other queues)
    agents: dict[str, int | str] = Field(default_factory=dict)
    ignore_agent_availability: bool = False

    @model_validator(mode="after")
    def _agents_for_assign(self) -> QiscusMultichannelConfig:
        if self.allocation == "assign" and not self.agents:
            raise ValueError("allocation: assign needs agents (queue name -> Qiscus agent id)")
        return self


class QiscusMultichannelPlatform(Platform):
    """Qiscus Multichannel / Omnichannel Chat bots (WhatsApp, Instagram, Messenger, LINE, the widget...).

    Inbound: the Bot Webhook (customer messages, deduplicated on `unique_temp_id`), and, pointed
    at the same URL, the Mark As Resolved webhook (an `agent.resolved` event) and the New Session
    webhook (a `conversation.started` event). Outbound: `POST {base_url}/{app_code}/bot`.
    Handoff turns the bot off for the room and asks Qiscus for an agent; release turns it back on.
    No typing indicator or read receipt: Multichannel offers neither to bots.
    """

    Config = QiscusMultichannelConfig
    config: QiscusMultichannelConfig
    # The bot API is message posts only (https://documentation.qiscus.com/latest/omnichannel-chat/bot-human-collaboration);
    # the channels' typing and read ticks (WhatsApp's, ...) are not exposed to bots.
    supports_typing = False
    supports_read = False
    supports_handoff = True

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, QiscusMultichannelConfig)
        self.base = config.base_url.rstrip("/")
        admin = f"{config.app_code}_admin@qismo.com"
        self.bot_email = config.bot_email or admin
        self.own_senders = {self.bot_email.lower(), admin.lower()}
        self.parts = SentParts()

    def parse(self, request: WebhookRequest) -> Parsed:
        token = self.config.webhook_token
        if token:
            presented = request.query.get("token")
            if not presented:
                raise Rejected(401, "missing ?token= in the webhook URL")
            if not hmac.compare_digest(presented.encode(), token.encode()):
                raise Rejected(401, "bad webhook token")
        data = decode_json(request)
        if not isinstance(data, dict):
            raise Rejected(400, "body must be a JSON object")
        if isinstance(data.get("service"), dict) and "resolved_by" in data:
            return self._resolved(data)
        if "candidate_agent" in data:
            return ignored("a custom agent allocation webhook; Switchboard takes the bot webhook")
        payload = data.get("payload")
        if not isinstance(payload, dict):
            raise Rejected(400, "payload is required and must be an object", "payload")
        comment = parse_comment(payload, "payload.", request.body, prefer_unique_temp_id=True)
        channel = _channel(comment, data)
        if self.config.channels is not None and channel not in self.config.channels:
            return ignored(f"channel {channel!r} is not in this platform's channels")
        if data.get("webhook_type") == "NEW_SESSION_WEBHOOK":
            return Parsed([self._new_session(comment, channel)])
        if comment.sender.id.lower() in self.own_senders:
            return ignored("the bot's own message")
        return Parsed([comment.inbound(self.name, comment.message_id, channel)])

    def _new_session(self, comment: Comment, channel: str | None) -> Inbound:
        return Inbound(
            platform=self.name,
            message_id=f"session:{comment.message_id}"[:MAX_ID_LENGTH],
            conversation_id=comment.room_id,
            sender=comment.sender,
            type="event",
            payload={"event": EVENT_CONVERSATION_STARTED},
            timestamp=comment.timestamp,
            channel=channel,
        )

    def _resolved(self, data: dict[str, Any]) -> Parsed:
        service: dict[str, Any] = data["service"]
        room_id = service.get("room_id")
        if isinstance(room_id, bool) or not isinstance(room_id, str | int) or str(room_id) in ("", "0"):
            raise Rejected(400, "service.room_id is required", "service.room_id")
        service_id = service.get("id")
        if isinstance(service_id, bool) or not isinstance(service_id, str | int):
            service_id = service.get("last_comment_id", "")
        customer = data.get("customer") if isinstance(data.get("customer"), dict) else {}
        agent = data.get("resolved_by") if isinstance(data.get("resolved_by"), dict) else {}
        assert isinstance(customer, dict) and isinstance(agent, dict)
        user_id = customer.get("user_id")
        sender_id = str(user_id) if isinstance(user_id, str | int) and str(user_id) else f"room:{room_id}"
        name = customer.get("name")
        by = agent.get("email") or agent.get("name")
        notes = service.get("notes")
        event = Inbound(
            platform=self.name,
            message_id=f"resolved:{room_id}:{service_id}"[:MAX_ID_LENGTH],
            conversation_id=str(room_id),
            sender=Sender(sender_id, name if isinstance(name, str) else None),
            type="event",
            payload={
                "event": EVENT_AGENT_RESOLVED,
                "agent": by if isinstance(by, str) else None,
                "notes": notes if isinstance(notes, str) else "",
            },
            channel=service.get("source") if isinstance(service.get("source"), str) else None,
        )
        return Parsed([event])

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        if item.kind == "message":
            assert item.reply is not None
            parts = comment_parts(item.reply, rich=self.config.rich_messages)
            await send_parts(self.parts, idempotency_key, parts, self._post(item.conversation_id))
        elif item.kind == "handoff":
            await self._handoff(item)
        elif item.kind == "release":
            await self._admin(
                "bot on", f"{self.base}/bot/{quote(item.conversation_id, safe='')}/activate", {"is_active": "true"}
            )

    def _post(self, room_id: str) -> Callable[[CommentPart], Awaitable[None]]:
        # https://documentation.qiscus.com/latest/omnichannel-chat/bot-human-collaboration:
        # POST {base}/{AppCode}/bot, header QISCUS_SDK_SECRET; Qiscus-Integration/qiscus-go
        # (multichannel/api.go SendMessageTextByBot) sends Qiscus-App-Id + Qiscus-Secret-Key.
        url = f"{self.base}/{self.config.app_code}/bot"
        headers = {
            "QISCUS_SDK_SECRET": self.config.secret_key,
            "Qiscus-App-Id": self.config.app_code,
            "Qiscus-Secret-Key": self.config.secret_key,
        }

        async def post(part: CommentPart) -> None:
            body: dict[str, Any] = {
                "sender_email": self.bot_email,
                "message": part.message,
                "type": part.type,
                "room_id": room_id,
            }
            if part.payload is not None:
                body["payload"] = part.payload
            if part.type == "file_attachment" and part.payload is not None:
                # Sources disagree on the attachment's place: the custom-channel doc puts it in
                # payload {url, caption}, Qiscus-Integration/n8n-nodes-qiscus (bot sendMessage)
                # sends top-level attachment_url + caption. Both are sent.
                body["attachment_url"] = part.payload["url"]
                body["caption"] = part.payload["caption"]
            await post_json(self.http, url, body, headers)

        return post

    async def _handoff(self, item: Outgoing) -> None:
        room = item.conversation_id
        # A custom bot is not switched off by an agent's assignment; turn it off for the room first
        # (Qiscus-Integration/qiscus-go multichannel/api.go SetToggleBotInRoom: POST /bot/{room_id}/activate).
        await self._admin("bot off", f"{self.base}/bot/{quote(room, safe='')}/activate", {"is_active": "false"})
        allocation = self.config.allocation
        if allocation == "allocate_assign":
            fields = {"room_id": room}
            if self.config.ignore_agent_availability:
                fields["ignore_agent_availability"] = "true"
            await self._admin(
                "allocate_assign_agent", f"{self.base}/api/v1/admin/service/allocate_assign_agent", fields
            )
        elif allocation == "assign":
            queue = item.handoff.queue if item.handoff is not None else "default"
            agent = self.config.agents.get(queue, self.config.agents.get("default"))
            if agent is None:
                raise DeliveryError(
                    f"the bot is off for room {room}, but no agent is configured for queue {queue!r} "
                    "(agents: {queue: agent id}, or a 'default')",
                    retryable=False,
                )
            await self._admin(
                "assign_agent",
                f"{self.base}/api/v1/admin/service/assign_agent",
                {"room_id": room, "agent_id": str(agent)},
            )

    async def _admin(self, step: str, url: str, fields: dict[str, str]) -> None:
        headers = {"content-type": "application/x-www-form-urlencoded", "Qiscus-App-Id": self.config.app_code}
        if self.config.admin_token:
            headers["Authorization"] = self.config.admin_token
        else:
            headers["Qiscus-Secret-Key"] = self.config.secret_key
        try:
            await post_bytes(self.http, url, urlencode(fields).encode(), headers)
        except DeliveryError as exc:
            raise DeliveryError(
                f"{step}: {exc}", retryable=exc.retryable, status=exc.status, retry_after=exc.retry_after
            ) from exc


def _channel(comment: Comment, data: dict[str, Any]) -> str | None:
    for value in (comment.room_options.get("source"), comment.room_options.get("channel")):
        if isinstance(value, str) and value:
            return value
    channel = data.get("channel")
    if isinstance(channel, dict) and isinstance(channel.get("source"), str):
        return str(channel["source"])
    return None
