"""The playground: the page, starting a conversation with a chosen flow, and a message's whole trip
(webhook -> store -> dispatcher -> turn -> outbox -> the playground platform -> server-sent events)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from middleware.platforms.base import Rejected, WebhookRequest
from middleware.platforms.playground import PlaygroundConfig, PlaygroundPlatform
from middleware.settings import load_settings
from middleware.web.playground import GraphCache, sanitize_svg
from tests.conftest import REPO, running
from tests.web.conftest import events, web_config

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


def said(conversation: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "message_id": f"pg-{uuid.uuid4().hex}",
        "conversation_id": conversation,
        "sender": {"id": "user:ana", "name": "Ana"},
        "type": "text",
        "text": text,
        **extra,
    }


async def start(client: httpx.AsyncClient, base: str, flow: str = "helpdesk") -> dict[str, Any]:
    answer = await client.post(f"{base}/playground/conversations", json={"flow": flow})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


async def test_the_page_lists_the_flows_and_draws_the_chosen_one(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient
) -> None:
    (helpdesk_flows / "echo.yaml").write_text("flow: echo\nstates:\n  start:\n    routes:\n      - do: [{reply: hi}]\n")
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    async with running(settings) as (server, _):
        page = await client.get(f"{server.url}/?flow=helpdesk")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'self'" in csp and "unsafe-inline" not in csp
        html = page.text
        assert '<option value="echo">echo</option>' in html
        assert '<option value="helpdesk" selected>helpdesk</option>' in html
        assert 'data-platform="playground"' in html and "/static/playground.js" in html
        if shutil.which("dot"):
            assert 'class="flow-graph"' in html and "<title>n_rate</title>" in html
        else:
            assert "flowchart TD" in html
        for asset in ("/static/app.css", "/static/playground.js", "/static/inbox.js"):
            assert (await client.get(f"{server.url}{asset}")).status_code == 200
        unknown = await client.get(f"{server.url}/?flow=nope")  # an unknown flow: the first one
        assert unknown.status_code == 200 and "selected>echo</option>" in unknown.text
        fragment = await client.get(f"{server.url}/playground/graph/helpdesk")
        assert fragment.status_code == 200 and "rate" in fragment.text
        assert (await client.get(f"{server.url}/playground/graph/nope")).status_code == 404


async def test_without_graphviz_the_page_shows_the_mermaid_text(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GraphCache, "dot_program", lambda self: None)
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    async with running(settings) as (server, _):
        html = (await client.get(f"{server.url}/")).text
        assert "<svg" not in html
        assert "flowchart TD" in html and "apt-get install graphviz" in html
        assert "n_start --&gt; n_rate" not in html  # the text is escaped, and edges are only drawn for gotos
        assert "&#34;" in html or "&quot;" in html  # Mermaid's quotes, escaped


async def test_a_message_travels_the_webhook_path_and_comes_back_as_events(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient
) -> None:
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    async with running(settings) as (server, services):
        conv = await start(client, server.url)
        assert conv["webhook"] == "/webhooks/playground" and conv["flow"] == "helpdesk"
        async with events(client, server.url + conv["events"]) as stream:
            sent = said(conv["conversation_id"], "hello")
            answer = await client.post(server.url + conv["webhook"], json=sent)
            assert answer.status_code == 200 and answer.json() == {"accepted": 1, "duplicates": 0}
            read = await stream.until("read")
            assert read["message_id"] == sent["message_id"]
            trace = await stream.until("trace")
            assert trace["message"] == {
                "id": sent["message_id"],
                "type": "text",
                "text": "hello",
                "event": None,
                "by": "Ana",
            }
            assert "state start: route at helpdesk.yaml:11" in trace["lines"]
            assert trace["flow"] == "helpdesk" and trace["state"] == "start" and trace["node"] == "n_start"
            assert trace["owner"] == "bot" and trace["vars"] == {"brand": "Acme"} and trace["replies"] == 1
            assert isinstance(trace["ms"], float) and trace["ms"] >= 0
            reply = await stream.until("reply")
            assert reply["text"] == "Hello Ana! I'm the Acme bot. Say 'human' to talk to a person."
            assert reply["reply_to"] == sent["message_id"] and len(reply["id"]) == 40
            # the same message again is a duplicate: no second turn
            again = await client.post(server.url + conv["webhook"], json=sent)
            assert again.json() == {"accepted": 0, "duplicates": 1}
            # asking for a human: the handoff shows in the trace, with the owner
            await client.post(server.url + conv["webhook"], json=said(conv["conversation_id"], "a human please"))
            trace = await stream.until("trace")
            assert trace["owner"] == "queued" and trace["queue"] == "support"
            assert "handoff to support: queued" in trace["lines"]
            assert any(a.startswith("Handoff(queue='support'") for a in trace["actions"])
            reply = await stream.until("reply")
            assert reply["text"] == "Connecting you to a person at Acme."
        stored = await services.store.conversation(conv["conversation"])
        assert stored is not None and stored["state"]["owner"] == "queued"


async def test_buttons_come_as_data_and_a_postback_goes_back(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient
) -> None:
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    async with running(settings) as (server, services):
        conv = await start(client, server.url)
        key = conv["conversation"]
        async with events(client, server.url + conv["events"]) as stream:
            await client.post(server.url + conv["webhook"], json=said(conv["conversation_id"], "human"))
            await stream.until("reply", text="Connecting you to a person at Acme.")
            # the agent side gives it back: the bot resumes at `rate` and asks with buttons
            from middleware.agents import submit_agent_event

            await submit_agent_event(services, key, "agent.resolved", "alice")
            trace = await stream.until("trace")
            assert trace["message"]["event"] == "agent.resolved" and trace["state"] == "rate"
            question = await stream.until("reply")
            assert question["text"] == "How would you rate the help you got?"
            assert [b["title"] for b in question["buttons"]] == ["Great", "OK", "Poor"]
            assert question["plain"].endswith("1. Great\n2. OK\n3. Poor")
            pick = said(conv["conversation_id"], "Great", type="postback", payload={"payload": "Great"})
            await client.post(server.url + conv["webhook"], json=pick)
            thanks = await stream.until("reply")
            assert thanks["text"] == "Thanks for rating us: Great."


async def test_starting_conversations(tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient) -> None:
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    async with running(settings) as (server, services):
        url = f"{server.url}/playground/conversations"
        one, two = await start(client, server.url), await start(client, server.url)
        assert one["conversation_id"] != two["conversation_id"]
        stored = await services.store.conversation(one["conversation"])
        assert stored is not None and stored["state"]["flow"] == "helpdesk"
        bad_flow = await client.post(url, json={"flow": "nope"})
        assert bad_flow.status_code == 400 and bad_flow.json()["field"] == "flow"
        form = await client.post(url, data={"flow": "helpdesk"})  # a cross-site form cannot send JSON
        assert form.status_code == 415
        assert (await client.post(url, json={"flow": "helpdesk", "platform": "myapp"})).status_code == 404
        assert (await client.post(url, json=["helpdesk"])).status_code == 400
        assert (await client.get(f"{server.url}/playground/events/playground/bad id!")).status_code == 404
        assert (await client.get(f"{server.url}/playground/events/nope/pg-1")).status_code == 404


async def test_the_playground_webhook_refuses_events_and_bad_messages(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient
) -> None:
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    async with running(settings) as (server, services):
        url = f"{server.url}/webhooks/playground"
        forged = said("pg-1", "", type="event", payload={"event": "agent.resolved", "agent": "mallory"})
        answer = await client.post(url, json=forged)
        assert answer.status_code == 400 and answer.json()["field"] == "type"
        missing = await client.post(url, json={"conversation_id": "pg-1", "sender": {"id": "u"}})
        assert missing.status_code == 400 and missing.json()["field"] == "message_id"
        assert (await client.post(url, content=b"hello", headers={"content-type": "text/plain"})).status_code == 415
        assert await services.store.conversation("playground:pg-1") is None


async def test_without_a_playground_platform_the_page_says_how_to_add_one(
    tmp_path: Path, helpdesk_flows: Path, client: httpx.AsyncClient
) -> None:
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    settings = settings.model_copy(update={"platforms": {}})
    async with running(settings) as (server, _):
        page = await client.get(f"{server.url}/")
        assert page.status_code == 404 and "type: playground" in page.text
        assert (
            await client.post(f"{server.url}/playground/conversations", json={"flow": "helpdesk"})
        ).status_code == 404


async def test_the_platform_publishes_deliveries_on_its_hub() -> None:
    from middleware.hub import LocalHub
    from middleware.model import Outgoing, Reply

    platform = PlaygroundPlatform("pg", PlaygroundConfig(), None)
    assert isinstance(platform.hub, LocalHub)
    sub = platform.hub.subscribe(["playground:pg:c-1"])
    await platform.deliver(Outgoing("typing", "c-1", typing=True), "k1")
    await platform.deliver(Outgoing("message", "c-1", reply=Reply("<b>hi</b>"), reply_to="m-1"), "k2")
    await platform.deliver(Outgoing("read", "c-1", message_id="m-1"), "k3")
    kinds = []
    for _ in range(3):
        event = await sub.next(1)
        assert event is not None
        kinds.append(event.kind)
        if event.kind == "reply":
            assert event.data["text"] == "<b>hi</b>"  # data; the page shows it with textContent
            assert event.data["id"] == "k2" and event.data["reply_to"] == "m-1"
    assert kinds == ["typing", "reply", "read"]
    with pytest.raises(Rejected) as refused:
        platform.parse(WebhookRequest("GET", b"", {}))
    assert refused.value.status == 405


def test_svg_is_sanitised_before_it_goes_inline() -> None:
    hostile = (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="10pt" '
        'onload="alert(1)"><script>alert(2)</script><g class="node"><title>n_start</title>'
        '<a xlink:href="javascript:alert(3)"><text onclick="alert(4)" style="x">start</text></a>'
        '<foreignObject><div>x</div></foreignObject><path fill="url(http://evil/x)" d="M0 0"/></g></svg>'
    )
    clean = sanitize_svg(hostile)
    assert clean is not None
    for bad in ("alert", "script", "javascript", "onload", "onclick", "foreignObject", "evil", "style="):
        assert bad not in clean, bad
    assert "<title>n_start</title>" in clean and ">start</text>" in clean and 'class="flow-graph"' in clean
    assert sanitize_svg("<html/>") is None and sanitize_svg("not xml") is None


@needs_dot
async def test_graphviz_draws_each_loaded_flow_once(helpdesk_flows: Path) -> None:
    from middleware.engine import load_flows

    flow = load_flows(helpdesk_flows)["helpdesk"]
    cache = GraphCache()
    first = await cache.graph(flow)
    assert first.svg is not None and "n_rate" in first.svg
    assert await cache.graph(flow) is first


def test_the_default_config_serves_the_playground() -> None:
    settings = load_settings(REPO / "config" / "switchboard.yaml", env={})
    assert settings.platforms["playground"].type == "playground"
    assert settings.inbox.secret in (None, "")  # unset: a random one per process, with a warning


async def test_a_failing_or_hanging_dot_falls_back_to_mermaid(tmp_path: Path) -> None:
    from middleware.web.playground import render_svg

    assert await render_svg("false", "digraph { a -> b }") is None
    slow = tmp_path / "slow-dot"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    assert await render_svg(str(slow), "digraph { a -> b }", limit=0.3) is None


async def test_typing_shows_while_a_slow_turn_works(tmp_path: Path, client: httpx.AsyncClient) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "slow.yaml").write_text(
        "flow: slow\nstates:\n  start:\n    routes:\n      - do: [{wait: 1.2s}, {reply: done}]\n"
    )
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", flows, extra="typing: {delay: 0.2}\n")
    async with running(settings) as (server, _):
        conv = await start(client, server.url, "slow")
        async with events(client, server.url + conv["events"]) as stream:
            await client.post(server.url + conv["webhook"], json=said(conv["conversation_id"], "hi"))
            on = await stream.until("typing")
            assert on["on"] is True and on["ttl"] == 30.0
            assert (await stream.until("reply"))["text"] == "done"
            assert (await stream.until("typing"))["on"] is False
