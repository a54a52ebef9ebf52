"""Deciding a turn: pick the flow, run `always` then the state's routes, follow gotos."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from middleware.engine.flow import Action, Flow, Route, TurnContext
from middleware.engine.templates import TemplateFailed
from middleware.model import ConversationState, Inbound, Reply, TurnResult

log = logging.getLogger("switchboard.engine")

MAX_GOTO_CHAIN = 16


class FlowFailed(Exception):
    """The flow could not finish the turn (a template error, a goto loop); the turn falls back."""


class Engine:
    """Holds the loaded flows and decides turns; `swap` replaces the flows between turns."""

    def __init__(self, flows: Mapping[str, Flow]) -> None:
        self.flows: dict[str, Flow] = dict(flows)

    def swap(self, flows: Mapping[str, Flow]) -> None:
        self.flows = dict(flows)

    def flow_for(self, message: Inbound, state: ConversationState) -> Flow | None:
        if state.flow and state.flow in self.flows and self.flows[state.flow].serves(message):
            return self.flows[state.flow]
        for flow in self.flows.values():
            if flow.serves(message):
                return flow
        return None

    async def decide(self, message: Inbound, state: ConversationState) -> TurnResult:
        """Run one turn of the conversation's flow; raises FlowFailed if the flow breaks."""
        flow = self.flow_for(message, state)
        if flow is None:
            return TurnResult((), (), state, ("no flow serves this conversation",))
        current = state.state if state.flow == flow.name and state.state in flow.states else flow.start
        variables = {**flow.vars, **state.vars} if state.flow == flow.name else dict(flow.vars)
        ctx = TurnContext(message=message, vars=variables, state=current, flow=flow.name, turns=state.turns)
        try:
            await self._turn(flow, ctx)
        except TemplateFailed as exc:
            raise FlowFailed(f"template error in flow {flow.name!r} state {ctx.state!r}: {exc}") from exc
        new_state = ConversationState(
            flow=flow.name, state=ctx.state, vars=ctx.vars, turns=state.turns + 1, owner=state.owner
        )
        return TurnResult(tuple(ctx.replies), (), new_state, tuple(ctx.trace))

    async def _turn(self, flow: Flow, ctx: TurnContext) -> None:
        route = _first_match(flow.always, ctx) or _first_match(flow.states[ctx.state].routes, ctx)
        if route is None:
            ctx.trace.append(f"state {ctx.state}: no route matched")
            return
        ctx.trace.append(f"state {ctx.state}: route at {route.where}")
        await self._run(flow, route.do, ctx)

    async def _run(self, flow: Flow, actions: tuple[Action, ...], ctx: TurnContext) -> None:
        hops = 0
        while True:
            for action in actions:
                await action.run(ctx)
                if ctx.stopped or ctx.goto is not None:
                    break
            if ctx.goto is None or ctx.stopped:
                return
            hops += 1
            if hops > MAX_GOTO_CHAIN:
                raise FlowFailed(f"more than {MAX_GOTO_CHAIN} gotos in one turn (a loop?) in flow {flow.name!r}")
            target, ctx.goto = ctx.goto, None
            ctx.trace.append(f"goto {target}")
            ctx.state = target
            actions = flow.states[target].enter


def _first_match(routes: tuple[Route, ...], ctx: TurnContext) -> Route | None:
    for route in routes:
        if route.when.test(ctx):
            return route
    return None


def fallback_reply(text: str) -> Reply:
    return Reply(text=text)
