"""Outbound token buckets: per platform instance, per conversation, and slowing down on 429."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest

from middleware.ratelimit import RateLimit, RateLimiter, TokenBucket
from tests.conftest import fake_platform, generic_config, message, running


def test_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3, now=100.0)
    for _ in range(3):
        assert bucket.wait(100.0) == 0
        bucket.take(100.0)
    assert bucket.wait(100.0) == pytest.approx(0.5)
    assert bucket.wait(100.5) == 0


def test_a_429_halves_the_rate_pauses_and_recovers() -> None:
    bucket = TokenBucket.full(rate=10.0, burst=10, now=0.0)
    bucket.slow_down(0.0, retry_after=2.0)
    assert bucket.rate == 5.0
    assert bucket.wait(1.0) == pytest.approx(1.0)  # paused for the Retry-After
    bucket.wait(3.0)
    assert 5.0 < bucket.rate <= 10.0  # creeping back
    bucket.wait(20.0)
    assert bucket.rate == 10.0


def test_limiter_combines_platform_and_conversation_buckets() -> None:
    limiter = RateLimiter(RateLimit(per_second=1000, burst=1000, conversation_per_second=1, conversation_burst=2))
    assert limiter.delay("a") == 0
    assert limiter.delay("a") == 0
    assert limiter.delay("a") > 0.5  # a's own bucket is empty
    assert limiter.delay("b") == 0  # b is not held back by a


def test_no_limit_never_delays() -> None:
    limiter = RateLimiter(RateLimit())
    assert all(limiter.delay("a") == 0 for _ in range(1000))


async def test_outbox_paces_one_conversation_and_keeps_order(tmp_path: Path, echo_flows: Path) -> None:
    keys = {"rate_limit": "{conversation_per_second: 5, conversation_burst: 1}"}
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows, platform_keys=keys)
        async with running(settings) as (server, _services), httpx.AsyncClient() as client:
            for n in range(4):
                r = await client.post(f"{server.url}/webhooks/myapp", json=message(n))
                assert r.status_code == 200
            await fake.wait_for(lambda: len(fake.delivered()) == 4, timeout=15)
            delivered = fake.delivered()
            assert [c.body["reply_to"] for c in delivered] == ["m-0", "m-1", "m-2", "m-3"]
            gaps = [b.at - a.at for a, b in itertools.pairwise(delivered)]
            assert min(gaps) >= 0.15, gaps  # 5 per second with no burst: about 0.2 s apart
            metrics = (await client.get(f"{server.url}/metrics")).text
            assert 'switchboard_rate_limited_total{platform="myapp"}' in metrics
