"""The typed core: the only types that cross module borders.

Platform modules turn their JSON into `Inbound` at the edge and turn `Outgoing` back into their
JSON at the other edge; the flow engine and connectors see nothing else. Every type here is
plain data that round-trips through `to_json` / `from_json`, because it is stored (inbox,
outbox) between the edge and the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

MessageType = Literal["text", "postback", "image", "file", "location", "event"]
MESSAGE_TYPES: tuple[MessageType, ...] = ("text", "postback", "image", "file", "location", "event")


class Owner(StrEnum):
    """Who answers a conversation now."""

    BOT = "bot"
    QUEUED = "queued"
    AGENT = "agent"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Sender:
    id: str
    name: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Attachment:
    type: str
    url: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message (or event) from a user, normalised by its platform module."""

    platform: str
    message_id: str
    conversation_id: str
    sender: Sender
    type: MessageType = "text"
    text: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()
    timestamp: datetime | None = None

    @property
    def conversation_key(self) -> str:
        return conversation_key(self.platform, self.conversation_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "message_id": self.message_id,
            "conversation_id": self.conversation_id,
            "sender": {"id": self.sender.id, "name": self.sender.name, "attributes": self.sender.attributes},
            "type": self.type,
            "text": self.text,
            "payload": self.payload,
            "attachments": [{"type": a.type, "url": a.url, "name": a.name} for a in self.attachments],
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Inbound:
        sender = data["sender"]
        ts = data.get("timestamp")
        return cls(
            platform=data["platform"],
            message_id=data["message_id"],
            conversation_id=data["conversation_id"],
            sender=Sender(sender["id"], sender.get("name"), sender.get("attributes") or {}),
            type=data.get("type", "text"),
            text=data.get("text", ""),
            payload=data.get("payload") or {},
            attachments=tuple(Attachment(a["type"], a["url"], a.get("name")) for a in data.get("attachments", ())),
            timestamp=datetime.fromisoformat(ts) if ts else None,
        )


def conversation_key(platform: str, conversation_id: str) -> str:
    """The store's name for a conversation: unique across platform instances."""
    return f"{platform}:{conversation_id}"


@dataclass(frozen=True, slots=True)
class Button:
    title: str
    payload: str


@dataclass(frozen=True, slots=True)
class Reply:
    """What the bot says: text, optional buttons and attachments."""

    text: str = ""
    buttons: tuple[Button, ...] = ()
    attachments: tuple[Attachment, ...] = ()

    def plain_text(self) -> str:
        """The reply as text alone, for platforms without buttons or attachments."""
        lines = [self.text] if self.text else []
        lines += [f"{i}. {b.title}" for i, b in enumerate(self.buttons, 1)]
        lines += [a.url if not a.name else f"{a.name}: {a.url}" for a in self.attachments]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "buttons": [{"title": b.title, "payload": b.payload} for b in self.buttons],
            "attachments": [{"type": a.type, "url": a.url, "name": a.name} for a in self.attachments],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        return cls(
            text=data.get("text", ""),
            buttons=tuple(Button(b["title"], b["payload"]) for b in data.get("buttons", ())),
            attachments=tuple(Attachment(a["type"], a["url"], a.get("name")) for a in data.get("attachments", ())),
        )


@dataclass(frozen=True, slots=True)
class Handoff:
    """Hand the conversation to a human."""

    queue: str = "default"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SetVariable:
    name: str
    value: Any


Action = Handoff | SetVariable


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One call to a platform's API, as stored in the outbox and handed to the platform module.

    `kind` is "message" (with `reply`), "typing" (with `typing`) or "read" (with `message_id`).
    """

    kind: Literal["message", "typing", "read"]
    conversation_id: str
    reply: Reply | None = None
    reply_to: str | None = None
    typing: bool = False
    message_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "conversation_id": self.conversation_id}
        if self.reply is not None:
            data["reply"] = self.reply.to_json()
        if self.reply_to is not None:
            data["reply_to"] = self.reply_to
        if self.kind == "typing":
            data["typing"] = self.typing
        if self.message_id is not None:
            data["message_id"] = self.message_id
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outgoing:
        reply = data.get("reply")
        return cls(
            kind=data["kind"],
            conversation_id=data["conversation_id"],
            reply=Reply.from_json(reply) if reply is not None else None,
            reply_to=data.get("reply_to"),
            typing=bool(data.get("typing", False)),
            message_id=data.get("message_id"),
        )


@dataclass(slots=True)
class ConversationState:
    """What the flow engine keeps between turns, stored as JSON on the conversation row."""

    flow: str | None = None
    state: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)
    turns: int = 0
    owner: Owner = Owner.BOT

    def to_json(self) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "state": self.state,
            "vars": self.vars,
            "turns": self.turns,
            "owner": self.owner.value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ConversationState:
        if not data:
            return cls()
        return cls(
            flow=data.get("flow"),
            state=data.get("state"),
            vars=dict(data.get("vars") or {}),
            turns=int(data.get("turns", 0)),
            owner=Owner(data.get("owner", "bot")),
        )


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What one turn decided: replies to send, actions taken, and the state to keep."""

    replies: tuple[Reply, ...]
    actions: tuple[Action, ...]
    state: ConversationState
    trace: tuple[str, ...] = ()
