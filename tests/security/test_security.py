"""Security properties: secrets never in a log line, the flow `http` action held to its allowlist (redirects
included), JSON depth at the edge, flood control per sender, every comparison of a secret in
constant time, and every admin and inbox route behind its authentication."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from middleware.engine import Engine, load_flows
from middleware.engine.flow import Resources
from middleware.flood import SenderLimiter
from middleware.logs import JsonFormatter, KeyValueFormatter, redact
from middleware.model import ConversationState, Inbound, Sender
from middleware.platforms.base import MAX_JSON_DEPTH, Rejected, loads_json, loads_json_stdlib
from tests.conftest import REPO
from tests.security.conftest import ADMIN_TOKEN, ThreadedApp, hostile_config, sync_client
from tests.security.targets import BY_NAME, SECRETS, TARGETS

# -- secrets in logs ------------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged, through both of Switchboard's formatters, at DEBUG."""
    out = io.StringIO()
    handlers = []
    for formatter in (KeyValueFormatter(), JsonFormatter()):
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        handlers.append(handler)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    try:
        yield out
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(level)


def failing_platform_apis(request: httpx.Request) -> httpx.Response:
    """Every platform API down in a way that talks: the token-bearing URL in the answer, and for Telegram an
    exception whose message is the URL with the bot token in it (as some transports' errors are)."""
    url = str(request.url)
    if "/sendMessage" in url:
        raise RuntimeError(f"transport failed for {url}")
    return httpx.Response(502, text=f"<html>upstream error for {request.method} {url}</html>")


def test_no_secret_reaches_a_log_line(tmp_path: Path, captured: io.StringIO) -> None:
    env = {f"SB_{k.upper()}": v for k, v in SECRETS.items()}
    env |= {"SB_ADMIN": ADMIN_TOKEN, "SB_CHAT_TOKEN": "chat-url-token-3e5f"}

    def config(api: str) -> str:
        text = hostile_config(tmp_path, "outbox:\n  max_attempts: 2\n  backoff_base: 0.05\n")(api)
        for name, value in sorted(env.items(), key=lambda kv: -len(kv[1])):
            text = text.replace(value, "${" + name + "}")
        # a platform URL that carries a token in its query, as some chat backends want
        return text.replace("/generic/messages", "/generic/messages?token=${SB_CHAT_TOKEN}", 1)

    config_text = config("http://api.test")
    assert "${SB_TELEGRAM_TOKEN}" in config_text and SECRETS["telegram_token"] not in config_text
    http = httpx.AsyncClient(transport=httpx.MockTransport(failing_platform_apis))
    with ThreadedApp(config, tmp_path, env, http) as app, sync_client() as client:
        for target in TARGETS:  # a turn on every platform, each webhook with its secret in the headers
            hook = target.text_hook("log-1", "log-1", "hello")
            r = client.request(hook.method, hook.url(app.url, target.name), content=hook.body, headers=hook.headers)
            assert r.status_code == 200, (target.name, r.text)
        app.wait_for(
            lambda: (
                "adapter failed unexpectedly" in captured.getvalue()
                and captured.getvalue().count("outbox dead letter") >= len(TARGETS)
            )
        )
        dead = client.get(f"{app.url}/api/v1/outbox/dead", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert dead.status_code == 200 and dead.json()["dead"]
        stored_errors = json.dumps(dead.json())
        app.call(asyncio.sleep(0.2))
    log = captured.getvalue()
    assert "transport failed for" in log and "[redacted]" in log, log[-2000:]
    # an adapter's unexpected exception is a failed attempt (retried, then dead-lettered), not a crash loop
    assert "worker crashed" not in log
    for name, value in env.items():
        assert value not in log, f"{name} is in the log:\n" + "\n".join(x for x in log.splitlines() if value in x)
        assert value not in stored_errors, f"{name} is in a stored delivery error"


def test_redact_catches_secret_shapes_it_was_not_told() -> None:
    line = (
        "GET https://api.telegram.org/bot123456:AAH-unknown_token/getMe?access_token=abc123&x=1 "
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9 postgresql://sb:hunter22@db:5432/sb hub.verify_token=zzz"
    )
    out = redact(line)
    for secret in ("AAH-unknown_token", "abc123", "eyJhbGciOiJIUzI1NiJ9", "hunter22", "zzz"):
        assert secret not in out, out
    assert "x=1" in out and "db:5432" in out


# -- the flow `http` action -----------------------------------------------------------------------------

HTTP_FLOW = """\
flow: fetch
states:
  start:
    routes:
      - do:
          - http: {url: "{{ message.text }}", save_as: answer}
          - reply: "done"
"""


class Api:
    """Answers by host: redirects where asked, JSON elsewhere; records every request made."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(str(request.url))
        path = request.url.path
        if path.startswith("/to/"):
            return httpx.Response(302, headers={"location": "http://" + path.removeprefix("/to/")})
        if path == "/loop":
            return httpx.Response(307, headers={"location": "/loop"})
        if path == "/big":
            return httpx.Response(200, content=b"[" + b"1," * 600_000 + b"1]")
        if path == "/deep":
            return httpx.Response(200, content=b"[" * 5000 + b"]" * 5000)
        return httpx.Response(200, json={"host": request.url.host, "path": path})


async def fetch(url: str, allow: tuple[str, ...], tmp_path: Path, follow: bool = True) -> tuple[Any, list[str]]:
    (tmp_path / "fetch.yaml").write_text(HTTP_FLOW)
    api = Api()
    # a client that follows redirects on its own: the action must not let it
    async with httpx.AsyncClient(transport=httpx.MockTransport(api), follow_redirects=follow) as client:
        engine = Engine(load_flows(tmp_path), Resources(http=client, http_allow=allow))
        message = Inbound("t", "m-1", "c-1", Sender("u-1"), text=url)
        result = await engine.decide(message, ConversationState())
    return result.state.vars["answer"], api.seen


ALLOW = ("api.example.com",)


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/steal",
        "http://api.example.com.evil.example/",
        "http://api.example.com@evil.example/",
        "http://evil.example#@api.example.com/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "file:///etc/passwd",
        "gopher://api.example.com/",
        "//api.example.com/no-scheme",
        "http://",
    ],
)
async def test_http_action_refuses_hosts_outside_the_allowlist(url: str, tmp_path: Path) -> None:
    answer, seen = await fetch(url, ALLOW, tmp_path)
    assert "error" in answer, answer
    assert not seen, f"a request went out: {seen}"


async def test_http_action_calls_an_allowed_host_whatever_its_case(tmp_path: Path) -> None:
    answer, seen = await fetch("https://API.Example.COM./orders/7", ALLOW, tmp_path)
    assert answer == {"host": "api.example.com.", "path": "/orders/7"}, answer
    assert len(seen) == 1


async def test_http_action_does_not_follow_a_redirect_to_another_host(tmp_path: Path) -> None:
    answer, seen = await fetch("https://api.example.com/to/evil.example/collect", ALLOW, tmp_path)
    assert answer == {"error": "HTTP 302 redirect to 'evil.example', not in the allowed hosts"}
    assert seen == ["https://api.example.com/to/evil.example/collect"]


async def test_http_action_follows_a_redirect_within_the_allowlist(tmp_path: Path) -> None:
    answer, seen = await fetch("https://api.example.com/to/api.example.com/v2", ALLOW, tmp_path)
    assert answer == {"host": "api.example.com", "path": "/v2"}
    assert len(seen) == 2


async def test_http_action_stops_a_redirect_loop_and_a_huge_or_deep_answer(tmp_path: Path) -> None:
    answer, seen = await fetch("https://api.example.com/loop", ALLOW, tmp_path)
    assert answer == {"error": "more than 3 redirects"} and len(seen) == 4
    answer, _ = await fetch("https://api.example.com/big", ALLOW, tmp_path)
    assert answer == {"error": "answer larger than 1048576 bytes"}
    answer, _ = await fetch("https://api.example.com/deep", ALLOW, tmp_path)
    assert isinstance(answer, str) and answer.startswith("[[[")  # kept as text, not parsed 5000 levels deep


async def test_http_action_without_an_allowlist_takes_any_host(tmp_path: Path) -> None:
    answer, _ = await fetch("http://elsewhere.example/x", (), tmp_path, follow=False)
    assert answer == {"host": "elsewhere.example", "path": "/x"}


# -- JSON depth at the edge ------------------------------------------------------------------------------


def test_json_depth_limit() -> None:
    assert loads_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    for deep in (b"[" * 65 + b"]" * 65, b'{"a":' * 65 + b"1" + b"}" * 65, ("[" * 65 + "]" * 65).encode("utf-16")):
        with pytest.raises(Rejected) as refused:
            loads_json(deep)
        assert refused.value.status == 400 and "nested too deeply: more than 64 levels" in refused.value.message
    # brackets inside strings (escaped quotes too) are text, not nesting
    text = json.dumps({"t": '\\"[' * 500, "u": "{" * 500}).encode()
    assert loads_json(text)["u"] == "{" * 500


#: bodies on both sides of every line the edge draws (orjson reads most of them first; what it
#: refuses, or would read differently, goes to the stdlib parser and its exact message)
EDGE_BODIES = [
    b'{"message_id":"m-1","conversation_id":"c-1","sender":{"id":"u-1"},"type":"text","text":"hi"}',
    b' [1, 2.5, -0, 1e-400, 1.7976931348623157e308, true, null, "\\u00e9\\ud83d\\ude00"] ',
    b'{"a":1,"a":2}',
    b'{"id":9223372036854775807,"low":-9223372036854775808,"u":18446744073709551615}',
    b'{"id":-9223372036854775809}',
    b'{"id":18446744073709551616}',
    b'{"digits":"1234567890123456789","n":1}',
    b'{"a":1e400}',
    b'{"a":-1e400}',
    b'{"a":NaN}',
    b'{"a":Infinity}',
    b'{"a":"\\ud800"}',
    b'{"a":"\xed\xa0\x80"}',
    b'{"a":"\xff"}',
    b'\xef\xbb\xbf{"bom":true}',
    '{"utf16":"\u00e9"}'.encode("utf-16"),
    b'{"a":"tab\there"}',
    b'{"a":1} trailing',
    b'{"a":',
    b"",
    b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH,
    b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
    b"[" * 2000 + b"]" * 2000,
]


@pytest.mark.parametrize("body", EDGE_BODIES, ids=range(len(EDGE_BODIES)))
def test_fast_json_at_the_edge_reads_exactly_what_the_stdlib_reading_does(body: bytes) -> None:
    """`loads_json` reads with orjson where it can: the values (and their types) and the refusals
    must be those of the standard library's reading with the edge's own checks."""

    def outcome(read: Callable[[bytes], object]) -> tuple[str, object]:
        try:
            value = read(body)
        except Rejected as exc:
            return "rejected", (exc.status, exc.message)
        return "read", (value, json.dumps(value, sort_keys=True, default=repr), _types(value))

    assert outcome(loads_json) == outcome(loads_json_stdlib)


def _types(value: object) -> object:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


# -- flood control -------------------------------------------------------------------------------------------


def inbound(sender: str, n: int, platform: str = "p", kind: str = "text") -> Inbound:
    return Inbound(platform, f"m-{sender}-{n}", f"c-{sender}", Sender(sender), type=kind)  # type: ignore[arg-type]


def test_sender_limiter_buckets() -> None:
    limiter = SenderLimiter(per_second=1.0, burst=3)
    admitted = [limiter.admit(inbound("a", i), now=100.0) for i in range(5)]
    assert admitted == [True, True, True, False, False]
    assert limiter.admit(inbound("b", 0), now=100.0), "another sender has a bucket of its own"
    assert limiter.admit(inbound("a", 9, platform="q"), now=100.0), "and so does the same id on another platform"
    assert limiter.admit(inbound("a", 5, kind="event"), now=100.0), "events are never held back"
    assert limiter.admit(inbound("a", 6), now=101.01), "a second later, one more"
    assert not limiter.admit(inbound("a", 7), now=101.02)
    limiter.refund(inbound("a", 6))
    assert limiter.admit(inbound("a", 8), now=101.03), "a duplicate's token comes back"
    assert SenderLimiter(None, 1).admit(inbound("a", 0)), "no rate: no limit"


def test_sender_limiter_forgets_the_least_recent_senders() -> None:
    limiter = SenderLimiter(per_second=1.0, burst=1)
    limiter.MAX_SENDERS = 3
    for s in "abcd":
        assert limiter.admit(inbound(s, 0), now=0.0)
    assert len(limiter._senders) == 3
    assert limiter.admit(inbound("a", 1), now=0.0), "a was forgotten: a full bucket again"
    assert not limiter.admit(inbound("d", 1), now=0.0)


def test_a_flooding_sender_is_stored_but_gets_turns_only_at_its_rate(tmp_path: Path, captured: io.StringIO) -> None:
    extra = "ingress:\n  sender_per_second: 0.5\n  sender_burst: 3\n"
    with ThreadedApp(hostile_config(tmp_path, extra), tmp_path) as app, sync_client() as client:
        target = BY_NAME["open"]
        url = f"{app.url}/webhooks/open"
        answers = []
        for i in range(10):
            body = target.valid(f"flood-{i}", "flood", f"spam {i}")
            answers.append(client.post(url, json=body).json())
        assert answers[:3] == [{"accepted": 1, "duplicates": 0}] * 3
        assert answers[3:] == [{"accepted": 1, "duplicates": 0, "flooded": 1}] * 7
        # a retry of a flooded message is a duplicate; another sender is not held back
        again = client.post(url, json=target.valid("flood-9", "flood", "spam 9")).json()
        assert again == {"accepted": 0, "duplicates": 1}
        other = client.post(url, json=target.valid("calm-1", "calm", "hello")).json()
        assert other == {"accepted": 1, "duplicates": 0}
        statuses = [app.stored("open", f"flood-{i}")["status"] for i in range(10)]  # type: ignore[index]
        assert statuses[3:] == ["flooded"] * 7 and "flooded" not in statuses[:3]

        def answered() -> list[str]:
            return [json.loads(c.body)["text"] for c in app.fake.replies_to("/generic/messages")]

        app.wait_for(lambda: len(answered()) == 4)
        time.sleep(0.5)
        assert sorted(answered()) == ["echo hello", "echo spam 0", "echo spam 1", "echo spam 2"]
        metrics = client.get(f"{app.url}/metrics").text
        assert 'switchboard_webhooks_total{platform="open",result="flooded"} 7.0' in metrics
        assert app.services.dispatcher.backlog == 0
        time.sleep(2.1)  # a token back at 0.5 a second
        later = client.post(url, json=target.valid("flood-late", "flood", "later")).json()
        assert later == {"accepted": 1, "duplicates": 0}
        app.wait_for(lambda: "echo later" in answered())
    lines = [line for line in captured.getvalue().splitlines() if "sender flooding" in line]
    assert len(lines) == 2, lines  # one per formatter: one structured line for the whole flood
    assert 'sender="u-flood"' in lines[0] and 'platform="open"' in lines[0]


# -- constant-time comparisons, everywhere a secret is checked --------------------------------------------

SECRET_NAMES = re.compile(r"(secret|token|signature|password|csrf|hs_token|verify|presented|expected|nonce|mac)", re.I)
CHECKED = [
    *sorted((REPO / "middleware" / "platforms").glob("*.py")),
    REPO / "middleware" / "web" / "api.py",
    REPO / "middleware" / "web" / "inbox.py",
    REPO / "middleware" / "agents.py",
    REPO / "connectors" / "rasa_actions.py",
]


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def test_secrets_are_compared_in_constant_time_only() -> None:
    """No `==`, `!=` or `in` between values named like secrets: hmac.compare_digest (or a hash lookup) instead."""
    found = []
    for path in CHECKED:
        if not path.exists():
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) for o in operands):
                continue  # against a literal: a type or a name, not a secret
            secretive = [n for o in operands for n in _names(o) if SECRET_NAMES.search(n)]
            if secretive:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


# -- authentication in front of every admin and inbox route ------------------------------------------------


def test_every_admin_and_inbox_route_wants_its_credentials(tmp_path: Path) -> None:
    open_routes = {"/api/v1/openapi.json", "/inbox/login", "/inbox/logout"}
    with ThreadedApp(hostile_config(tmp_path), tmp_path) as app, sync_client() as client:
        routes = [r for r in app.app.routes if getattr(r, "path", "").startswith(("/api/", "/inbox"))]
        assert len(routes) >= 10
        for route in routes:
            path = route.path.replace("{key:path}", "generic:c-1").replace("{id:int}", "1")  # type: ignore[attr-defined]
            if path in open_routes:
                continue
            for method in sorted(route.methods or {"GET"}):  # type: ignore[attr-defined]
                if method == "HEAD":
                    continue
                r = client.request(method, app.url + path, headers={"authorization": "Bearer wrong"})
                if path.startswith("/api/"):
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert r.headers.get("www-authenticate") == "Bearer"
                else:
                    assert r.status_code in (303, 401, 403, 415), (method, path, r.status_code)
                    if r.status_code == 303:
                        assert r.headers["location"].startswith("/inbox/login")


def test_the_constant_time_check_finds_a_plain_comparison() -> None:
    """The check above would catch the mistake it guards against."""
    tree = ast.parse("if presented == self.config.secret_token: pass\nif kind == 'message': pass")
    flagged = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and not any(isinstance(o, ast.Constant) for o in [n.left, *n.comparators])
        and any(SECRET_NAMES.search(x) for o in [n.left, *n.comparators] for x in _names(o))
    ]
    assert len(flagged) == 1


async def test_sender_attributes_cannot_pass_for_the_sender(tmp_path: Path) -> None:
    """A Chatwoot contact sets its own custom attributes (the widget's setCustomAttributes): `{"id": ...}`
    among them must not change `user.id`, which flows use to look things up for the user."""
    (tmp_path / "who.yaml").write_text(
        "flow: who\nstates:\n  start:\n    routes:\n"
        '      - do: [{reply: "{{ user.id }}|{{ user.name }}|{{ user.plan }}"}]\n'
    )
    engine = Engine(load_flows(tmp_path))
    spoofed = Sender("u-real", "Ana", {"id": "u-victim", "name": "Admin", "plan": "gold"})
    result = await engine.decide(Inbound("cw", "m-1", "c-1", spoofed), ConversationState())
    assert [r.text for r in result.replies] == ["u-real|Ana|gold"]
