"""Deciding a turn: pick the flow, handle events and timers, route, follow gotos and calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime

from connectors.base import ConnectorError
from middleware.engine.actions import TIMER_EXPECT, TIMER_SCHEDULED, TIMER_STATE
from middleware.engine.flow import Action, Flow, Resources, Route, TurnContext
from middleware.engine.templates import TemplateFailed
from middleware.model import (
    EVENT_CONVERSATION_STARTED,
    HUMAN_OWNERS,
    ConversationState,
    Inbound,
    Owner,
    Timer,
    Transition,
    TurnResult,
)

log = logging.getLogger("switchboard.engine")

MAX_HOPS = 16
HISTORY_TURNS = 20
EVENT_TIMER = "timer"


class FlowFailed(Exception):
    """The flow could not finish the turn (a template error, a goto loop, connectors down with
    no fallback); the turn sends the fallback reply."""


class Engine:
    """Holds the loaded flows and decides turns; `swap` replaces the flows between turns."""

    def __init__(self, flows: Mapping[str, Flow], resources: Resources | None = None) -> None:
        self.flows: dict[str, Flow] = dict(flows)
        self.resources = resources or Resources()
        if self.resources.handoff is None:
            from middleware.handoff import HandoffMachine

            self.resources.handoff = HandoffMachine()

    def swap(self, flows: Mapping[str, Flow]) -> None:
        self.flows = dict(flows)

    def flow_for(self, message: Inbound, state: ConversationState) -> Flow | None:
        if state.flow and state.flow in self.flows:
            return self.flows[state.flow]
        for flow in self.flows.values():
            if flow.serves(message):
                return flow
        return None

    def uses_user_scope(self, message: Inbound, state: ConversationState) -> bool:
        flow = self.flow_for(message, state)
        return flow is not None and flow.user_scope

    def coalesce_window(self, message: Inbound, state: ConversationState) -> tuple[float, bool]:
        """(seconds to gather a burst of messages into one turn, whether a newer one cancels a turn)."""
        flow = self.flow_for(message, state)
        if flow is None or flow.coalesce is None:
            return 0.0, False
        return flow.coalesce.window, flow.coalesce.cancel_inflight

    async def decide(
        self, message: Inbound, state: ConversationState, deadline: float | None = None, now: datetime | None = None
    ) -> TurnResult:
        """Run one turn; raises FlowFailed if the flow breaks (the caller sends the fallback reply).

        `now` fixes the clock (business hours, templates) for conversation tests.
        """
        flow = self.flow_for(message, state)
        if flow is None:
            return TurnResult((), (), state, ("no flow serves this conversation",))
        new = state.copy()
        if new.flow != flow.name or new.state not in flow.states:
            new.flow, new.state = flow.name, flow.start
            new.vars = {**flow.vars, **new.vars}
        ctx = TurnContext(
            message=message,
            state=new,
            flow=flow,
            resources=self.resources,
            deadline=deadline if deadline is not None else time.monotonic() + 30,
            now=now,
            first=state.turns == 0,
        )
        try:
            await self._turn(ctx)
        except TemplateFailed as exc:
            raise FlowFailed(f"template error in flow {ctx.flow.name!r} state {new.state!r}: {exc}") from exc
        except ConnectorError as exc:
            raise FlowFailed(str(exc)) from exc
        if message.type != "event":
            new.turns += 1
            _remember(new, "user", message.text)
        for reply in ctx.replies:
            _remember(new, ctx.speaker, reply.plain_text())
        if new.handoff is not None and new.handoff.get("history_at") is None:
            # handed off in this turn: a give-back keeps the history up to here (the request, "Connecting...")
            new.handoff["history_at"] = len(new.history)
        return TurnResult(
            tuple(ctx.replies),
            tuple(ctx.actions),
            new,
            tuple(ctx.trace),
            tuple(ctx.timers),
            _cancels(new, ctx.cancel_timers, ctx.timers),
            tuple(ctx.transitions),
        )

    async def _turn(self, ctx: TurnContext) -> None:
        message, flow, state = ctx.message, ctx.flow, ctx.state
        entered_before = state.entered
        if message.type == "event":
            event = str(message.payload.get("event", ""))
            if event == EVENT_TIMER:
                if not ctx.handoff.timer(ctx, str(message.payload.get("name"))):
                    if state.owner in HUMAN_OWNERS:
                        # a state timeout or `expect` armed before the handoff: the bot stays silent
                        ctx.trace.append(f"{message.payload.get('name')} timer while a human owns it: ignored")
                    else:
                        await self._timer(ctx)
                else:
                    from middleware.handoff import TIMER_QUEUE

                    # nobody came in the queue's time and the bot has it back: the flow's `on: handoff.timeout`
                    queue_timeout = message.payload.get("name") == TIMER_QUEUE
                    await self._after_give_back(ctx, "handoff.timeout" if queue_timeout else None)
                return
            before = state.owner
            if ctx.handoff.event(ctx, event, message.payload):
                if before != Owner.BOT and state.owner == Owner.BOT:
                    await self._after_give_back(ctx, "agent.resolved")
                elif before == Owner.QUEUED and state.owner == Owner.AGENT and "agent.assigned" in flow.on:
                    await self._run(flow.on["agent.assigned"], ctx)
                return
            if state.owner in HUMAN_OWNERS:
                # a person has it: the bot stays silent; no `on:` handler, no routes (docs/handoff.md)
                ctx.trace.append(f"event {event} while a human owns it: ignored, the bot stays silent")
                return
            if event == EVENT_CONVERSATION_STARTED:
                if state.started:
                    ctx.trace.append("conversation.started: the conversation has started already, ignored")
                    return
                state.started = True  # the platform's own start: the first message does not run it again
            handler = flow.on.get(event)
            if handler is not None:
                ctx.trace.append(f"on {event}")
                await self._run(handler, ctx)
                return
        elif state.owner in HUMAN_OWNERS:
            ctx.trace.append(f"owner is {state.owner.value}: the bot stays silent, the message goes to the human")
            ctx.handoff.user_message(ctx)
            return
        elif state.owner == Owner.RESOLVED:
            ctx.transitions.append(Transition(Owner.RESOLVED, Owner.BOT, "user", "wrote again"))
            state.owner = Owner.BOT
            state.state = flow.start
        if message.type != "event":
            ctx.cancel_timers.append(TIMER_EXPECT)
        started = message.type != "event" and not state.started
        if started:
            state.started = True
        if started and EVENT_CONVERSATION_STARTED in flow.on:
            ctx.trace.append("on conversation.started")
            await self._run(flow.on[EVENT_CONVERSATION_STARTED], ctx)
            if ctx.stopped:
                return
        if flow.nlu and message.type == "text":
            await self._nlu(ctx, flow.nlu)
        route = _first_match(flow.always, ctx) or _first_match(ctx.flow.states[state.state or flow.start].routes, ctx)
        if route is None:
            ctx.trace.append(f"state {state.state}: no route matched")
            ctx.missed = True
        else:
            ctx.trace.append(f"state {state.state}: route at {route.where}")
            ctx.missed = route.miss
            await self._run(route.do, ctx)
        if message.type != "event":
            await self._count_miss(ctx)
        if state.entered == entered_before and message.type != "event":
            self._arm_state_timeout(ctx)

    async def _after_give_back(self, ctx: TurnContext, event: str | None) -> None:
        """After a human gave the conversation back: the flow's handler, then the resume state."""
        resume, ctx.goto = ctx.goto, None
        ctx.stopped = False
        before = ctx.state.entered
        handler = ctx.flow.on.get(event) if event else None
        if handler is not None and ctx.state.owner == Owner.BOT and ctx.transitions:
            ctx.trace.append(f"on {event}")
            await self._run(handler, ctx)
        if resume is not None and ctx.state.entered == before and not ctx.stopped:
            ctx.goto = resume
            await self._run((), ctx)

    async def _count_miss(self, ctx: TurnContext) -> None:
        state, fallback = ctx.state, ctx.flow.fallback
        state.misses = state.misses + 1 if ctx.missed else 0
        if fallback is not None and state.misses >= fallback.after:
            ctx.trace.append(f"fallback after {state.misses} turns not understood")
            state.misses = 0
            ctx.stopped = False
            await self._run(fallback.do, ctx)

    async def _nlu(self, ctx: TurnContext, name: str) -> None:
        from connectors.base import ConnectorTurn, HistoryEntry

        connector = self.resources.connectors.get(name)
        if connector is None:
            ctx.trace.append(f"nlu {name}: not configured")
            return
        history = [HistoryEntry("user" if h[0] == "user" else "bot", h[1]) for h in ctx.state.history]
        turn = ConnectorTurn(ctx.message, dict(ctx.state.vars), history, ctx.deadline, ctx.message.conversation_key)
        try:
            ctx.nlu = await connector.parse(turn)
            ctx.trace.append(f"nlu {name}: {ctx.nlu.intent} ({ctx.nlu.confidence:.2f})")
        except ConnectorError as exc:
            ctx.trace.append(f"nlu {name}: {type(exc).__name__}: {exc}")

    async def _timer(self, ctx: TurnContext) -> None:
        p = ctx.message.payload
        name = p.get("name")
        state = ctx.state
        if name == TIMER_STATE:
            if p.get("state") != state.state or p.get("entered") != state.entered or p.get("flow") != ctx.flow.name:
                ctx.trace.append("state timeout for a state already left: ignored")
                return
            current = ctx.flow.states.get(state.state or "")
            if current is None or current.timeout is None:
                return
            ctx.trace.append(f"state {state.state}: timeout")
            await self._run(current.timeout.do, ctx)
            return
        if name in (TIMER_EXPECT, TIMER_SCHEDULED):
            flow = self.flows.get(str(p.get("flow")))
            actions = flow.scheduled.get(str(p.get("ref"))) if flow is not None else None
            if flow is None or actions is None or flow.name != ctx.flow.name:
                ctx.trace.append(f"{name} timer for actions no longer in the flow: ignored")
                return
            ctx.trace.append(f"{name} timer fired")
            await self._run(actions, ctx)
            return
        ctx.trace.append(f"unknown timer {name!r}: ignored")

    async def _run(self, actions: tuple[Action, ...], ctx: TurnContext) -> None:
        hops = 0
        while True:
            for action in actions:
                await action.run(ctx)
                if ctx.stopped or ctx.goto is not None or ctx.switch is not None:
                    break
            if ctx.switch is not None:
                hops += 1
                self._check_hops(hops, ctx)
                flow_name, state_name = ctx.switch
                ctx.switch = None
                flow = self.flows.get(flow_name)
                if flow is None:
                    raise FlowFailed(f"call to flow {flow_name!r}, which is not loaded")
                ctx.flow = flow
                ctx.state.flow = flow.name
                target = state_name if state_name in flow.states else flow.start
                ctx.trace.append(f"switch to flow {flow.name} state {target}")
                actions = self._enter(ctx, target)
                ctx.stopped = False
                continue
            if ctx.goto is None or ctx.stopped:
                return
            hops += 1
            self._check_hops(hops, ctx)
            target, ctx.goto = ctx.goto, None
            ctx.trace.append(f"goto {target}")
            actions = self._enter(ctx, target)

    def _check_hops(self, hops: int, ctx: TurnContext) -> None:
        if hops > MAX_HOPS:
            raise FlowFailed(f"more than {MAX_HOPS} gotos in one turn (a loop?) in flow {ctx.flow.name!r}")

    def _enter(self, ctx: TurnContext, target: str) -> tuple[Action, ...]:
        state = ctx.state
        state.state = target
        state.entered += 1
        self._arm_state_timeout(ctx)
        return ctx.flow.states[target].enter

    def _arm_state_timeout(self, ctx: TurnContext) -> None:
        state = ctx.state
        ctx.cancel_timers.append(TIMER_STATE)
        ctx.timers[:] = [t for t in ctx.timers if t.name != TIMER_STATE]
        current = ctx.flow.states.get(state.state or "")
        if current is not None and current.timeout is not None:
            payload = {"flow": ctx.flow.name, "state": current.name, "entered": state.entered}
            ctx.timers.append(Timer(current.timeout.after, TIMER_STATE, payload))


def _first_match(routes: tuple[Route, ...], ctx: TurnContext) -> Route | None:
    for route in routes:
        if route.when is None or route.when.test(ctx):
            return route
    return None


def _cancels(state: ConversationState, cancelled: list[str], armed: list[Timer]) -> tuple[str, ...]:
    """The timers the turn cancels that may be pending (all when not known); records in `state`
    what stays armed: the names it had, less those cancelled, plus those armed now."""
    if state.timers is not None and not state.timers and not armed:
        return ()  # none pending, none armed (most turns)
    names = tuple(dict.fromkeys(cancelled))
    if state.timers is None:
        return names
    names = tuple(n for n in names if n in state.timers)
    state.timers = sorted({n for n in state.timers if n not in names} | {t.name for t in armed})
    return names


def _remember(state: ConversationState, role: str, text: str) -> None:
    if not text:
        return
    state.history.append([role, text[:2000]])
    extra = len(state.history) - HISTORY_TURNS * 2
    if extra > 0:
        del state.history[:extra]
        kept = (state.handoff or {}).get("history_at")
        if kept is not None and state.handoff is not None:  # the handoff's mark moves with the entries
            state.handoff["history_at"] = max(0, int(kept) - extra)
