"""A conversation keeps its lease for `dispatch.linger_seconds` after a turn: the next message runs
without a claim (the lease's epoch, bumped by every claim, stays put), and the lease is released when
the linger ends. Real Switchboard and a fake platform on 127.0.0.1, the store on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from middleware.services import Services
from tests.conftest import fake_platform, generic_config, message, running
from tests.fakes.platform import FakePlatform


async def lease(services: Services, key: str) -> dict[str, Any]:
    conversation = await services.store.conversation(key)
    assert conversation is not None
    found: dict[str, Any] = conversation["lease"]
    return found


async def reply_to(client: httpx.AsyncClient, url: str, fake: FakePlatform, n: int, conversation: str) -> None:
    r = await client.post(f"{url}/webhooks/myapp", json=message(n, conversation))
    assert r.status_code == 200, r.text
    await fake.wait_for(lambda: any(c.body.get("reply_to") == f"m-{n}" for c in fake.delivered()), timeout=10)


async def test_next_message_runs_without_a_claim_and_the_lease_goes_back_after_the_linger(
    tmp_path: Path, store_url: str, echo_flows: Path, client: httpx.AsyncClient
) -> None:
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(store_url, platform_server.url, echo_flows, "dispatch: {linger_seconds: 0.6}\n")
        async with running(settings) as (server, services):
            owner = services.dispatcher.owner
            await reply_to(client, server.url, fake, 1, "c-1")
            first = await lease(services, "myapp:c-1")
            assert first["owner"] == owner, "the lease is kept after the turn"
            for n in (2, 3):
                await reply_to(client, server.url, fake, n, "c-1")
            kept = await lease(services, "myapp:c-1")
            assert kept["epoch"] == first["epoch"], "a message within the linger claimed the conversation again"
            assert [c.body["text"] for c in fake.delivered()] == ["echo hello 1", "echo hello 2", "echo hello 3"]

            deadline = time.monotonic() + 5
            while (await lease(services, "myapp:c-1"))["owner"] is not None:
                assert time.monotonic() < deadline, "the lease was not released after the linger"
                await asyncio.sleep(0.05)
            assert not services.dispatcher.holds("myapp:c-1")
            assert await services.store.pending_count() == 0

            # after the linger the next message claims again
            await reply_to(client, server.url, fake, 4, "c-1")
            assert (await lease(services, "myapp:c-1"))["epoch"] == first["epoch"] + 1


async def test_without_linger_every_run_claims_and_releases(
    tmp_path: Path, echo_flows: Path, client: httpx.AsyncClient
) -> None:
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(
            f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows, "dispatch: {linger_seconds: 0}\n"
        )
        async with running(settings) as (server, services):
            epochs = []
            for n in (1, 2, 3):
                await reply_to(client, server.url, fake, n, "c-1")
                await services.dispatcher.settled("myapp:c-1")
                state = await lease(services, "myapp:c-1")
                assert state["owner"] is None
                epochs.append(state["epoch"])
            assert epochs == [1, 2, 3]


async def test_a_timer_event_reaches_a_lingering_conversation(tmp_path: Path, client: httpx.AsyncClient) -> None:
    """News that is not a webhook (here a state timeout's event) is read from the store even while
    the conversation lingers with its state in memory."""
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "t.yaml").write_text(
        "flow: t\n"
        "states:\n"
        "  start:\n"
        "    routes:\n"
        "      - do: [{reply: 'waiting'}, {goto: wait}]\n"
        "  wait:\n"
        "    timeout: {after: 300ms, do: [{goto: late}]}\n"
        "    routes:\n"
        "      - do: [{reply: 'in time'}]\n"
        "  late:\n"
        "    enter: [{reply: 'too late'}]\n"
        "    routes:\n"
        "      - do: [{reply: 'after'}, {goto: start}]\n"
    )
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(
            f"sqlite:///{tmp_path}/sb.db",
            platform_server.url,
            flows,
            "dispatch: {linger_seconds: 30, sweep_seconds: 0.1}\n",
        )
        async with running(settings) as (server, services):
            r = await client.post(f"{server.url}/webhooks/myapp", json=message(1, "c-t"))
            assert r.status_code == 200
            await fake.wait_for(lambda: [c.body.get("text") for c in fake.delivered()] == ["waiting", "too late"], 10)
            assert services.dispatcher.holds("myapp:c-t"), "the conversation was meant to linger (30 s)"
            await reply_to(client, server.url, fake, 2, "c-t")
            assert [c.body.get("text") for c in fake.delivered()] == ["waiting", "too late", "after"]
