"""Signals between nodes: a short text published on a channel reaches every node's subscribers.

Several `switchboard serve` processes on one PostgreSQL tell each other things that must not wait
for a sweep: "conversation K has new work and you hold its lease" (the dispatcher), "these flows
were reloaded" (hot reload), "a turn was stored in conversation K" (the agent inbox's live view).

- `LocalBus`: within one process (SQLite runs one node). Buses made with the same `scope` (the
  store URL) reach each other, so two apps in one process on one store behave like two nodes.
- `PostgresBus`: PostgreSQL LISTEN/NOTIFY. One dedicated connection LISTENs (reconnecting with
  backoff when the server goes away); publishing is a `pg_notify` through the store's writer, so a
  signal is one more statement in the next group commit. Channel names carry a hash of the database
  and schema, so stores sharing a server (a schema per test, say) never hear each other.

Delivery is best effort, as NOTIFY is: a signal sent while the listener reconnects is lost, so
every subscriber keeps a slower path that does not need it (the dispatcher's sweep, the hub's
`resync` event), and `on_reconnect` handlers run after every reconnection to take that path at once.
A payload is at most `MAX_PAYLOAD` bytes of UTF-8 (PostgreSQL's limit is 8000 with the origin).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

log = logging.getLogger("switchboard.notify")

#: the longest payload `publish` sends (bytes of UTF-8); longer ones are dropped with a warning
MAX_PAYLOAD = 7000
#: a channel name: lower-case letters, digits and underscores, at most this long
MAX_CHANNEL = 24


@dataclass(frozen=True, slots=True)
class Signal:
    channel: str
    payload: str
    #: the `Bus.origin` of the bus that published it
    origin: str

    def mine(self, bus: Bus) -> bool:
        return self.origin == bus.origin


Handler = Callable[[Signal], None]


class Bus(Protocol):
    #: unique per bus instance (per process start): receivers tell their own signals by it
    origin: str

    @property
    def connected(self) -> bool:
        """True while signals from other nodes can arrive."""
        ...

    @property
    def alone(self) -> bool:
        """True when no other node can be on this bus (and so none writes the store but us)."""
        ...

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        """Call `handler` (in the event loop, never concurrently) for each signal on the channel,
        this bus's own included; returns the function that unsubscribes."""
        ...

    def on_reconnect(self, handler: Callable[[], None]) -> None:
        """Call `handler` after the bus reconnected: signals may have been missed meanwhile."""
        ...

    async def publish(self, channel: str, payload: str) -> bool:
        """Send a signal to every node; never raises. False if it could not be sent."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _check_channel(channel: str) -> None:
    if not channel or len(channel) > MAX_CHANNEL or not all(c.islower() or c.isdigit() or c == "_" for c in channel):
        raise ValueError(f"bad channel name {channel!r}: lower-case letters, digits, _, at most {MAX_CHANNEL}")


def _fits(channel: str, payload: str) -> bool:
    if len(payload.encode()) <= MAX_PAYLOAD:
        return True
    log.warning("signal on %s not sent: payload over %d bytes", channel, MAX_PAYLOAD)
    return False


class _Subscribers:
    """Handlers by channel, and the reconnect handlers; calls each in the running loop."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Handler]] = {}
        self.reconnect: list[Callable[[], None]] = []

    def add(self, channel: str, handler: Handler) -> Callable[[], None]:
        _check_channel(channel)
        self.handlers.setdefault(channel, []).append(handler)

        def remove() -> None:
            with contextlib.suppress(ValueError, KeyError):
                self.handlers[channel].remove(handler)

        return remove

    def deliver(self, signal: Signal) -> None:
        for handler in list(self.handlers.get(signal.channel, ())):
            try:
                handler(signal)
            except Exception:  # one subscriber's bug must not stop the others or the listener
                log.exception("signal handler failed", extra={"channel": signal.channel})

    def reconnected(self) -> None:
        for handler in list(self.reconnect):
            try:
                handler()
            except Exception:
                log.exception("reconnect handler failed")


class LocalBus:
    """Signals within this process: to every LocalBus of the same scope (including itself)."""

    def __init__(self, scope: str = "") -> None:
        self.origin = secrets.token_hex(6)
        self.scope = scope
        self._subs = _Subscribers()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._group: _Scope | None = None

    @property
    def connected(self) -> bool:
        return not self._closed

    @property
    def alone(self) -> bool:
        return self._group is None or len(self._group.members) <= 1

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        return self._subs.add(channel, handler)

    def on_reconnect(self, handler: Callable[[], None]) -> None:
        self._subs.reconnect.append(handler)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._group = _Scope.of(self.scope)
        self._group.members.add(self)

    async def publish(self, channel: str, payload: str) -> bool:
        _check_channel(channel)
        if self._closed or self._group is None or not _fits(channel, payload):
            return False
        signal = Signal(channel, payload, self.origin)
        for member in list(self._group.members):
            member._receive(signal)
        return True

    def _receive(self, signal: Signal) -> None:
        if self._closed or self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._subs.deliver, signal)

    async def close(self) -> None:
        self._closed = True
        if self._group is not None:
            self._group.members.discard(self)


class _Scope:
    """The LocalBuses of one scope in this process."""

    _all: weakref.WeakValueDictionary[str, _Scope] = weakref.WeakValueDictionary()

    def __init__(self) -> None:
        self.members: weakref.WeakSet[LocalBus] = weakref.WeakSet()

    @classmethod
    def of(cls, scope: str) -> _Scope:
        group = cls._all.get(scope)
        if group is None:
            group = cls()
            cls._all[scope] = group
        # keep it alive as long as one member is: members hold it through their `_group`
        return group


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq takes it (`postgresql+psycopg://` -> `postgresql://`)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith(("postgresql", "postgres")):
        raise ValueError("not a PostgreSQL URL")
    dsn = "postgresql://" + rest
    if "connect_timeout=" not in dsn:
        dsn += ("&" if urlsplit(dsn).query else "?") + "connect_timeout=3"
    return dsn


Publisher = Callable[[str, str], Awaitable[None]]


class PostgresBus:
    """LISTEN/NOTIFY on PostgreSQL: one listening connection with reconnects; NOTIFY via `publisher`.

    `publisher(channel, payload)` runs `SELECT pg_notify(channel, payload)` (the store's `notify`).
    """

    def __init__(
        self,
        url: str,
        publisher: Publisher,
        *,
        backoff: tuple[float, float] = (0.2, 2.0),
        ping_seconds: float = 5.0,
    ) -> None:
        self.origin = secrets.token_hex(6)
        self.dsn = libpq_dsn(url)
        self.publisher = publisher
        self.backoff = backoff
        self.ping_seconds = ping_seconds
        self.prefix = ""
        self._subs = _Subscribers()
        self._listening: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._ready = asyncio.Event()
        self._closed = False
        self.reconnects = 0
        #: the listening connection's server process (pg_stat_activity.pid), while connected
        self.backend_pid: int | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def alone(self) -> bool:
        return False  # any number of nodes may share the database

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        return self._subs.add(channel, handler)

    def on_reconnect(self, handler: Callable[[], None]) -> None:
        self._subs.reconnect.append(handler)

    async def start(self, wait: float = 5.0) -> None:
        """Start listening; waits up to `wait` seconds for the first connection (then goes on
        connecting in the background: the store's own outage handling covers the start-up)."""
        self._task = asyncio.create_task(self._run(), name="notify-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._connected = False

    def channel_name(self, channel: str) -> str:
        return f"{self.prefix}{channel}"

    async def publish(self, channel: str, payload: str) -> bool:
        _check_channel(channel)
        if self._closed or not self.prefix or not _fits(channel, payload):
            return False
        try:
            await self.publisher(self.channel_name(channel), f"{self.origin}|{payload}")
        except Exception as exc:  # the store is down: the receivers' slower path covers it
            log.debug("signal on %s not sent: %s", channel, exc)
            return False
        return True

    async def _run(self) -> None:
        import psycopg

        delay = self.backoff[0]
        first = True
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    if not self.prefix:
                        row = await (await conn.execute("SELECT current_database(), current_schema()")).fetchone()
                        where = f"{row[0]}\x00{row[1]}" if row else ""
                        self.prefix = "sb" + hashlib.sha256(where.encode()).hexdigest()[:10] + "_"
                    self._listening = set()
                    self.backend_pid = conn.info.backend_pid
                    await self._listen_all(conn)
                    self._connected = True
                    self._ready.set()
                    if not first:
                        self.reconnects += 1
                        log.info("notify listener reconnected")
                        self._subs.reconnected()
                    first = False
                    delay = self.backoff[0]
                    await self._consume(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._connected:
                    log.warning("notify listener lost its connection: %s", str(exc).splitlines()[0][:200])
                self._connected = False
            self._connected = False
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(self.backoff[1], delay * 2)

    async def _listen_all(self, conn: object) -> None:
        from psycopg import AsyncConnection, sql

        assert isinstance(conn, AsyncConnection)
        for channel in list(self._subs.handlers):
            if channel not in self._listening:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel_name(channel))))
                self._listening.add(channel)

    async def _consume(self, conn: object) -> None:
        from psycopg import AsyncConnection

        assert isinstance(conn, AsyncConnection)
        prefix = self.prefix
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self.ping_seconds
        while not self._closed:
            async for note in conn.notifies(timeout=0.2):
                if not note.channel.startswith(prefix):
                    continue
                origin, sep, payload = note.payload.partition("|")
                if not sep:
                    continue
                self._subs.deliver(Signal(note.channel[len(prefix) :], payload, origin))
            await self._listen_all(conn)  # channels subscribed since
            if loop.time() >= next_ping:  # a connection that died quietly shows here
                await conn.execute("SELECT 1")
                next_ping = loop.time() + self.ping_seconds


__all__ = ["MAX_PAYLOAD", "Bus", "LocalBus", "PostgresBus", "Signal", "libpq_dsn"]
