from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from starlette.types import ASGIApp

from middleware.app import create_app
from middleware.server_protocol import OneWriteHttpToolsProtocol
from middleware.services import Services
from middleware.settings import Settings, settings_from_text
from tests.fakes.platform import FakePlatform
from tests.procs import procs as procs  # the fixture, for every test that starts processes

PG_DSN = os.environ.get("SWITCHBOARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parent.parent


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store: a SQLite file, or a PostgreSQL schema of its own on the server at 127.0.0.1:5432."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/switchboard.db"
        return
    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_DSN} (.ci/run starts it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class Server:
    """A uvicorn server for an ASGI app on 127.0.0.1, run as a task in the test's loop; `http`:
    uvicorn's protocol ("auto": its own; `running` passes the one `switchboard serve` runs)."""

    def __init__(self, app: ASGIApp, port: int = 0, http: type[asyncio.Protocol] | str = "auto") -> None:
        self.config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=http,
            # a test that failed with a request in flight ends instead of waiting for it forever
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(self.config)
        self.task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Server:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generic_config(
    store_url: str,
    platform_url: str,
    flows: Path,
    extra: str = "",
    secret: str | None = None,
    platform_keys: dict[str, Any] | None = None,
) -> Settings:
    """A config with one generic platform `myapp`; `platform_keys` adds keys under it (e.g. typing_ttl)."""
    secret_line = f"    secret: {secret}\n" if secret else ""
    secret_line += "".join(f"    {k}: {v}\n" for k, v in (platform_keys or {}).items())
    text = (
        textwrap.dedent(
            f"""\
            store:
              url: "{store_url}"
            flows: {flows}
            platforms:
              myapp:
                type: generic
                post_message_url: {platform_url}/messages
                typing_url: {platform_url}/typing
                read_url: {platform_url}/read
            """
        )
        + secret_line
        + textwrap.dedent(extra)
    )
    return settings_from_text(text, "<test config>")


@pytest.fixture
def echo_flows(tmp_path: Path) -> Path:
    d = tmp_path / "flows"
    d.mkdir()
    (d / "echo.yaml").write_text(
        textwrap.dedent(
            """\
            flow: echo
            states:
              start:
                routes:
                  - when: {text: {matches: "^slow"}}
                    do: [{wait: 1.6s}, {reply: "slow {{ message.text }}"}]
                  - when: {text: {matches: "^two"}}
                    do: [{reply: "first {{ message.text }}"}, {reply: "second {{ message.text }}"}]
                  - when: {text: {matches: "^broken"}}
                    do: [{reply: "{{ vars.nope.deeper }}"}]
                  - do: [{reply: "echo {{ message.text }}"}]
            """
        )
    )
    return d


@contextlib.asynccontextmanager
async def running(
    settings: Settings, http: type[asyncio.Protocol] | str = OneWriteHttpToolsProtocol
) -> AsyncIterator[tuple[Server, Services]]:
    """Switchboard on a real port, with its lifespan, served as `switchboard serve` serves it
    (`http`: another uvicorn protocol, e.g. "auto" for the ASGI way of every request)."""
    app = create_app(settings)
    async with Server(app, http=http) as server:
        yield server, app.state.services


@contextlib.asynccontextmanager
async def fake_platform(**kwargs: Any) -> AsyncIterator[tuple[Server, FakePlatform]]:
    fake = FakePlatform(**kwargs)
    async with Server(fake.app()) as server:
        yield server, fake


def message(n: int | str, conversation: str = "c-1", text: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "message_id": f"m-{n}",
        "conversation_id": conversation,
        "sender": {"id": f"u-{conversation}", "name": "Ana"},
        "type": "text",
        "text": text if text is not None else f"hello {n}",
        **extra,
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        yield c
