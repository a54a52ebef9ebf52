"""The contract every platform module passes.

A platform's test module describes its platform in a `Case` and subclasses `ContractSuite`:

    class TestAcmeContract(ContractSuite):
        case = Case(...)

The suite checks: verification (a forged webhook is refused), parsing (a text message becomes
one `Inbound` with stable ids, a duplicate parses to the same dedupe key), sending text, sending
a rich reply (natively or as the plain-text fallback), typing on/off and read receipts where
supported, and the mapping of the platform API's failures to retryable / permanent errors.
The platform's API is played by `httpx.MockTransport` with the platform's documented answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pytest

from middleware.model import Button, Inbound, Outgoing, Reply
from middleware.platforms import PLATFORM_TYPES, DeliveryError, Platform, Rejected, WebhookRequest


@dataclass
class ApiCall:
    method: str
    url: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or form fields, or raw text

    @property
    def text(self) -> str:
        return json.dumps(self.body, ensure_ascii=False) if not isinstance(self.body, str) else self.body


@dataclass
class FakeApi:
    """Records every call and answers with the platform's documented success body, unless told to fail."""

    ok: Callable[[httpx.Request], httpx.Response]
    calls: list[ApiCall] = field(default_factory=list)
    fail_with: httpx.Response | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        raw = request.content.decode() if request.content else ""
        ctype = request.headers.get("content-type", "")
        body: Any
        if "json" in ctype and raw:
            body = json.loads(raw)
        elif "x-www-form-urlencoded" in ctype:
            from urllib.parse import parse_qsl

            body = dict(parse_qsl(raw))
        else:
            body = raw
        self.calls.append(ApiCall(request.method, str(request.url), dict(request.headers), body))
        if self.fail_with is not None:
            return self.fail_with
        return self.ok(request)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


@dataclass
class Case:
    """What the contract needs to know about one platform."""

    type: str
    #: the platform's config as in switchboard.yaml (API base URLs pointing anywhere: MockTransport answers)
    config: dict[str, Any]
    #: a valid, signed webhook carrying one text message
    text_webhook: Callable[[str, str, str], WebhookRequest]  # (message id, conversation id, text)
    #: the same webhook with a forged signature or token
    forge: Callable[[WebhookRequest], WebhookRequest]
    #: the platform API's success answer for any call
    ok: Callable[[httpx.Request], httpx.Response] = lambda r: httpx.Response(200, json={"ok": True})
    #: statuses a forged webhook may get
    forged_status: tuple[int, ...] = (401, 403)
    #: the conversation id Switchboard derives from `text_webhook`'s conversation argument
    conversation_of: Callable[[str], str] = lambda c: c
    #: how to tell a 429 with a retry hint in this platform's words
    rate_limited: Callable[[], httpx.Response] = lambda: httpx.Response(429, headers={"Retry-After": "7"})


class ContractSuite:
    case: ClassVar[Case]

    def make(self) -> tuple[Platform, FakeApi]:
        cls = PLATFORM_TYPES[self.case.type]
        api = FakeApi(self.case.ok)
        config = cls.Config.model_validate(self.case.config)
        return cls("acme", config, api.client()), api

    def parse_one(self, platform: Platform, mid: str = "m-1", conv: str = "c-1", text: str = "hello") -> Inbound:
        parsed = platform.parse(self.case.text_webhook(mid, conv, text))
        assert len(parsed.messages) == 1, parsed
        return parsed.messages[0]

    def test_forged_webhook_is_refused(self) -> None:
        platform, _ = self.make()
        with pytest.raises(Rejected) as err:
            platform.parse(self.case.forge(self.case.text_webhook("m-1", "c-1", "hello")))
        assert err.value.status in self.case.forged_status

    def test_text_message_parses_to_one_inbound(self) -> None:
        platform, _ = self.make()
        msg = self.parse_one(platform, "m-1", "c-1", "hello there")
        assert msg.platform == "acme"
        assert msg.text == "hello there"
        assert msg.type == "text"
        assert msg.conversation_id == self.case.conversation_of("c-1")
        assert msg.message_id and msg.sender.id

    def test_duplicate_has_the_same_dedupe_key(self) -> None:
        platform, _ = self.make()
        first = self.parse_one(platform, "m-7", "c-1", "same")
        again = self.parse_one(platform, "m-7", "c-1", "same")
        other = self.parse_one(platform, "m-8", "c-1", "same")
        assert first.message_id == again.message_id
        assert other.message_id != first.message_id

    async def test_send_text(self) -> None:
        platform, api = self.make()
        msg = self.parse_one(platform)
        await platform.deliver(
            Outgoing("message", msg.conversation_id, Reply("hi from the bot"), msg.message_id), "k-1"
        )
        assert any("hi from the bot" in c.text for c in api.calls), api.calls

    async def test_send_rich_reply_or_its_fallback(self) -> None:
        platform, api = self.make()
        msg = self.parse_one(platform)
        reply = Reply("Pick one", buttons=(Button("Opening hours", "hours"), Button("Pricing", "pricing")))
        await platform.deliver(Outgoing("message", msg.conversation_id, reply, msg.message_id), "k-2")
        sent = " ".join(c.text for c in api.calls)
        assert "Pick one" in sent and "Opening hours" in sent and "Pricing" in sent

    async def test_typing_on_and_off(self) -> None:
        platform, api = self.make()
        if not platform.supports_typing:
            pytest.skip(f"{self.case.type} has no typing indicator")
        msg = self.parse_one(platform)
        await platform.deliver(Outgoing("typing", msg.conversation_id, typing=True, message_id=msg.message_id), "t-1")
        await platform.deliver(Outgoing("typing", msg.conversation_id, typing=False, message_id=msg.message_id), "t-2")
        assert api.calls, "typing made no API call"

    async def test_read_receipt(self) -> None:
        platform, api = self.make()
        if not platform.supports_read:
            pytest.skip(f"{self.case.type} has no read receipts")
        msg = self.parse_one(platform)
        await platform.deliver(Outgoing("read", msg.conversation_id, message_id=msg.message_id), "r-1")
        assert api.calls, "read receipt made no API call"

    async def test_api_failures_map_to_retryable_or_permanent(self) -> None:
        platform, api = self.make()
        msg = self.parse_one(platform)
        item = Outgoing("message", msg.conversation_id, Reply("x"), msg.message_id)
        api.fail_with = httpx.Response(503, json={"error": "down"})
        with pytest.raises(DeliveryError) as err:
            await platform.deliver(item, "k-3")
        assert err.value.retryable
        api.fail_with = self.case.rate_limited()
        with pytest.raises(DeliveryError) as err:
            await platform.deliver(item, "k-3")
        assert err.value.retryable and err.value.retry_after == pytest.approx(7, abs=1)
        api.fail_with = httpx.Response(400, json={"error": "bad request"})
        with pytest.raises(DeliveryError) as err:
            await platform.deliver(item, "k-3")
        assert not err.value.retryable
