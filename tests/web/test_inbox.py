"""The agent inbox over real HTTP: sign-in, sessions, CSRF, each agent action, live events, escaping.

Switchboard runs on a real port with a generic platform played by the fake platform, so an agent's
reply is seen where a user would see it: delivered to the platform through the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from middleware.agents import add_agent, verify_agent
from middleware.handoff import QueueSettings
from middleware.services import Services
from middleware.web.inbox import SESSION_COOKIE, LoginThrottle, build_transcript, token_hash
from tests.conftest import Server, fake_platform, message, running
from tests.fakes.platform import FakePlatform
from tests.web.conftest import PASSWORD, csrf_of, events, eventually, sign_in, web_config


@contextlib.asynccontextmanager
async def inbox_app(
    tmp_path: Path, flows: Path, inbox: str = "", queues: dict[str, QueueSettings] | None = None
) -> AsyncIterator[tuple[Server, Services, FakePlatform]]:
    """`queues`: more handoff queues besides web_config's support and billing."""
    async with fake_platform() as (platform_server, fake):
        settings = web_config(f"sqlite:///{tmp_path}/sb.db", flows, platform_url=platform_server.url, inbox=inbox)
        if queues:
            handoff = settings.handoff.model_copy(update={"queues": {**settings.handoff.queues, **queues}})
            settings = settings.model_copy(update={"handoff": handoff})
        async with running(settings) as (server, services):
            await add_agent(services.store, "alice", PASSWORD)
            await add_agent(services.store, "bob", PASSWORD)
            yield server, services, fake


@pytest.fixture
async def agent_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def owner_of(services: Services, key: str) -> dict[str, Any]:
    found = await services.store.conversation(key)
    assert found is not None
    return dict(found["state"])


async def hand_off(client: httpx.AsyncClient, server: Server, services: Services, conv: str, n: int = 1) -> str:
    """The user asks for a person; returns the conversation key once it waits in `support`."""
    answer = await client.post(f"{server.url}/webhooks/myapp", json=message(f"{conv}-{n}", conv, "a human please"))
    assert answer.status_code == 200
    key = f"myapp:{conv}"

    async def queued() -> bool:
        found = await services.store.conversation(key)
        return found is not None and (found["state"] or {}).get("owner") == "queued"

    await eventually(queued, what="the handoff")
    return key


async def act(client: httpx.AsyncClient, server: Server, key: str, action: str, **form: str) -> httpx.Response:
    page = await client.get(f"{server.url}/inbox/c/{key}")
    assert page.status_code == 200, page.text
    return await client.post(
        f"{server.url}/inbox/act",
        data={"csrf": csrf_of(page.text), "key": key, "action": action, **form},
        headers={"X-Requested-With": "fetch"},
    )


async def settled(services: Services, key: str) -> None:
    async def idle() -> bool:
        found = await services.store.conversation(key)
        return found is not None and all(m["status"] == "done" for m in found["messages"])

    await eventually(idle, what="the conversation's turns")
    await services.dispatcher.settled(key)


# -- accounts and sessions ---------------------------------------------------------------------


async def test_sign_in_opens_a_session_kept_only_as_a_hash(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        first = await agent_client.get(f"{server.url}/inbox")
        assert first.status_code == 303 and first.headers["location"] == "/inbox/login?next=%2Finbox"
        login = await agent_client.get(f"{server.url}/inbox/login")
        assert "content-security-policy" in login.headers and login.headers["x-frame-options"] == "DENY"
        answer = await sign_in(agent_client, server.url, "alice")
        assert answer.status_code == 303 and answer.headers["location"] == "/inbox"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Path=/inbox" in cookie
        token = agent_client.cookies[SESSION_COOKIE]
        assert await services.store.agent_session(token_hash(token)) is not None
        assert await services.store.agent_session(token) is None  # the store never holds the token itself
        page = await agent_client.get(f"{server.url}/inbox")
        assert page.status_code == 200
        assert "Signed in as <strong>alice</strong>" in page.text
        for queue in ("support", "billing"):
            assert f'data-queue="{queue}"' in page.text
        again = await agent_client.get(f"{server.url}/inbox/login")  # already signed in: straight on
        assert again.status_code == 303


async def test_wrong_password_and_unknown_name_get_the_same_answer(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        wrong = await sign_in(agent_client, server.url, "alice", "not the password")
        unknown = await sign_in(agent_client, server.url, "nobody", "not the password")
        for answer in (wrong, unknown):
            assert answer.status_code == 401
            assert "Wrong name or password." in answer.text
            assert f"{SESSION_COOKIE}=" not in answer.headers.get("set-cookie", "")
        assert 'value="alice"' in wrong.text  # the name stays in the form; the password does not
        assert 'name="next" value="/inbox"' in wrong.text
        assert "not the password" not in wrong.text
        assert (await agent_client.get(f"{server.url}/inbox")).status_code == 303
        assert await verify_agent(services.store, "alice", PASSWORD)


async def test_repeated_failures_pause_sign_in(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows, inbox="secret: s\nmax_failed_logins: 3") as (server, _, _):
        for _ in range(3):
            assert (await sign_in(agent_client, server.url, "alice", "wrong password")).status_code == 401
        paused = await sign_in(agent_client, server.url, "alice")  # even the right password, for now
        assert paused.status_code == 429 and "Too many failed sign-ins" in paused.text


async def test_sign_in_without_its_csrf_token_is_refused(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, _, _):
        url = f"{server.url}/inbox/login"
        bare = await agent_client.post(url, data={"name": "alice", "password": PASSWORD})
        assert bare.status_code == 403 and "expired" in bare.text
        form = await agent_client.get(url)
        token = csrf_of(form.text)
        issued, _, mac = token.partition(".")
        forged = f"{issued}.{'0' * len(mac)}"
        assert (
            await agent_client.post(url, data={"csrf": forged, "name": "alice", "password": PASSWORD})
        ).status_code == 403
        # a token is bound to the browser's cookie: another browser's token does not work here
        async with httpx.AsyncClient() as other:
            assert (
                await other.post(url, data={"csrf": token, "name": "alice", "password": PASSWORD})
            ).status_code == 403
        assert (
            await agent_client.post(url, data={"csrf": token, "name": "alice", "password": PASSWORD})
        ).status_code == 303
        json_body = await agent_client.post(url, json={"name": "alice"})
        assert json_body.status_code == 415


async def test_sessions_expire_after_the_idle_time(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows, inbox="secret: s\nsession_minutes: 0.01") as (server, _, _):
        assert (await sign_in(agent_client, server.url, "alice")).status_code == 303
        assert (await agent_client.get(f"{server.url}/inbox")).status_code == 200
        await asyncio.sleep(0.8)  # 0.01 minutes = 0.6 s
        expired = await agent_client.get(f"{server.url}/inbox")
        assert expired.status_code == 303 and expired.headers["location"].startswith("/inbox/login")
        partial = await agent_client.get(f"{server.url}/inbox/partials/sidebar")
        assert partial.status_code == 401 and partial.json()["login"] == "/inbox/login"
        assert (await agent_client.get(f"{server.url}/inbox/events")).status_code == 401


async def test_sign_out_and_account_removal_end_the_session(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        await sign_in(agent_client, server.url, "alice")
        page = await agent_client.get(f"{server.url}/inbox")
        refused = await agent_client.post(f"{server.url}/inbox/logout", data={"csrf": "nope"})
        assert refused.status_code == 403
        out = await agent_client.post(f"{server.url}/inbox/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/inbox/login"
        assert (await agent_client.get(f"{server.url}/inbox")).status_code == 303
        async with httpx.AsyncClient() as bob:
            await sign_in(bob, server.url, "bob")
            assert (await bob.get(f"{server.url}/inbox")).status_code == 200
            assert await services.store.remove_agent("bob")
            assert (await bob.get(f"{server.url}/inbox")).status_code == 303


# -- agent actions -----------------------------------------------------------------------------


async def test_claim_reply_note_and_resolve(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, fake):
        key = await hand_off(client, server, services, "c-1")
        await sign_in(agent_client, server.url, "alice")
        inbox = await agent_client.get(f"{server.url}/inbox")
        assert 'href="/inbox/c/myapp:c-1"' in inbox.text and "a human please" in inbox.text

        claimed = await act(agent_client, server, key, "claim")
        assert claimed.status_code == 202 and claimed.json() == {"ok": True, "notice": "You took the conversation."}
        await settled(services, key)
        state = await owner_of(services, key)
        assert state["owner"] == "agent" and state["handoff"]["agent"] == "alice"

        replied = await act(agent_client, server, key, "reply", text="Hi, I'm Alice. How can I help?")
        assert replied.status_code == 202
        await fake.wait_for(lambda: any(c.body["text"] == "Hi, I'm Alice. How can I help?" for c in fake.delivered()))

        await client.post(f"{server.url}/webhooks/myapp", json=message("c-1-2", "c-1", "my order is late"))
        noted = await act(agent_client, server, key, "note", text="Check the courier <b>first</b>")
        assert noted.status_code == 202
        await settled(services, key)
        texts = [c.body["text"] for c in fake.delivered()]
        assert "Check the courier <b>first</b>" not in texts  # notes stay with the agents

        page = await agent_client.get(f"{server.url}/inbox/partials/conversation/{key}")
        html = page.text
        order = [
            html.index("a human please"),
            html.index("Connecting you to a person at Acme."),
            html.index("alice took the conversation."),
            html.index("Hi, I&#39;m Alice. How can I help?"),
            html.index("my order is late"),
            html.index("Check the courier &lt;b&gt;first&lt;/b&gt;"),
        ]
        assert order == sorted(order), "the transcript is in the conversation's order"
        assert "internal note" in html and "Handed off to a person (asked)" in html

        resolved = await act(agent_client, server, key, "resolve")
        assert resolved.status_code == 202
        await fake.wait_for(
            lambda: any(c.body["text"] == "How would you rate the help you got?" for c in fake.delivered())
        )
        state = await owner_of(services, key)
        assert state["owner"] == "bot" and state["state"] == "rate"
        found = await services.store.conversation(key)
        assert found is not None
        assert [(o["before"], o["after"], o["actor"]) for o in found["ownership"]] == [
            ("bot", "queued", "bot"),
            ("queued", "agent", "alice"),
            ("agent", "bot", "alice"),
        ]
        # after the bot took it back there is nothing left for an agent to do
        late = await act(agent_client, server, key, "reply", text="hello?")
        assert late.status_code == 409 and "bot owns" in late.json()["error"]


async def test_transfer_and_release(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, fake):
        key = await hand_off(client, server, services, "c-2")
        await sign_in(agent_client, server.url, "alice")
        await act(agent_client, server, key, "claim")
        await settled(services, key)
        moved = await act(agent_client, server, key, "transfer", queue="billing")
        assert moved.status_code == 202
        await settled(services, key)
        state = await owner_of(services, key)
        assert state["owner"] == "queued" and state["handoff"]["queue"] == "billing"
        assert state["handoff"]["agent"] is None
        sidebar = (await agent_client.get(f"{server.url}/inbox/partials/sidebar")).text
        billing_row = re.search(r'data-queue="billing">(.*?)</tr>', sidebar, re.S)
        assert billing_row and '<span class="count hot">1</span>' in billing_row.group(1)
        bad = await act(agent_client, server, key, "transfer", queue="nowhere")
        assert bad.status_code == 400
        released = await act(agent_client, server, key, "release")
        assert released.status_code == 202
        await fake.wait_for(
            lambda: any(c.body["text"] == "How would you rate the help you got?" for c in fake.delivered())
        )
        assert (await owner_of(services, key))["owner"] == "bot"
        found = await services.store.conversation(key)
        assert found is not None and found["ownership"][-1]["reason"] == "released"


async def test_other_agents_conversations_capacity_and_take_over(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        keys = [await hand_off(client, server, services, f"c-{n}") for n in range(3)]
        await sign_in(agent_client, server.url, "alice")
        for key in keys[:2]:
            assert (await act(agent_client, server, key, "claim")).status_code == 202
            await settled(services, key)
        full = await act(agent_client, server, keys[2], "claim")  # support's capacity is 2
        assert full.status_code == 409 and "as many conversations" in full.json()["error"]
        answering = await act(agent_client, server, keys[2], "reply", text="hi")  # a reply would claim it
        assert answering.status_code == 409 and "as many conversations" in answering.json()["error"]
        async with httpx.AsyncClient(timeout=30) as bob:
            await sign_in(bob, server.url, "bob")
            page = (await bob.get(f"{server.url}/inbox/c/{keys[0]}")).text
            assert "with alice" in page and "Take over" in page and 'id="resolve-button"' not in page
            taken = await act(bob, server, keys[0], "reply", text="hi")
            assert taken.status_code == 409 and "Another agent" in taken.json()["error"]
            assert (await act(bob, server, keys[0], "resolve")).status_code == 409
            assert (await act(bob, server, keys[0], "note", text="seen it")).status_code == 202
            assert (await act(bob, server, keys[0], "claim")).status_code == 202
            await settled(services, keys[0])
            assert (await owner_of(services, keys[0]))["handoff"]["agent"] == "bob"
            sidebar = (await bob.get(f"{server.url}/inbox/partials/sidebar")).text
            mine = sidebar.split("list-mine", 1)[1].split("list-others", 1)[0]
            assert keys[0] in mine
            page = (await bob.get(f"{server.url}/inbox/c/{keys[0]}")).text
            assert "bob took the conversation." in page
        for action, status in (("dance", 400), ("reply", 400)):
            assert (await act(agent_client, server, keys[1], action)).status_code == status
        missing = await agent_client.post(
            f"{server.url}/inbox/act",
            data={
                "csrf": csrf_of((await agent_client.get(f"{server.url}/inbox")).text),
                "key": "x:y",
                "action": "note",
                "text": "t",
            },
            headers={"X-Requested-With": "fetch"},
        )
        assert missing.status_code == 404


async def test_waiting_conversations_by_queue_priority_and_agent_skills(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    queues = {"vip": QueueSettings(priority=10), "indonesian": QueueSettings(skills=("id",))}
    async with inbox_app(tmp_path, helpdesk_flows, queues=queues) as (server, services, _):
        await add_agent(services.store, "sari", PASSWORD, skills=["ID", "en"])
        old, local, urgent = [await hand_off(client, server, services, f"c-{n}") for n in range(3)]
        await sign_in(agent_client, server.url, "alice")  # alice has no skills
        for key, queue in ((local, "indonesian"), (urgent, "vip")):
            assert (await act(agent_client, server, key, "transfer", queue=queue)).status_code == 202
            await settled(services, key)
            assert (await owner_of(services, key))["handoff"]["queue"] == queue

        def waiting_keys(sidebar: str) -> list[str]:
            section = sidebar.split("list-waiting", 1)[1].split("list-mine", 1)[0]
            return re.findall(r'data-key="([^"]+)"', section)

        # alice: the newest first (vip's priority beats the wait), the Indonesian queue's out of sight
        sidebar = (await agent_client.get(f"{server.url}/inbox/partials/sidebar")).text
        assert waiting_keys(sidebar) == [urgent, old]
        row = re.search(r'<tr data-queue="indonesian"([^>]*)>(.*?)</tr>', sidebar, re.S)
        assert row and 'class="not-yours"' in row.group(1) and "not yours: needs id" in row.group(2)
        assert 'data-queue="vip">' in sidebar and 'data-queue="support">' in sidebar
        page = (await agent_client.get(f"{server.url}/inbox/c/{local}")).text
        assert "asks for skills you do not have" in page and 'id="claim-button"' not in page
        for action, form in (("claim", {}), ("reply", {"text": "halo"}), ("transfer", {"queue": "support"})):
            refused = await act(agent_client, server, local, action, **form)
            assert refused.status_code == 403 and "skills you do not have" in refused.json()["error"], action
        assert (await owner_of(services, local))["owner"] == "queued"

        # sari (skills ID, en: matched regardless of case) sees all three and takes the local one
        async with httpx.AsyncClient(timeout=30) as sari:
            await sign_in(sari, server.url, "sari")
            sidebar = (await sari.get(f"{server.url}/inbox/partials/sidebar")).text
            assert waiting_keys(sidebar) == [urgent, old, local]
            assert "not-yours" not in sidebar
            assert (await act(sari, server, local, "claim")).status_code == 202
            await settled(services, local)
            assert (await owner_of(services, local))["handoff"]["agent"] == "sari"
        # alice does not see it among the other agents' either, nor may take it over
        sidebar = (await agent_client.get(f"{server.url}/inbox/partials/sidebar")).text
        assert local not in sidebar
        assert (await act(agent_client, server, local, "claim")).status_code == 403


async def test_actions_without_the_sessions_csrf_token_are_refused(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, fake):
        key = await hand_off(client, server, services, "c-9")
        await sign_in(agent_client, server.url, "alice")
        url = f"{server.url}/inbox/act"
        before = len((await services.store.conversation(key) or {})["messages"])
        for token in (None, "", "forged"):
            data = {"key": key, "action": "reply", "text": "pwned"}
            if token is not None:
                data["csrf"] = token
            refused = await agent_client.post(url, data=data)
            assert refused.status_code == 403 and "out of date" in refused.text
        # another agent's token is not this session's
        async with httpx.AsyncClient() as bob:
            await sign_in(bob, server.url, "bob")
            bobs = csrf_of((await bob.get(f"{server.url}/inbox")).text)
        assert (
            await agent_client.post(url, data={"csrf": bobs, "key": key, "action": "reply", "text": "x"})
        ).status_code == 403
        assert len((await services.store.conversation(key) or {})["messages"]) == before
        assert "pwned" not in [c.body.get("text") for c in fake.calls]
        # without a session: to the sign-in page, nothing done
        async with httpx.AsyncClient() as stranger:
            answer = await stranger.post(url, data={"csrf": "x", "key": key, "action": "resolve"})
            assert answer.status_code == 303 and answer.headers["location"] == "/inbox/login"
        # a plain form (no script) gets a redirect back to the conversation with a notice
        page = await agent_client.get(f"{server.url}/inbox/c/{key}")
        plain = await agent_client.post(url, data={"csrf": csrf_of(page.text), "key": key, "action": "claim"})
        assert plain.status_code == 303 and plain.headers["location"] == f"/inbox/c/{key}?notice=claim"
        shown = await agent_client.get(f"{server.url}{plain.headers['location']}")
        assert "You took the conversation." in shown.text


async def test_what_users_write_is_escaped_everywhere(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        key = await hand_off(client, server, services, "c-x")
        evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
        payload = message("c-x-2", "c-x", evil, sender={"id": "u-x", "name": "<b>Mallory</b>"})
        payload["attachments"] = [{"type": "file", "url": "javascript:alert(2)", "name": "invoice"}]
        await client.post(f"{server.url}/webhooks/myapp", json=payload)
        await settled(services, key)
        await sign_in(agent_client, server.url, "alice")
        for url in (f"/inbox/c/{key}", "/inbox", f"/inbox/partials/conversation/{key}", "/inbox/partials/sidebar"):
            html = (await agent_client.get(f"{server.url}{url}")).text
            assert "<script>alert" not in html and "<img src=x" not in html and "<b>Mallory" not in html, url
            assert "javascript:" not in html, url
        page = (await agent_client.get(f"{server.url}/inbox/c/{key}")).text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
        assert 'href="#"' in page  # the javascript: link was defused


async def test_the_live_stream_tells_about_arrivals_and_owner_changes(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows, inbox="secret: s\nsession_minutes: 60") as (server, services, _):
        await sign_in(agent_client, server.url, "alice")
        async with events(agent_client, f"{server.url}/inbox/events?conversation=myapp:c-7") as stream:
            # a bot-only turn is none of the inbox's business, but this conversation's own topic has it
            await client.post(f"{server.url}/webhooks/myapp", json=message("c-7-1", "c-7", "hello"))
            turn = await stream.until("turn")
            assert turn == {
                "kind": "turn",
                "conversation": "myapp:c-7",
                "owner": "bot",
                "queue": None,
                "agent": None,
                "event": None,
                "changed": False,
            }
            await client.post(f"{server.url}/webhooks/myapp", json=message("c-7-2", "c-7", "human"))
            queued = await stream.until("turn", owner="queued")
            assert queued["queue"] == "support" and queued["changed"] is True
            await act(agent_client, server, "myapp:c-7", "claim")
            claimed = await stream.until("turn", owner="agent")
            assert claimed["agent"] == "alice" and claimed["event"] == "agent.assigned"
            await client.post(f"{server.url}/webhooks/myapp", json=message("c-7-3", "c-7", "are you there?"))
            arrived = await stream.until("turn", event=None)
            assert arrived["owner"] == "agent" and arrived["changed"] is False
        async with events(agent_client, f"{server.url}/inbox/events") as stream:
            # the inbox topic alone: an unrelated conversation handed off
            await hand_off(client, server, services, "c-8")
            change = await stream.until("turn", conversation="myapp:c-8")
            assert change["owner"] == "queued"


async def test_the_stream_ends_when_the_session_does(
    tmp_path: Path, helpdesk_flows: Path, agent_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from middleware.web import sse

    monkeypatch.setattr(sse, "HEARTBEAT_SECONDS", 0.2)
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        await sign_in(agent_client, server.url, "alice")
        async with events(agent_client, f"{server.url}/inbox/events") as stream:
            await services.store.close_session(token_hash(agent_client.cookies[SESSION_COOKIE]))
            await stream.until("signed-out", within=5)


async def test_a_reconnecting_stream_gets_what_it_missed(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, agent_client: httpx.AsyncClient
) -> None:
    async with inbox_app(tmp_path, helpdesk_flows) as (server, services, _):
        await sign_in(agent_client, server.url, "alice")
        async with events(agent_client, f"{server.url}/inbox/events") as stream:
            await hand_off(client, server, services, "c-a")
            await stream.until("turn", conversation="myapp:c-a")
            last_id = stream.events[-1][2]
        assert last_id
        await hand_off(client, server, services, "c-b")  # while the page was away
        async with events(agent_client, f"{server.url}/inbox/events", **{"Last-Event-ID": last_id}) as stream:
            missed = await stream.until("turn", within=3)
            assert missed["conversation"] == "myapp:c-b"


def test_the_throttle_counts_names_and_addresses_apart() -> None:
    throttle = LoginThrottle(2)
    for _ in range(2):
        throttle.failed(["name:alice", "addr:10.0.0.1"])
    assert throttle.wait(["name:alice", "addr:10.0.0.1"]) > 0
    assert throttle.wait(["name:bob", "addr:10.0.0.1"]) == 0  # one proxy, several agents
    for n in range(6):
        throttle.failed([f"name:x{n}", "addr:10.0.0.1"])
    assert throttle.wait(["name:bob", "addr:10.0.0.1"]) > 0
    throttle.succeeded("name:alice")
    assert throttle.wait(["name:alice"]) == 0


# -- the transcript, as data ---------------------------------------------------------------------


def test_transcript_orders_replies_after_their_message_and_owner_changes_after_their_turn() -> None:
    user = {"id": "u", "name": "Ana", "attributes": {}}
    agent = {"id": "al", "name": "al", "attributes": {"role": "agent"}}
    conversation = {
        "messages": [
            {
                "message_id": "m1",
                "type": "text",
                "text": "human",
                "sender": user,
                "payload": {},
                "status": "done",
                "received_at": 1.0,
                "handled_at": 2.0,
            },
            {
                "message_id": "agent:a",
                "type": "event",
                "text": "",
                "sender": agent,
                "status": "done",
                "payload": {"event": "agent.message", "agent": "al", "text": "hi"},
                "received_at": 3.0,
                "handled_at": 4.0,
            },
            {
                "message_id": "timer:1",
                "type": "event",
                "text": "",
                "sender": user,
                "status": "done",
                "payload": {"event": "timer", "name": "handoff-reminder"},
                "received_at": 5.0,
                "handled_at": 6.0,
            },
            {
                "message_id": "agent:b",
                "type": "event",
                "text": "",
                "sender": agent,
                "status": "pending",
                "payload": {"event": "agent.resolved", "agent": "al"},
                "received_at": 7.0,
                "handled_at": None,
            },
        ],
        "outbox": [
            {"kind": "message", "reply": {"text": "Connecting"}, "reply_to": "m1", "status": "sent", "created_at": 2.0},
            {
                "kind": "message",
                "reply": {"text": "hi"},
                "reply_to": "agent:a",
                "status": "dead",
                "error": "400: no",
                "attempts": 1,
                "created_at": 4.0,
            },
            {
                "kind": "message",
                "reply": {"text": "still in line"},
                "reply_to": "timer:1",
                "status": "pending",
                "created_at": 6.0,
            },
            {"kind": "handoff", "reply_to": "m1", "status": "sent", "created_at": 2.0},
        ],
        "ownership": [
            {"before": "bot", "after": "queued", "actor": "bot", "reason": "asked", "at": 2.0},
            {"before": "queued", "after": "agent", "actor": "al", "reason": "claimed", "at": 4.0},
        ],
    }
    entries = [(e.kind, e.text, e.status) for e in build_transcript(conversation)]
    assert entries == [
        ("user", "human", ""),
        ("system", "Handed off to a person (asked); waiting in line.", ""),
        ("bot", "Connecting", "sent"),
        ("agent", "hi", "not delivered"),
        ("system", "al took the conversation.", ""),
        ("bot", "still in line", "sending"),
        ("system", "al: resolve…", "sending"),
    ]
