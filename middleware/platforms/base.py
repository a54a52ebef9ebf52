"""The platform interface: the edge between a chat platform's JSON and the typed core.

A platform module does four things and nothing else knows its JSON:

1. `parse` a webhook: verify its signature, decode it, and return `Inbound` messages
   (or raise `Rejected` with the HTTP status and a message that names the problem);
2. `deliver` an `Outgoing` item (a reply, a typing indicator, a read receipt) through the
   platform's API, raising `DeliveryError` that says whether a retry may help;
3. say what it supports (`supports_typing`, `supports_read`) and how long typing lasts there;
4. build itself from its config model (`Config`), validated by `switchboard check`.

A webhook may also call for something that is not an answer to a message (Matrix: the bot is
invited to a room, and joins it). `parse` makes no network call (the platform is waiting for its
answer), so it lists such work as `Parsed.follow_ups`; once the webhook is accepted (its messages,
if any, stored) ingress hands each to `Platform.follow_up` in the background, after the answer, and
tries a retryable failure again a few times (`run_follow_ups`). A refused webhook, or one answered
503 because the store is down, runs none: the platform sends it again.

To add a platform: subclass `Platform`, give it a pydantic `Config`, and register the type
name in `middleware/platforms/__init__.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Protocol

import httpx
import orjson
from pydantic import BaseModel, ConfigDict

from middleware import jsoncodec
from middleware.http1 import Http1Error, Http1Timeout, SwitchboardClient
from middleware.model import Inbound, Outgoing
from middleware.ratelimit import RateLimit

_log = logging.getLogger("switchboard.platforms")


class PlatformConfig(BaseModel):
    """Every platform's config has a `type`; subclasses add their own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    typing_delay: float | None = None
    #: outbound limits; unset = the platform's documented default (`Platform.default_rate_limit`)
    rate_limit: RateLimit | None = None


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


@dataclass(frozen=True, slots=True)
class FollowUp:
    """Work a webhook calls for besides its messages, done by `Platform.follow_up` once the webhook
    is accepted: a `kind` the platform module defines (Matrix: "join") and what it acts on."""

    kind: str
    target: str


@dataclass(slots=True)
class Parsed:
    """The messages a webhook carried, and the answer the platform expects.

    `response` is a JSON body (a dict or list) or plain text (a str, e.g. a verification
    challenge); None means the standard `{"accepted": N, "duplicates": M}`. `follow_ups` are
    handed to `Platform.follow_up` after the webhook is accepted.
    """

    messages: list[Inbound]
    response: dict[str, Any] | list[Any] | str | None = None
    status: int = 200
    follow_ups: list[FollowUp] = field(default_factory=list)


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
    #: outbound limits when the config sets none: the platform's documented limits
    default_rate_limit: ClassVar[RateLimit] = RateLimit()

    @property
    def rate_limit(self) -> RateLimit:
        return self.config.rate_limit or self.default_rate_limit

    #: seconds a typing indicator stays on at the platform without a refresh
    typing_ttl: float = 5.0
    #: HTTP methods its webhooks use; ingress answers any other with 405 before reading the body
    methods: ClassVar[frozenset[str]] = frozenset({"POST"})
    #: whether the platform calls sub-paths of its webhook URL (`/webhooks/{name}/...`); else they are 404
    subpaths: ClassVar[bool] = False

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

    async def follow_up(self, item: FollowUp) -> None:
        """Do one of a webhook's `Parsed.follow_ups` (a platform call, made after the webhook's answer);
        raise `DeliveryError` as `deliver` does. Only platforms whose `parse` lists follow-ups get any."""
        raise NotImplementedError(f"{type(self).__name__} lists no follow-ups, got {item.kind!r}")

    async def aclose(self) -> None:
        """Release what the platform holds open (a realtime connection); called once at shutdown."""
        return


async def deliver(platform: Platform, item: Outgoing, idempotency_key: str) -> None:
    """`platform.deliver` as its callers (the outbox, typing, read receipts) use it: any error that is
    not a `DeliveryError` (a bug in an adapter, an answer it did not expect) is logged once with its
    traceback and raised as a retryable `DeliveryError`, so it counts as a failed attempt (retried,
    then dead-lettered) instead of crashing the worker that made the call."""
    try:
        await platform.deliver(item, idempotency_key)
    except (DeliveryError, TimeoutError, asyncio.CancelledError):
        raise
    except Exception as exc:
        _log.exception(
            "platform adapter failed unexpectedly",
            extra={"platform": platform.name, "conversation": item.conversation_id, "kind": item.kind},
        )
        raise DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True) from exc


#: tries of a follow-up whose failure is retryable, and the first pause between them (doubling)
FOLLOW_UP_ATTEMPTS = 4
FOLLOW_UP_BACKOFF = 1.0


async def run_follow_ups(platform: Platform, items: list[FollowUp], backoff: float = FOLLOW_UP_BACKOFF) -> None:
    """A webhook's follow-ups, in order; a retryable `DeliveryError` is tried again (after its Retry-After,
    else a doubling pause) up to `FOLLOW_UP_ATTEMPTS` times; a failure that stays is logged, never raised."""
    for item in items:
        for attempt in range(1, FOLLOW_UP_ATTEMPTS + 1):
            try:
                await platform.follow_up(item)
                break
            except DeliveryError as exc:
                if not exc.retryable or attempt == FOLLOW_UP_ATTEMPTS:
                    _log.warning(
                        "%s %s failed after %d attempt(s): %s",
                        item.kind,
                        item.target,
                        attempt,
                        exc,
                        extra={"platform": platform.name},
                    )
                    break
                pause = exc.retry_after if exc.retry_after is not None else backoff * 2 ** (attempt - 1)
                await asyncio.sleep(min(pause, 60.0))
            except Exception:
                _log.exception("%s %s failed", item.kind, item.target, extra={"platform": platform.name})
                break


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_matches(secret: str, body: bytes, presented: str | None, prefix: str = "") -> bool:
    """Constant-time comparison of a presented HMAC-SHA256 hex signature."""
    if not presented:
        return False
    expected = prefix + hmac_sha256_hex(secret, body)
    return hmac.compare_digest(expected.encode(), presented.strip().encode())


def decode_json(request: WebhookRequest) -> Any:
    """The JSON body, with 415 for another content type and 400 for malformed JSON (see `loads_json`)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() not in ("application/json", "") or not ctype:
        raise Rejected(415, f"expected Content-Type application/json, got {ctype or 'none'!r}")
    return loads_json(request.body)


#: how deeply JSON from outside may nest; platforms' webhooks stay under 15 levels
MAX_JSON_DEPTH = 64


def loads_json(raw: bytes | str) -> Any:
    """JSON from outside (a webhook, a form field, an API body), or `Rejected` 400 naming the problem:
    malformed JSON or not UTF-8, nested deeper than `MAX_JSON_DEPTH`, NaN or Infinity or a number past
    float range (no peer can read them back), an integer of more than 4300 digits, or an unpaired UTF-16
    surrogate (no database stores one)."""
    body = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if not jsoncodec.long_digit_run(body):
        # orjson first (a tenth of json's time on a webhook). It refuses all that json is made to
        # refuse here (NaN, Infinity, numbers past float range, unpaired surrogates, bad UTF-8) and
        # more (a BOM, UTF-16): on any error the text goes the stdlib's way, for its exact message.
        # It would read an integer past 64 bits as a float: such text has a 19-digit run, and skips it.
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            return _within_depth(body, data)
    return loads_json_stdlib(body)


def loads_json_stdlib(body: bytes) -> Any:
    """`loads_json` with the standard library's parser alone (UTF-16 and -32, a BOM, integers of any
    size), and its messages for what is refused."""
    try:
        data = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))  # = json.loads
    except UnicodeDecodeError as exc:
        raise Rejected(400, "body is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise Rejected(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except _NotJson as exc:
        raise Rejected(400, f"malformed JSON: {exc}") from exc
    except RecursionError as exc:
        raise Rejected(400, f"JSON nested too deeply: more than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:  # an integer longer than Python converts (4300 digits)
        raise Rejected(400, f"malformed JSON: {str(exc)[:80]}") from exc
    _within_depth(body, data)
    # json.loads lets unpaired surrogates (\ud800 escapes, or raw with UTF-16/32) through; no database stores them
    if _SURROGATE.search(body) or 0 in body[:4]:
        try:
            json_bytes(data)
        except UnicodeEncodeError as exc:
            raise Rejected(400, "malformed JSON: unpaired UTF-16 surrogate (\\ud800-\\udfff)") from exc
    return data


def _within_depth(body: bytes, data: Any) -> Any:
    """`data`, or `Rejected` 400 if the document nests deeper than `MAX_JSON_DEPTH`."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_depth(body, data) > MAX_JSON_DEPTH:
        raise Rejected(400, f"JSON nested too deeply: more than {MAX_JSON_DEPTH} levels")
    return data


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJson(f"number out of range: {text[:40]}")
    return value


#: one decoder for every call (json.loads builds one per call when given hooks)
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_depth(body: bytes, data: Any) -> int:
    """How deeply the (valid) JSON document `body`, parsed as `data`, nests: 1 for `{}`, 2 for `[{}]`."""
    if json.detect_encoding(body) == "utf-8":
        # brackets outside strings, counted at C speed: no Python work per node of a hostile document
        brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
        return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)
    depth, level = 0, [(data, 1)]
    while level:
        value, d = level.pop()
        if isinstance(value, dict | list):
            depth = max(depth, d)
            level += [(v, d + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return depth


def from_unix(value: Any, per_second: int = 1) -> datetime | None:
    """A Unix time (in seconds, or in 1/`per_second` of a second) as an aware datetime; None for anything
    else: a bool, a non-number, a string other than ASCII digits, 0 or less, or past the year 9999."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()) or len(value) > 20:
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < _YEAR_10000 * per_second:
        return None
    with contextlib.suppress(ValueError, OverflowError, OSError):
        return datetime.fromtimestamp(value / per_second, UTC)
    return None


_YEAR_10000 = 253_402_300_800


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


class HttpAnswer(Protocol):
    """What the platform modules read of an answer: httpx.Response, or the lean pool's Answer."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...


async def post_json(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> HttpAnswer:
    """POST JSON and map every failure to a `DeliveryError` that says whether to retry.

    5xx, 408, timeouts and connection errors are retryable; 429 carries Retry-After;
    any other 4xx is permanent.
    """
    return await post_bytes(http, url, json_bytes(body), {"content-type": "application/json", **(headers or {})})


def json_bytes(body: Any) -> bytes:
    return jsoncodec.dumps(body)


async def post_bytes(http: httpx.AsyncClient, url: str, raw: bytes, headers: dict[str, str]) -> HttpAnswer:
    """POST `raw`; on the lean pool when the client has one that takes the URL (middleware/http1.py)."""
    fast = http.fast if isinstance(http, SwitchboardClient) else None
    response: HttpAnswer
    if fast is not None and fast.target(url) is not None:
        try:
            response = await fast.post(url, raw, headers)
        except Http1Timeout as exc:
            raise DeliveryError(f"timeout: {exc}", retryable=True) from exc
        except Http1Error as exc:
            raise DeliveryError(f"connection: {exc}", retryable=True) from exc
    else:
        try:
            response = await http.post(url, content=raw, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timeout: {type(exc).__name__}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"connection: {type(exc).__name__}: {exc}", retryable=True) from exc
    check_status(response)
    return response


def check_status(response: HttpAnswer) -> None:
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


def response_object(response: HttpAnswer) -> dict[str, Any]:
    """A platform API's JSON answer as a dict; {} when it is empty, not JSON, or not an object."""
    try:
        data = json.loads(response.content) if response.content else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else {} (for optional nested objects in webhooks)."""
    return value if isinstance(value, dict) else {}


#: the longest id (of a message, a conversation, a sender) the store takes
MAX_ID_LENGTH = 256


def id_problem(value: str) -> str | None:
    """Why `value` cannot be a message, conversation or sender id in the store; None if it can."""
    if not value:
        return "is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if "\x00" in value:  # PostgreSQL cannot store NUL in a text column
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "contains an unpaired UTF-16 surrogate"
    return None


def as_list(value: Any) -> list[Any]:
    """`value` if it is a JSON array, else [] (for optional arrays in webhooks)."""
    return value if isinstance(value, list) else []


def as_text(value: Any) -> str | None:
    """`value` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None
