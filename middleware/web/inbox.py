"""The built-in agent inbox at `/inbox`: sign in, see the queues, claim, talk, note, transfer, give back.

- **Accounts** live in the store (`switchboard agent add NAME`), passwords hashed with argon2id.
- **Sessions** are kept server-side in the store: the cookie holds a random token (HttpOnly,
  SameSite=Lax, Secure under HTTPS), the store only its SHA-256, the agent, a CSRF token and the
  expiry, which slides with use (`inbox.session_minutes`). Signing out or removing the account
  ends it at once, and any node of a cluster reads the same sessions.
- **CSRF**: every form carries a token. Signed in, it is the session's own (compared in constant
  time); the sign-in form's is an HMAC of a random cookie under `inbox.secret` (double submit).
- **Agent actions** become agent-side events (`middleware.agents.submit_agent_event`) applied in
  the conversation's order by the handoff state machine, exactly as the admin API's: a reply goes
  out through the outbox like any reply.
- **Live updates**: `GET /inbox/events` streams the hub's inbox topic (and one conversation's)
  as server-sent events; the page then reloads the part that changed, rendered here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from middleware.agents import (
    MAX_TEXT,
    can_take,
    queue_priority,
    queue_skills,
    queue_summary,
    submit_agent_event,
    verify_agent,
)
from middleware.handoff import (
    EVENT_AGENT_ASSIGNED,
    EVENT_AGENT_MESSAGE,
    EVENT_AGENT_NOTE,
    EVENT_AGENT_RELEASED,
    EVENT_AGENT_RESOLVED,
    EVENT_AGENT_TRANSFER,
)
from middleware.hub import INBOX_TOPIC, conversation_topic
from middleware.services import Services
from middleware.settings import InboxSettings
from middleware.web.sse import event_stream
from middleware.web.ui import page

log = logging.getLogger("switchboard.inbox")

SESSION_COOKIE = "sb_inbox"
LOGIN_COOKIE = "sb_inbox_login"
#: how long a sign-in form stays valid
LOGIN_FORM_SECONDS = 2 * 3600
#: the window in which failed sign-ins are counted, and how long sign-in pauses after too many
THROTTLE_SECONDS = 15 * 60
MAX_FORM_BYTES = 64 * 1024
#: a session's expiry is written back at most this often (not on every request)
TOUCH_EVERY = 30.0

ACTIONS = {
    "claim": EVENT_AGENT_ASSIGNED,
    "reply": EVENT_AGENT_MESSAGE,
    "note": EVENT_AGENT_NOTE,
    "transfer": EVENT_AGENT_TRANSFER,
    "resolve": EVENT_AGENT_RESOLVED,
    "release": EVENT_AGENT_RELEASED,
}
ACTION_OF = {event: action for action, event in ACTIONS.items()}
NOTICES = {
    "claim": "You took the conversation.",
    "reply": "Sent.",
    "note": "Note added (only agents see it).",
    "transfer": "Transferred.",
    "resolve": "Resolved: the bot takes over again.",
    "release": "Released: the bot takes over again.",
}
ERRORS = {
    "bot": "The bot owns this conversation now; there is nothing to do for an agent.",
    "taken": "Another agent has this conversation. Take it over first.",
    "capacity": "You already hold as many conversations of this queue as it allows.",
    "skills": "This conversation's queue asks for skills you do not have; an agent who has one of them takes it.",
    "text": f"Write something (at most {MAX_TEXT} characters).",
    "queue": "Pick a queue to transfer to.",
    "action": "Unknown action.",
    "missing": "No such conversation.",
}


class FormError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form (the only kind these pages send), bounded in size; last value wins."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError(415, "send the form urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(413, "form too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(400, "malformed form") from exc
    return dict(pairs)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    agent: str
    csrf: str
    token_hash: str


class LoginThrottle:
    """Failed sign-ins per name (`name:...` keys) and per client address (`addr:...`, four times as
    many: several agents may sign in through one proxy); past the limit, sign-in pauses for them."""

    def __init__(self, limit: int, window: float = THROTTLE_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    def limit_of(self, key: str) -> int:
        return self.limit * 4 if key.startswith("addr:") else self.limit

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self.failures[key]
        while times and times[0] < now - self.window:
            times.popleft()
        return times

    def wait(self, keys: list[str]) -> float:
        """Seconds until these may try again (0: now)."""
        now = time.time()
        waits = [
            times[0] + self.window - now for key in keys if len(times := self._recent(key, now)) >= self.limit_of(key)
        ]
        return max(waits, default=0.0)

    def failed(self, keys: list[str]) -> None:
        now = time.time()
        if len(self.failures) > 10_000:  # forget the quiet ones
            for key in [k for k, v in self.failures.items() if not v or v[-1] < now - self.window]:
                del self.failures[key]
        for key in keys:
            self._recent(key, now).append(now)

    def succeeded(self, name_key: str) -> None:
        self.failures.pop(name_key, None)


@dataclass
class Entry:
    """One line of a transcript as the inbox shows it."""

    kind: str  # user | bot | agent | note | system
    text: str
    at: float | None
    who: str = ""
    status: str = ""
    buttons: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    error: str = ""


def _delivery(row: dict[str, Any] | None, inbox_status: str = "done") -> tuple[str, str]:
    if inbox_status == "pending":
        return "sending", ""
    if row is None:
        return "", ""
    status = {"pending": "sending", "sent": "sent", "dead": "not delivered"}.get(str(row.get("status")), "")
    if status == "sending" and row.get("attempts"):
        status = "retrying"
    return status, str(row.get("error") or "") if status in ("not delivered", "retrying") else ""


def _links(attachments: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(a.get("name") or a.get("type") or "file"), str(a.get("url", ""))) for a in attachments)


def _reply_entry(row: dict[str, Any]) -> Entry:
    reply = row.get("reply") or {}
    status, error = _delivery(row)
    buttons = tuple(str(b.get("title", "")) for b in [*reply.get("buttons", ()), *reply.get("quick_replies", ())])
    links = _links(reply.get("attachments", ()))
    text = str(reply.get("text", ""))
    for card in reply.get("cards", ()):
        text += ("\n" if text else "") + f"{card.get('title', '')}: {card.get('text', '')}".strip()
    return Entry("bot", text, row.get("created_at"), "bot", status, buttons, links, error)


def _change_text(change: dict[str, Any]) -> str:
    before, after = change.get("before"), change.get("after")
    actor, reason = str(change.get("actor") or ""), str(change.get("reason") or "")
    if after == "queued" and before == "bot":
        return f"Handed off to a person ({reason or 'handoff'}); waiting in line."
    if after == "queued":
        return f"{actor}: {reason or 'back in line'}."
    if after == "agent":
        return f"{actor} took the conversation."
    if after == "bot" and before == "resolved":
        return "The user wrote again; the bot answers."
    if after == "bot":
        who = "" if actor in ("system", "bot") else f" by {actor}"
        return f"Back to the bot ({reason}{who})."
    if after == "resolved":
        return f"Resolved ({reason})."
    return f"{before} → {after} by {actor} ({reason})."


def _system(change: dict[str, Any]) -> Entry:
    return Entry("system", _change_text(change), change.get("at"), str(change.get("actor") or ""))


def _message_entry(m: dict[str, Any], replies: dict[str | None, list[dict[str, Any]]]) -> Entry | None:
    sender = m.get("sender") or {}
    who = str(sender.get("name") or sender.get("id") or "user")
    at = m.get("received_at")
    mtype = m.get("type")
    payload = m.get("payload") or {}
    if mtype != "event":
        links = _links(m.get("attachments", ()))
        text = str(m.get("text") or "")
        if mtype == "postback" and not text:
            text = str(payload.get("payload", ""))
        if mtype == "location" and not text:
            text = f"location {payload.get('latitude', '?')}, {payload.get('longitude', '?')}"
        if not text and not links:
            text = f"[{mtype}]"
        return Entry("user", text, at, who, links=links)
    event = payload.get("event")
    agent = str(payload.get("agent") or who)
    if event == EVENT_AGENT_MESSAGE:
        rows = replies.get(m.get("message_id"), [])
        status, error = _delivery(rows[0] if rows else None, str(m.get("status")))
        return Entry("agent", str(payload.get("text", "")), at, agent, status, error=error)
    if event == EVENT_AGENT_NOTE:
        return Entry("note", str(payload.get("text", "")), at, agent)
    if m.get("status") == "pending" and event in ACTIONS.values():
        label = ACTION_OF[str(event)]
        return Entry("system", f"{agent}: {label}…", at, agent, "sending")
    return None  # other events show through what they changed (owner lines, replies)


def _quiet_action(m: dict[str, Any]) -> Entry | None:
    """A claim or transfer that changed who holds the conversation but not its owner kind (an agent
    took over from another, a waiting conversation moved queue): no owner line tells of it."""
    payload = m.get("payload") or {}
    event, agent = payload.get("event"), str(payload.get("agent") or "an agent")
    if m.get("type") != "event" or m.get("status") != "done":
        return None
    if event == EVENT_AGENT_ASSIGNED:
        return Entry("system", f"{agent} took the conversation.", m.get("handled_at"), agent)
    if event == EVENT_AGENT_TRANSFER:
        return Entry("system", f"{agent} moved it to {payload.get('queue') or 'another queue'}.", m.get("handled_at"))
    return None


def build_transcript(conversation: dict[str, Any]) -> list[Entry]:
    """The whole conversation in order: the user, the bot, agents, notes, and every owner change.

    Replies follow the message they answer (`reply_to`); an owner change follows the last message
    handled in the same transaction (its `at` is that message's `handled_at`)."""
    messages = conversation.get("messages", [])
    replies: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for row in conversation.get("outbox", []):
        if row.get("kind") == "message" and not row.get("to") and row.get("reply") is not None:
            replies[row.get("reply_to")].append(row)
    last_handled: dict[float, int] = {}
    for i, m in enumerate(messages):
        if m.get("handled_at"):
            last_handled[m["handled_at"]] = i
    after: dict[int, list[dict[str, Any]]] = defaultdict(list)
    loose: list[dict[str, Any]] = []
    for change in conversation.get("ownership", []):
        at = change.get("at")
        index = last_handled.get(at) if at is not None else None
        (after[index] if index is not None else loose).append(change)
    out: list[Entry] = []
    for i, m in enumerate(messages):
        entry = _message_entry(m, replies)
        if entry is not None:
            out.append(entry)
        changes = after.get(i, [])
        out += [_system(c) for c in changes]
        quiet = _quiet_action(m) if not changes else None
        if quiet is not None:
            out.append(quiet)
        rows = replies.pop(m.get("message_id"), [])
        is_agent_message = m.get("type") == "event" and (m.get("payload") or {}).get("event") == EVENT_AGENT_MESSAGE
        if not is_agent_message:
            out += [_reply_entry(r) for r in rows]
    out += [_reply_entry(r) for rows in replies.values() for r in rows]
    out += [_system(c) for c in loose]
    return out


def _user_of(conversation: dict[str, Any]) -> str:
    for m in conversation.get("messages", []):
        if m.get("type") != "event":
            sender = m.get("sender") or {}
            return str(sender.get("name") or sender.get("id") or "")
    return ""


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/inbox") and not target.startswith("//") and "\\" not in target:
        return target
    return "/inbox"


def conversation_path(key: str) -> str:
    return "/inbox/c/" + quote(key, safe=":@")


class InboxPages:
    def __init__(self, settings: InboxSettings) -> None:
        self.settings = settings
        secret = settings.secret or ""
        if not secret:
            log.warning(
                "inbox.secret is not set: using a random one for this process; sign-in forms opened before "
                "a restart or served by another node will be refused (set inbox.secret, e.g. from the environment)"
            )
            secret = secrets.token_urlsafe(32)
        self.secret = secret.encode()
        self.throttle = LoginThrottle(settings.max_failed_logins)

    def routes(self) -> list[Route]:
        return [
            Route("/inbox", self.guarded(self.index), methods=["GET"]),
            Route("/inbox/", self.guarded(self.index), methods=["GET"]),
            Route("/inbox/login", self.login_form, methods=["GET"]),
            Route("/inbox/login", self.login, methods=["POST"]),
            Route("/inbox/logout", self.logout, methods=["POST"]),
            Route("/inbox/act", self.act, methods=["POST"]),
            Route("/inbox/events", self.events, methods=["GET"]),
            Route("/inbox/partials/sidebar", self.guarded(self.sidebar_partial, page=False), methods=["GET"]),
            Route(
                "/inbox/partials/conversation/{key:path}",
                self.guarded(self.conversation_partial, page=False),
                methods=["GET"],
            ),
            Route("/inbox/c/{key:path}", self.guarded(self.conversation_page), methods=["GET"]),
        ]

    # -- sessions ------------------------------------------------------------------------------

    @property
    def session_seconds(self) -> float:
        return self.settings.session_minutes * 60

    async def session(self, request: Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token or len(token) > 200:
            return None
        s: Services = request.app.state.services
        hashed = token_hash(token)
        row = await s.store.agent_session(hashed)
        if row is None:
            return None
        now = time.time()
        if now - float(row["seen_at"]) >= min(TOUCH_EVERY, self.session_seconds / 4):
            await s.store.touch_session(hashed, now + self.session_seconds)
        return Session(str(row["agent"]), str(row["csrf"]), hashed)

    def guarded(
        self, handler: Callable[[Request, Session], Awaitable[Response]], *, page: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            session = await self.session(request)
            if session is None:
                if not page:
                    return JSONResponse({"error": "signed out", "login": "/inbox/login"}, status_code=401)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/inbox/login?next=" + quote(target, safe=""), status_code=303)
            return await handler(request, session)

        return run

    def _login_token(self, nonce: str, issued: int) -> str:
        mac = hmac.new(self.secret, f"{nonce}.{issued}".encode(), hashlib.sha256).hexdigest()
        return f"{issued}.{mac}"

    def _login_token_ok(self, nonce: str | None, token: str) -> bool:
        issued, _, _mac = token.partition(".")
        # isdigit() alone takes "²" and 5000 digits, on which int() fails
        if not nonce or not (issued.isascii() and issued.isdigit() and len(issued) <= 12):
            return False
        if time.time() - int(issued) > LOGIN_FORM_SECONDS:
            return False
        return hmac.compare_digest(self._login_token(nonce, int(issued)).encode(), token.encode())

    def _secure(self, request: Request) -> bool:
        return request.url.scheme == "https"

    # -- sign in and out -----------------------------------------------------------------------

    async def login_form(
        self, request: Request, error: str = "", status_code: int = 200, name: str = "", target: str | None = None
    ) -> Response:
        target = _safe_next(target or request.query_params.get("next"))
        if not error and await self.session(request) is not None:
            return RedirectResponse(target, status_code=303)
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        if len(nonce) != 43:
            nonce = secrets.token_urlsafe(32)
        context = {
            "csrf": self._login_token(nonce, int(time.time())),
            "next": target,
            "error": error,
            "name": name,
            "agent": None,
        }
        response = page(request, "inbox_login.html", context, status_code)
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_FORM_SECONDS,
            path="/inbox",
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        return response

    async def login(self, request: Request) -> Response:
        s: Services = request.app.state.services
        try:
            form = await read_form(request)
        except FormError as exc:
            return await self.login_form(request, exc.message, exc.status)
        if not self._login_token_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf", "")):
            expired = "The sign-in form expired. Please try again."
            return await self.login_form(request, expired, 403, "", form.get("next"))
        name = form.get("name", "").strip()
        password = form.get("password", "")
        client = request.client.host if request.client else "unknown"
        keys = [f"name:{name.lower()}", f"addr:{client}"]
        wait = self.throttle.wait(keys)
        if wait > 0:
            minutes = max(1, round(wait / 60))
            message = f"Too many failed sign-ins. Try again in {minutes} min."
            return await self.login_form(request, message, 429, name, form.get("next"))
        if not name or not password or not await verify_agent(s.store, name, password):
            self.throttle.failed(keys)
            log.info("inbox sign-in refused", extra={"agent": name[:64], "client": client})
            return await self.login_form(request, "Wrong name or password.", 401, name, form.get("next"))
        self.throttle.succeeded(keys[0])
        token = secrets.token_urlsafe(32)
        expires = time.time() + self.session_seconds
        await s.store.open_session(token_hash(token), name, secrets.token_urlsafe(32), expires)
        log.info("inbox sign-in", extra={"agent": name, "client": client})
        response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE, token, path="/inbox", httponly=True, samesite="lax", secure=self._secure(request)
        )
        response.delete_cookie(LOGIN_COOKIE, path="/inbox")
        return response

    async def logout(self, request: Request) -> Response:
        s: Services = request.app.state.services
        session = await self.session(request)
        try:
            form = await read_form(request)
        except FormError as exc:
            return page(request, "inbox_error.html", {"message": exc.message, "agent": None}, exc.status)
        if session is not None:
            if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
                return self._csrf_refused(request, session)
            await s.store.close_session(session.token_hash)
        response = RedirectResponse("/inbox/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/inbox")
        return response

    def _csrf_refused(self, request: Request, session: Session | None, fetch: bool = False) -> Response:
        message = "This form is out of date (or was not sent by the inbox). Reload the page and try again."
        if fetch:
            return JSONResponse({"error": message}, status_code=403)
        return page(request, "inbox_error.html", {"message": message, "agent": session.agent if session else None}, 403)

    # -- pages ---------------------------------------------------------------------------------

    async def _sidebar(self, s: Services, session: Session, current: str | None) -> dict[str, Any]:
        skills = await s.store.agent_skills(session.agent)
        queues = await queue_summary(s)
        for q in queues:
            q["can_take"] = can_take(q.get("skills", ()), skills)

        def takeable(c: dict[str, Any]) -> bool:
            return can_take(queue_skills(s, c["queue"]), skills)

        # the queues' priority first (higher first), then the longest wait (the store's order)
        waiting = sorted(
            filter(takeable, await s.store.conversations("queued", None, 200)),
            key=lambda c: -queue_priority(s, c["queue"]),
        )
        assigned = await s.store.conversations("agent", None, 500)
        mine = [c for c in assigned if c["agent"] == session.agent]
        others = [c for c in assigned if c["agent"] != session.agent and takeable(c)]
        previews = await s.store.last_user_messages([c["key"] for c in waiting + assigned])
        return {
            "queues": queues,
            "waiting": waiting,
            "mine": mine,
            "others": others,
            "previews": previews,
            "current": current,
            "path": conversation_path,
            "now": time.time(),
        }

    async def index(self, request: Request, session: Session) -> Response:
        s: Services = request.app.state.services
        context = {
            "agent": session.agent,
            "csrf": session.csrf,
            "key": None,
            "conversation": None,
            "notice": NOTICES.get(request.query_params.get("notice", ""), ""),
            "error": ERRORS.get(request.query_params.get("error", ""), ""),
            **await self._sidebar(s, session, None),
        }
        return page(request, "inbox.html", context)

    async def sidebar_partial(self, request: Request, session: Session) -> Response:
        s: Services = request.app.state.services
        current = request.query_params.get("current") or None
        return page(request, "_sidebar.html", await self._sidebar(s, session, current))

    async def _conversation(self, s: Services, session: Session, key: str) -> dict[str, Any] | None:
        found = await s.store.conversation(key)
        if found is None:
            return None
        state = found.get("state") or {}
        handoff = state.get("handoff") or {}
        owner = str(state.get("owner") or "bot")
        agent = handoff.get("agent")
        mine = owner == "agent" and agent == session.agent
        handed_off = owner in ("queued", "agent")
        queue = handoff.get("queue")
        # a conversation of a queue whose skills the agent lacks: readable, but not theirs to take
        skilled = mine or can_take(queue_skills(s, queue), await s.store.agent_skills(session.agent))
        return {
            "key": key,
            "platform": found["platform"],
            "conversation_id": found["conversation_id"],
            "user": _user_of(found),
            "owner": owner,
            "queue": queue,
            "holder": agent,
            "since": found["ownership"][-1]["at"] if found["ownership"] else None,
            "mine": mine,
            "can_claim": skilled and (owner == "queued" or (owner == "agent" and not mine)),
            "can_act": (skilled and owner == "queued") or mine,
            "unskilled": handed_off and not skilled,
            "handed_off": handed_off,
            "entries": build_transcript(found),
            "flow": state.get("flow"),
            "state": state.get("state"),
            "transfer_to": [q for q in s.settings.handoff.queues if q != queue],
            "csrf": session.csrf,
            "path": conversation_path(key),
        }

    async def conversation_page(self, request: Request, session: Session) -> Response:
        s: Services = request.app.state.services
        key = request.path_params["key"]
        conversation = await self._conversation(s, session, key)
        notice = NOTICES.get(request.query_params.get("notice", ""), "")
        error = ERRORS.get(request.query_params.get("error", ""), "")
        context = {
            "agent": session.agent,
            "csrf": session.csrf,
            "key": key,
            "conversation": conversation,
            "notice": notice,
            "error": error,
            **await self._sidebar(s, session, key),
        }
        return page(request, "inbox.html", context, 200 if conversation is not None else 404)

    async def conversation_partial(self, request: Request, session: Session) -> Response:
        s: Services = request.app.state.services
        conversation = await self._conversation(s, session, request.path_params["key"])
        if conversation is None:
            return JSONResponse({"error": "no such conversation"}, status_code=404)
        return page(request, "_conversation.html", {"conversation": conversation})

    # -- actions -------------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        s: Services = request.app.state.services
        fetch = request.headers.get("x-requested-with") == "fetch"
        session = await self.session(request)
        if session is None:
            if fetch:
                return JSONResponse({"error": "signed out", "login": "/inbox/login"}, status_code=401)
            return RedirectResponse("/inbox/login", status_code=303)
        try:
            form = await read_form(request)
        except FormError as exc:
            if fetch:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            return page(request, "inbox_error.html", {"message": exc.message, "agent": session.agent}, exc.status)
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            log.warning("inbox action refused: bad CSRF token", extra={"agent": session.agent})
            return self._csrf_refused(request, session, fetch)
        key = form.get("key", "")
        action = form.get("action", "")
        problem, status = await self._check(s, session, key, action, form)

        def answer(code: str, http_status: int) -> Response:
            if fetch:
                ok = http_status < 400
                text = NOTICES.get(code, "") if ok else ERRORS.get(code, code)
                return JSONResponse({"ok": ok, "notice" if ok else "error": text}, status_code=http_status)
            where = conversation_path(key) if key else "/inbox"
            return RedirectResponse(f"{where}?{'notice' if http_status < 400 else 'error'}={code}", status_code=303)

        if problem:
            return answer(problem, status)
        text = form.get("text", "").strip() if action in ("reply", "note") else None
        queue = form.get("queue", "").strip() if action == "transfer" else None
        reason = {"transfer": f"transferred to {queue}", "resolve": "resolved", "release": "released"}.get(action)
        await submit_agent_event(
            s,
            key,
            ACTIONS[action],
            session.agent,
            text=text,
            queue=queue,
            reason=reason,
            event_id=form.get("id") or None,
        )
        log.info("inbox action", extra={"agent": session.agent, "conversation": key, "action": action})
        return answer(action, 202)

    async def _check(
        self, s: Services, session: Session, key: str, action: str, form: dict[str, str]
    ) -> tuple[str, int]:
        """('', 0) if the agent may do this now, else (an ERRORS code, an HTTP status)."""
        if action not in ACTIONS:
            return "action", 400
        if action in ("reply", "note"):
            text = form.get("text", "").strip()
            if not text or len(text) > MAX_TEXT:
                return "text", 400
        if action == "transfer" and form.get("queue", "").strip() not in s.settings.handoff.queues:
            return "queue", 400
        found = await s.store.conversation(key) if key else None
        if found is None:
            return "missing", 404
        if action == "note":
            return "", 0
        state = found.get("state") or {}
        owner = state.get("owner") or "bot"
        handoff = state.get("handoff") or {}
        if owner not in ("queued", "agent"):
            return "bot", 409
        holder = handoff.get("agent")
        # what the agent does not hold must be of a queue whose skills they have
        skilled = can_take(queue_skills(s, handoff.get("queue")), await s.store.agent_skills(session.agent))
        if (holder != session.agent or owner != "agent") and not skilled:
            return "skills", 403
        if action != "claim" and owner == "agent" and holder != session.agent:
            return "taken", 409
        # a claim, or a reply to a waiting conversation (which claims it), counts against capacity
        if (action == "claim" or (action == "reply" and owner == "queued")) and holder != session.agent:
            queue = handoff.get("queue") or "default"
            capacity = s.settings.handoff.queues[queue].capacity if queue in s.settings.handoff.queues else None
            if capacity is not None:
                held = [
                    c
                    for c in await s.store.conversations("agent", queue, 1000)
                    if c["agent"] == session.agent and c["key"] != key
                ]
                if len(held) >= capacity:
                    return "capacity", 409
        return "", 0

    async def events(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return JSONResponse({"error": "signed out", "login": "/inbox/login"}, status_code=401)
        s: Services = request.app.state.services
        topics = [INBOX_TOPIC]
        key = request.query_params.get("conversation")
        if key:
            topics.append(conversation_topic(key))
        token = session.token_hash

        async def still_signed_in() -> bool:
            return await s.store.agent_session(token) is not None

        return event_stream(request, request.app.state.hub, topics, still_allowed=still_signed_in)


__all__ = ["Entry", "InboxPages", "LoginThrottle", "build_transcript"]
