"""The `http` connector: any bot behind a URL, with the documented request and response JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connectors.base import (
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorTimeout,
    ConnectorUnavailable,
    HistoryEntry,
)
from connectors.http import HttpBotConfig, HttpBotConnector
from middleware.model import Attachment, Button, Card, Handoff, Reply, SetVariable
from tests.connectors.common import make_turn, run_flow
from tests.fakes.engines import client
from tests.fakes.httpbot import FakeHttpBot, recorded


def bot(fake: FakeHttpBot, name: str = "bot", **config: Any) -> HttpBotConnector:
    raw = {"type": "http", "url": "http://bot.test/turn", "backoff": 0.01, **config}
    return HttpBotConnector(name, HttpBotConfig.model_validate(raw), client(fake.app()))


async def test_the_request_is_the_documented_json() -> None:
    fake = FakeHttpBot()
    history = [HistoryEntry("user", "hi"), HistoryEntry("bot", "Hello! How can I help?")]
    result = await bot(fake).ask(make_turn("show me the menu", vars={"brand": "Acme"}, history=history, timeout=10))
    body = fake.requests[0].body
    documented = recorded("request.json")
    assert set(body) == set(documented)
    assert {k: v for k, v in body.items() if k not in ("deadline_ms", "message")} == {
        k: v for k, v in documented.items() if k not in ("deadline_ms", "message")
    }
    assert set(body["message"]) == set(documented["message"]) and body["message"]["text"] == "show me the menu"
    assert 9000 < body["deadline_ms"] <= 10_000
    assert result.replies == (Reply("bot heard: show me the menu"),)
    assert result.nlu is not None and (result.nlu.intent, result.nlu.confidence) == ("echo", 0.5)


async def test_every_reply_shape_actions_and_nlu() -> None:
    result = await bot(FakeHttpBot()).ask(make_turn("menu"))
    assert result.replies == (
        Reply("Here is the menu."),
        Reply(
            "Pick a size",
            buttons=(Button("Small", "size_s"), Button("Large", "Large")),
            attachments=(Attachment("file", "https://example.com/sizes.pdf", "sizes.pdf"),),
            quick_replies=(Button("Later", "Later"),),
            cards=(Card("Oxford shirt", "Cotton", "https://example.com/oxford.png", (Button("Buy", "Buy"),)),),
        ),
    )
    assert result.actions == (
        SetVariable("last_menu", "shirts"),
        SetVariable("user.language", "en"),
        Handoff("sales", "big order"),
    )
    assert result.nlu is not None and result.nlu.intent == "browse"
    assert [(e.name, e.value, e.confidence) for e in result.nlu.entities] == [("product", "shirt", 0.8)]
    ended = await bot(FakeHttpBot()).ask(make_turn("bye"))
    assert ended.end and ended.replies == (Reply("Bye!"),) and ended.actions == ()


async def test_parse_url_and_signing() -> None:
    fake = FakeHttpBot(secret="shh")
    signed = bot(fake, secret="shh", parse_url="http://bot.test/parse")
    nlu = await signed.parse(make_turn("where is 123456"))
    assert (nlu.intent, nlu.confidence, nlu.entities[0].value) == ("order_status", 0.88, "123456")
    assert fake.requests[0].path == "/parse"
    assert fake.requests[0].headers["x-switchboard-signature"].startswith("sha256=")
    with pytest.raises(ConnectorAuthError):
        await bot(fake, secret="wrong").ask(make_turn("hi"))


async def test_failures_and_retries_only_when_declared_safe() -> None:
    fake = FakeHttpBot()
    fake.fail.append(502)
    with pytest.raises(ConnectorUnavailable, match="HTTP 502"):
        await bot(fake).ask(make_turn("hi"))
    assert len(fake.requests) == 1
    fake.fail.append(502)
    assert (await bot(fake, retry=True).ask(make_turn("hi"))).replies == (Reply("bot heard: hi"),)
    assert len(fake.requests) == 3
    fake.fail.append(("slow", 2.0))
    with pytest.raises(ConnectorTimeout):
        await bot(fake, timeout=0.3).ask(make_turn("hi"))
    fake.fail.append("malformed")
    with pytest.raises(ConnectorBadResponse, match="not JSON"):
        await bot(fake).ask(make_turn("hi"))
    with pytest.raises(ConnectorBadResponse, match="buttons must be a list"):
        await bot(fake).ask(make_turn("odd"))


async def test_the_fallback_chain_takes_over_in_a_flow(tmp_path: Path) -> None:
    down, up = FakeHttpBot(), FakeHttpBot()
    down.fail.append(500)
    result = await run_flow(tmp_path, {"primary": bot(down, "primary"), "backup": bot(up, "backup")}, text="agent")
    assert [r.text for r in result.replies] == ["A person will answer."]
    assert result.actions == (Handoff("tier1", "http bot"),)
    assert result.state.owner.value == "queued"
