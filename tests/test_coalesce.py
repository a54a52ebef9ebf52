"""Burst coalescing: quick messages become one turn; a newer message cancels a turn still deciding."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import httpx

from tests.conftest import fake_platform, generic_config, message, running


def flows(tmp_path: Path, coalesce: str, do: str) -> Path:
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / "burst.yaml").write_text(
        textwrap.dedent(
            f"""\
            flow: burst
            coalesce: {coalesce}
            states:
              start:
                routes:
                  - do: {do}
            """
        )
    )
    return folder


async def test_a_burst_within_the_window_is_one_turn(tmp_path: Path) -> None:
    folder = flows(tmp_path, "{window: 600ms}", '[{reply: "got: {{ message.text }}"}]')
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, folder)
        async with running(settings) as (server, services), httpx.AsyncClient() as client:
            for n, text in enumerate(["I want", "to change", "my order"]):
                r = await client.post(f"{server.url}/webhooks/myapp", json=message(n, text=text))
                assert r.json() == {"accepted": 1, "duplicates": 0}
            await fake.wait_for(lambda: len(fake.delivered()) >= 1, timeout=10)
            await asyncio.sleep(1.0)  # nothing more may come
            replies = fake.delivered()
            assert [c.body["text"] for c in replies] == ["got: I want\nto change\nmy order"]
            assert replies[0].body["reply_to"] == "m-2"
            assert await services.store.pending_count() == 0
            # a message after the window is a turn of its own
            await client.post(f"{server.url}/webhooks/myapp", json=message(9, text="thanks"))
            await fake.wait_for(lambda: len(fake.delivered()) == 2, timeout=10)
            assert fake.delivered()[1].body["text"] == "got: thanks"


async def test_a_newer_message_cancels_a_turn_still_deciding(tmp_path: Path) -> None:
    folder = flows(
        tmp_path,
        "{window: 100ms, cancel_inflight: true}",
        '[{wait: 1500ms}, {reply: "slow: {{ message.text }}"}]',
    )
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, folder)
        async with running(settings) as (server, services), httpx.AsyncClient() as client:
            await client.post(f"{server.url}/webhooks/myapp", json=message(1, text="first"))
            await asyncio.sleep(0.6)  # the first turn is waiting on its slow step
            await client.post(f"{server.url}/webhooks/myapp", json=message(2, text="second"))
            await fake.wait_for(lambda: len(fake.delivered()) >= 1, timeout=15)
            await asyncio.sleep(2.0)  # the cancelled turn must not answer late
            replies = fake.delivered()
            assert [c.body["text"] for c in replies] == ["slow: first\nsecond"]
            assert replies[0].body["reply_to"] == "m-2"
            assert await services.store.pending_count() == 0


async def test_without_cancel_each_turn_finishes(tmp_path: Path) -> None:
    folder = flows(tmp_path, "{window: 50ms}", '[{wait: 800ms}, {reply: "slow: {{ message.text }}"}]')
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, folder)
        async with running(settings) as (server, _services), httpx.AsyncClient() as client:
            await client.post(f"{server.url}/webhooks/myapp", json=message(1, text="first"))
            await asyncio.sleep(0.4)
            await client.post(f"{server.url}/webhooks/myapp", json=message(2, text="second"))
            await fake.wait_for(lambda: len(fake.delivered()) == 2, timeout=15)
            assert [c.body["text"] for c in fake.delivered()] == ["slow: first", "slow: second"]
