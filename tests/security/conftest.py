"""A running Switchboard with every webhook platform, for synchronous tests: the app and a fake of every
platform's API serve on 127.0.0.1 from a thread with its own event loop, and the tests talk to them
with a plain `httpx.Client` (hypothesis and schemathesis drive synchronous code)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware.app import create_app
from middleware.services import Services
from middleware.settings import settings_from_text
from tests.security.targets import platforms_yaml

T = TypeVar("T")
ADMIN_TOKEN = "admin-token-hostile-0c1d"

ECHO_FLOW = """\
flow: echo
states:
  start:
    routes:
      - do: [{reply: "echo {{ message.text }}"}]
"""


@dataclass
class ApiCall:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class FakeApis:
    """Every platform's API at once: records each call and answers 200 with a body that satisfies all."""

    calls: list[ApiCall] = field(default_factory=list)

    def app(self) -> Starlette:
        async def anything(request: Request) -> Response:
            self.calls.append(ApiCall(request.url.path, await request.body(), dict(request.headers)))
            body = {"ok": True, "result": {"message_id": 1}, "event_id": "$e", "status": 200, "id": 1, "data": {}}
            return JSONResponse(body | {"results": {"token": "t", "comment": {}}, "messages": [{"id": "wamid.x"}]})

        return Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST", "PUT"])])

    def replies_to(self, path_prefix: str) -> list[ApiCall]:
        return [c for c in self.calls if c.path.startswith(path_prefix)]


def _bound_socket() -> socket.socket:
    # IPPROTO_TCP named, or asyncio does not set TCP_NODELAY on accepted connections (40 ms per response)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


class ThreadedApp:
    """Switchboard (`create_app`) and the fake APIs, served by uvicorn in a thread of their own."""

    def __init__(
        self,
        config: Callable[[str], str],
        folder: Path,
        env: dict[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.fake = FakeApis()
        self._fake_sock, self._app_sock = _bound_socket(), _bound_socket()
        self.api = f"http://127.0.0.1:{self._fake_sock.getsockname()[1]}"
        self.url = f"http://127.0.0.1:{self._app_sock.getsockname()[1]}"
        self.settings = settings_from_text(config(self.api), str(folder / "switchboard.yaml"), env)
        self.app = create_app(self.settings, http=http)
        self._servers = [
            uvicorn.Server(uvicorn.Config(self.fake.app(), log_config=None, access_log=False, lifespan="off")),
            uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on")),
        ]
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="switchboard-under-test", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            fake, app = self._servers
            await asyncio.gather(fake.serve(sockets=[self._fake_sock]), app.serve(sockets=[self._app_sock]))

        asyncio.run(main())

    def __enter__(self) -> ThreadedApp:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not all(s.started for s in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app under test did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.should_exit = True
        self._thread.join(30)

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the app's loop (the store belongs to it) and wait for its result."""
        assert self.loop is not None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(30)

    def _read(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """A read on a connection of the test's own: the store's writer commits (and syncs) every call."""
        path = self.settings.store.url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute(sql, args).fetchall()

    def inbox_rows(self) -> int:
        return int(self._read("SELECT count(*) FROM inbox")[0][0])

    def stored(self, platform: str, message_id: str) -> dict[str, Any] | None:
        """The stored body of a message (with its inbox status), or None."""
        rows = self._read("SELECT body, status FROM inbox WHERE platform = ? AND message_id = ?", platform, message_id)
        return {**json.loads(rows[0][0]), "status": rows[0][1]} if rows else None

    def conversation(self, key: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.call(self.services.store.conversation(key))
        return found

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the app")
            time.sleep(0.02)


def hostile_config(folder: Path, extra: str = "") -> Callable[[str], str]:
    flows = folder / "flows"
    flows.mkdir(exist_ok=True)
    (flows / "echo.yaml").write_text(ECHO_FLOW)

    def config(api: str) -> str:
        head = f"""\
            store:
              url: "sqlite:///{folder}/sb.db"
            flows: {flows}
            reload: false
            server:
              max_body_bytes: 262144
            admin:
              token: {ADMIN_TOKEN}
            inbox:
              secret: inbox-secret-hostile-77aa
            handoff:
              queues:
                tier1: {{}}
            outbox:
              max_attempts: 2
              backoff_base: 0.05
        """
        return textwrap.dedent(head) + textwrap.dedent(extra) + platforms_yaml(api)

    return config


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedApp]:
    """One app for a module's hostile requests (no flood control: the corpus is many requests per sender)."""
    folder = tmp_path_factory.mktemp("hostile")
    extra = "ingress:\n  sender_per_second: null\n"
    with ThreadedApp(hostile_config(folder, extra), folder) as app:
        yield app


def sync_client() -> httpx.Client:
    """A blocking client that sends a request's head and body without waiting on delayed ACKs (TCP_NODELAY:
    without it every request with a body takes 40 ms on loopback)."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(timeout=30, transport=transport)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with sync_client() as c:
        yield c
