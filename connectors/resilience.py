"""The layer every built-in engine connector stands on: deadlines, retries, a circuit breaker, a
concurrency limit, per-connector statistics, and httpx errors turned into the ConnectorError family.

A subclass of `HttpConnector` implements `call_ask` (and `call_parse` for NLU only) and talks
HTTP only through `self.send(call, ...)`; `ask` and `parse` wrap those in the guard:

1. the call's budget is `timeout` seconds, cut short by the turn's deadline (`ConnectorTurn.deadline`);
2. the circuit breaker refuses at once while open (`CircuitOpen`), and lets one probe through
   after `breaker.cooldown`;
3. at most `max_concurrency` calls run at once; waiting for a slot counts against the budget;
4. `send` retries 429, 5xx and transport errors with jittered exponential backoff, within the
   budget, only for requests the caller marks `safe` (a repeat changes nothing) - and connection
   failures for any request, since nothing reached the engine;
5. anything else that escapes (a KeyError while reading an odd answer) becomes
   `ConnectorBadResponse`; nothing from httpx or json leaves a connector.

Timeouts and `unavailable` errors count towards opening the breaker; auth and bad-response errors
do not (the engine answered, so it is up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from connectors.base import (
    NLU,
    Connector,
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorConfig,
    ConnectorError,
    ConnectorResult,
    ConnectorTimeout,
    ConnectorTurn,
    ConnectorUnavailable,
)
from middleware.model import Action, Reply, Resolve

log = logging.getLogger("switchboard.connectors")

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]
#: latency histogram buckets, seconds (also the Prometheus `le` values)
BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: how far back `recent_errors` looks, seconds
RECENT_WINDOW = 300.0


class CircuitOpen(ConnectorUnavailable):
    """The breaker is open: the engine failed too often lately, so it is not asked at all."""

    kind = "circuit_open"


class BreakerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: consecutive failed calls (timeouts, unavailable) that open the breaker
    failures: int = Field(default=5, ge=1)
    #: seconds the breaker stays open before one probe call is let through
    cooldown: float = Field(default=30.0, gt=0)


class HttpConnectorConfig(ConnectorConfig):
    """Settings every built-in engine shares (`timeout` is the whole call's budget, retries included)."""

    #: extra attempts for requests that are safe to repeat (429, 5xx, transport errors)
    retries: int = Field(default=2, ge=0, le=10)
    #: first retry delay, seconds; doubles per attempt, with jitter, up to `backoff_max`
    backoff: float = Field(default=0.2, ge=0)
    backoff_max: float = Field(default=2.0, ge=0)
    #: calls to this engine in flight at once, per Switchboard process
    max_concurrency: int = Field(default=16, ge=1)
    breaker: BreakerConfig = BreakerConfig()


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failures -> half-open (one probe) after `cooldown`."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        if self.probing or self.clock() - self.opened_at >= self.cooldown:
            return "half_open"
        return "open"

    def retry_in(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def before(self) -> bool:
        """Raise CircuitOpen unless a call may go; True if this call is the half-open probe."""
        if self.opened_at is None:
            return False
        if self.probing:
            raise CircuitOpen("circuit open: a probe call is in flight")
        wait = self.retry_in()
        if wait > 0:
            raise CircuitOpen(f"circuit open after {self.consecutive} failures; next probe in {wait:.1f}s")
        self.probing = True
        return True

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing:  # the probe failed: open for another cooldown
            self.probing = False
            self.opened_at = self.clock()
        elif self.opened_at is None and self.consecutive >= self.failures:
            self.opened_at = self.clock()
            self.opened_count += 1

    def release_probe(self) -> None:
        """A probe that ended without a verdict (cancelled, or an error that does not count)."""
        self.probing = False


@dataclass
class ConnectorStats:
    """Counts for /metrics and /api/v1/connectors; plain numbers, read at scrape time."""

    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    in_flight: int = 0
    #: cumulative counts per bucket of BUCKETS, then +Inf
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    seconds_sum: float = 0.0
    recent: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=2000))
    last_error: dict[str, Any] | None = None

    def observe(self, seconds: float) -> None:
        self.seconds_sum += seconds
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1
        self.buckets[-1] += 1

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        now = time.monotonic()
        self.recent.append((now, kind))
        self.last_error = {"kind": kind, "message": message[:300], "at": time.time()}

    def recent_errors(self, window: float = RECENT_WINDOW) -> dict[str, int]:
        cutoff = time.monotonic() - window
        out: dict[str, int] = {}
        for at, kind in self.recent:
            if at >= cutoff:
                out[kind] = out.get(kind, 0) + 1
        return out


@dataclass
class Call:
    """One guarded call: its deadline (a `time.monotonic()` instant) and how many retries it made."""

    deadline: float
    retries: int = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_COUNTS_FOR_BREAKER = (ConnectorTimeout, ConnectorUnavailable)


class Guard:
    """Deadline, breaker, semaphore and statistics around one connector's calls."""

    def __init__(self, name: str, config: HttpConnectorConfig) -> None:
        self.name = name
        self.config = config
        self.breaker = CircuitBreaker(config.breaker.failures, config.breaker.cooldown)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.stats = ConnectorStats()

    async def run(self, deadline: float, fn: Callable[[Call], Awaitable[T]]) -> T:
        started = time.monotonic()
        call = Call(min(deadline, started + self.config.timeout))
        self.stats.calls += 1
        probe = False
        try:
            if call.remaining() <= 0:
                raise ConnectorTimeout("no time left before the turn's deadline")
            probe = self.breaker.before()
            result = await self._limited(call, fn)
        except ConnectorError as exc:
            self._failed(exc, probe)
            raise
        except asyncio.CancelledError:
            if probe:
                self.breaker.release_probe()
            raise
        except Exception as exc:  # httpx used directly, a connector's own bug, an odd answer: never leaks as is
            wrapped: ConnectorError
            if isinstance(exc, httpx.HTTPError):
                wrapped = ConnectorUnavailable(f"{type(exc).__name__}: {exc}")
            else:
                log.exception("connector %s raised %s", self.name, type(exc).__name__)
                wrapped = ConnectorBadResponse(f"{type(exc).__name__}: {exc}")
            self._failed(wrapped, probe)
            raise wrapped from exc
        finally:
            self.stats.observe(time.monotonic() - started)
        self.stats.ok += 1
        self.breaker.success()
        return result

    async def _limited(self, call: Call, fn: Callable[[Call], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(max(0.0, call.remaining())):
                async with self.slots:
                    self.stats.in_flight += 1
                    try:
                        return await fn(call)
                    finally:
                        self.stats.in_flight -= 1
        except TimeoutError as exc:
            raise ConnectorTimeout(f"no answer within {self.config.timeout:g}s or the turn's deadline") from exc

    def _failed(self, exc: ConnectorError, probe: bool) -> None:
        self.stats.error(exc.kind, str(exc))
        if isinstance(exc, CircuitOpen):
            return
        if isinstance(exc, _COUNTS_FOR_BREAKER):
            self.breaker.failure()
        elif probe:
            self.breaker.success()  # the engine answered, even if not to our liking

    def health(self) -> dict[str, Any]:
        b = self.breaker
        s = self.stats
        return {
            "breaker": {
                "state": b.state,
                "consecutive_failures": b.consecutive,
                "retry_in_seconds": round(b.retry_in(), 1),
                "opened": b.opened_count,
            },
            "calls": s.calls,
            "ok": s.ok,
            "errors": dict(s.errors),
            "recent_errors": s.recent_errors(),
            "recent_window_seconds": RECENT_WINDOW,
            "retries": s.retries,
            "in_flight": s.in_flight,
            "max_concurrency": self.config.max_concurrency,
            "last_error": s.last_error,
        }


def result_of(
    replies: Iterable[Reply], actions: Iterable[Action], nlu: NLU | None = None, end: bool = False
) -> ConnectorResult:
    """A ConnectorResult where a requested Resolve becomes `end` (the engine resolves once)."""
    kept = [a for a in actions if not isinstance(a, Resolve)]
    ended = end or any(isinstance(a, Resolve) for a in actions)
    return ConnectorResult(tuple(replies), tuple(kept), nlu, ended)


def obj(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (for reading engines' answers defensively)."""
    return value if isinstance(value, dict) else {}


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if not raw:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(raw))
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    return None


def _excerpt(response: httpx.Response) -> str:
    try:
        text = response.text
    except (UnicodeDecodeError, httpx.HTTPError):
        return "<unreadable body>"
    return " ".join(text.split())[:200]


class HttpConnector(Connector):
    """Base of the built-in engines: implement `call_ask` (and `call_parse`), talk through `send`.

    ```python
    class EchoBot(HttpConnector):
        Config = EchoConfig                      # a subclass of HttpConnectorConfig with `url`

        async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
            response = await self.send(call, "POST", self.config.url, json={"text": turn.message.text})
            return ConnectorResult((Reply(self.json_of(response)["text"]),))
    ```
    """

    Config: ClassVar[type[ConnectorConfig]] = HttpConnectorConfig
    config: HttpConnectorConfig

    def __init__(self, name: str, config: ConnectorConfig, http: httpx.AsyncClient) -> None:
        super().__init__(name, config, http)
        self.guard = Guard(name, self.config)

    async def ask(self, turn: ConnectorTurn) -> ConnectorResult:
        return await self.guard.run(turn.deadline, lambda call: self.call_ask(call, turn))

    async def parse(self, turn: ConnectorTurn) -> NLU:
        return await self.guard.run(turn.deadline, lambda call: self.call_parse(call, turn))

    @abstractmethod
    async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
        """One guarded turn: talk to the engine through `send`, map its answer."""

    async def call_parse(self, call: Call, turn: ConnectorTurn) -> NLU:
        """NLU only; by default the NLU of a full turn."""
        return (await self.call_ask(call, turn)).nlu or NLU()

    def health(self) -> dict[str, Any]:
        return self.guard.health()

    async def send(
        self,
        call: Call,
        method: str,
        url: str,
        *,
        safe: bool = False,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP request within the call's budget; a 2xx/3xx response, or a ConnectorError.

        401/403 -> ConnectorAuthError; 429, 5xx, transport errors -> ConnectorUnavailable (retried
        when `safe`); a timeout -> ConnectorTimeout; other 4xx -> ConnectorBadResponse.
        """
        cfg = self.config
        attempt = 0
        while True:
            remaining = call.remaining()
            if remaining <= 0:
                raise ConnectorTimeout(f"no answer from {self.name} within the budget")
            retry_after: float | None = None
            try:
                response = await self.http.request(
                    method, url, json=json, content=content, headers=headers, params=params, timeout=remaining
                )
            except httpx.ConnectError as exc:  # refused or unresolved: the engine never saw it
                error: ConnectorError = ConnectorUnavailable(f"cannot connect: {exc}")
                retryable = True
            except httpx.TimeoutException as exc:
                raise ConnectorTimeout(f"timed out after {remaining:.1f}s ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                error = ConnectorUnavailable(f"{type(exc).__name__}: {exc}")
                retryable = safe
            else:
                status = response.status_code
                if status < 400:
                    return response
                if status in (401, 403):
                    raise ConnectorAuthError(f"HTTP {status}: {_excerpt(response)}")
                if status == 429 or status >= 500 or status == 408:
                    error = ConnectorUnavailable(f"HTTP {status}: {_excerpt(response)}")
                    retryable = safe
                    retry_after = _retry_after(response)
                else:
                    raise ConnectorBadResponse(f"HTTP {status}: {_excerpt(response)}")
            if not retryable or attempt >= cfg.retries:
                raise error
            delay = min(cfg.backoff_max, cfg.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, retry_after)
            if delay >= call.remaining() - 0.05:
                raise error
            attempt += 1
            call.retries += 1
            self.guard.stats.retries += 1
            log.info("retrying %s after %s (attempt %d)", self.name, error, attempt + 1)
            await asyncio.sleep(delay)

    @staticmethod
    def json_of(response: httpx.Response) -> Any:
        """The response's JSON, or ConnectorBadResponse."""
        try:
            return json.loads(response.content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConnectorBadResponse(f"not JSON: {_excerpt(response)!r}") from exc


__all__ = [
    "BUCKETS",
    "BreakerConfig",
    "Call",
    "CircuitBreaker",
    "CircuitOpen",
    "ConnectorStats",
    "Guard",
    "HttpConnector",
    "HttpConnectorConfig",
    "obj",
    "result_of",
]
