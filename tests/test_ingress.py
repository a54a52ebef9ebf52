"""Bad input at the webhook, through a real running app: the documented status, a JSON error naming the
problem, nothing stored, and the process still serving.

The apps are module-scoped (one per flavour); every test compares the inbox before and after its request
and finishes with a valid message that must be answered, so a rejected request that left anything behind
or broke the process fails the test that sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
from sqlalchemy import func, select

from middleware.services import Services
from middleware.store import INBOX
from tests.conftest import PG_DSN, Server, fake_platform, generic_config, message, pg_available, running
from tests.fakes.platform import FakePlatform

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "s3cret"
SIG = "X-Switchboard-Signature"
JSON = {"content-type": "application/json"}
SMALL = 1024


async def inbox_rows(services: Services) -> int:
    """Every row in the inbox, handled or not."""
    stmt = select(func.count()).select_from(INBOX)
    return int(await services.store.run(lambda conn: conn.execute(stmt).scalar() or 0))


@dataclass
class App:
    server: Server
    services: Services
    fake: FakePlatform
    client: httpx.AsyncClient
    secret: str | None = None

    @property
    def webhook(self) -> str:
        return f"{self.server.url}/webhooks/myapp"

    def signed(self, body: bytes) -> dict[str, str]:
        assert self.secret is not None
        return {**JSON, SIG: "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()}

    async def inbox_rows(self) -> int:
        return await inbox_rows(self.services)

    async def post(self, body: bytes, headers: dict[str, str] | None = None, url: str | None = None) -> httpx.Response:
        return await self.client.post(url or self.webhook, content=body, headers=JSON if headers is None else headers)

    async def assert_rejected(
        self,
        response: httpx.Response,
        status: int,
        error: str,
        field: str | None = None,
        conversations: tuple[str, ...] = (),
        before: int = 0,
    ) -> None:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        data = response.json()
        assert isinstance(data, dict) and isinstance(data.get("error"), str), data
        assert error.lower() in data["error"].lower(), data
        assert data.get("field") == field, data
        assert "accepted" not in data
        store = self.services.store
        assert await self.inbox_rows() == before, "a rejected request left rows in the inbox"
        assert await store.pending_count() == 0
        for c in conversations:
            assert await store.conversation(f"myapp:{c}") is None, f"conversation {c} exists after a rejection"
        await self.assert_alive(conversations)

    async def assert_alive(self, rejected: tuple[str, ...] = ()) -> None:
        """The process answers /healthz and still turns a valid message into a reply."""
        r = await self.client.get(f"{self.server.url}/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        conv = f"ok-{uuid.uuid4().hex[:8]}"
        body = json.dumps(message(conv, conversation=conv, text="still there?")).encode()
        r = await self.post(body, self.signed(body) if self.secret else JSON)
        assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}, r.text
        await self.fake.wait_for(lambda: any(c.body["conversation_id"] == conv for c in self.fake.delivered()), 10)
        assert not [c for c in self.fake.calls if c.body.get("conversation_id") in rejected]


FLOW = """\
flow: echo
states:
  start:
    routes:
      - do: [{reply: "echo {{ message.text }}"}]
"""


@contextlib.asynccontextmanager
async def app_for(store_url: str, folder: Path, extra: str = "", secret: str | None = None) -> AsyncIterator[App]:
    flows = folder / "flows"
    flows.mkdir(exist_ok=True)
    (flows / "echo.yaml").write_text(FLOW)
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(store_url, platform_server.url, flows, extra=textwrap.dedent(extra), secret=secret)
        async with running(settings) as (server, services), httpx.AsyncClient(timeout=30) as client:
            yield App(server, services, fake, client, secret)


@contextlib.contextmanager
def pg_schema() -> Any:
    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_DSN}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest_asyncio.fixture(
    loop_scope="module", scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def plain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    folder = tmp_path_factory.mktemp(f"plain-{request.param}")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_schema()) if request.param == "postgresql" else f"sqlite:///{folder}/sb.db"
        async with app_for(url, folder) as app:
            yield app


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def signed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    folder = tmp_path_factory.mktemp("signed")
    async with app_for(f"sqlite:///{folder}/sb.db", folder, secret=SECRET) as app:
        yield app


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def small(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    folder = tmp_path_factory.mktemp("small")
    async with app_for(f"sqlite:///{folder}/sb.db", folder, extra=f"server:\n  max_body_bytes: {SMALL}\n") as app:
        yield app


# -- the body --------------------------------------------------------------------------------------

Msg = dict[str, Any]


@dataclass(frozen=True)
class Spoil:
    """Set (or, with `drop`, delete) one field of a valid message, e.g. `sender.id`."""

    path: str
    value: Any = None
    drop: bool = False

    def __call__(self, m: Msg) -> Any:
        target = m
        *parents, last = self.path.split(".")
        for p in parents:
            target = target[p]
        if self.drop:
            del target[last]
        else:
            target[last] = self.value
        return m

    def body(self, conv: str) -> bytes:
        return json.dumps(self(message(conv, conversation=conv))).encode()


def with_(path: str, value: Any) -> Spoil:
    return Spoil(path, value)


def without(path: str) -> Spoil:
    return Spoil(path, drop=True)


class NotAnObject(Spoil):
    def __call__(self, m: Msg) -> Any:
        return 3


def raw(template: str | bytes) -> Callable[[str], bytes]:
    """A literal body; `CONV` in it becomes the test's conversation id."""

    def f(conv: str) -> bytes:
        data = template.encode() if isinstance(template, str) else template
        return data.replace(b"CONV", conv.encode())

    return f


def array(*mutations: Spoil | None) -> Callable[[str], bytes]:
    """A JSON array of messages in conversations CONV-0, CONV-1, ...; each optionally spoiled."""

    def f(conv: str) -> bytes:
        items = []
        for i, mutate in enumerate(mutations):
            m = message(f"{conv}-{i}", conversation=f"{conv}-{i}")
            items.append(mutate(m) if mutate else m)
        return json.dumps(items).encode()

    return f


def duplicate_then_bad(conv: str) -> bytes:
    good = message(conv, conversation=conv)
    return json.dumps([good, good, message(f"{conv}-x", conversation=conv, type="gif")]).encode()


LONG = "x" * 257
# (id, body maker: a mutation of a valid message or a whole-body maker, status, words of the error, field)
BAD_BODIES: list[tuple[str, Any, int, str, str | None]] = [
    ("malformed-json", raw('{"message_id": "m-1", "conversation_id": "CONV",'), 400, "malformed JSON", None),
    ("trailing-garbage", raw('{"message_id": "m-1"} x'), 400, "malformed JSON", None),
    ("empty-body", raw(b""), 400, "malformed JSON", None),
    (
        "not-utf8",
        raw(b'{"message_id": "m-\xff", "conversation_id": "CONV", "sender": {"id": "u"}}'),
        400,
        "UTF-8",
        None,
    ),
    ("string-body", raw('"hello"'), 400, "object or an array", None),
    ("number-body", raw("42"), 400, "object or an array", None),
    ("null-body", raw("null"), 400, "object or an array", None),
    ("true-body", raw("true"), 400, "object or an array", None),
    ("empty-array", raw("[]"), 400, "empty array", None),
    ("array-of-numbers", raw("[1, 2]"), 400, "must be a JSON object", "[0]"),
    ("array-of-arrays", raw("[[]]"), 400, "must be a JSON object", "[0]"),
    ("nested-too-deep", raw("[" * 100_000 + "]" * 100_000), 400, "nested too deeply", None),
    ("huge-integer", raw('{"message_id": ' + "7" * 5000 + ', "conversation_id": "CONV"}'), 400, "malformed JSON", None),
    ("lone-surrogate-text", with_("text", "\ud800"), 400, "surrogate", None),
    ("lone-surrogate-id", with_("message_id", "m-\udfff"), 400, "surrogate", None),
    (
        "raw-surrogate-bytes",
        raw(b'{"message_id": "m-\xed\xa0\x80", "conversation_id": "CONV"}'),
        400,
        "surrogate",
        None,
    ),
    ("no-message_id", without("message_id"), 400, "message_id is required", "message_id"),
    ("empty-message_id", with_("message_id", ""), 400, "message_id is required", "message_id"),
    ("null-message_id", with_("message_id", None), 400, "message_id is required", "message_id"),
    ("no-conversation_id", without("conversation_id"), 400, "conversation_id is required", "conversation_id"),
    ("no-sender", without("sender"), 400, "sender is required", "sender"),
    ("sender-a-string", with_("sender", "u-1"), 400, "sender is required and must be an object", "sender"),
    ("no-sender.id", without("sender.id"), 400, "sender.id is required", "sender.id"),
    ("message_id-a-list", with_("message_id", ["m-1"]), 400, "message_id must be a string", "message_id"),
    ("message_id-an-object", with_("message_id", {"id": 1}), 400, "message_id must be a string", "message_id"),
    ("message_id-a-float", with_("message_id", 1.5), 400, "message_id must be a string", "message_id"),
    ("message_id-a-bool", with_("message_id", True), 400, "message_id must be a string", "message_id"),
    ("conversation_id-a-list", with_("conversation_id", ["c"]), 400, "must be a string", "conversation_id"),
    ("sender.id-a-list", with_("sender.id", ["u"]), 400, "sender.id must be a string", "sender.id"),
    ("sender.name-a-number", with_("sender.name", 7), 400, "sender.name must be a string", "sender.name"),
    ("sender.attributes-a-list", with_("sender.attributes", []), 400, "must be an object", "sender.attributes"),
    ("text-a-number", with_("text", 42), 400, "text must be a string", "text"),
    ("text-a-list", with_("text", ["hi"]), 400, "text must be a string", "text"),
    ("type-unknown", with_("type", "video"), 400, "type must be one of text, postback", "type"),
    ("type-a-number", with_("type", 1), 400, "type must be one of", "type"),
    ("timestamp-not-iso", with_("timestamp", "yesterday at noon"), 400, "not ISO 8601", "timestamp"),
    ("timestamp-a-number", with_("timestamp", 1_764_291_600), 400, "ISO 8601", "timestamp"),
    ("timestamp-bad-date", with_("timestamp", "2026-02-30T01:00:00Z"), 400, "not ISO 8601", "timestamp"),
    ("payload-a-list", with_("payload", [1]), 400, "payload must be an object", "payload"),
    ("payload-a-string", with_("payload", "{}"), 400, "payload must be an object", "payload"),
    ("attachments-an-object", with_("attachments", {"url": "x"}), 400, "attachments must be an array", "attachments"),
    ("attachment-without-url", with_("attachments", [{"type": "image"}]), 400, "string url", "attachments[0]"),
    ("message_id-too-long", with_("message_id", LONG), 400, "longer than 256", "message_id"),
    ("conversation_id-too-long", with_("conversation_id", LONG), 400, "longer than 256", "conversation_id"),
    ("sender.id-too-long", with_("sender.id", LONG), 400, "longer than 256", "sender.id"),
    ("nul-in-message_id", with_("message_id", "m-\x00-1"), 400, "NUL", "message_id"),
    ("nul-in-conversation_id", with_("conversation_id", "c\x00"), 400, "NUL", "conversation_id"),
    ("array-3rd-missing-sender.id", array(None, None, without("sender.id")), 400, "is required", "[2].sender.id"),
    ("array-3rd-bad-type", array(None, None, with_("type", "gif"), None), 400, "type must be", "[2].type"),
    ("array-3rd-a-number", array(None, None, NotAnObject("")), 400, "must be a JSON object", "[2]"),
    ("array-2nd-duplicates-1st-3rd-bad", duplicate_then_bad, 400, "type must be", "[2].type"),
]


@pytest.mark.parametrize(("case", "make", "status", "error", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_body_is_rejected_and_nothing_is_stored(
    plain: App, case: str, make: Any, status: int, error: str, field: str | None
) -> None:
    conv = f"{case}-{uuid.uuid4().hex[:6]}"
    body = make.body(conv) if isinstance(make, Spoil) else make(conv)
    conversations = (conv, *(f"{conv}-{i}" for i in range(4)))
    before = await plain.inbox_rows()
    r = await plain.post(body)
    await plain.assert_rejected(r, status, error, field, conversations, before)


async def test_valid_bodies_are_accepted_as_controls(plain: App) -> None:
    """The same shapes, valid, are accepted: the rejections above are about the fault, not the shape."""
    conv = f"ok-{uuid.uuid4().hex[:6]}"
    before = await plain.inbox_rows()
    full = message(conv, conversation=conv, timestamp="2026-11-28T01:00:00Z", payload={"a": [1]})
    full["attachments"] = [{"type": "image", "url": "http://x/y.png", "name": "y"}]
    full["message_id"] = "m-" + "x" * 254  # 256 characters: the longest allowed
    r = await plain.post(json.dumps(full).encode())
    assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}, r.text
    numeric = message(0, conversation=conv) | {"message_id": 12345, "text": None, "payload": None}
    r = await plain.post(json.dumps([numeric, numeric, message(2, conversation=conv)]).encode())
    assert r.status_code == 200 and r.json() == {"accepted": 2, "duplicates": 1}, r.text
    r = await plain.post(json.dumps(numeric).encode(), {"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json() == {"accepted": 0, "duplicates": 1}, r.text
    assert await plain.inbox_rows() == before + 3
    await plain.fake.wait_for(
        lambda: len([c for c in plain.fake.delivered() if c.body["conversation_id"] == conv]) == 3
    )
    row = await plain.services.store.conversation(f"myapp:{conv}")
    assert row is not None
    assert [m["message_id"] for m in row["messages"]] == [full["message_id"], "12345", "m-2"]
    await plain.assert_alive()


# -- headers, routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/xml", 415),
        (None, 415),
    ],
)
async def test_wrong_content_type_is_415(plain: App, content_type: str | None, status: int) -> None:
    conv = f"ctype-{uuid.uuid4().hex[:6]}"
    before = await plain.inbox_rows()
    headers = {} if content_type is None else {"content-type": content_type}
    r = await plain.post(json.dumps(message(1, conversation=conv)).encode(), headers)
    await plain.assert_rejected(r, status, "Content-Type", None, (conv,), before)


async def test_unknown_platform_is_404(plain: App) -> None:
    conv = f"nope-{uuid.uuid4().hex[:6]}"
    before = await plain.inbox_rows()
    body = json.dumps(message(1, conversation=conv)).encode()
    r = await plain.post(body, url=f"{plain.server.url}/webhooks/nope")
    await plain.assert_rejected(r, 404, "'nope'", None, (conv,), before)
    assert await plain.services.store.conversation(f"nope:{conv}") is None


# -- signatures ------------------------------------------------------------------------------------


def _sig(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


SIGNATURES: list[tuple[str, Callable[[bytes], str | None], str]] = [
    ("missing", lambda body: None, f"missing {SIG}"),
    ("empty", lambda body: "", f"missing {SIG}"),
    ("garbage", lambda body: "sha256=nope", f"bad {SIG}"),
    ("no-prefix", lambda body: _sig(SECRET, body), f"bad {SIG}"),
    ("other-algorithm-prefix", lambda body: "sha1=" + _sig(SECRET, body), f"bad {SIG}"),
    ("wrong-secret", lambda body: "sha256=" + _sig("other", body), f"bad {SIG}"),
    ("other-body", lambda body: "sha256=" + _sig(SECRET, body + b" "), f"bad {SIG}"),
    ("truncated", lambda body: "sha256=" + _sig(SECRET, body)[:-1], f"bad {SIG}"),
]


@pytest.mark.parametrize(("case", "signature", "error"), SIGNATURES, ids=[s[0] for s in SIGNATURES])
async def test_bad_or_missing_signature_is_401(
    signed: App, case: str, signature: Callable[[bytes], str | None], error: str
) -> None:
    conv = f"sig-{case}-{uuid.uuid4().hex[:6]}"
    before = await signed.inbox_rows()
    body = json.dumps(message(1, conversation=conv)).encode()
    sig = signature(body)
    headers = {**JSON, **({SIG: sig} if sig is not None else {})}
    r = await signed.post(body, headers)
    await signed.assert_rejected(r, 401, error, None, (conv,), before)


async def test_good_signature_is_accepted(signed: App) -> None:
    conv = f"sig-good-{uuid.uuid4().hex[:6]}"
    body = json.dumps(message(1, conversation=conv, text="signed")).encode()
    r = await signed.post(body, {**JSON, SIG.lower(): "sha256=" + _sig(SECRET, body)})
    assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}, r.text
    await signed.fake.wait_for(lambda: any(c.body["conversation_id"] == conv for c in signed.fake.delivered()))
    row = await signed.services.store.conversation(f"myapp:{conv}")
    assert row is not None and [m["text"] for m in row["messages"]] == ["signed"]


async def test_signature_is_checked_before_the_body_is_parsed(signed: App) -> None:
    body = b'{"message_id": '
    before = await signed.inbox_rows()
    r = await signed.post(body, {**JSON, SIG: "sha256=" + "0" * 64})
    await signed.assert_rejected(r, 401, f"bad {SIG}", None, (), before)
    before = await signed.inbox_rows()
    r = await signed.post(body, signed.signed(body))
    await signed.assert_rejected(r, 400, "malformed JSON", None, (), before)


# -- size ------------------------------------------------------------------------------------------


def sized(conv: str, size: int) -> bytes:
    """A valid one-message body of exactly `size` bytes."""
    m = message(conv, conversation=conv, text="")
    pad = size - len(json.dumps(m).encode())
    assert pad >= 0
    m["text"] = "x" * pad
    body = json.dumps(m).encode()
    assert len(body) == size
    return body


async def _chunks(body: bytes, n: int = 100) -> AsyncIterator[bytes]:
    for i in range(0, len(body), n):
        yield body[i : i + n]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413(small: App, chunked: bool) -> None:
    conv = f"big-{chunked}-{uuid.uuid4().hex[:6]}"
    before = await small.inbox_rows()
    body = sized(conv, SMALL + 1)
    content: Any = _chunks(body) if chunked else body
    r = await small.client.post(small.webhook, content=content, headers=JSON)
    assert ("content-length" in r.request.headers) is not chunked
    await small.assert_rejected(r, 413, f"larger than {SMALL} bytes", None, (conv,), before)

    before = await small.inbox_rows()
    body = sized(conv, 20 * SMALL)
    r = await small.client.post(small.webhook, content=_chunks(body) if chunked else body, headers=JSON)
    await small.assert_rejected(r, 413, f"larger than {SMALL} bytes", None, (conv,), before)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_at_the_limit_is_accepted(small: App, chunked: bool) -> None:
    conv = f"edge-{chunked}-{uuid.uuid4().hex[:6]}"
    body = sized(conv, SMALL)
    r = await small.client.post(small.webhook, content=_chunks(body) if chunked else body, headers=JSON)
    assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}, r.text


# -- overload --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def overload_service(
    tmp_path: Path, echo_flows: Path, dispatch: str
) -> AsyncIterator[tuple[str, Services, FakePlatform, httpx.AsyncClient]]:
    """Switchboard on SQLite with the echo flows (a "slow" message's turn takes 1.6 s), a fake platform
    and these `dispatch:` settings; yields the webhook URL, the services, the fake and a client."""
    extra = "dispatch:\n" + textwrap.indent(textwrap.dedent(dispatch), "  ")
    async with fake_platform() as (platform_server, fake):
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, echo_flows, extra)
        async with running(settings) as (server, services), httpx.AsyncClient(timeout=30) as client:
            yield f"{server.url}/webhooks/myapp", services, fake, client


async def test_backlog_full_is_503_with_retry_after_and_nothing_stored(tmp_path: Path, echo_flows: Path) -> None:
    dispatch = "max_backlog: 2\nretry_after_seconds: 7\n"
    async with overload_service(tmp_path, echo_flows, dispatch) as (url, services, fake, client):
        for conv in ("slow-1", "slow-2"):
            r = await client.post(url, json=message(conv, conversation=conv, text="slow down"))
            assert r.status_code == 200, r.text
        store = services.store
        for body in (message("late", conversation="late"), [message("a1", "late-a"), message("a2", "late-b")]):
            r = await client.post(url, json=body)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "7"
            assert "backlog" in r.json()["error"]
        for conv in ("late", "late-a", "late-b"):
            assert await store.conversation(f"myapp:{conv}") is None
        assert await inbox_rows(services) == 2
        stored = {
            m["message_id"]
            for c in ("slow-1", "slow-2")
            for m in (await store.conversation(f"myapp:{c}") or {"messages": []})["messages"]
        }
        assert stored == {"m-slow-1", "m-slow-2"}
        r = await client.get(url.replace("/webhooks/myapp", "/healthz"))
        assert r.status_code == 200
        # once the slow turns are done the backlog drains and the same message is taken
        await fake.wait_for(lambda: len(fake.delivered()) == 2, timeout=15)
        r = await client.post(url, json=message("late", conversation="late"))
        assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}, r.text
        await fake.wait_for(lambda: len(fake.delivered()) == 3, timeout=15)
        assert sorted(c.body["text"] for c in fake.delivered()) == [
            "echo hello late",
            "slow slow down",
            "slow slow down",
        ]


async def test_past_hold_backlog_the_answer_waits_for_the_turns(tmp_path: Path, echo_flows: Path) -> None:
    """A sender faster than the turns is slowed to their pace: past `hold_backlog` the webhook's
    answer waits until a turn ends (or `hold_seconds`), then the message is taken as usual."""
    dispatch = "hold_backlog: 2\nhold_seconds: 10\n"
    async with overload_service(tmp_path, echo_flows, dispatch) as (url, services, fake, client):
        started = time.monotonic()
        for conv in ("slow-1", "slow-2"):  # each turn waits 1.6 s (echo_flows)
            r = await client.post(url, json=message(conv, conversation=conv, text="slow down"))
            assert r.status_code == 200, r.text
        assert time.monotonic() - started < 1.0  # under the mark: answered at once
        assert services.dispatcher.crowded
        r = await client.post(url, json=message("next", conversation="next"))
        held = time.monotonic() - started
        assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}, r.text
        assert 1.2 < held < 8, held  # held until a slow turn ended, not until hold_seconds
        await fake.wait_for(lambda: len(fake.delivered()) == 3, timeout=15)
        assert not services.dispatcher.crowded


async def test_hold_ends_after_hold_seconds_and_at_shutdown(tmp_path: Path, echo_flows: Path) -> None:
    dispatch = "hold_backlog: 1\nhold_seconds: 0.3\n"
    async with overload_service(tmp_path, echo_flows, dispatch) as (url, services, _fake, client):
        r = await client.post(url, json=message("s", conversation="slow", text="slow down"))
        assert r.status_code == 200
        started = time.monotonic()
        r = await client.post(url, json=message("t", conversation="other"))
        assert r.status_code == 200, r.text  # taken after hold_seconds: the backlog is under max_backlog
        assert 0.25 < time.monotonic() - started < 1.2
        held = asyncio.create_task(client.post(url, json=message("u", conversation="third")))
        await asyncio.sleep(0.1)
        drain = asyncio.create_task(services.dispatcher.drain(5))  # SIGTERM's first part
        r = await held
        assert r.status_code == 503 and "shutting down" in r.json()["error"], r.text
        await drain
        assert await services.store.conversation("myapp:third") is None
