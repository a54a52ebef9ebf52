from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import fake_platform, generic_config, message, running


async def test_webhook_in_reply_out(tmp_path: Path, echo_flows: Path, client: httpx.AsyncClient) -> None:
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows)
        async with running(settings) as (server, _services):
            r = await client.post(f"{server.url}/webhooks/myapp", json=message(1))
            assert r.status_code == 200, r.text
            assert r.json() == {"accepted": 1, "duplicates": 0}
            await fake.wait_for(lambda: len(fake.delivered()) == 1, timeout=10)
            call = fake.delivered()[0]
            assert call.body == {
                "conversation_id": "c-1",
                "reply_to": "m-1",
                "text": "echo hello 1",
                "buttons": [],
                "attachments": [],
            }
            assert call.headers["idempotency-key"]
