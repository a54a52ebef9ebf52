"""The platform interface: the edge between a chat platform's JSON and the typed core.

A platform module does four things and nothing else knows its JSON:

1. `parse` a webhook: verify its signature, decode it, and return `Inbound` messages
   (or raise `Rejected` with the HTTP status and a message that names the problem);
2. `deliver` an `Outgoing` item (a reply, a typing indicator, a read receipt) through the
   platform's API, raising `DeliveryError` that says whether a retry may help;
3. say what it supports (`supports_typing`, `supports_read`) and how long typing lasts there;
4. build itself from its config model (`Config`), validated by `switchboard check`.

To add a platform: subclass `Platform`, give it a pydantic `Config`, and register the type
name in `middleware/platforms/__init__.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict

from middleware.model import Inbound, Outgoing


class PlatformConfig(BaseModel):
    """Every platform's config has a `type`; subclasses add their own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    typing_delay: float | None = None


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """A webhook as the platform sent it.

    `path` is what followed `/webhooks/{name}` in the URL ("" for the plain webhook URL), for
    platforms that call sub-paths (a Matrix homeserver PUTs `/_matrix/app/v1/transactions/{id}`).
    Header names are lower-case.
    """

    method: str
    body: bytes
    headers: Mapping[str, str]
    query: Mapping[str, str] = field(default_factory=dict)
    path: str = ""


@dataclass(slots=True)
class Parsed:
    """The messages a webhook carried, and the answer the platform expects.

    `response` is a JSON body (a dict or list) or plain text (a str, e.g. a verification
    challenge); None means the standard `{"accepted": N, "duplicates": M}`.
    """

    messages: list[Inbound]
    response: dict[str, Any] | list[Any] | str | None = None
    status: int = 200


class Rejected(Exception):
    """A webhook the platform must not retry as is: 4xx with a JSON body naming the problem."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            data["field"] = self.field
        return data


class DeliveryError(Exception):
    """A platform call that failed; `retryable` says whether sending it again may succeed."""

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class Platform(ABC):
    """A chat platform instance, named by its key under `platforms:` in the config."""

    Config: ClassVar[type[PlatformConfig]] = PlatformConfig
    supports_typing: bool = False
    supports_read: bool = False
    #: the platform has its own agent tools: `deliver` takes "handoff" and "release" items
    supports_handoff: bool = False
    #: seconds a typing indicator stays on at the platform without a refresh
    typing_ttl: float = 5.0

    def __init__(self, name: str, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        self.name = name
        self.config = config
        self.http = http

    @abstractmethod
    def parse(self, request: WebhookRequest) -> Parsed:
        """Verify and decode one webhook; raise `Rejected` for anything not acceptable."""

    @abstractmethod
    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        """Send one outgoing item; raise `DeliveryError` on failure.

        Items of a kind the platform does not support (typing without `supports_typing`, ...)
        are never handed to it.
        """

    async def aclose(self) -> None:
        """Release what the platform holds open (a realtime connection); called once at shutdown."""
        return


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_matches(secret: str, body: bytes, presented: str | None, prefix: str = "") -> bool:
    """Constant-time comparison of a presented HMAC-SHA256 hex signature."""
    if not presented:
        return False
    expected = prefix + hmac_sha256_hex(secret, body)
    return hmac.compare_digest(expected.encode(), presented.strip().encode())


def decode_json(request: WebhookRequest) -> Any:
    """The JSON body, with 415 for another content type and 400 for malformed JSON."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() not in ("application/json", "") or not ctype:
        raise Rejected(415, f"expected Content-Type application/json, got {ctype or 'none'!r}")
    try:
        data = json.loads(request.body)
    except UnicodeDecodeError as exc:
        raise Rejected(400, "body is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise Rejected(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise Rejected(400, "JSON nested too deeply") from exc
    except ValueError as exc:  # an integer longer than Python converts (4300 digits)
        raise Rejected(400, f"malformed JSON: {str(exc)[:80]}") from exc
    # json.loads lets unpaired surrogates (\ud800 escapes, or raw with UTF-16/32) through; no database stores them
    if _SURROGATE.search(request.body) or 0 in request.body[:4]:
        try:
            json_bytes(data)
        except UnicodeEncodeError as exc:
            raise Rejected(400, "malformed JSON: unpaired UTF-16 surrogate (\\ud800-\\udfff)") from exc
    return data


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def post_json(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST JSON and map every failure to a `DeliveryError` that says whether to retry.

    5xx, 408, timeouts and connection errors are retryable; 429 carries Retry-After;
    any other 4xx is permanent.
    """
    return await post_bytes(http, url, json_bytes(body), {"content-type": "application/json", **(headers or {})})


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


async def post_bytes(http: httpx.AsyncClient, url: str, raw: bytes, headers: dict[str, str]) -> httpx.Response:
    try:
        response = await http.post(url, content=raw, headers=headers)
    except httpx.TimeoutException as exc:
        raise DeliveryError(f"timeout: {type(exc).__name__}", retryable=True) from exc
    except httpx.HTTPError as exc:
        raise DeliveryError(f"connection: {type(exc).__name__}: {exc}", retryable=True) from exc
    check_status(response)
    return response


def check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 300:
        return
    detail = response.text[:200]
    if status == 429:
        raise DeliveryError(
            f"429 rate limited: {detail}",
            retryable=True,
            status=status,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )
    if status >= 500 or status == 408:
        raise DeliveryError(
            f"{status}: {detail}",
            retryable=True,
            status=status,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )
    raise DeliveryError(f"{status}: {detail}", retryable=False, status=status)


def response_object(response: httpx.Response) -> dict[str, Any]:
    """A platform API's JSON answer as a dict; {} when it is empty, not JSON, or not an object."""
    try:
        data = json.loads(response.content) if response.content else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else {} (for optional nested objects in webhooks)."""
    return value if isinstance(value, dict) else {}


def as_text(value: Any) -> str | None:
    """`value` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None
