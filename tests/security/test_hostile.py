"""The hostile-input corpus (tests/data/hostile/) against every webhook, the admin API, the inbox and the
playground of one running app: no 5xx, the documented 4xx with a JSON error naming the problem,
nothing stored from a refused request, what a user wrote stored and echoed exactly, and the process
still serving afterwards.

Also, at the parser level: "wrong types at every level", every value of every recorded payload
(tests/data/<platform>/) replaced in turn by a value of each JSON type, and the ones that broke
parsers before (huge numbers, "²", NUL, unhashable lists where strings belong).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from middleware.ingress import check_messages
from middleware.model import Inbound
from middleware.platforms import Rejected
from middleware.platforms.base import json_bytes
from tests.security.conftest import ADMIN_TOKEN, ThreadedApp
from tests.security.strategies import paths_of, put
from tests.security.targets import BY_NAME, HOSTILE, TARGETS, TYPED, Hook, Target, _hex

CASES = yaml.safe_load((HOSTILE / "cases.yaml").read_text(encoding="utf-8"))
PAGES = yaml.safe_load((HOSTILE / "admin.yaml").read_text(encoding="utf-8"))
UNICODE: dict[str, str] = json.loads((HOSTILE / "unicode.json").read_text())
TEMPLATES: dict[str, str] = json.loads((HOSTILE / "templates.json").read_text())
NAMES = [t.name for t in TARGETS]


def expected(spec: Any, target: Target) -> int:
    if isinstance(spec, dict):
        return int(spec.get(target.name, spec["default"]))
    return int(spec)


def wire(headers: dict[str, str]) -> dict[str, bytes]:
    """Header values as sent: latin-1 bytes, so that a test may send the octets a hostile client would."""
    return {k: v.encode("latin-1") if max(map(ord, v), default=0) < 256 else v.encode() for k, v in headers.items()}


def send(client: httpx.Client, app: ThreadedApp, target: Target, hook: Hook, content: Any = None) -> httpx.Response:
    return client.request(
        hook.method,
        hook.url(app.url, target.name),
        content=hook.body if content is None else content,
        headers=wire(hook.headers),
    )


class Outcomes:
    """Every mismatch of a case across the platforms, reported together."""

    def __init__(self, app: ThreadedApp, client: httpx.Client) -> None:
        self.app = app
        self.client = client
        self.problems: list[str] = []

    def check(
        self, where: str, response: httpx.Response, status: int | list[int], before: int, error: str | None = None
    ) -> None:
        allowed = status if isinstance(status, list) else [status]
        if response.status_code >= 500 or response.status_code not in allowed:
            self.problems.append(f"{where}: {response.status_code} (expected {allowed}): {response.text[:200]}")
            return
        if response.status_code >= 400:
            if response.headers.get("content-type", "").startswith("application/json"):
                data = response.json()
                message = data.get("error") if isinstance(data, dict) else None
                if not isinstance(message, str) or not message:
                    self.problems.append(f"{where}: a refusal without an error message: {response.text[:200]}")
                elif error and error.lower() not in message.lower():
                    self.problems.append(f"{where}: error {message!r} does not say {error!r}")
            rows = self.app.inbox_rows()
            if rows != before:
                self.problems.append(f"{where}: refused with {response.status_code}, yet {rows - before} rows stored")

    def done(self) -> None:
        r = self.client.get(f"{self.app.url}/healthz")
        assert r.status_code == 200, "the process no longer answers /healthz"
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def outcomes(hostile: ThreadedApp, client: httpx.Client) -> Iterator[Outcomes]:
    yield Outcomes(hostile, client)


# -- bodies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES["bodies"], ids=[c["file"] for c in CASES["bodies"]])
def test_hostile_bodies(hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, case: dict[str, Any]) -> None:
    body = (HOSTILE / "bodies" / case["file"]).read_bytes()
    for target in TARGETS:
        before = hostile.inbox_rows()
        response = send(client, hostile, target, target.hook(body))
        outcomes.check(f"{target.name}", response, expected(case["expect"], target), before, case.get("error"))
    outcomes.done()


def generated(make: str, size: int, target: Target, n: int) -> tuple[Hook, Any]:
    """(the webhook, the content to send: bytes, or an iterator of chunks for a chunked body)."""
    if make == "deep":
        body = b"[" * size + b"]" * size
        return target.hook(body), None
    valid = target.valid(f"gen-{make}-{n}", f"gen-{make}-{n}", "hello")
    if make == "deep-valid":
        nested: Any = {}
        for _ in range(size):
            nested = {"n": nested}
        return target.hook({**valid, "deep": nested}), None
    if make == "huge-text":
        return target.text_hook(f"gen-{make}-{n}", f"gen-{make}-{n}", "x" * size), None
    if make in ("oversized", "oversized-chunked"):
        hook = target.hook({**valid, "pad": "x" * size})
        if make == "oversized":
            return hook, None
        chunks = [hook.body[i : i + 4096] for i in range(0, len(hook.body), 4096)]
        return hook, iter(chunks)
    raise AssertionError(make)


@pytest.mark.parametrize("case", CASES["generated"], ids=[c["id"] for c in CASES["generated"]])
def test_generated_bodies(hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, case: dict[str, Any]) -> None:
    for n, target in enumerate(TARGETS):
        before = hostile.inbox_rows()
        hook, content = generated(case["make"], case["size"], target, n)
        response = send(client, hostile, target, hook, content)
        status = expected(case["expect"], target)
        outcomes.check(target.name, response, status, before, case.get("error"))
        if status == 200 and response.status_code == 200 and hostile.inbox_rows() != before + 1:
            outcomes.problems.append(f"{target.name}: accepted, but not stored once")
    outcomes.done()


# -- signatures --------------------------------------------------------------------------------------


def forge(target: Target, case: dict[str, Any]) -> Hook:
    valid = target.valid(f"sig-{case['id']}", f"sig-{case['id']}", "forged?")
    body = json.dumps(valid).encode()
    stamp = ""
    if "stamp" in case:
        stamp = str(int(time.time()) + int(case["stamp"]))
    elif "stamp_text" in case:
        stamp = "9" * 400 if case["stamp_text"] == "huge" else case["stamp_text"]
    hook = target.sign(body, "application/json", case.get("secret"), stamp)
    if case.get("tamper"):
        hook = Hook(hook.method, body.replace(b"forged?", b"forged!"), hook.headers, hook.query, hook.path)
    transform = case.get("transform")
    if transform:
        name = next(k for k in hook.headers if "signature" in k or "secret-token" in k)
        value = hook.headers[name]
        changed = {
            "upper": value.upper(),
            "truncate": value[:-1],
            "pad": value + "0" * 10_000,
            "strip-prefix": value.split("=", 1)[-1],
            "v1": "v1=" + value.split("=", 1)[-1],
        }[transform]
        hook = hook.with_headers(**{name: changed})
    if "drop" in case:
        hook = hook.with_headers(**{case["drop"]: None})
    if "set" in case:
        hook = hook.with_headers(**case["set"])
    query = dict(hook.query)
    if "drop_query" in case:
        query.pop(case["drop_query"], None)
    query.update(case.get("set_query", {}))
    return Hook(hook.method, hook.body, hook.headers, query, hook.path)


SIGNATURE_CASES = [(name, case) for name, cases in CASES["signatures"].items() for case in cases]


@pytest.mark.parametrize(("name", "case"), SIGNATURE_CASES, ids=[f"{n}-{c['id']}" for n, c in SIGNATURE_CASES])
def test_forged_signatures(
    hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, name: str, case: dict[str, Any]
) -> None:
    target = BY_NAME[name]
    hook = forge(target, case)
    with pytest.raises(Rejected) as refused:  # the parser itself, with the header exactly as forged
        target.make().parse(hook.request())
    assert refused.value.status == case["expect"], refused.value.message
    before = hostile.inbox_rows()
    outcomes.check(name, send(client, hostile, target, hook), case["expect"], before, case.get("error"))
    outcomes.done()


def test_every_platform_type_has_forgeries() -> None:
    assert {t.name for t in TYPED} <= set(CASES["signatures"])


@pytest.mark.parametrize("target", TYPED, ids=[t.name for t in TYPED])
def test_a_replayed_webhook_is_a_duplicate(hostile: ThreadedApp, client: httpx.Client, target: Target) -> None:
    """Schemes without a timestamp cannot tell a replay from the platform's own retry: both are the same
    message, stored once and answered once (Slack's and Chatwoot's replays past 5 minutes are 401 above)."""
    hook = target.text_hook("replay-1", "replay", "say it once")
    before = hostile.inbox_rows()
    first = send(client, hostile, target, hook)
    again = send(client, hostile, target, hook)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert hostile.inbox_rows() == before + 1
    if target.type == "generic":
        assert again.json() == {"accepted": 0, "duplicates": 1}
        hostile.wait_for(lambda: hostile.fake.replies_to("/generic/messages"))
        time.sleep(0.3)
        echoes = [c for c in hostile.fake.replies_to("/generic/messages") if b"say it once" in c.body]
        assert len(echoes) == 1, echoes


# -- content types, methods, paths -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES["content_types"], ids=[str(c["type"]) for c in CASES["content_types"]])
def test_content_types(hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, case: dict[str, Any]) -> None:
    for target in TARGETS:
        hook = target.text_hook(f"ctype-{case['type']}", "ctype", "typed")
        hook = hook.with_headers(**{"content-type": case["type"]})
        before = hostile.inbox_rows()
        outcomes.check(target.name, send(client, hostile, target, hook), expected(case["expect"], target), before)
    outcomes.done()


@pytest.mark.parametrize("case", CASES["methods"], ids=[f"{c['method']}-{c.get('path', '')}" for c in CASES["methods"]])
def test_methods_and_paths(
    hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, case: dict[str, Any]
) -> None:
    for target in TARGETS:
        hook = target.text_hook("method", "method", "which way?")
        hook = Hook(case["method"], hook.body, hook.headers, hook.query, case.get("path", ""))
        before = hostile.inbox_rows()
        outcomes.check(target.name, send(client, hostile, target, hook), expected(case["expect"], target), before)
    outcomes.done()


# -- what users write: stored and echoed as data ------------------------------------------------------


def stored_text(app: ThreadedApp, target: Target, hook: Hook) -> str | None:
    (message,) = target.make().parse(hook.request()).messages
    stored = app.stored(target.name, message.message_id)
    return stored["text"] if stored else None


@pytest.mark.parametrize(("label", "texts"), [("unicode", UNICODE), ("templates", TEMPLATES)])
def test_user_text_is_stored_and_echoed_verbatim(
    hostile: ThreadedApp, client: httpx.Client, label: str, texts: dict[str, str]
) -> None:
    problems = []
    for case, text in texts.items():
        for target in TARGETS:
            conv = f"{label}-{case}"
            hook = target.text_hook(f"{label}-{case}", conv, text)
            response = send(client, hostile, target, hook)
            if response.status_code != 200:
                problems.append(f"{case} via {target.name}: {response.status_code} {response.text[:200]}")
            elif stored_text(hostile, target, hook) != text:
                problems.append(f"{case} via {target.name}: stored as {stored_text(hostile, target, hook)!r:.80}")

    def echoed() -> dict[str, str]:
        out = {}
        for call in hostile.fake.replies_to("/generic/messages"):
            body = json.loads(call.body)
            if body["conversation_id"].startswith(f"{label}-"):
                out[body["conversation_id"]] = body["text"]
        return out

    hostile.wait_for(lambda: len(echoed()) >= len(texts), timeout=20)
    for case, text in texts.items():
        if echoed().get(f"{label}-{case}") != f"echo {text}":
            problems.append(f"{case}: echoed as {echoed().get(f'{label}-{case}')!r:.80}")
    assert not problems, "\n".join(problems)


# -- wrong types at every level --------------------------------------------------------------------------

#: one value of each JSON type, and the ones that broke parsers before
WRONG = [None, True, -1, 2**63, 10**300, 1e308, "", "²", "9" * 400, "\x00", [], {}, [[[]]], {"a": {"b": []}}]


def variants(target: Target) -> Iterator[tuple[str, Any, bool]]:
    for name, payload, form in [*target.seed_bodies(), ("valid", target.valid("m-1", "c-1", "hi"), False)]:
        for path in paths_of(payload):
            for value in WRONG:
                yield f"{name} {list(path)} = {value!r:.20}", put(payload, path, value), form
            if path:
                yield f"{name} {list(path)} removed", put(payload, path, None, delete=True), form


@pytest.mark.parametrize("target", TARGETS, ids=NAMES)
def test_wrong_types_at_every_level_parse_or_are_refused(target: Target) -> None:
    problems, n = [], 0
    platform = target.make()
    for where, payload, form in variants(target):
        n += 1
        try:
            parsed = platform.parse(target.seed_hook(payload, form).request())
            check_messages(parsed.messages)
            for m in parsed.messages:
                assert json_bytes(Inbound.from_json(json.loads(json_bytes(m.to_json()))).to_json())
        except Rejected as exc:
            if not 400 <= exc.status < 500:
                problems.append(f"{where}: {exc.status}")
        except Exception as exc:
            problems.append(f"{where}: {type(exc).__name__}: {exc}")
    assert n > 50
    assert not problems, f"{len(problems)} of {n}:\n" + "\n".join(problems[:30])


@pytest.mark.parametrize("target", TARGETS, ids=NAMES)
def test_wrong_types_over_http(hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, target: Target) -> None:
    """A sample of the above through the running app: the status is the parser's, a refusal stores nothing."""
    every = max(1, sum(1 for _ in variants(target)) // 40)
    for i, (where, payload, form) in enumerate(variants(target)):
        if i % every:
            continue
        hook = target.seed_hook(payload, form)
        try:
            parsed = target.make().parse(hook.request())
            check_messages(parsed.messages)
            status = parsed.status
        except Rejected as exc:
            status = exc.status
        before = hostile.inbox_rows()
        outcomes.check(where, send(client, hostile, target, hook), status, before)
    outcomes.done()


# -- the admin API, the inbox, the playground -------------------------------------------------------


def page_body(case: dict[str, Any]) -> bytes:
    if "body_file" in case:
        return (HOSTILE / "bodies" / case["body_file"]).read_bytes()
    if "body_repeat" in case:
        text, n = case["body_repeat"]
        return (str(text) * int(n)).encode()
    body = str(case.get("body", ""))
    special = {
        "LONG_TEXT_EVENT": json.dumps({"event": "note", "text": "x" * 10_001}),
        "LONG_AGENT_EVENT": json.dumps({"event": "note", "text": "x", "agent": "a" * 201}),
        "LONG_CSRF_FORM": "name=a&password=b&csrf=" + "9" * 5000 + ".abc",
    }
    return special.get(body, body).encode()


def page_request(case: dict[str, Any]) -> tuple[str, str, dict[str, bytes], bytes]:
    path = case["path"].replace("LONG_DIGITS", "9" * 5000).replace("LONG_KEY", "k" * 10_000)
    headers = {k: str(v) for k, v in (case.get("headers") or {}).items()}
    if headers.get("authorization") == "long-bearer":
        headers["authorization"] = "Bearer " + "t" * 8000
    if headers.get("cookie") == "LONG_COOKIE":
        headers["cookie"] = "sb_inbox=" + "c" * 8000
    if path.startswith("/api/") and case.get("auth", "authorization" not in headers):
        headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
    if "body" in case or "body_file" in case or "body_repeat" in case:
        headers.setdefault("content-type", "application/json")
    return case["method"], path, wire(headers), page_body(case)


ADMIN_CASES = [*PAGES["admin"], *PAGES["pages"]]


@pytest.mark.parametrize("case", ADMIN_CASES, ids=[c["id"] for c in ADMIN_CASES])
def test_admin_api_inbox_and_playground(
    hostile: ThreadedApp, client: httpx.Client, outcomes: Outcomes, case: dict[str, Any]
) -> None:
    # a conversation for the agent-event cases to find
    hostile.call(hostile.services.store.seed_conversation("generic:c-admin", "generic", "c-admin", _state()))
    method, path, headers, body = page_request(case)
    before = hostile.inbox_rows()
    response = client.request(method, hostile.url + path, headers=headers, content=body, follow_redirects=False)
    outcomes.check(case["id"], response, case["expect"], before, case.get("error"))
    if "location" in case:
        assert response.headers.get("location", "").startswith(case["location"]), response.headers
    if "absent" in case:
        assert case["absent"] not in response.text
    outcomes.done()


def _state() -> Any:
    from middleware.model import ConversationState

    return ConversationState(flow="echo")


def test_still_taking_messages_on_every_platform(hostile: ThreadedApp, client: httpx.Client) -> None:
    """After the whole corpus: every platform still takes a valid message, and the generic one is answered."""
    for target in TARGETS:
        before = hostile.inbox_rows()
        response = send(client, hostile, target, target.text_hook("alive", "alive", "still there?"))
        assert response.status_code == 200, (target.name, response.text)
        assert hostile.inbox_rows() == before + 1, target.name
    hostile.wait_for(lambda: any(b"still there?" in c.body for c in hostile.fake.replies_to("/generic/messages")))
    assert _hex("k", b"") != ""  # the signing helper the corpus uses is the platforms' own scheme
