"""The webhook lane (`SwitchboardApp`): webhook POSTs skip Starlette's stack, with the same answers.

A platform module registered the documented way (a type name in PLATFORM_TYPES) whose `parse`
fails unexpectedly on one body: the platform gets a 500, the operator one log line naming the
platform, and the service goes on answering the next webhook.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import httpx
import pytest

from middleware.platforms import PLATFORM_TYPES
from middleware.platforms.base import Parsed, WebhookRequest
from middleware.platforms.generic import GenericConfig, GenericPlatform
from middleware.settings import settings_from_text
from tests.conftest import fake_platform, message, running


class FragileConfig(GenericConfig):
    type: str = "fragile"


class FragilePlatform(GenericPlatform):
    """The generic platform, with a bug: a message saying "crash" breaks its parse."""

    Config = FragileConfig

    def parse(self, request: WebhookRequest) -> Parsed:
        parsed = super().parse(request)
        if any(m.text == "crash" for m in parsed.messages):
            raise RuntimeError("a bug in the platform module")
        return parsed


async def test_an_unexpected_error_is_a_500_and_one_log_line_and_the_next_webhook_is_served(
    tmp_path: Path, echo_flows: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(PLATFORM_TYPES, "fragile", FragilePlatform)
    async with fake_platform() as (platform_server, fake):
        text = f"""\
            store:
              url: "sqlite:///{tmp_path}/sb.db"
            flows: {echo_flows}
            platforms:
              app:
                type: fragile
                post_message_url: {platform_server.url}/messages
            """
        settings = settings_from_text(textwrap.dedent(text), "<lane test>")
        async with running(settings) as (server, services), httpx.AsyncClient(timeout=30) as client:
            url = f"{server.url}/webhooks/app"
            with caplog.at_level(logging.ERROR, logger="switchboard"):
                r = await client.post(url, json=message(1, text="crash"))
            assert r.status_code == 500 and r.text == "Internal Server Error"
            failed = [rec for rec in caplog.records if rec.getMessage() == "webhook failed"]
            assert len(failed) == 1 and getattr(failed[0], "platform", None) == "app"
            assert failed[0].exc_info is not None
            assert await services.store.conversation("app:c-1") is None  # nothing stored

            r = await client.post(url, json=message(2, text="fine"))
            assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}
            await fake.wait_for(lambda: [c.body["text"] for c in fake.delivered()] == ["echo fine"], timeout=15)

            # what the lane leaves to Starlette's stack answers as before
            r = await client.get(url)
            assert r.status_code == 405 and r.headers["allow"] == "POST"
            r = await client.post(f"{server.url}/webhooks/app/extra", json=message(3))
            assert r.status_code == 404
            r = await client.post(f"{server.url}/webhooks/", json=message(4))
            assert r.status_code == 404
