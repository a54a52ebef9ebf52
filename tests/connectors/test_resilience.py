"""The layer under every engine: deadlines, retries, the circuit breaker, the concurrency limit,
statistics and metrics, and httpx errors turned into the ConnectorError family."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from connectors.base import (
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorResult,
    ConnectorTimeout,
    ConnectorTurn,
    ConnectorUnavailable,
)
from connectors.resilience import Call, CircuitBreaker, CircuitOpen, HttpConnector, HttpConnectorConfig
from middleware.metrics import Metrics, observe_connectors
from middleware.model import Reply
from tests.conftest import free_port
from tests.connectors.common import make_turn, run_flow


class EchoConfig(HttpConnectorConfig):
    type: str = "echo"
    url: str = "http://echo.test/turn"
    safe: bool = True


class EchoBot(HttpConnector):
    """The smallest HttpConnector: POST the text, reply with the answer's `text`."""

    Config = EchoConfig
    config: EchoConfig

    async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
        if turn.message.text == "bug":
            raise KeyError("a connector bug")
        if turn.message.text == "direct":  # httpx used without `send`: the guard still maps its errors
            await self.http.get(self.config.url)
        response = await self.send(
            call, "POST", self.config.url, json={"text": turn.message.text}, safe=self.config.safe
        )
        return ConnectorResult((Reply(self.json_of(response)["text"]),))


class Script:
    """An httpx.MockTransport handler answering scripted statuses, then echoes; it counts concurrency."""

    def __init__(self) -> None:
        self.plan: deque[int | tuple[int, dict[str, str]] | float] = deque()
        self.requests: list[float] = []
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(time.monotonic())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            step = self.plan.popleft() if self.plan else 200
            if isinstance(step, float):
                await asyncio.sleep(step)
                step = 200
            status, headers = step if isinstance(step, tuple) else (step, {})
            if status == 200:
                text = httpx.Response(200, content=request.content).json()["text"]
                return httpx.Response(200, json={"text": f"echo {text}"})
            return httpx.Response(status, json={"error": status}, headers=headers)
        finally:
            self.in_flight -= 1


def echo(script: Script, **config: Any) -> EchoBot:
    cfg = EchoConfig.model_validate({"type": "echo", "backoff": 0.01, **config})
    return EchoBot("echo", cfg, httpx.AsyncClient(transport=httpx.MockTransport(script)))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown=30, clock=clock)
    for _ in range(2):
        assert breaker.before() is False
        breaker.failure()
    assert breaker.state == "closed"
    breaker.before()
    breaker.failure()
    assert breaker.state == "open" and breaker.opened_count == 1
    with pytest.raises(CircuitOpen, match=r"next probe in 30\.0s"):
        breaker.before()
    clock.now += 30
    assert breaker.state == "half_open"
    assert breaker.before() is True, "one probe goes through"
    with pytest.raises(CircuitOpen, match="probe call is in flight"):
        breaker.before()
    breaker.failure()
    assert breaker.state == "open" and breaker.retry_in() == 30, "a failed probe opens it for another cooldown"
    clock.now += 30
    assert breaker.before() is True
    breaker.success()
    assert breaker.state == "closed" and breaker.consecutive == 0
    breaker.before()


async def test_the_breaker_opens_after_failures_and_closes_after_a_good_probe() -> None:
    script = Script()
    bot = echo(script, retries=0, breaker={"failures": 3, "cooldown": 0.2})
    script.plan.extend([503, 503, 503])
    for _ in range(3):
        with pytest.raises(ConnectorUnavailable, match="HTTP 503"):
            await bot.ask(make_turn("hi"))
    assert bot.guard.breaker.state == "open"
    with pytest.raises(CircuitOpen):
        await bot.ask(make_turn("hi"))
    assert len(script.requests) == 3, "an open breaker asks nothing"
    assert bot.health()["breaker"]["state"] == "open" and bot.health()["recent_errors"] == {
        "unavailable": 3,
        "circuit_open": 1,
    }
    await asyncio.sleep(0.25)
    assert bot.guard.breaker.state == "half_open"
    assert (await bot.ask(make_turn("hi"))).replies == (Reply("echo hi"),)
    assert bot.guard.breaker.state == "closed"


async def test_auth_and_bad_answers_do_not_open_the_breaker() -> None:
    script = Script()
    bot = echo(script, breaker={"failures": 2})
    script.plan.extend([401, 401, 400, 400])
    for _ in range(2):
        with pytest.raises(ConnectorAuthError):
            await bot.ask(make_turn("hi"))
    for _ in range(2):
        with pytest.raises(ConnectorBadResponse, match="HTTP 400"):
            await bot.ask(make_turn("hi"))
    assert bot.guard.breaker.state == "closed"


async def test_an_open_breaker_hands_the_turn_to_the_fallback_at_once(tmp_path: Path) -> None:
    script = Script()
    primary = echo(script, retries=0, breaker={"failures": 1, "cooldown": 60})
    script.plan.append(503)
    backup = echo(Script())
    await run_flow(tmp_path, {"primary": primary, "backup": backup})
    started = time.monotonic()
    result = await run_flow(tmp_path, {"primary": primary, "backup": backup})
    assert time.monotonic() - started < 0.5
    assert [r.text for r in result.replies] == ["echo hello"]
    assert any("connector primary: CircuitOpen" in line for line in result.trace)


async def test_the_turns_deadline_bounds_the_call() -> None:
    script = Script()
    bot = echo(script, timeout=10)
    script.plan.append(2.0)
    started = time.monotonic()
    with pytest.raises(ConnectorTimeout):
        await bot.ask(make_turn("hi", timeout=0.3))
    assert time.monotonic() - started < 1.0
    with pytest.raises(ConnectorTimeout, match="no time left"):
        await bot.ask(make_turn("hi", timeout=-1))
    assert len(script.requests) == 1


async def test_retries_back_off_honour_retry_after_and_stop_for_unsafe_calls() -> None:
    script = Script()
    bot = echo(script, retries=2)
    script.plan.extend([(429, {"retry-after": "0.3"}), 500])
    started = time.monotonic()
    assert (await bot.ask(make_turn("hi"))).replies == (Reply("echo hi"),)
    assert script.requests[1] - script.requests[0] >= 0.29
    assert time.monotonic() - started < 2 and bot.guard.stats.retries == 2
    unsafe = echo(script, safe=False)
    script.requests.clear()
    script.plan.append(503)
    with pytest.raises(ConnectorUnavailable):
        await unsafe.ask(make_turn("hi"))
    assert len(script.requests) == 1


async def test_the_concurrency_limit_holds_and_waiting_counts_against_the_deadline() -> None:
    script = Script()
    bot = echo(script, max_concurrency=2)
    script.plan.extend([0.3] * 5)
    results = await asyncio.gather(*(bot.ask(make_turn(f"m{i}", timeout=5)) for i in range(5)))
    assert script.peak == 2 and len(results) == 5
    script.plan.extend([0.5] * 3)
    outcomes = await asyncio.gather(*(bot.ask(make_turn("x", timeout=0.7)) for _ in range(3)), return_exceptions=True)
    assert sum(isinstance(o, ConnectorTimeout) for o in outcomes) == 1, "the third waited past its deadline"


async def test_httpx_errors_never_leak() -> None:
    port = free_port()  # nothing listens there
    async with httpx.AsyncClient() as http:
        cfg = EchoConfig.model_validate({"type": "echo", "url": f"http://127.0.0.1:{port}/x", "backoff": 0.01})
        refused = EchoBot("echo", cfg.model_copy(update={"safe": False}), http)
        with pytest.raises(ConnectorUnavailable, match="cannot connect"):
            await refused.ask(make_turn("hi"))
        assert refused.guard.stats.retries == 2, "nothing reached the engine: safe to repeat even when unsafe"

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    dropped = EchoBot("echo", EchoConfig(), httpx.AsyncClient(transport=httpx.MockTransport(drop)))
    with pytest.raises(ConnectorUnavailable, match="RemoteProtocolError"):
        await dropped.ask(make_turn("hi"))
    with pytest.raises(ConnectorUnavailable, match="RemoteProtocolError"):
        await dropped.ask(make_turn("direct"))
    with pytest.raises(ConnectorBadResponse, match="KeyError"):
        await echo(Script()).ask(make_turn("bug"))


async def test_statistics_and_prometheus_metrics() -> None:
    script = Script()
    bot = echo(script, retries=1)
    script.plan.extend([503, 200, 401])
    await bot.ask(make_turn("hi"))
    with pytest.raises(ConnectorAuthError):
        await bot.ask(make_turn("hi"))
    health = bot.health()
    assert (health["calls"], health["ok"], health["errors"], health["retries"]) == (2, 1, {"auth": 1}, 1)
    assert health["last_error"]["kind"] == "auth" and health["max_concurrency"] == 16
    metrics = Metrics()
    observe_connectors(metrics, lambda: {"echo": bot, "other": object()})
    text = generate_latest(metrics.registry).decode()
    assert 'switchboard_connector_calls_total{connector="echo",outcome="ok"} 1.0' in text
    assert 'switchboard_connector_calls_total{connector="echo",outcome="error"} 1.0' in text
    assert 'switchboard_connector_errors_total{connector="echo",kind="auth"} 1.0' in text
    assert 'switchboard_connector_retries_total{connector="echo"} 1.0' in text
    assert 'switchboard_connector_seconds_count{connector="echo"} 2.0' in text
    assert 'switchboard_connector_breaker{connector="echo"} 0.0' in text
    assert 'connector="other"' not in text
