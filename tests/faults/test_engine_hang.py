"""An engine that hangs: the bot behind the `http` connector (connectors/http.py, on the guard of
connectors/resilience.py) stops answering.

- the connector's deadline (1 s) fires and the flow's fallback answers each message;
- after three timeouts in a row the circuit breaker opens: later messages are answered by the
  fallback at once, and the engine is not called at all (`/metrics` shows the breaker open);
- once the engine answers again, the probe after the cool-down closes the breaker and its own
  replies come back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.fakes.httpbot import FakeHttpBot
from tests.fakes.platform import FakePlatform
from tests.faults.cluster import Node, PrivatePostgres, Sender, metric, msg, no_tracebacks, node_config, start_nodes

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ASKING_FLOW = """\
flow: asker
states:
  start:
    routes:
      - do:
          - ask:
              connector: bot
              fallback: [{reply: "fallback {{ message.text }}"}]
"""
TIMEOUT = 1.0
COOLDOWN = 4.0


async def test_a_hanging_engine_times_out_the_fallback_answers_and_the_breaker_opens(
    tmp_path: Path,
    pg: PrivatePostgres,
    nodes: list[Node],
    platform: tuple[Server, FakePlatform],
    http: httpx.AsyncClient,
) -> None:
    server, fake = platform
    bot = FakeHttpBot()
    for _ in range(3):
        bot.fail.append(("slow", 5.0))  # hangs (past the connector's deadline)
    async with Server(bot.app()) as bot_server:
        flows = tmp_path / "flows"
        flows.mkdir()
        (flows / "asker.yaml").write_text(ASKING_FLOW)
        config = node_config(
            tmp_path,
            "n1",
            pg.new_store(),
            server.url,
            flows,
            extra=f"""\
            connectors:
              bot:
                type: http
                url: {bot_server.url}/turn
                timeout: {TIMEOUT}
                breaker: {{failures: 3, cooldown: {COOLDOWN}}}
            """,
        )
        node = Node("n1", config, tmp_path)
        nodes.append(node)
        await start_nodes(nodes)
        sender = Sender(http, [node.url])

        async def answer(c: int, text: str) -> tuple[str, float]:
            m = msg(c, 0, text)
            await sender.post(m)
            at = time.monotonic()
            await fake.wait_for(
                lambda: any(d.body["reply_to"] == m["message_id"] for d in fake.delivered()),
                timeout=15,
            )
            reply = next(d for d in fake.delivered() if d.body["reply_to"] == m["message_id"])
            return str(reply.body["text"]), time.monotonic() - at

        # the engine hangs: each ask times out, the fallback answers
        timed_out = [await answer(c, f"hang {c}") for c in range(3)]
        for c, (text, took) in enumerate(timed_out):
            assert text == f"fallback hang {c}"
            assert TIMEOUT * 0.9 < took < TIMEOUT + 2.0, took
        assert len(bot.requests) == 3
        breaker = await metric(http, node, "switchboard_connector_breaker")
        assert breaker == 2, f"breaker state {breaker} (2 = open)"
        opened_at = time.monotonic()

        # open: answered by the fallback at once, the engine not asked
        fast = [await answer(c, f"open {c}") for c in range(3, 8)]
        assert all(text == f"fallback open {c}" for c, (text, _) in zip(range(3, 8), fast, strict=True))
        assert max(took for _, took in fast) < 0.8, fast
        assert len(bot.requests) == 3, "the engine was called while the breaker was open"
        errors = await http.get(f"{node.url}/metrics")
        assert 'switchboard_connector_errors_total{connector="bot",kind="circuit_open"}' in errors.text

        # the engine is back (no more hangs scripted): after the cool-down the probe closes the breaker
        wait = COOLDOWN - (time.monotonic() - opened_at) + 0.3
        if wait > 0:
            await asyncio.sleep(wait)
        text, took = await answer(20, "back")
        assert text == "bot heard: back", text
        assert await metric(http, node, "switchboard_connector_breaker") == 0
        no_tracebacks(nodes)
        print(
            f"\nhanging engine: fallback after {[round(t, 2) for _, t in timed_out]} s (timeout {TIMEOUT}s); "
            f"breaker open: fallback in {[round(t * 1000) for _, t in fast]} ms, engine calls {len(bot.requests) - 1} "
            f"before the probe; after the cool-down the engine answered in {took * 1000:.0f} ms"
        )
