"""Switchboard as the application service of a real Synapse homeserver.

Synapse comes from the venv that `tests/peers/synapse.py` installs once per machine (the test is skipped,
with the reason, where that install cannot work). Synapse and Switchboard both listen on 127.0.0.1; a user
made with `register_new_matrix_user` talks to the bot in a room and watches, through her own /sync, for
the bot's read receipt, its typing notification while the turn works, and its reply. Synapse is then
restarted (its transaction ids start again at 1) and the next message is still answered, once.
Every wait is bounded; Synapse is stopped at the end whatever happens.
"""

from __future__ import annotations

import json
import secrets
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from middleware.settings import settings_from_text
from tests.conftest import free_port, running
from tests.peers.synapse import AppService, Homeserver, Installed, Unavailable, install

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def synapse() -> Installed:
    try:
        installed = install()
    except Unavailable as exc:
        pytest.skip(f"Synapse could not be installed here: {exc}")
    print(f"matrix-synapse {installed.version}: install {installed.install_seconds:.1f}s")
    return installed


@dataclass
class Seen:
    """What the user saw of the bot in her /sync stream."""

    replies: list[str] = field(default_factory=list)
    typing_on: bool = False
    typing_off: bool = False
    read: set[str] = field(default_factory=set)


class User:
    """A Matrix user on the client-server API."""

    def __init__(self, client: httpx.AsyncClient, homeserver: str, token: str) -> None:
        self.client = client
        self.api = f"{homeserver}/_matrix/client/v3"
        self.headers = {"authorization": f"Bearer {token}"}
        self.since: str | None = None
        self.txn = 0

    @classmethod
    async def login(cls, client: httpx.AsyncClient, homeserver: str, user: str, password: str) -> User:
        response = await client.post(
            f"{homeserver}/_matrix/client/v3/login",
            json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password},
        )
        response.raise_for_status()
        return cls(client, homeserver, response.json()["access_token"])

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self.client.request(method, self.api + path, headers=self.headers, **kwargs)
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
        data: dict[str, Any] = response.json()
        return data

    async def say(self, room: str, text: str) -> str:
        self.txn += 1
        sent = await self.call(
            "PUT", f"/rooms/{quote(room)}/send/m.room.message/u{self.txn}", json={"msgtype": "m.text", "body": text}
        )
        return str(sent["event_id"])

    async def sync(self, room: str, wait_ms: int) -> dict[str, Any]:
        params: dict[str, Any] = {"timeout": wait_ms, "filter": json.dumps({"room": {"rooms": [room]}})}
        if self.since:
            params["since"] = self.since
        data = await self.call("GET", "/sync", params=params, timeout=wait_ms / 1000 + 10)
        self.since = data["next_batch"]
        joined: dict[str, Any] = data.get("rooms", {}).get("join", {}).get(room, {})
        return joined

    async def watch(self, room: str, bot: str, until: Any, seconds: float) -> Seen:
        """Follow /sync until `until(seen)` holds or `seconds` pass."""
        seen = Seen()
        deadline = time.monotonic() + seconds
        while not until(seen) and time.monotonic() < deadline:
            joined = await self.sync(room, 1000)
            for ev in joined.get("timeline", {}).get("events", []):
                if ev["sender"] == bot and ev["type"] == "m.room.message":
                    seen.replies.append(ev["content"]["body"])
            for edu in joined.get("ephemeral", {}).get("events", []):
                if edu["type"] == "m.typing":
                    if bot in edu["content"]["user_ids"]:
                        seen.typing_on = True
                    elif seen.typing_on:
                        seen.typing_off = True
                elif edu["type"] == "m.receipt":
                    seen.read |= {eid for eid, r in edu["content"].items() if bot in r.get("m.read", {})}
        return seen


async def test_a_user_talks_to_the_bot_through_a_real_synapse(
    tmp_path: Path, echo_flows: Path, synapse: Installed
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    as_token, hs_token = secrets.token_hex(16), secrets.token_hex(16)
    hs_port = free_port()
    bot = "@bot_switchboard:localhost"
    settings = settings_from_text(
        textwrap.dedent(
            f"""\
            store:
              url: "sqlite:///{tmp_path}/sb.db"
            flows: {echo_flows}
            platforms:
              matrix:
                type: matrix
                homeserver_url: http://127.0.0.1:{hs_port}
                as_token: {as_token}
                hs_token: {hs_token}
                bot_user_id: "{bot}"
            """
        ),
        "<test config>",
    )
    async with running(settings) as (server, services), httpx.AsyncClient(timeout=30) as client:
        appservice = AppService(f"{server.url}/webhooks/matrix", as_token, hs_token, "bot_switchboard")
        assert appservice.bot_user_id == bot
        hs = Homeserver(synapse, tmp_path / "synapse", hs_port, appservice)
        try:
            await hs.configure()
            timings["configure"] = time.monotonic() - started
            timings["first start"] = await hs.start()
            await hs.register_user("alice", "alice-password")
            alice = await User.login(client, hs.url, "alice", "alice-password")
            as_bot = {"authorization": f"Bearer {as_token}"}

            room = str((await alice.call("POST", "/createRoom", json={"invite": [bot], "is_direct": True}))["room_id"])
            joined = await client.post(
                f"{hs.url}/_matrix/client/v3/rooms/{quote(room)}/join", params={"user_id": bot}, headers=as_bot
            )
            assert joined.status_code == 200, joined.text
            # the homeserver reaches Switchboard's ping endpoint with the hs_token
            ping = await client.post(
                f"{hs.url}/_matrix/client/v1/appservice/{appservice.id}/ping",
                json={"transaction_id": "switchboard-test"},
                headers=as_bot,
            )
            assert ping.status_code == 200 and "duration_ms" in ping.json(), ping.text
            timings["setup"] = time.monotonic() - started

            await alice.sync(room, 0)
            turn = time.monotonic()
            hello = await alice.say(room, "slow hello")
            seen = await alice.watch(room, bot, lambda s: s.replies and s.typing_off and hello in s.read, 30)
            timings["turn seen"] = time.monotonic() - turn
            assert seen.replies == ["slow slow hello"], seen
            assert hello in seen.read, f"no read receipt from the bot: {seen}"
            assert seen.typing_on, f"the bot never showed typing: {seen}"
            assert seen.typing_off, f"the bot's typing was not turned off: {seen}"

            # After a restart Synapse numbers its transactions from 1 again; new events still get answered.
            await hs.stop()
            timings["restart"] = await hs.start()
            later = await alice.say(room, "after restart")
            seen = await alice.watch(room, bot, lambda s: s.replies and later in s.read, 30)
            assert seen.replies == ["echo after restart"], seen

            history = await alice.call("GET", f"/rooms/{quote(room)}/messages", params={"dir": "b", "limit": 50})
            from_bot = [e["content"]["body"] for e in history["chunk"] if e["sender"] == bot and "body" in e["content"]]
            assert sorted(from_bot) == ["echo after restart", "slow slow hello"]
            assert await services.store.outbox_counts() == {"pending": 0, "dead": 0, "retrying": 0}
        finally:
            await hs.stop()
    timings["total"] = time.monotonic() - started
    print("synapse run: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
