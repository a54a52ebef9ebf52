"""Conversation ownership: bot -> queued -> agent -> back to the bot, with rules, queues and timers.

Every change of owner happens inside a turn (the conversation's ordered stream), so events that
race (an agent's reply and a queue timeout, a resolve sent twice) are applied one after the other
and each sees the owner the previous one left: a timeout for a conversation an agent already
took is ignored, and a second resolve finds the bot already in charge and does nothing.

    bot --handoff--> queued --agent.assigned / agent.message--> agent
     ^                 |  \\--queue timeout (then: bot)--------------------+
     |                 +--agent.resolved / agent.released--------------+  |
     +----------------------------- resume at the named state ---------+--+
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from middleware.engine.durations import parse_duration
from middleware.engine.hours import Hours, parse_hours
from middleware.model import HUMAN_OWNERS, Handoff, Owner, Reply, Timer, Transition

if TYPE_CHECKING:
    from middleware.engine.flow import TurnContext

TIMER_QUEUE = "handoff-timeout"
TIMER_REMINDER = "handoff-reminder"
TIMER_AGENT_IDLE = "agent-idle"
TIMER_USER_IDLE = "user-idle"
HANDOFF_TIMERS = (TIMER_QUEUE, TIMER_REMINDER, TIMER_AGENT_IDLE, TIMER_USER_IDLE)

EVENT_AGENT_ASSIGNED = "agent.assigned"
EVENT_AGENT_MESSAGE = "agent.message"
EVENT_AGENT_RESOLVED = "agent.resolved"
EVENT_AGENT_RELEASED = "agent.released"
EVENT_AGENT_NOTE = "agent.note"
EVENT_AGENT_TRANSFER = "agent.transfer"
AGENT_EVENTS = (
    EVENT_AGENT_ASSIGNED,
    EVENT_AGENT_MESSAGE,
    EVENT_AGENT_RESOLVED,
    EVENT_AGENT_RELEASED,
    EVENT_AGENT_NOTE,
    EVENT_AGENT_TRANSFER,
)


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is None:
        raise ValueError(f"expected a duration such as 90s, 10m, 2h; got {value!r}")
    return seconds


def _agent_name(value: Any) -> str:
    """An event's agent: a name, or a platform's {"id", "name"} (Chatwoot's assignee)."""
    if isinstance(value, dict):
        value = value.get("name") or value.get("id")
    return str(value or "agent")


class Outcome(BaseModel):
    """What happens when nobody comes: a message, and then `bot` (the bot takes over again),
    `wait` (stay in the queue) or `message` (leave a message: stay queued, no more timers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reply: str | None = None
    then: Literal["bot", "wait", "message"] = "bot"


class QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    #: business hours: {timezone, mon-fri: "09:00-17:00", holidays: [...]}; none = always open
    hours: dict[str, Any] | None = None
    #: conversations one agent holds at once in this queue
    capacity: int = Field(default=3, ge=1)
    priority: int = 0
    skills: tuple[str, ...] = ()
    #: how long a user waits before `on_timeout`
    timeout: float | None = None
    on_timeout: Outcome = Outcome(reply="Sorry, nobody is free right now. I'm back to help in the meantime.")
    outside_hours: Outcome | None = Outcome(
        reply="Our team is away now; leave a message and we will answer when we are back.", then="message"
    )
    #: remind a waiting user every so often
    remind_every: float | None = None
    reminder: str = "You are still in line; someone will be with you soon."
    #: what the user is told when the handoff starts (besides the flow's own reply)
    joined: str | None = None

    _timeout = field_validator("timeout", "remind_every", mode="before")(lambda v: _duration(v))

    def calendar(self, name: str) -> Hours | None:
        if self.hours is None:
            return None
        hours, _ = parse_hours(name, self.hours)
        return hours

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _, problems = parse_hours("queue", v)
            if problems:
                raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        return v


class HandoffSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: where humans answer: the built-in inbox, the platform's own agent tools, a helpdesk webhook;
    #: `auto` = the platform's tools where it has them, else the inbox
    target: Literal["auto", "inbox", "platform", "webhook"] = "auto"
    webhook_url: str | None = None
    webhook_secret: str | None = None
    queues: dict[str, QueueSettings] = Field(default_factory=lambda: {"default": QueueSettings()})
    #: the state the bot resumes at when a human gives the conversation back (a handoff's own
    #: `resume:` wins); none = the state it was in
    resume_state: str | None = None
    #: resolve a conversation an agent holds after this long without an agent message
    agent_idle: float | None = None
    #: resolve a handed-off conversation after this long without a user message
    user_idle: float | None = None

    _idle = field_validator("agent_idle", "user_idle", mode="before")(lambda v: _duration(v))


class HandoffMachine:
    """The ownership transitions, applied to a turn's context by the flow engine."""

    def __init__(self, settings: HandoffSettings | None = None) -> None:
        self.settings = settings or HandoffSettings()
        self.calendars = {name: q.calendar(name) for name, q in self.settings.queues.items()}

    def queue(self, name: str) -> QueueSettings:
        return self.settings.queues.get(name) or QueueSettings()

    def _move(self, ctx: TurnContext, after: Owner, actor: str, reason: str) -> None:
        before = ctx.state.owner
        if before == after:
            return
        ctx.state.owner = after
        ctx.transitions.append(Transition(before, after, actor, reason))

    def request(self, ctx: TurnContext, handoff: Handoff) -> None:
        """The flow, a connector or a rule asks for a human."""
        if ctx.state.owner in HUMAN_OWNERS:
            ctx.trace.append(f"handoff: already {ctx.state.owner.value}")
            return
        queue = self.queue(handoff.queue)
        calendar = self.calendars.get(handoff.queue)
        now: datetime = ctx.now
        self._move(ctx, Owner.QUEUED, "bot", handoff.reason or "handoff")
        ctx.state.handoff = {
            "queue": handoff.queue,
            "reason": handoff.reason,
            "resume": handoff.resume or self.settings.resume_state,
            "since": now.timestamp(),
            # the history's length at the end of this turn (set by the engine then): what give-back keeps
            "history_at": None,
            "agent": None,
        }
        ctx.actions.append(handoff)
        ctx.stopped = True
        if calendar is not None and not calendar.open_at(now) and queue.outside_hours is not None:
            ctx.trace.append(f"handoff to {handoff.queue}: outside its hours")
            self._outcome(ctx, queue.outside_hours, "outside hours")
            return
        ctx.trace.append(f"handoff to {handoff.queue}: queued")
        if queue.joined:
            ctx.replies.append(Reply(queue.joined))
        if queue.timeout is not None:
            ctx.timers.append(Timer(queue.timeout, TIMER_QUEUE, {"queue": handoff.queue}))
        if queue.remind_every is not None:
            ctx.timers.append(Timer(queue.remind_every, TIMER_REMINDER, {"queue": handoff.queue}))
        if self.settings.user_idle is not None:
            ctx.timers.append(Timer(self.settings.user_idle, TIMER_USER_IDLE, {}))

    def _outcome(self, ctx: TurnContext, outcome: Outcome, why: str) -> None:
        if outcome.reply:
            ctx.replies.append(Reply(outcome.reply))
        ctx.cancel_timers.extend((TIMER_QUEUE, TIMER_REMINDER))
        if outcome.then == "bot":
            self.give_back(ctx, "system", why, resume=False)
        elif outcome.then == "wait":
            queue = (ctx.state.handoff or {}).get("queue", "default")
            settings = self.queue(queue)
            if settings.timeout is not None:
                ctx.timers.append(Timer(settings.timeout, TIMER_QUEUE, {"queue": queue}))

    def event(self, ctx: TurnContext, event: str, payload: dict[str, Any]) -> bool:
        """Apply an agent-side event; True if it was one (handled, or ignored as stale)."""
        agent = _agent_name(payload.get("agent"))
        owner = ctx.state.owner
        if event == EVENT_AGENT_ASSIGNED:
            if owner in HUMAN_OWNERS:
                self._assign(ctx, agent)
            else:
                ctx.trace.append("agent.assigned for a conversation the bot owns: ignored")
            return True
        if event == EVENT_AGENT_MESSAGE:
            text = str(payload.get("text", ""))
            if owner == Owner.QUEUED:
                self._assign(ctx, agent)
            if text:
                ctx.replies.append(Reply(text))
                ctx.speaker = "agent"  # in the history as the agent's, not the bot's
            if ctx.state.owner == Owner.AGENT and self.settings.agent_idle is not None:
                ctx.cancel_timers.append(TIMER_AGENT_IDLE)
                ctx.timers.append(Timer(self.settings.agent_idle, TIMER_AGENT_IDLE, {}))
            return True
        if event in (EVENT_AGENT_RESOLVED, EVENT_AGENT_RELEASED):
            if owner in HUMAN_OWNERS:
                reason = "resolved" if event == EVENT_AGENT_RESOLVED else "released"
                self.give_back(ctx, agent, str(payload.get("reason") or reason))
            else:
                ctx.trace.append(f"{event} while the bot owns the conversation: ignored (already resumed)")
                ctx.stopped = True
            return True
        if event == EVENT_AGENT_TRANSFER:
            if owner in HUMAN_OWNERS and ctx.state.handoff is not None:
                queue = str(payload.get("queue") or ctx.state.handoff["queue"])
                ctx.state.handoff["queue"] = queue
                ctx.state.handoff["agent"] = payload.get("to_agent")
                self._move(ctx, Owner.QUEUED, agent, f"transferred to {queue}")
                ctx.trace.append(f"transferred to {queue}")
            return True
        if event == EVENT_AGENT_NOTE:
            ctx.trace.append("internal note")
            return True
        return False

    def _assign(self, ctx: TurnContext, agent: str) -> None:
        if ctx.state.handoff is not None:
            ctx.state.handoff["agent"] = agent
        self._move(ctx, Owner.AGENT, agent, "claimed")
        ctx.cancel_timers.extend((TIMER_QUEUE, TIMER_REMINDER))
        if self.settings.agent_idle is not None:
            ctx.timers.append(Timer(self.settings.agent_idle, TIMER_AGENT_IDLE, {}))

    def give_back(self, ctx: TurnContext, actor: str, reason: str, *, resume: bool = True) -> None:
        """The bot owns the conversation again; after a human had it, it resumes at the handoff's
        resume state (after a queue timeout nobody helped, so it carries on where it was).

        The history keeps the conversation up to and including the handoff's turn (the user's
        request, the bot's "Connecting you..."); what came after (the user's messages to the people,
        the agent's talk) is not the bot's context and is dropped."""
        handoff = ctx.state.handoff or {}
        kept = handoff.get("history_at")
        if kept is not None:
            del ctx.state.history[max(0, int(kept)) :]
        ctx.state.handoff = None
        self._move(ctx, Owner.BOT, actor, reason)
        ctx.cancel_timers.extend(HANDOFF_TIMERS)
        target = handoff.get("resume") if resume else None
        if target and target in ctx.flow.states:
            ctx.goto = target
            ctx.trace.append(f"the bot resumes at {target}")
        else:
            ctx.trace.append("the bot resumes")

    def timer(self, ctx: TurnContext, name: str) -> bool:
        """A handoff timer fired; True if it was one of ours."""
        owner = ctx.state.owner
        queue_name = (ctx.state.handoff or {}).get("queue", "default")
        queue = self.queue(queue_name)
        if name == TIMER_QUEUE:
            if owner == Owner.QUEUED:
                ctx.trace.append(f"queue {queue_name}: nobody came in time")
                self._outcome(ctx, queue.on_timeout, "queue timeout")
            else:
                ctx.trace.append("queue timeout after an agent took it: ignored")
            return True
        if name == TIMER_REMINDER:
            if owner == Owner.QUEUED and queue.remind_every is not None:
                ctx.replies.append(Reply(queue.reminder))
                ctx.timers.append(Timer(queue.remind_every, TIMER_REMINDER, {"queue": queue_name}))
            return True
        if name in (TIMER_AGENT_IDLE, TIMER_USER_IDLE):
            if owner in HUMAN_OWNERS:
                who = "agent" if name == TIMER_AGENT_IDLE else "user"
                self.give_back(ctx, "system", f"auto-resolved: {who} inactive")
            return True
        return False

    def user_message(self, ctx: TurnContext) -> None:
        """A user wrote while a human owns the conversation: it goes to them; the bot stays silent
        (the engine records the message in the history, as every user message)."""
        if self.settings.user_idle is not None:
            ctx.cancel_timers.append(TIMER_USER_IDLE)
            ctx.timers.append(Timer(self.settings.user_idle, TIMER_USER_IDLE, {}))
