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

#: Names of `type: event` messages (in `payload["event"]`) that platforms and timers emit.
EVENT_CONVERSATION_STARTED = "conversation.started"
EVENT_AGENT_ASSIGNED = "agent.assigned"
EVENT_AGENT_RESOLVED = "agent.resolved"
EVENT_AGENT_MESSAGE = "agent.message"


class Owner(StrEnum):
    """Who answers a conversation now."""

    BOT = "bot"
    QUEUED = "queued"
    AGENT = "agent"
    RESOLVED = "resolved"


#: the owners that are people: while one holds a conversation the bot stays silent. (A constant:
#: on Python 3.11 each `Owner.X` read takes EnumType.__getattr__'s slow attribute lookup.)
HUMAN_OWNERS = (Owner.QUEUED, Owner.AGENT)


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
    #: the platform's sub-channel, where it has one (a WhatsApp number, a Qiscus channel)
    channel: str | None = None

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
            "channel": self.channel,
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
            channel=data.get("channel"),
        )


def conversation_key(platform: str, conversation_id: str) -> str:
    """The store's name for a conversation: unique across platform instances."""
    return f"{platform}:{conversation_id}"


@dataclass(frozen=True, slots=True)
class Button:
    title: str
    payload: str


@dataclass(frozen=True, slots=True)
class Card:
    """A card: title, text, an optional image and buttons (several make a carousel)."""

    title: str
    text: str = ""
    image_url: str | None = None
    buttons: tuple[Button, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "text": self.text,
            "image_url": self.image_url,
            "buttons": [{"title": b.title, "payload": b.payload} for b in self.buttons],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Card:
        return cls(
            data["title"],
            data.get("text", ""),
            data.get("image_url"),
            tuple(Button(b["title"], b["payload"]) for b in data.get("buttons", ())),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """What the bot says: text, optional buttons, quick replies, cards and attachments.

    Platforms without a rich form send `plain_text()`, which keeps every option readable.
    """

    text: str = ""
    buttons: tuple[Button, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    quick_replies: tuple[Button, ...] = ()
    cards: tuple[Card, ...] = ()

    def plain_text(self) -> str:
        """The reply as text alone, for platforms without buttons, cards or attachments."""
        if not (self.cards or self.buttons or self.quick_replies or self.attachments):
            return self.text  # text alone (most replies)
        lines = [self.text] if self.text else []
        for card in self.cards:
            lines.append(f"*{card.title}*" + (f"\n{card.text}" if card.text else ""))
            if card.image_url:
                lines.append(card.image_url)
            lines += [f"- {b.title}" for b in card.buttons]
        lines += [f"{i}. {b.title}" for i, b in enumerate(self.buttons + self.quick_replies, 1)]
        lines += [a.url if not a.name else f"{a.name}: {a.url}" for a in self.attachments]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "text": self.text,
            "buttons": [{"title": b.title, "payload": b.payload} for b in self.buttons] if self.buttons else [],
            "attachments": (
                [{"type": a.type, "url": a.url, "name": a.name} for a in self.attachments] if self.attachments else []
            ),
        }
        if self.quick_replies:
            data["quick_replies"] = [{"title": b.title, "payload": b.payload} for b in self.quick_replies]
        if self.cards:
            data["cards"] = [c.to_json() for c in self.cards]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        return cls(
            text=data.get("text", ""),
            buttons=tuple(Button(b["title"], b["payload"]) for b in data.get("buttons", ())),
            attachments=tuple(Attachment(a["type"], a["url"], a.get("name")) for a in data.get("attachments", ())),
            quick_replies=tuple(Button(b["title"], b["payload"]) for b in data.get("quick_replies", ())),
            cards=tuple(Card.from_json(c) for c in data.get("cards", ())),
        )


@dataclass(frozen=True, slots=True)
class Handoff:
    """Hand the conversation to a human."""

    queue: str = "default"
    reason: str = ""
    #: the state the bot resumes at when the human gives the conversation back
    resume: str | None = None


@dataclass(frozen=True, slots=True)
class SetVariable:
    name: str
    value: Any


@dataclass(frozen=True, slots=True)
class Resolve:
    """The conversation is done (an agent resolved it, or the bot ended it)."""

    reason: str = ""


Action = Handoff | SetVariable | Resolve


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One call to a platform's API, as stored in the outbox and handed to the platform module.

    `kind` is "message" (with `reply`), "typing" (with `typing`), "read", "handoff" (with
    `handoff`: turn the bot off and ask the platform's own agent tools for a human) or "release"
    (the bot takes the conversation back). `message_id` names the user's message being answered
    or read (platforms such as WhatsApp tie typing to it).
    """

    kind: Literal["message", "typing", "read", "handoff", "release"]
    conversation_id: str
    reply: Reply | None = None
    reply_to: str | None = None
    typing: bool = False
    message_id: str | None = None
    handoff: Handoff | None = None
    #: where the item goes when not to the conversation's platform ("helpdesk": the handoff webhook)
    to: str | None = None
    #: for the helpdesk: the conversation so far, [[role, text]]
    transcript: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "conversation_id": self.conversation_id}
        if self.to is not None:
            data["to"] = self.to
        if self.transcript:
            data["transcript"] = [list(t) for t in self.transcript]
        if self.reply is not None:
            data["reply"] = self.reply.to_json()
        if self.reply_to is not None:
            data["reply_to"] = self.reply_to
        if self.kind == "typing":
            data["typing"] = self.typing
        if self.message_id is not None:
            data["message_id"] = self.message_id
        if self.handoff is not None:
            data["handoff"] = {
                "queue": self.handoff.queue,
                "reason": self.handoff.reason,
                "resume": self.handoff.resume,
            }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outgoing:
        reply = data.get("reply")
        handoff = data.get("handoff")
        return cls(
            kind=data["kind"],
            conversation_id=data["conversation_id"],
            reply=Reply.from_json(reply) if reply is not None else None,
            reply_to=data.get("reply_to"),
            typing=bool(data.get("typing", False)),
            message_id=data.get("message_id"),
            handoff=Handoff(handoff["queue"], handoff.get("reason", ""), handoff.get("resume")) if handoff else None,
            to=data.get("to"),
            transcript=tuple((str(r), str(t)) for r, t in data.get("transcript", ())),
        )


@dataclass(slots=True)
class ConversationState:
    """What the flow engine keeps between turns, stored as JSON on the conversation row."""

    flow: str | None = None
    state: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)
    turns: int = 0
    owner: Owner = Owner.BOT
    #: consecutive turns the bot did not understand
    misses: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    #: flows called with `call`, to `return` to: [{"flow", "state"}]
    stack: list[dict[str, str]] = field(default_factory=list)
    #: bumped on every state entry; a state timeout fires only if it still matches
    entered: int = 0
    #: recent turns for connectors: [["user" | "bot", text]]
    history: list[list[str]] = field(default_factory=list)
    #: the open handoff: {"queue", "reason", "resume", "since", "history_at", "agent"}; `history_at`
    #: is the history's length at the end of the handoff's turn: what a give-back keeps
    handoff: dict[str, Any] | None = None
    #: `on: conversation.started` has had its moment (a platform's own event, or the first message)
    started: bool = False
    #: names of the timers the turns armed and did not cancel since: a superset of the conversation's
    #: pending timers (one that fired stays here until a turn cancels it), so a turn cancels only
    #: these and skips the store's UPDATE when none is armed; None: not known (a state stored
    #: before this was kept), every cancel goes to the store
    timers: list[str] | None = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "state": self.state,
            "vars": self.vars,
            "turns": self.turns,
            "owner": self.owner._value_,  # = .value, without Enum's Python-level property (every turn)
            "misses": self.misses,
            "counters": self.counters,
            "stack": self.stack,
            "entered": self.entered,
            "history": self.history,
            "handoff": self.handoff,
            "started": self.started,
            "timers": self.timers,
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
            misses=int(data.get("misses", 0)),
            counters=dict(data.get("counters") or {}),
            stack=list(data.get("stack") or []),
            entered=int(data.get("entered", 0)),
            history=[list(h) for h in data.get("history") or []],
            handoff=data.get("handoff"),
            # stored before this key existed: a conversation with turns had its start
            started=bool(data.get("started", int(data.get("turns", 0)) > 0)),
            timers=[str(t) for t in data["timers"]] if isinstance(data.get("timers"), list) else None,
        )

    def copy(self) -> ConversationState:
        """A copy that the turn may change freely (vars and handoff are JSON-like: dicts, lists and
        scalars, copied deeply; the history's entries are shared, as nothing changes one in place)."""
        return ConversationState(
            flow=self.flow,
            state=self.state,
            vars=_copy_json(self.vars),
            turns=self.turns,
            owner=self.owner,
            misses=self.misses,
            counters=dict(self.counters),
            stack=[dict(frame) for frame in self.stack],
            entered=self.entered,
            history=list(self.history),  # its entries are never changed in place: appended, or cut off
            handoff=None if self.handoff is None else _copy_json(self.handoff),
            started=self.started,
            timers=None if self.timers is None else list(self.timers),
        )


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_json(v) if isinstance(v, dict | list) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) if isinstance(v, dict | list) else v for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Timer:
    """Something to happen later in a conversation: it comes back as a `type: event` message."""

    after: float
    name: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of owner, kept with who made it and why (the conversation's audit trail)."""

    before: Owner
    after: Owner
    actor: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What one turn decided: replies to send, actions taken, timers to set, the state to keep."""

    replies: tuple[Reply, ...]
    actions: tuple[Action, ...]
    state: ConversationState
    trace: tuple[str, ...] = ()
    timers: tuple[Timer, ...] = ()
    #: timer names to cancel (a state left cancels its timeout)
    cancel_timers: tuple[str, ...] = ()
    transitions: tuple[Transition, ...] = ()
