"""Actions of `do:` and `enter:` lists.

To add one: subclass `Action`, set `key`, implement `run` and `from_yaml`, and add the class
to `ACTIONS`. `run` changes the `TurnContext`: replies to send, variables, the next state,
timers; it never talks to a platform.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from connectors.base import ConnectorError, ConnectorTurn, HistoryEntry
from middleware.engine.flow import Action, TurnContext
from middleware.engine.templates import Template, TemplateFailed
from middleware.model import Attachment, Button, Card, Handoff, Owner, Reply, Resolve, SetVariable, Timer, Transition
from middleware.platforms.base import Rejected, loads_json

if TYPE_CHECKING:
    from middleware.engine.loader import Compiler
    from middleware.yamlfile import PathKey

log = logging.getLogger("switchboard.engine")

REPLY_KEYS = ("text", "buttons", "quick_replies", "cards", "image", "file", "attachments")
BUTTON_KEYS = ("title", "payload")
CARD_KEYS = ("title", "text", "image", "buttons")
VAR_NAME = re.compile(r"^(user\.)?[A-Za-z_][A-Za-z0-9_]*$")
TIMER_EXPECT = "expect"
TIMER_STATE = "state-timeout"
TIMER_SCHEDULED = "scheduled"


def _buttons(c: Compiler, raw: Any, path: PathKey) -> tuple[tuple[Template, str], ...]:
    if not isinstance(raw, list):
        c.error(path, "expected a list of buttons: strings or {title, payload}")
        return ()
    out = []
    for i, b in enumerate(raw):
        bpath = (*path, i)
        if isinstance(b, str):
            out.append((c.template(b, bpath), b))
        elif isinstance(b, dict) and "title" in b:
            c.known_keys(b, bpath, BUTTON_KEYS, "button")
            out.append((c.template(b["title"], (*bpath, "title")), str(b.get("payload", b["title"]))))
        else:
            c.error(bpath, "a button is a string or {title, payload}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CardSpec:
    title: Template
    text: Template
    image: Template | None
    buttons: tuple[tuple[Template, str], ...]


@dataclass(frozen=True, slots=True)
class ReplyAction(Action):
    key = "reply"
    text: Template
    buttons: tuple[tuple[Template, str], ...] = ()
    quick_replies: tuple[tuple[Template, str], ...] = ()
    cards: tuple[CardSpec, ...] = ()
    attachments: tuple[tuple[str, Template, str | None], ...] = ()

    async def run(self, ctx: TurnContext) -> None:
        t = ctx.template_context()
        text = self.text.render(t)
        if not (self.buttons or self.quick_replies or self.cards or self.attachments):
            ctx.replies.append(Reply(text=text))  # most replies are text alone
            return
        ctx.replies.append(
            Reply(
                text=text,
                buttons=tuple(Button(title.render(t), p) for title, p in self.buttons),
                quick_replies=tuple(Button(title.render(t), p) for title, p in self.quick_replies),
                cards=tuple(
                    Card(
                        card.title.render(t),
                        card.text.render(t),
                        card.image.render(t) if card.image else None,
                        tuple(Button(title.render(t), p) for title, p in card.buttons),
                    )
                    for card in self.cards
                ),
                attachments=tuple(Attachment(kind, url.render(t), name) for kind, url, name in self.attachments),
            )
        )

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return cls(c.template(value, path))
        if not isinstance(value, dict):
            c.error(path, "reply takes text or {text, buttons, quick_replies, cards, image, file, attachments}")
            return None
        c.known_keys(value, path, REPLY_KEYS, "reply")
        text = c.template(value.get("text", ""), (*path, "text"))
        buttons = _buttons(c, value["buttons"], (*path, "buttons")) if "buttons" in value else ()
        quick = _buttons(c, value["quick_replies"], (*path, "quick_replies")) if "quick_replies" in value else ()
        cards: list[CardSpec] = []
        for i, raw in enumerate(value.get("cards", []) if isinstance(value.get("cards", []), list) else []):
            cpath = (*path, "cards", i)
            if not isinstance(raw, dict) or "title" not in raw:
                c.error(cpath, "a card is {title, text, image, buttons}")
                continue
            c.known_keys(raw, cpath, CARD_KEYS, "card")
            cards.append(
                CardSpec(
                    c.template(raw["title"], (*cpath, "title")),
                    c.template(raw.get("text", ""), (*cpath, "text")),
                    c.template(raw["image"], (*cpath, "image")) if "image" in raw else None,
                    _buttons(c, raw["buttons"], (*cpath, "buttons")) if "buttons" in raw else (),
                )
            )
        attachments: list[tuple[str, Template, str | None]] = []
        for kind in ("image", "file"):
            if kind in value:
                attachments.append((kind, c.template(value[kind], (*path, kind)), None))
        for i, raw in enumerate(value.get("attachments", []) if isinstance(value.get("attachments"), list) else []):
            apath = (*path, "attachments", i)
            if not isinstance(raw, dict) or "url" not in raw:
                c.error(apath, "an attachment is {type, url, name}")
                continue
            attachments.append((str(raw.get("type", "file")), c.template(raw["url"], (*apath, "url")), raw.get("name")))
        return cls(text, buttons, quick, tuple(cards), tuple(attachments))


@dataclass(frozen=True, slots=True)
class SetAction(Action):
    """`set: {order: "{{ message.text }}", user.language: id}`: conversation or user scope."""

    key = "set"
    values: tuple[tuple[str, Template | Any], ...]

    async def run(self, ctx: TurnContext) -> None:
        t = ctx.template_context()
        for name, value in self.values:
            rendered = value.render(t) if isinstance(value, Template) else value
            set_variable(ctx, name, rendered)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, dict) or not value:
            c.error(path, "set takes a mapping of variable -> value")
            return None
        values: list[tuple[str, Any]] = []
        for name, v in value.items():
            if not VAR_NAME.match(name):
                c.error(
                    (*path, name),
                    f"bad variable name {name!r}: letters, digits, _ (user.NAME for user scope)",
                    key=True,
                )
                continue
            c.note_variable(name)  # `user.NAME`: the flow loads and keeps the user's variables
            values.append((name, c.template(v, (*path, name)) if isinstance(v, str) else v))
        return cls(tuple(values))


def set_variable(ctx: TurnContext, name: str, value: Any) -> None:
    if name.startswith("user."):
        user = ctx.state.vars.setdefault("user", {})
        if isinstance(user, dict):
            user[name[5:]] = value
        ctx.actions.append(SetVariable(name, value))
    else:
        ctx.state.vars[name] = value


@dataclass(frozen=True, slots=True)
class ClearAction(Action):
    key = "clear"
    names: tuple[str, ...]

    async def run(self, ctx: TurnContext) -> None:
        for name in self.names:
            if name.startswith("user."):
                user = ctx.state.vars.get("user")
                if isinstance(user, dict):
                    user.pop(name[5:], None)
                ctx.actions.append(SetVariable(name, None))
            else:
                ctx.state.vars.pop(name, None)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        names = c.strings(value, path)
        for i, n in enumerate(names):
            if not VAR_NAME.match(n):
                at = (*path, i) if isinstance(value, list) else path
                c.error(at, f"bad variable name {n!r}: letters, digits, _ (user.NAME for user scope)")
            c.note_variable(n)
        return cls(tuple(names))


@dataclass(frozen=True, slots=True)
class GotoAction(Action):
    key = "goto"
    state: str

    async def run(self, ctx: TurnContext) -> None:
        ctx.goto = self.state

    def targets(self) -> tuple[str, ...]:
        return (self.state,)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, str):
            c.error(path, "goto takes a state name")
            return None
        c.note_goto(value, path)
        return cls(value)


@dataclass(frozen=True, slots=True)
class CallAction(Action):
    """`call: other_flow` or `call: {flow, state}`: run another flow; its `return` comes back here."""

    key = "call"
    flow: str
    state: str | None = None

    async def run(self, ctx: TurnContext) -> None:
        ctx.state.stack.append({"flow": ctx.flow.name, "state": ctx.state.state or ctx.flow.start})
        ctx.switch = (self.flow, self.state or "")

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if isinstance(value, str):
            c.note_flow(value, path)
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("flow"), str):
            c.known_keys(value, path, ("flow", "state"), "call")
            c.note_flow(value["flow"], (*path, "flow"))
            state = value.get("state")
            return cls(value["flow"], str(state) if state else None)
        c.error(path, "call takes a flow name or {flow, state}")
        return None


@dataclass(frozen=True, slots=True)
class ReturnAction(Action):
    key = "return"

    async def run(self, ctx: TurnContext) -> None:
        if not ctx.state.stack:
            ctx.trace.append("return with nothing to return to: stays")
            ctx.stopped = True
            return
        frame = ctx.state.stack.pop()
        ctx.switch = (frame["flow"], frame["state"])

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        return cls()


@dataclass(frozen=True, slots=True)
class HandoffAction(Action):
    """`handoff: tier1` or `handoff: {queue, reason, resume}`: a human takes over; the bot goes quiet
    until the conversation is given back, then resumes at `resume` (a state of this flow)."""

    key = "handoff"
    queue: str
    reason: Template
    resume: str | None = None

    async def run(self, ctx: TurnContext) -> None:
        ctx.handoff.request(ctx, Handoff(self.queue, self.reason.render(ctx.template_context()), self.resume))

    def targets(self) -> tuple[str, ...]:
        return (self.resume,) if self.resume else ()

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if value is None or value is True:
            value = {}
        if isinstance(value, str):
            c.note_queue(value, path)
            return cls(value, Template("flow"))
        if not isinstance(value, dict):
            c.error(path, "handoff takes a queue name or {queue, reason}")
            return None
        c.known_keys(value, path, ("queue", "reason", "resume"), "handoff")
        queue = str(value.get("queue", "default"))
        c.note_queue(queue, (*path, "queue"))
        resume = value.get("resume")
        if resume is not None:
            c.note_goto(str(resume), (*path, "resume"), "handoff resumes at")
        return cls(queue, c.template(value.get("reason", "flow"), (*path, "reason")), str(resume) if resume else None)


@dataclass(frozen=True, slots=True)
class ResolveAction(Action):
    key = "resolve"

    async def run(self, ctx: TurnContext) -> None:
        ctx.actions.append(Resolve("flow"))
        if ctx.state.owner == Owner.BOT:
            ctx.state.owner = Owner.RESOLVED
            ctx.transitions.append(Transition(Owner.BOT, Owner.RESOLVED, "bot", "resolved by the flow"))
        ctx.stopped = True

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        return cls()


@dataclass(frozen=True, slots=True)
class WaitAction(Action):
    """`wait: 1.5s`: pause the turn (typing shows meanwhile where the platform has it)."""

    key = "wait"
    seconds: float

    async def run(self, ctx: TurnContext) -> None:
        await ctx.resources.sleep(self.seconds)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        seconds = c.duration(value, path, maximum=300)
        return cls(seconds) if seconds is not None else None


@dataclass(frozen=True, slots=True)
class ExpectAction(Action):
    """`expect: {timeout: 2m, do: [...]}`: if the user says nothing for that long, run `do`."""

    key = "expect"
    after: float
    ref: str

    async def run(self, ctx: TurnContext) -> None:
        ctx.cancel_timers.append(TIMER_EXPECT)
        ctx.timers.append(Timer(self.after, TIMER_EXPECT, {"flow": ctx.flow.name, "ref": self.ref}))

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, dict) or "timeout" not in value or "do" not in value:
            c.error(path, "expect takes {timeout: DURATION, do: [actions]}")
            return None
        c.known_keys(value, path, ("timeout", "do"), "expect")
        after = c.duration(value["timeout"], (*path, "timeout"))
        ref = c.scheduled(value["do"], (*path, "do"))
        return cls(after, ref) if after is not None else None


@dataclass(frozen=True, slots=True)
class ScheduleAction(Action):
    """`schedule: {after: 1h, do: [...]}`: run actions later, even after a restart."""

    key = "schedule"
    after: float
    ref: str

    async def run(self, ctx: TurnContext) -> None:
        ctx.timers.append(Timer(self.after, TIMER_SCHEDULED, {"flow": ctx.flow.name, "ref": self.ref}))

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, dict) or "after" not in value or "do" not in value:
            c.error(path, "schedule takes {after: DURATION, do: [actions]}")
            return None
        c.known_keys(value, path, ("after", "do"), "schedule")
        after = c.duration(value["after"], (*path, "after"), maximum=90 * 86400)
        ref = c.scheduled(value["do"], (*path, "do"))
        return cls(after, ref) if after is not None else None


@dataclass(frozen=True, slots=True)
class CountAction(Action):
    """`count: asked_order` adds one; `count: {asked_order: 0}` sets it."""

    key = "count"
    changes: tuple[tuple[str, int | None], ...]

    async def run(self, ctx: TurnContext) -> None:
        for name, value in self.changes:
            ctx.state.counters[name] = ctx.state.counters.get(name, 0) + 1 if value is None else value

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if isinstance(value, str):
            return cls(((value, None),))
        if isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            return cls(tuple((str(k), int(v)) for k, v in value.items()))
        c.error(path, "count takes a counter name, or {counter: number} to set it")
        return None


@dataclass(frozen=True, slots=True)
class AskAction(Action):
    """`ask: {connector: rasa, fallback: [gpt, {reply: "..."}, {handoff: tier1}]}`.

    The connector's replies, actions and NLU join the turn. If it fails (timeout, down, bad
    answer), the fallback chain runs in order: a connector name is asked in turn; actions run
    and end the chain. With no fallback, the flow's `on: {connector.failed: [...]}` runs, or
    the service's fallback reply is sent.
    """

    key = "ask"
    connector: str
    fallback: tuple[str | Action, ...] = ()
    options: tuple[tuple[str, Template], ...] = ()

    async def run(self, ctx: TurnContext) -> None:
        chain: list[str | Action] = [self.connector, *self.fallback]
        for i, step in enumerate(chain):
            if isinstance(step, Action):
                ctx.trace.append(f"fallback: {step.key}")
                for action in chain[i:]:
                    if isinstance(action, Action):
                        await action.run(ctx)
                        if ctx.stopped:
                            break
                return
            if await self._ask(ctx, step):
                return
        handler = ctx.flow.on.get("connector.failed")
        if handler is not None:
            ctx.trace.append("connector.failed handler")
            for action in handler:
                await action.run(ctx)
            return
        raise ConnectorError(f"connector {self.connector!r} failed and the flow declares no fallback")

    async def _ask(self, ctx: TurnContext, name: str) -> bool:
        connector = ctx.resources.connectors.get(name)
        if connector is None:
            ctx.trace.append(f"connector {name}: not configured")
            return False
        t = ctx.template_context()
        options = {k: v.render(t) for k, v in self.options}
        history = [HistoryEntry("user" if h[0] == "user" else "bot", h[1]) for h in ctx.state.history]
        turn = ConnectorTurn(
            ctx.message, dict(ctx.state.vars), history, ctx.deadline, ctx.message.conversation_key, options
        )
        started = time.perf_counter()
        try:
            result = await connector.ask(turn)
        except ConnectorError as exc:
            ms = (time.perf_counter() - started) * 1000
            ctx.trace.append(f"connector {name}: {type(exc).__name__} after {ms:.0f} ms: {exc}")
            log.warning(
                "connector failed",
                extra={
                    "connector": name,
                    "platform": ctx.message.platform,
                    "conversation": ctx.message.conversation_key,
                    "flow": ctx.flow.name,
                    "state": ctx.state.state,
                    "kind": exc.kind,
                    "error": str(exc),
                },
            )
            return False
        ms = (time.perf_counter() - started) * 1000
        ctx.trace.append(f"connector {name}: {len(result.replies)} replies in {ms:.0f} ms")
        ctx.replies.extend(result.replies)
        if result.nlu is not None:
            ctx.nlu = result.nlu
        for action in result.actions:
            if isinstance(action, SetVariable):
                set_variable(ctx, action.name, action.value)
            elif isinstance(action, Handoff):
                ctx.handoff.request(ctx, action)
            else:
                ctx.actions.append(action)
        if result.end:
            ctx.actions.append(Resolve(f"connector {name} ended the conversation"))
        return True

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if isinstance(value, str):
            c.note_connector(value, path)
            return cls(value)
        if not isinstance(value, dict) or not isinstance(value.get("connector"), str):
            c.error(path, "ask takes a connector name or {connector, fallback, options}")
            return None
        c.known_keys(value, path, ("connector", "fallback", "options"), "ask")
        c.note_connector(value["connector"], (*path, "connector"))
        fallback: list[str | Action] = []
        raw = value.get("fallback", [])
        if not isinstance(raw, list):
            c.error((*path, "fallback"), "fallback takes a list of connector names and actions")
            raw = []
        for i, step in enumerate(raw):
            spath = (*path, "fallback", i)
            if isinstance(step, str):
                c.note_connector(step, spath)
                fallback.append(step)
            else:
                fallback.extend(c.actions([step], (*path, "fallback"), start=i))
        options = value.get("options", {})
        if not isinstance(options, dict):
            c.error((*path, "options"), "options takes a mapping")
            options = {}
        opts = tuple((str(k), c.template(v, (*path, "options", k))) for k, v in options.items())
        return cls(value["connector"], tuple(fallback), opts)


@dataclass(frozen=True, slots=True)
class HttpAction(Action):
    """`http: {url, method, json, headers, save_as, timeout}`: call an API, keep its JSON in a variable.

    The URL's host must be in the config's `http_allow` list (when the list is set), and so must
    the host of every redirect (at most `MAX_REDIRECTS`; one to another host is not followed). The
    answer is read up to `MAX_ANSWER_BYTES`. On failure the variable is set to `{"error": "..."}`
    and the turn goes on.
    """

    key = "http"
    url: Template
    method: str
    body: Any
    headers: tuple[tuple[str, Template], ...]
    save_as: str | None
    timeout: float

    async def run(self, ctx: TurnContext) -> None:
        t = ctx.template_context()
        raw = self.url.render(t)
        result: Any
        allow = frozenset(h.lower().rstrip(".") for h in ctx.resources.http_allow)
        try:
            url: httpx.URL | None = httpx.URL(raw)  # httpx's own parsing: the host checked is the host called
        except httpx.InvalidURL:
            url = None
        host = url.host if url is not None else ""
        if url is None or url.scheme not in ("http", "https") or not host:
            result = {"error": f"not an http(s) URL: {raw[:80]}"}
        elif allow and host.rstrip(".") not in allow:
            result = {"error": f"host {host!r} is not in the allowed hosts"}
        elif ctx.resources.http is None:
            result = {"error": "no HTTP client"}
        else:
            body = _render_tree(self.body, t)
            headers = {k: v.render(t) for k, v in self.headers}
            remaining = max(0.1, min(self.timeout, ctx.deadline - time.monotonic()))
            try:
                request = ctx.resources.http.build_request(
                    self.method, url, json=body if self.method != "GET" else None, headers=headers, timeout=remaining
                )
                result = await _fetch(ctx.resources.http, request, allow)
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # ValueError: a header with a newline
                result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        ctx.trace.append(
            f"http {self.method} {host}: {'error' if isinstance(result, dict) and 'error' in result else 'ok'}"
        )
        if self.save_as:
            set_variable(ctx, self.save_as, result)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, dict) or "url" not in value:
            c.error(path, "http takes {url, method, json, headers, save_as, timeout}")
            return None
        c.known_keys(value, path, ("url", "method", "json", "headers", "save_as", "timeout"), "http")
        method = str(value.get("method", "GET")).upper()
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            c.error((*path, "method"), f"unknown HTTP method {method!r}")
        headers = value.get("headers", {})
        if not isinstance(headers, dict):
            c.error((*path, "headers"), "headers takes a mapping")
            headers = {}
        save_as = value.get("save_as")
        if save_as is not None and (not isinstance(save_as, str) or not VAR_NAME.match(save_as)):
            c.error((*path, "save_as"), "save_as takes a variable name")
            save_as = None
        if save_as is not None:
            c.note_variable(save_as)
        timeout = c.duration(value.get("timeout", 10), (*path, "timeout"), maximum=60) or 10.0
        return cls(
            c.template(value["url"], (*path, "url")),
            method,
            _compile_tree(c, value.get("json"), (*path, "json")),
            tuple((str(k), c.template(v, (*path, "headers", k))) for k, v in headers.items()),
            save_as,
            timeout,
        )


MAX_REDIRECTS = 3
MAX_ANSWER_BYTES = 1_048_576


async def _fetch(http: httpx.AsyncClient, request: httpx.Request, allow: frozenset[str]) -> Any:
    """Send `request`, following redirects by hand so each target's host is checked against `allow`
    (whatever the client's own `follow_redirects`); the answer's JSON, or its text, or `{"error"}`."""
    for _ in range(MAX_REDIRECTS + 1):
        response = await http.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect and response.next_request is not None:
                target = response.next_request.url.host
                if allow and target.rstrip(".") not in allow:
                    return {"error": f"HTTP {response.status_code} redirect to {target!r}, not in the allowed hosts"}
                request = response.next_request
                continue
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    return {"error": f"answer larger than {MAX_ANSWER_BYTES} bytes"}
                chunks.append(chunk)
        finally:
            await response.aclose()
        raw = b"".join(chunks)
        try:
            data = loads_json(raw)
        except Rejected:
            data = raw.decode("utf-8", "replace")[:2000]
        return data if response.status_code < 400 else {"error": f"HTTP {response.status_code}", "body": data}
    return {"error": f"more than {MAX_REDIRECTS} redirects"}


def _compile_tree(c: Compiler, value: Any, path: PathKey) -> Any:
    if isinstance(value, str):
        return c.template(value, path)
    if isinstance(value, dict):
        return {k: _compile_tree(c, v, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_compile_tree(c, v, (*path, i)) for i, v in enumerate(value)]
    return value


def _render_tree(value: Any, t: dict[str, Any]) -> Any:
    if isinstance(value, Template):
        return value.render(t)
    if isinstance(value, dict):
        return {k: _render_tree(v, t) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_tree(v, t) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class StopAction(Action):
    key = "stop"

    async def run(self, ctx: TurnContext) -> None:
        ctx.stopped = True

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Action | None:
        return cls()


ACTIONS: dict[str, type[Action]] = {
    cls.key: cls
    for cls in (
        ReplyAction,
        SetAction,
        ClearAction,
        GotoAction,
        CallAction,
        ReturnAction,
        HandoffAction,
        ResolveAction,
        WaitAction,
        ExpectAction,
        ScheduleAction,
        CountAction,
        AskAction,
        HttpAction,
        StopAction,
    )
}

__all__ = ["ACTIONS", "TIMER_EXPECT", "TIMER_SCHEDULED", "TIMER_STATE", "TemplateFailed"]
