"""The webhook lanes: webhook POSTs skip Starlette's stack (`SwitchboardApp`, under any ASGI
server) or ASGI altogether (`switchboard serve`'s protocol, middleware/server_protocol.py), with
the same answers as the normal way.

A platform module registered the documented way (a type name in PLATFORM_TYPES) whose `parse`
fails unexpectedly on one body: the platform gets a 500, the operator one log line naming the
platform, and the service goes on answering the next webhook. Both lanes answer a set of good and
bad webhooks byte for byte alike. On raw sockets, the protocol's lane keeps HTTP/1.1's connection
rules: pipelined webhooks answered in order, `Expect: 100-continue`, HTTP/1.0's close, a client
that leaves halfway through its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from middleware.platforms import PLATFORM_TYPES
from middleware.platforms.base import Parsed, WebhookRequest
from middleware.platforms.generic import GenericConfig, GenericPlatform
from middleware.server_protocol import OneWriteHttpToolsProtocol
from middleware.services import Services
from middleware.settings import settings_from_text
from tests.conftest import Server, fake_platform, generic_config, message, running


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


LANES = [pytest.param(OneWriteHttpToolsProtocol, id="protocol-lane"), pytest.param("auto", id="asgi-lane")]


@pytest.mark.parametrize("http", LANES)
async def test_an_unexpected_error_is_a_500_and_one_log_line_and_the_next_webhook_is_served(
    tmp_path: Path,
    echo_flows: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    http: type[asyncio.Protocol] | str,
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
        async with running(settings, http) as (server, services), httpx.AsyncClient(timeout=30) as client:
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


# -- both lanes answer alike ---------------------------------------------------------------------

SECRET = "lane-secret"
LIMIT = 2048


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Switchboard-Signature": f"sha256={digest}"}


def webhooks() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(label, path, body, headers): good, repeated, and each way of being bad."""
    good = json.dumps(message(1, conversation="c-lane")).encode()
    two = json.dumps([message(2, conversation="c-lane"), message(3, conversation="c-lane")]).encode()
    spoiled = json.dumps({**message(4, conversation="c-lane"), "type": "video"}).encode()
    big = json.dumps(message(5, conversation="c-lane", text="x" * LIMIT)).encode()
    return [
        ("good", "/webhooks/myapp", good, signed(good)),
        ("again", "/webhooks/myapp", good, signed(good)),
        ("two", "/webhooks/myapp?source=test", two, signed(two)),
        ("bad-signature", "/webhooks/myapp", good, signed(good, "wrong")),
        ("no-signature", "/webhooks/myapp", good, {"Content-Type": "application/json"}),
        ("malformed", "/webhooks/myapp", b"{not json", signed(b"{not json")),
        ("bad-type", "/webhooks/myapp", spoiled, signed(spoiled)),
        ("form", "/webhooks/myapp", good, {**signed(good), "Content-Type": "application/x-www-form-urlencoded"}),
        ("too-big", "/webhooks/myapp", big, signed(big)),
        ("unknown-platform", "/webhooks/nope", good, signed(good)),
    ]


@contextlib.asynccontextmanager
async def service(
    folder: Path, flows: Path, http: type[asyncio.Protocol] | str
) -> AsyncIterator[tuple[Server, Services]]:
    async with fake_platform() as (platform_server, _):
        extra = f"server:\n  max_body_bytes: {LIMIT}\n"
        settings = generic_config(f"sqlite:///{folder}/sb.db", platform_server.url, flows, extra, secret=SECRET)
        async with running(settings, http) as served:
            yield served


async def test_both_lanes_answer_every_webhook_alike(tmp_path: Path, echo_flows: Path) -> None:
    answers: dict[str, list[tuple[str, int, str, str | None, bytes]]] = {}
    for label, http in (("protocol", OneWriteHttpToolsProtocol), ("asgi", "auto")):
        (tmp_path / label).mkdir()
        async with service(tmp_path / label, echo_flows, http) as (server, _), httpx.AsyncClient(timeout=30) as client:
            got = answers.setdefault(label, [])
            for name, path, body, headers in webhooks():
                r = await client.post(server.url + path, content=body, headers=headers)
                got.append((name, r.status_code, r.headers["content-type"], r.headers.get("retry-after"), r.content))
    assert answers["protocol"] == answers["asgi"]
    statuses = {name: status for name, status, *_ in answers["protocol"]}
    assert statuses == {
        "good": 200,
        "again": 200,
        "two": 200,
        "bad-signature": 401,
        "no-signature": 401,
        "malformed": 400,
        "bad-type": 400,
        "form": 415,
        "too-big": 413,
        "unknown-platform": 404,
    }
    assert answers["protocol"][1][4] == b'{"accepted":0,"duplicates":1}'


# -- the protocol's lane on raw sockets ------------------------------------------------------------


def request(body: bytes, *, version: str = "1.1", extra: str = "") -> bytes:
    head = (
        f"POST /webhooks/myapp HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}"
    )
    sig = signed(body)["X-Switchboard-Signature"]
    return f"{head}X-Switchboard-Signature: {sig}\r\n\r\n".encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One answer: its status line, headers (lower-case names) and body (by content-length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status.encode(), headers, body


async def test_pipelined_webhooks_are_answered_in_order_on_one_connection(tmp_path: Path, echo_flows: Path) -> None:
    async with service(tmp_path, echo_flows, OneWriteHttpToolsProtocol) as (server, services):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        bodies = [json.dumps(message(n, conversation=f"c-pipe-{n}")).encode() for n in range(5)]
        bodies.append(bodies[0])  # a repeat: a duplicate, answered in its place
        writer.write(b"".join(request(body) for body in bodies))
        await writer.drain()
        answers = [await read_answer(reader) for _ in bodies]
        assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 6
        assert [json.loads(body)["duplicates"] for _, _, body in answers] == [0, 0, 0, 0, 0, 1]
        assert all("connection" not in headers for _, headers, _ in answers)  # kept alive
        assert answers[0][1]["content-type"] == "application/json" and "date" in answers[0][1]
        writer.close()
        for n in range(5):
            assert await services.store.conversation(f"myapp:c-pipe-{n}") is not None


async def test_expect_100_continue_and_http_1_0(tmp_path: Path, echo_flows: Path) -> None:
    async with service(tmp_path, echo_flows, OneWriteHttpToolsProtocol) as (server, _):
        body = json.dumps(message(1, conversation="c-expect")).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        whole = request(body, extra="Expect: 100-continue\r\n")
        writer.write(whole[: -len(body)])  # the head alone: the client waits for the go-ahead
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status, _, answer = await read_answer(reader)
        assert status == b"HTTP/1.1 200 OK" and json.loads(answer) == {"accepted": 1, "duplicates": 0}
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        old = json.dumps(message(2, conversation="c-expect")).encode()
        writer.write(request(old, version="1.0"))
        status, headers, answer = await read_answer(reader)
        assert status == b"HTTP/1.1 200 OK" and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and closed
        writer.close()


async def test_a_client_leaving_halfway_through_its_body_leaves_nothing_behind(
    tmp_path: Path, echo_flows: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with service(tmp_path, echo_flows, OneWriteHttpToolsProtocol) as (server, services):
        body = json.dumps(message(1, conversation="c-gone")).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        with caplog.at_level(logging.INFO, logger="switchboard"):
            writer.write(request(body)[:-10])  # all but the last bytes
            await writer.drain()
            await asyncio.sleep(0.2)  # the lane waits for the rest
            writer.close()
            for _ in range(100):
                if any(r.getMessage().startswith("webhook client left") for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
        assert [r.levelno for r in caplog.records if r.getMessage().startswith("webhook client left")] == [logging.INFO]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert await services.store.conversation("myapp:c-gone") is None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(body))
        status, _, answer = await read_answer(reader)  # the service goes on
        assert status == b"HTTP/1.1 200 OK" and json.loads(answer)["accepted"] == 1
        writer.close()
