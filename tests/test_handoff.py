"""Human handoff end to end: ownership, the agent side, event orders, restarts, platform agent tools.

Everything runs for real on 127.0.0.1: Switchboard (in the test's loop, or `switchboard serve` as a
subprocess), a fake chat platform, a fake helpdesk and a fake Chatwoot. Nothing of ours is patched;
assertions read what the fakes received and what the admin API shows.

1. A user asks for a human: the bot's reply, silence while queued and while an agent has it, agent
   replies through the outbox in order, the admin API's queues and owners, the resume question once,
   the ownership trail.
2. Event orders: an agent reply racing the queue timeout (both outcomes), resolves arriving twice,
   one event id twice, a state timeout armed before the handoff, the helpdesk webhook's pushes.
3. `switchboard serve` killed (SIGKILL or SIGTERM) with conversations in every state, restarted:
   no bot reply while not bot-owned, no lost agent reply, exactly one resume, a queue timeout set
   before the restart fires after it.
4. Chatwoot's agent tools: the handoff calls after the bot's reply, the resolve webhook, the release
   before the bot's resume question.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import sqlite3
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.services import Services
from middleware.settings import settings_from_text
from tests.conftest import Server, fake_platform, free_port, generic_config, message, running
from tests.fakes.platform import FakePlatform
from tests.procs import Proc, switchboard_command, wait_ready

TOKEN = "handoff-admin-token"
CONNECTING = "Connecting you to a person."
QUESTION = "How did we do, 1 to 5?"
THANKS = "Thanks!"
TIMED_OUT = "Nobody is free right now; the bot is back."

FLOW = """\
flow: support
always:
  - when: {text: {matches: "(?i)\\\\bhuman\\\\b"}}
    do:
      - reply: "Connecting you to a person."
      - handoff: {queue: support, reason: asked, resume: rate}
states:
  start:
    routes:
      - do: [{reply: "bot: {{ message.text }}"}]
  rate:
    enter: [{reply: "How did we do, 1 to 5?"}]
    routes:
      - when: {text: {matches: "^[1-5]$"}}
        do: [{set: {rating: "{{ message.text }}"}}, {reply: "Thanks!"}, {goto: start}]
      - do: [{reply: "1 to 5, please."}]
"""

#: FLOW, and "quick..." hands off to the `brief` queue (which times out)
RESTART_FLOW = FLOW.replace(
    "always:\n",
    """always:
  - when: {text: {matches: "(?i)^quick"}}
    do:
      - reply: "Connecting you to a person."
      - handoff: {queue: brief, reason: asked, resume: rate}
""",
)
#: admin token and a fast outbox retry, for every in-process test
BASE_EXTRA = f"""\
admin: {{token: {TOKEN}}}
outbox: {{backoff_base: 0.05, backoff_max: 0.5}}
"""


def flows_dir(tmp_path: Path, text: str = FLOW) -> Path:
    d = tmp_path / "flows"
    d.mkdir(exist_ok=True)
    (d / "support.yaml").write_text(text)
    return d


async def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def texts(fake: FakePlatform, conversation: str) -> list[str]:
    """Texts the user received, in arrival order, one per Idempotency-Key (repeats of a key dropped)."""
    return [c.body["text"] for c in fake.delivered() if c.body["conversation_id"] == conversation]


def keys_per_text(fake: FakePlatform, conversation: str) -> dict[str, set[str]]:
    """text -> the Idempotency-Keys it was sent under (every call, repeats included)."""
    out: dict[str, set[str]] = {}
    for c in fake.calls:
        if c.path == "/messages" and c.body["conversation_id"] == conversation:
            out.setdefault(c.body["text"], set()).add(c.headers["idempotency-key"])
    return out


def trail(conversation: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(o["before"], o["after"], o["actor"], o["reason"]) for o in conversation["ownership"]]


HUMAN_TRAIL = [
    ("bot", "queued", "bot", "asked"),
    ("queued", "agent", "sam", "claimed"),
    ("agent", "bot", "sam", "resolved"),
]


class User:
    """A user of the generic platform writing in one conversation."""

    def __init__(self, client: httpx.AsyncClient, base: str, conversation: str) -> None:
        self.client = client
        self.base = base
        self.conversation = conversation
        self.n = 0
        self.sent: list[str] = []

    async def say(self, text: str) -> str:
        self.n += 1
        msg = message(f"{self.conversation}-{self.n}", self.conversation, text=text)
        r = await self.client.post(f"{self.base}/webhooks/myapp", json=msg)
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 1, "duplicates": 0}
        self.sent.append(msg["message_id"])
        return str(msg["message_id"])


class Admin:
    """The admin API as a helpdesk or an operator uses it."""

    def __init__(self, client: httpx.AsyncClient, base: str) -> None:
        self.client = client
        self.base = f"{base}/api/v1"
        self.headers = {"authorization": f"Bearer {TOKEN}"}

    async def event(self, key: str, event: str, *, id: str | None = None, **fields: str) -> httpx.Response:
        body: dict[str, Any] = {"event": event, **fields}
        if id is not None:
            body["id"] = id
        return await self.client.post(f"{self.base}/conversations/{key}/events", json=body, headers=self.headers)

    async def send(self, key: str, event: str, *, id: str, **fields: str) -> None:
        """An event that must be new: 202 accepted."""
        r = await self.event(key, event, id=id, **fields)
        assert (r.status_code, r.json()) == (202, {"accepted": True, "duplicate": False}), r.text

    async def conversation(self, key: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.base}/conversations/{key}", headers=self.headers)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def by_owner(self, owner: str) -> dict[str, dict[str, Any]]:
        r = await self.client.get(f"{self.base}/conversations", params={"owner": owner}, headers=self.headers)
        assert r.status_code == 200, r.text
        return {row["key"]: row for row in r.json()["conversations"]}

    async def queues(self) -> dict[str, dict[str, Any]]:
        r = await self.client.get(f"{self.base}/queues", headers=self.headers)
        assert r.status_code == 200, r.text
        return {row["queue"]: row for row in r.json()["queues"]}

    async def settled(self, key: str, within: float = 20.0) -> dict[str, Any]:
        """The conversation once every accepted message is handled and its outbox is empty."""
        deadline = time.monotonic() + within
        while True:
            conv = await self.conversation(key)
            if all(m["status"] == "done" for m in conv["messages"]) and not any(
                o["status"] == "pending" for o in conv["outbox"]
            ):
                return conv
            if time.monotonic() > deadline:
                pending = [m for m in conv["messages"] if m["status"] != "done"]
                raise AssertionError(f"{key} not settled after {within}s: {pending} {conv['outbox'][-3:]}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def switchboard_with(
    store_url: str, tmp_path: Path, extra: str = "handoff: {queues: {support: {}}}\n", flow: str = FLOW
) -> AsyncIterator[tuple[FakePlatform, Services, User, Admin, httpx.AsyncClient]]:
    async with (
        fake_platform() as (platform_server, fake),
        httpx.AsyncClient(timeout=10) as client,
    ):
        settings = generic_config(
            store_url, platform_server.url, flows_dir(tmp_path, flow), BASE_EXTRA + textwrap.dedent(extra)
        )
        async with running(settings) as (server, services):
            yield fake, services, User(client, server.url, "c-1"), Admin(client, server.url), client


# -- 1. a user asks for a human ------------------------------------------------------------------


async def test_user_asks_for_a_human_agent_talks_and_resolves_the_bot_resumes_once(
    store_url: str, tmp_path: Path
) -> None:
    extra = """\
    typing: {delay: 0}
    handoff:
      queues:
        support: {capacity: 2, priority: 1}
    """
    async with switchboard_with(store_url, tmp_path, extra) as (fake, _services, user, admin, _client):
        key = "myapp:c-1"

        def typing_calls() -> list[bool]:
            return [bool(c.body["typing"]) for c in fake.typing("c-1")]

        await user.say("hi")
        await fake.wait_for(lambda: texts(fake, "c-1") == ["bot: hi"], timeout=20)
        await user.say("I want a human")
        await fake.wait_for(lambda: texts(fake, "c-1") == ["bot: hi", CONNECTING], timeout=20)
        conv = await admin.settled(key)
        assert conv["state"]["owner"] == "queued"
        # typing was on for the handoff turn and is off once the bot's last reply is out
        await wait_until(lambda: typing_calls()[-1:] == [False], 10, "typing off after the handoff")
        typing_at_handoff = typing_calls()
        assert typing_at_handoff.count(True) == 2, typing_at_handoff  # "hi" and "I want a human"

        # queued: listed as waiting, not with the bot
        queued = await admin.by_owner("queued")
        assert set(queued) == {key}
        assert queued[key]["queue"] == "support" and queued[key]["agent"] is None
        assert key not in await admin.by_owner("bot")
        support = (await admin.queues())["support"]
        assert (support["waiting"], support["with_agent"], support["capacity"]) == (1, 0, 2)
        assert support["longest_wait_seconds"] >= 0

        # the user writes while queued: no bot reply, no typing; the messages are in the transcript
        await user.say("hello? anyone there?")
        await user.say("my order 123 is late")
        conv = await admin.settled(key)
        assert texts(fake, "c-1") == ["bot: hi", CONNECTING]
        assert typing_calls() == typing_at_handoff
        history = [tuple(h) for h in conv["state"]["history"]]
        assert ("user", "hello? anyone there?") in history and ("user", "my order 123 is late") in history

        # the agent answers through the events API: it claims the conversation, the reply reaches the user
        await admin.send(key, "message", id="e-1", agent="sam", text="Hi, Sam here. Let me look.")
        await fake.wait_for(lambda: texts(fake, "c-1")[-1:] == ["Hi, Sam here. Let me look."], timeout=20)
        conv = await admin.settled(key)
        assert conv["state"]["owner"] == "agent"
        agent_reply = fake.delivered()[-1]
        assert agent_reply.body == {
            "conversation_id": "c-1",
            "reply_to": "agent:e-1",
            "text": "Hi, Sam here. Let me look.",
            "buttons": [],
            "attachments": [],
        }
        with_agent = await admin.by_owner("agent")
        assert set(with_agent) == {key} and with_agent[key]["agent"] == "sam"
        assert key not in await admin.by_owner("queued")
        support = (await admin.queues())["support"]
        assert (support["waiting"], support["with_agent"], support["longest_wait_seconds"]) == (0, 1, 0.0)

        await user.say("thanks, it is order 123")
        await admin.settled(key)
        assert texts(fake, "c-1")[-1] == "Hi, Sam here. Let me look."
        assert typing_calls() == typing_at_handoff

        # an agent message and the resolve back to back: delivered in the order they were applied
        await admin.send(key, "message", id="e-2", agent="sam", text="Found it: it ships tomorrow.")
        await admin.send(key, "resolved", id="e-3", agent="sam")
        await fake.wait_for(lambda: QUESTION in texts(fake, "c-1"), timeout=20)
        conv = await admin.settled(key)
        assert conv["state"]["owner"] == "bot" and conv["state"]["state"] == "rate"
        assert conv["state"]["handoff"] is None
        assert await admin.by_owner("agent") == {} and await admin.by_owner("queued") == {}
        support = (await admin.queues())["support"]
        assert (support["waiting"], support["with_agent"]) == (0, 0)

        # the bot is back: it answers (with typing again)
        await user.say("5")
        await fake.wait_for(lambda: texts(fake, "c-1")[-1:] == [THANKS], timeout=20)
        conv = await admin.settled(key)
        assert typing_calls().count(True) == 3
        await asyncio.sleep(1.2)  # a late duplicate or stray timer would show up now

        assert texts(fake, "c-1") == [
            "bot: hi",
            CONNECTING,
            "Hi, Sam here. Let me look.",
            "Found it: it ships tomorrow.",
            QUESTION,
            THANKS,
        ]
        assert all(len(k) == 1 for k in keys_per_text(fake, "c-1").values())
        conv = await admin.conversation(key)
        assert trail(conv) == HUMAN_TRAIL
        stamps = [o["at"] for o in conv["ownership"]]
        assert stamps == sorted(stamps)
        assert conv["state"]["state"] == "start" and conv["state"]["vars"]["rating"] == "5"
        assert fake.bad_signatures == 0


# -- 2. event orders -----------------------------------------------------------------------------

RACE_EXTRA = """\
handoff:
  queues:
    support:
      timeout: 1s
      on_timeout: {reply: "Nobody is free right now; the bot is back.", then: bot}
"""
#: when the agent's message is posted, relative to the queue timeout's due time (the scheduler
#: fires due timers once a second, so up to ~1 s after due the two really race)
RACE_OFFSETS = [-0.6, -0.3, 0.0, 0.15, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 2.0]


async def test_agent_reply_racing_the_queue_timeout(store_url: str, tmp_path: Path) -> None:
    async with switchboard_with(store_url, tmp_path, RACE_EXTRA) as (fake, services, _user, admin, client):
        base = admin.base.removesuffix("/api/v1")
        outcomes: dict[str, tuple[float, str]] = {}

        async def one(i: int, offset: float) -> None:
            cid = f"race-{i}"
            key = f"myapp:{cid}"
            user = User(client, base, cid)
            await user.say("I want a human")
            await fake.wait_for(lambda: texts(fake, cid) == [CONNECTING], timeout=20)
            timers = [t for t in await services.store.pending_timers(key) if t["name"] == "handoff-timeout"]
            assert len(timers) == 1, timers
            due = timers[0]["due_at"]
            await asyncio.sleep(max(0.0, due + offset - time.time()))
            await admin.send(key, "message", id=f"agent-{i}", agent="sam", text=f"Agent reply {i}")
            # past the latest the timer can fire; then the agent resolves
            await asyncio.sleep(max(0.0, due + 2.5 - time.time()))
            await admin.settled(key)
            await admin.send(key, "resolved", id=f"resolve-{i}", agent="sam")
            await admin.settled(key)

        async with asyncio.timeout(60):
            await asyncio.gather(*(one(i, off) for i, off in enumerate(RACE_OFFSETS)))
        await asyncio.sleep(1.2)  # one more scheduler tick: nothing late may show up

        for i, offset in enumerate(RACE_OFFSETS):
            cid, key = f"race-{i}", f"myapp:race-{i}"
            got = texts(fake, cid)
            conv = await admin.settled(key)
            ownership = trail(conv)
            reply = f"Agent reply {i}"
            assert got.count(reply) == 1, (offset, got)  # no agent reply lost, none doubled
            assert got.count(QUESTION) <= 1, (offset, got)  # at most one resume
            assert sum(1 for t in ownership if t[1] == "bot") == 1, (offset, ownership)
            assert all(len(k) == 1 for k in keys_per_text(fake, cid).values())
            if ownership[1][1] == "agent":  # the agent's message was applied first: it claimed
                assert ownership == HUMAN_TRAIL, (offset, ownership)
                assert got == [CONNECTING, reply, QUESTION], (offset, got)
                outcomes[cid] = (offset, "agent first")
            else:  # the timeout first: the bot took it back, the late agent reply still reached the user
                assert ownership == [("bot", "queued", "bot", "asked"), ("queued", "bot", "system", "queue timeout")]
                assert got == [CONNECTING, TIMED_OUT, reply], (offset, got)
                assert conv["state"]["state"] == "start"
                outcomes[cid] = (offset, "timeout first")
            assert conv["state"]["owner"] == "bot"
            assert await services.store.pending_timers(key) == []
        summary = Counter(o for _, o in outcomes.values())
        print(f"\nagent reply vs queue timeout, by offset from due: {sorted(outcomes.values())} -> {dict(summary)}")
        assert outcomes["race-0"][1] == "agent first"  # posted 0.6 s before the timer was due
        assert outcomes[f"race-{len(RACE_OFFSETS) - 1}"][1] == "timeout first"  # 2 s after


async def test_resolve_twice_and_one_event_id_twice(store_url: str, tmp_path: Path) -> None:
    async with switchboard_with(store_url, tmp_path) as (fake, _services, user, admin, _client):
        key = "myapp:c-1"
        await user.say("I want a human")
        await fake.wait_for(lambda: texts(fake, "c-1") == [CONNECTING], timeout=20)
        await admin.settled(key)

        # one agent message sent twice at once under one id (a helpdesk retrying): one delivery
        first, second = await asyncio.gather(
            admin.event(key, "message", id="m-1", agent="sam", text="Sam here."),
            admin.event(key, "message", id="m-1", agent="sam", text="Sam here."),
        )
        answers = sorted([(first.status_code, first.json()), (second.status_code, second.json())], key=str)
        assert answers == [(200, {"accepted": False, "duplicate": True}), (202, {"accepted": True, "duplicate": False})]
        await admin.settled(key)

        # two resolves and a release, each with its own id, at once: one resume
        answers = await asyncio.gather(
            admin.event(key, "resolved", id="r-1", agent="sam"),
            admin.event(key, "resolved", id="r-2", agent="sam"),
            admin.event(key, "released", id="r-3", agent="sam"),
        )
        assert [a.status_code for a in answers] == [202, 202, 202]
        # the same id again, after it was applied: 200, a duplicate, nothing runs
        await fake.wait_for(lambda: QUESTION in texts(fake, "c-1"), timeout=20)
        await admin.settled(key)
        again = await admin.event(key, "resolved", id="r-1", agent="sam")
        assert (again.status_code, again.json()) == (200, {"accepted": False, "duplicate": True})
        late = await admin.event(key, "message", id="m-1", agent="sam", text="Sam here.")
        assert late.status_code == 200
        conv = await admin.settled(key)
        await asyncio.sleep(0.5)

        assert texts(fake, "c-1") == [CONNECTING, "Sam here.", QUESTION]
        ownership = trail(conv)
        assert ownership[:2] == HUMAN_TRAIL[:2]
        assert len(ownership) == 3 and ownership[2][:3] == ("agent", "bot", "sam")
        assert ownership[2][3] in ("resolved", "released")
        events = [m for m in conv["messages"] if m["type"] == "event"]
        assert events[0]["message_id"] == "agent:m-1"
        assert sorted(m["message_id"] for m in events) == ["agent:m-1", "agent:r-1", "agent:r-2", "agent:r-3"]
        assert all(m["status"] == "done" for m in events)

        await user.say("4")
        await fake.wait_for(lambda: texts(fake, "c-1")[-1:] == [THANKS], timeout=20)
        conv = await admin.settled(key)
        assert texts(fake, "c-1") == [CONNECTING, "Sam here.", QUESTION, THANKS]
        assert conv["state"]["vars"]["rating"] == "4"


TIMED_FLOW = FLOW.replace(
    """  start:
    routes:""",
    """  start:
    timeout: {after: 1s, do: [{reply: "Still there?"}]}
    routes:""",
).replace(
    """      - reply: "Connecting you to a person."
      - handoff: {queue: support""",
    """      - reply: "Connecting you to a person."
      - expect: {timeout: 1s, do: [{reply: "Are you still with us?"}]}
      - handoff: {queue: support""",
)


async def test_state_timeout_and_expect_armed_before_the_handoff_stay_silent(store_url: str, tmp_path: Path) -> None:
    """The handoff's turn arms the state's timeout (and the route's `expect`); they fire while a
    human owns the conversation, and the bot must not speak."""
    assert (
        RESTART_FLOW.count("handoff:") == 2
        and TIMED_FLOW != FLOW
        and "Still there?" in TIMED_FLOW
        and "Are you still" in TIMED_FLOW
    )
    async with switchboard_with(store_url, tmp_path, flow=TIMED_FLOW) as (fake, _services, user, admin, _client):
        key = "myapp:c-1"
        await user.say("I want a human")
        await fake.wait_for(lambda: texts(fake, "c-1") == [CONNECTING], timeout=20)

        def fired(conv: dict[str, Any]) -> list[str]:
            return sorted(
                m["payload"]["name"]
                for m in conv["messages"]
                if m["type"] == "event" and m["payload"].get("event") == "timer" and m["status"] == "done"
            )

        deadline = time.monotonic() + 10
        while fired(await admin.settled(key)) != ["expect", "state-timeout"]:
            assert time.monotonic() < deadline, (await admin.conversation(key))["messages"]
            await asyncio.sleep(0.2)
        conv = await admin.settled(key)
        assert texts(fake, "c-1") == [CONNECTING]
        assert conv["state"]["owner"] == "queued"

        await admin.send(key, "message", id="a-1", agent="sam", text="Sam here.")
        await admin.send(key, "resolved", id="a-2", agent="sam")
        await fake.wait_for(lambda: QUESTION in texts(fake, "c-1"), timeout=20)
        await admin.settled(key)
        await asyncio.sleep(1.5)
        assert texts(fake, "c-1") == [CONNECTING, "Sam here.", QUESTION]
        assert trail(await admin.conversation(key)) == HUMAN_TRAIL


@dataclass
class FakeHelpdesk:
    """A helpdesk taking Switchboard's handoff pushes; fails the first try of chosen events with 503."""

    secret: str
    fail_once: set[str] = field(default_factory=set)
    pushes: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    refused: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    bad_signatures: int = 0

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/push", self._push, methods=["POST"])])

    async def _push(self, request: Request) -> Response:
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, headers.get("x-switchboard-signature", "")):
            self.bad_signatures += 1
            return JSONResponse({"error": "bad signature"}, status_code=401)
        body = json.loads(raw)
        if body["event"] in self.fail_once:
            self.fail_once.discard(body["event"])
            self.refused.append((body, headers))
            return JSONResponse({"error": "busy"}, status_code=503)
        self.pushes.append((body, headers))
        return JSONResponse({"ok": True})


async def test_helpdesk_webhook_gets_the_handoff_the_users_messages_and_the_resume(
    store_url: str, tmp_path: Path
) -> None:
    helpdesk = FakeHelpdesk("hd-secret", fail_once={"message"})
    async with Server(helpdesk.app()) as hd:
        extra = f"""\
        handoff:
          target: webhook
          webhook_url: {hd.url}/push
          webhook_secret: hd-secret
          queues:
            support: {{}}
        """
        async with switchboard_with(store_url, tmp_path, extra) as (fake, _services, user, admin, _client):
            key = "myapp:c-1"
            await user.say("hi")
            await fake.wait_for(lambda: texts(fake, "c-1") == ["bot: hi"], timeout=20)
            await user.say("I want a human")
            await fake.wait_for(lambda: texts(fake, "c-1") == ["bot: hi", CONNECTING], timeout=20)
            await wait_until(lambda: len(helpdesk.pushes) == 1, 20, "the handoff push")
            first = await user.say("where is my order?")
            second = await user.say("hello?")
            await wait_until(lambda: len(helpdesk.pushes) == 3, 20, "the user's messages at the helpdesk")
            await admin.settled(key)
            assert texts(fake, "c-1") == ["bot: hi", CONNECTING]

            await admin.send(key, "message", id="hd-1", agent="ana@helpdesk", text="Ana from support here.")
            await admin.send(key, "resolved", id="hd-2", agent="ana@helpdesk")
            await fake.wait_for(lambda: QUESTION in texts(fake, "c-1"), timeout=20)
            await wait_until(lambda: len(helpdesk.pushes) == 4, 20, "the resumed push")
            await admin.settled(key)
            await asyncio.sleep(0.5)

        assert texts(fake, "c-1") == ["bot: hi", CONNECTING, "Ana from support here.", QUESTION]
        where = {"conversation": key, "platform": "myapp", "conversation_id": "c-1"}
        bodies = [b for b, _ in helpdesk.pushes]
        assert bodies == [
            {
                "event": "handoff",
                **where,
                "queue": "support",
                "reason": "asked",
                "transcript": [
                    {"role": "user", "text": "hi"},
                    {"role": "bot", "text": "bot: hi"},
                    {"role": "user", "text": "I want a human"},
                    {"role": "bot", "text": CONNECTING},
                ],
            },
            {"event": "message", **where, "message_id": first, "text": "where is my order?"},
            {"event": "message", **where, "message_id": second, "text": "hello?"},
            {"event": "resumed", **where},
        ]
        keys = [h["idempotency-key"] for _, h in helpdesk.pushes]
        assert all(keys) and len(set(keys)) == 4
        # the refused first try was retried under the same key
        assert [b["message_id"] for b, _ in helpdesk.refused] == [first]
        assert helpdesk.refused[0][1]["idempotency-key"] == keys[1]
        assert helpdesk.bad_signatures == 0
        # nothing for the helpdesk went to the chat platform
        assert all(c.path in ("/messages", "/typing", "/read") for c in fake.calls)


# -- 3. a process restart in each state ----------------------------------------------------------


RESTART_CONVERSATIONS = ("c-bot", "c-queued", "c-agent", "c-resolved", "c-timeout")
#: the brief queue's timeout: long enough not to fire before the kill, short enough to be due soon after
BRIEF_TIMEOUT = 5


def restart_config(tmp_path: Path, platform_url: str) -> Path:
    flows = flows_dir(tmp_path, RESTART_FLOW)
    config = tmp_path / "switchboard.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            store:
              url: sqlite:///{tmp_path}/data/switchboard.db
            flows: {flows}
            platforms:
              myapp:
                type: generic
                post_message_url: {platform_url}/messages
                typing_url: {platform_url}/typing
                read_url: {platform_url}/read
            dispatch: {{lease_seconds: 5, sweep_seconds: 0.5}}
            outbox: {{backoff_base: 0.05, backoff_max: 0.5}}
            admin: {{token: {TOKEN}}}
            reload: false
            handoff:
              queues:
                support: {{}}
                brief:
                  timeout: {BRIEF_TIMEOUT}s
                  on_timeout: {{reply: "{TIMED_OUT}", then: bot}}
            """
        )
    )
    return config


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_restart_in_every_state(tmp_path: Path, procs: list[Proc], how: signal.Signals) -> None:
    fake = FakePlatform()
    async with (
        Server(fake.app()) as platform_server,
        httpx.AsyncClient(timeout=10) as client,
    ):
        config = restart_config(tmp_path, platform_server.url)
        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def serve(n: int) -> Proc:
            proc = Proc(
                [switchboard_command(), "serve", "--config", str(config), "--port", str(port)],
                tmp_path / f"serve-{n}.log",
                cwd=tmp_path,
            )
            procs.append(proc)
            return proc

        first = serve(1)
        await wait_ready(first, f"{base}/readyz", 30)
        admin = Admin(client, base)
        users = {cid: User(client, base, cid) for cid in RESTART_CONVERSATIONS}

        async def said(cid: str, text: str, expect: list[str]) -> None:
            await users[cid].say(text)
            await fake.wait_for(lambda: texts(fake, cid) == expect, timeout=20)

        # Put each conversation in its state.
        await said("c-bot", "hi", ["bot: hi"])
        await said("c-queued", "I want a human", [CONNECTING])
        await said("c-agent", "I want a human", [CONNECTING])
        await admin.send("myapp:c-agent", "message", id="a-1", agent="sam", text="Sam here (c-agent).")
        await users["c-agent"].say("my order is late")
        await said("c-resolved", "I want a human", [CONNECTING])
        await admin.send("myapp:c-resolved", "message", id="r-1", agent="sam", text="Sam here (c-resolved).")
        await fake.wait_for(lambda: texts(fake, "c-agent")[-1:] == ["Sam here (c-agent)."], timeout=20)
        await fake.wait_for(lambda: texts(fake, "c-resolved")[-1:] == ["Sam here (c-resolved)."], timeout=20)
        for cid in RESTART_CONVERSATIONS[:4]:
            await admin.settled(f"myapp:{cid}")
        handed_at = time.time()
        await said("c-timeout", "quick, a person please", [CONNECTING])
        # Work acknowledged right before the signal: a user writing while queued, an agent reply, a resolve.
        await users["c-queued"].say("anyone there?")
        await admin.send("myapp:c-agent", "message", id="a-2", agent="sam", text="One more thing (c-agent).")
        await admin.send("myapp:c-resolved", "resolved", id="r-2", agent="sam")
        first.popen.send_signal(how)
        killed_at = time.time()
        code = await first.wait(30)
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -SIGTERM (or 0) is a clean exit
        assert code in ((-how,) if how == signal.SIGKILL else (0, -how)), (
            f"exit {code} after {how.name}:\n{first.tail()}"
        )
        assert killed_at - handed_at < BRIEF_TIMEOUT - 1, "too slow to kill before the queue timeout was due"

        db = tmp_path / "data" / "switchboard.db"
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            timer_rows = conn.execute(
                "SELECT status, due_at FROM timer WHERE conversation_key = 'myapp:c-timeout' AND name = ?",
                ("handoff-timeout",),
            ).fetchall()
            owners = dict(conn.execute("SELECT external_id, owner FROM conversation").fetchall())
            unhandled = conn.execute("SELECT count(*) FROM inbox WHERE status = 'pending'").fetchone()[0]
        assert [s for s, _ in timer_rows] == ["pending"], timer_rows
        assert TIMED_OUT not in texts(fake, "c-timeout")
        at_kill = {cid: texts(fake, cid) for cid in RESTART_CONVERSATIONS}
        assert owners["c-bot"] == "bot" and owners["c-timeout"] == "queued"
        assert owners["c-queued"] == "queued" and owners["c-agent"] == "agent"

        # After kill -9 the node stays down until the queue timeout is overdue; after SIGTERM it comes
        # back at once and the timeout falls due while it runs. Either way the row set before fires.
        due_at = timer_rows[0][1]
        if how == signal.SIGKILL:
            await asyncio.sleep(max(0.0, due_at + 0.5 - time.time()))
        overdue_at_restart = time.time() > due_at

        # Restart on the same port (the same node: it takes its leases back at once).
        second = serve(2)
        restarted = time.monotonic()
        ready_in = await wait_ready(second, f"{base}/readyz", 30)

        # What was acknowledged before the signal is done now, once; the queue timeout fires.
        await fake.wait_for(lambda: "One more thing (c-agent)." in texts(fake, "c-agent"), timeout=30)
        await fake.wait_for(lambda: QUESTION in texts(fake, "c-resolved"), timeout=30)
        await fake.wait_for(lambda: TIMED_OUT in texts(fake, "c-timeout"), timeout=30)
        timeout_call = next(c for c in fake.delivered() if c.body["text"] == TIMED_OUT)
        assert timeout_call.at > restarted
        timeout_after = timeout_call.at - restarted
        for cid in RESTART_CONVERSATIONS:
            await admin.settled(f"myapp:{cid}")

        # Continue every conversation to its end.
        await said("c-bot", "I want a human", ["bot: hi", CONNECTING])
        await users["c-bot"].say("hello?")
        await admin.settled("myapp:c-bot")
        await admin.send("myapp:c-bot", "message", id="b-1", agent="sam", text="Agent here (c-bot).")
        await admin.send("myapp:c-bot", "resolved", id="b-2", agent="sam")

        await users["c-queued"].say("still waiting")
        await admin.settled("myapp:c-queued")
        await admin.send("myapp:c-queued", "message", id="q-1", agent="sam", text="Agent here (c-queued).")
        await admin.send("myapp:c-queued", "resolved", id="q-2", agent="sam")

        await users["c-agent"].say("hello?")
        await admin.settled("myapp:c-agent")
        await admin.send("myapp:c-agent", "resolved", id="a-3", agent="sam")

        await admin.send("myapp:c-resolved", "resolved", id="r-3", agent="sam")  # a late second resolve
        for cid in ("c-bot", "c-queued", "c-agent"):
            await fake.wait_for(lambda cid=cid: texts(fake, cid)[-1:] == [QUESTION], timeout=20)
        for cid, rating in (("c-bot", "5"), ("c-queued", "4"), ("c-agent", "3"), ("c-resolved", "5")):
            await users[cid].say(rating)
            await fake.wait_for(lambda cid=cid: texts(fake, cid)[-1:] == [THANKS], timeout=20)
        await users["c-timeout"].say("hello again")
        await fake.wait_for(lambda: texts(fake, "c-timeout")[-1:] == ["bot: hello again"], timeout=20)
        for cid in RESTART_CONVERSATIONS:
            await admin.settled(f"myapp:{cid}")
        await asyncio.sleep(1.5)  # three sweeps and a timer tick: a late duplicate would show up now

        assert {cid: texts(fake, cid) for cid in RESTART_CONVERSATIONS} == {
            "c-bot": ["bot: hi", CONNECTING, "Agent here (c-bot).", QUESTION, THANKS],
            "c-queued": [CONNECTING, "Agent here (c-queued).", QUESTION, THANKS],
            "c-agent": [CONNECTING, "Sam here (c-agent).", "One more thing (c-agent).", QUESTION, THANKS],
            "c-resolved": [CONNECTING, "Sam here (c-resolved).", QUESTION, THANKS],
            "c-timeout": [CONNECTING, TIMED_OUT, "bot: hello again"],
        }
        for cid in RESTART_CONVERSATIONS:
            assert all(len(k) == 1 for k in keys_per_text(fake, cid).values()), keys_per_text(fake, cid)
            conv = await admin.conversation(f"myapp:{cid}")
            expected = (
                [("bot", "queued", "bot", "asked"), ("queued", "bot", "system", "queue timeout")]
                if cid == "c-timeout"
                else HUMAN_TRAIL
            )
            assert trail(conv) == expected, (cid, trail(conv))
            assert conv["state"]["owner"] == "bot" and conv["state"]["state"] == "start"
        assert fake.bad_signatures == 0

        second.popen.send_signal(signal.SIGTERM)
        rc = await second.wait(30)
        assert rc in (0, -signal.SIGTERM), f"exit code {rc} after SIGTERM:\n{second.tail()}"
        for proc in (first, second):
            log = proc.log.read_text()
            assert "Traceback" not in log, proc.tail(200)
        repeats = sum(1 for c in fake.calls if c.path == "/messages" and c.repeat)
        print(
            f"\n[{how.name}] replies at the signal {sum(len(t) for t in at_kill.values())}, "
            f"messages and events not yet handled {unhandled}, ready again in "
            f"{ready_in:.2f}s, the queue timeout (overdue at the restart: {overdue_at_restart}) fired "
            f"{timeout_after:.2f}s after the restart, "
            f"redelivered keys {repeats}"
        )


# -- 4. the platform's own agent tools: Chatwoot -------------------------------------------------

CW_SECRET = "cw-webhook-secret"
CW_BOT_TOKEN = "cw-bot-token"
CW_ACCOUNT = 3


def cw_sign(raw: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(CW_SECRET.encode(), stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-chatwoot-timestamp": stamp,
        "x-chatwoot-signature": f"sha256={digest}",
    }


CW_CONTACT = {"id": 731, "name": "Rina", "type": "contact"}
CW_AGENT = {"id": 5, "name": "Dewi", "type": "user"}


def cw_message(mid: int, conv: int, text: str, status: str) -> dict[str, Any]:
    return {
        "event": "message_created",
        "id": mid,
        "content": text,
        "message_type": "incoming",
        "content_type": "text",
        "private": False,
        "sender": CW_CONTACT,
        "conversation": {"id": conv, "status": status, "inbox_id": 7},
        "inbox": {"id": 7, "name": "Web"},
    }


def cw_status(
    conv: int, status: str, previous: str, stamp: float, event: str = "conversation_status_changed"
) -> dict[str, Any]:
    return {
        "event": event,
        "id": conv,
        "status": status,
        "inbox_id": 7,
        "meta": {"sender": CW_CONTACT, "assignee": CW_AGENT if status != "pending" else None},
        "changed_attributes": [{"status": {"previous_value": previous, "current_value": status}}],
        "updated_at": stamp,
        "timestamp": int(stamp),
    }


@dataclass
class FakeChatwoot:
    """Chatwoot's Application API for an agent bot. Like Chatwoot, a status change the bot makes
    fires `conversation_status_changed` back at the bot's webhook (with the assignee auto-assignment
    picked)."""

    webhook_url: str = ""
    calls: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    status: dict[int, str] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def app(self) -> Starlette:
        base = "/api/v1/accounts/{account:int}/conversations/{conv:int}"
        return Starlette(
            routes=[
                Route(f"{base}/{{what}}", self._call, methods=["POST"]),
            ]
        )

    async def _call(self, request: Request) -> Response:
        if request.path_params["account"] != CW_ACCOUNT or request.headers.get("api_access_token") != CW_BOT_TOKEN:
            return JSONResponse({"error": "Invalid Access Token"}, status_code=401)
        conv, what = request.path_params["conv"], request.path_params["what"]
        body: dict[str, Any] = await request.json()
        self.calls.append((conv, what, body))
        if what == "toggle_status":
            previous = self.status.get(conv, "pending")
            self.status[conv] = body["status"]
            if previous != body["status"]:
                task = asyncio.create_task(self.webhook(cw_status(conv, body["status"], previous, time.time())))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            return JSONResponse(
                {"payload": {"success": True, "current_status": body["status"], "conversation_id": conv}}
            )
        return JSONResponse({"id": len(self.calls), "content": body.get("content")})

    async def webhook(self, data: dict[str, Any]) -> dict[str, Any]:
        raw = json.dumps(data).encode()
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(self.webhook_url, content=raw, headers=cw_sign(raw))
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        self.answers.append(answer)
        return answer

    def of(self, conv: int) -> list[tuple[str, dict[str, Any]]]:
        return [(what, body) for c, what, body in self.calls if c == conv]


def outgoing(text: str, private: bool = False) -> tuple[str, dict[str, Any]]:
    return ("messages", {"content": text, "message_type": "outgoing", "private": private})


TYPING_ON = ("toggle_typing_status", {"typing_status": "on"})
TYPING_OFF = ("toggle_typing_status", {"typing_status": "off"})


async def test_chatwoot_handoff_and_release_through_the_platform(tmp_path: Path) -> None:
    cw = FakeChatwoot()
    async with Server(cw.app()) as cw_server, httpx.AsyncClient(timeout=10) as client:
        settings = settings_from_text(
            textwrap.dedent(
                f"""\
                store:
                  url: "sqlite:///{tmp_path}/sb.db"
                flows: {flows_dir(tmp_path)}
                platforms:
                  cw:
                    type: chatwoot
                    base_url: {cw_server.url}
                    account_id: {CW_ACCOUNT}
                    bot_token: {CW_BOT_TOKEN}
                    webhook_secret: {CW_SECRET}
                    teams: {{support: 9}}
                admin: {{token: {TOKEN}}}
                typing: {{delay: 0}}
                outbox: {{backoff_base: 0.05, backoff_max: 0.5}}
                handoff: {{queues: {{support: {{}}}}}}
                """
            ),
            "<test config>",
        )
        async with running(settings) as (server, _services):
            cw.webhook_url = f"{server.url}/webhooks/cw"
            admin = Admin(client, server.url)

            async def contact(mid: int, conv: int, text: str) -> dict[str, Any]:
                return await cw.webhook(cw_message(mid, conv, text, cw.status.get(conv, "pending")))

            # Conversation 42: the agent resolves in Chatwoot.
            assert await contact(101, 42, "I want a human") == {"accepted": 1, "duplicates": 0}
            # the handoff: the bot's reply, typing off, then Chatwoot's status open, the team and a note
            await wait_until(lambda: len(cw.of(42)) >= 6, 20, "the handoff calls")
            await wait_until(lambda: len(cw.answers) == 2, 20, "Chatwoot's status webhook")
            conv = await admin.settled("cw:42")
            assert cw.of(42) == [
                TYPING_ON,
                outgoing(CONNECTING),
                TYPING_OFF,
                ("toggle_status", {"status": "open"}),
                ("assignments", {"team_id": 9}),
                outgoing("Handoff: asked", private=True),
            ]
            # Chatwoot's "open" (an agent auto-assigned) is the agent's claim
            assert conv["state"]["owner"] == "agent"
            assert trail(conv) == [("bot", "queued", "bot", "asked"), ("queued", "agent", "Dewi", "claimed")]

            # the contact writes while a human owns it: acknowledged, no turn, nothing from the bot
            answer = await contact(102, 42, "are you there?")
            assert answer["accepted"] == 0 and "human owns it" in answer["ignored"]

            # Dewi resolves: Chatwoot's new and legacy events announce one change and dedupe to one resume
            stamp = time.time()
            cw.status[42] = "resolved"  # Chatwoot changes the status, then tells the bot
            resolved = await cw.webhook(cw_status(42, "resolved", "open", stamp))
            legacy = await cw.webhook(cw_status(42, "resolved", "open", stamp, event="conversation_resolved"))
            assert (resolved, legacy) == ({"accepted": 1, "duplicates": 0}, {"accepted": 0, "duplicates": 1})
            await wait_until(lambda: len(cw.of(42)) >= 8, 20, "the release and the resume question")
            # the release's own status webhook (pending after resolved) is no hand-back: ignored
            await wait_until(lambda: len(cw.answers) == 6, 20, "Chatwoot's pending webhook")
            # (its answer may come before the legacy event's: the resume turn does not wait for that)
            ignored = [a for a in cw.answers if "pending without a human" in a.get("ignored", "")]
            assert len(ignored) == 1, cw.answers
            await admin.settled("cw:42")
            assert await contact(103, 42, "5") == {"accepted": 1, "duplicates": 0}
            await wait_until(lambda: len(cw.of(42)) >= 11, 20, "the bot's answer")
            conv = await admin.settled("cw:42")

            # Conversation 43: the agent hands it back by setting it pending in Chatwoot.
            await contact(201, 43, "human please")
            await wait_until(lambda: len(cw.of(43)) >= 6 and len(cw.answers) == 9, 20, "the second handoff")
            await admin.settled("cw:43")
            stamp = time.time()
            cw.status[43] = "pending"  # the bot's release finds it pending already: no status change
            back = await cw.webhook(cw_status(43, "pending", "open", stamp))
            assert back == {"accepted": 1, "duplicates": 0}
            await wait_until(lambda: len(cw.of(43)) >= 8, 20, "the second release")
            conv43 = await admin.settled("cw:43")
            await asyncio.sleep(0.5)
            await asyncio.wait_for(asyncio.gather(*cw.tasks), 10)

        handoff = [
            TYPING_ON,
            outgoing(CONNECTING),
            TYPING_OFF,
            ("toggle_status", {"status": "open"}),
            ("assignments", {"team_id": 9}),
            outgoing("Handoff: asked", private=True),
        ]
        assert cw.of(42) == [
            *handoff,
            # the platform gives the conversation back to the bot before the bot speaks again
            ("toggle_status", {"status": "pending"}),
            outgoing(QUESTION),
            TYPING_ON,
            outgoing(THANKS),
            TYPING_OFF,
        ]
        assert trail(conv) == [
            ("bot", "queued", "bot", "asked"),
            ("queued", "agent", "Dewi", "claimed"),
            ("agent", "bot", "agent", "resolved"),
        ]
        assert conv["state"]["vars"]["rating"] == "5"
        assert cw.of(43) == [*handoff, ("toggle_status", {"status": "pending"}), outgoing(QUESTION)]
        assert trail(conv43)[-1] == ("agent", "bot", "agent", "resolved")
        assert conv43["state"]["owner"] == "bot" and conv43["state"]["state"] == "rate"
