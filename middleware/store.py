"""The store: sqlmodel tables and the queries the service runs on them.

SQLite (WAL) by default, PostgreSQL for clusters; the same statements run on both (upserts
with RETURNING exist on SQLite >= 3.35 and on PostgreSQL).

Operations are group-committed: whatever is waiting when a transaction starts goes into it, so
many webhooks share one commit and persisting before the 200 costs a fraction of a commit each.
On PostgreSQL a writer thread runs each batch (its statements are network round trips). On SQLite
the hot path's brief operations run on the event loop's thread and only the COMMIT, with its
fsync, on the writer thread (`Store._flush` says why); anything longer runs there whole. One batch
is in flight at a time, in the order the operations came. The async methods below are the only API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import operator
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Float,
    Index,
    UniqueConstraint,
    cast,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    union,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql import Subquery
from sqlmodel import Field, SQLModel

from middleware import migrate as migrations
from middleware.dburl import normalise
from middleware.hotsql import HotSQL, execute
from middleware.jsoncodec import dumps
from middleware.jsoncodec import loads as _loads
from middleware.migrate import Policy
from middleware.model import ConversationState, Inbound, Outgoing, Sender, Timer, Transition

log = logging.getLogger("switchboard.store")
T = TypeVar("T")


#: an operation waiting for its batch, and the future its caller awaits (None: `submit`, nobody waits)
_Item: TypeAlias = tuple[Callable[[Connection], Any], "asyncio.Future[Any] | None"]
#: an operation's outcome, for its future: (future, result, error)
_Outcome: TypeAlias = tuple["asyncio.Future[Any] | None", Any, BaseException | None]

#: SQLite: the most operations one batch runs on the event loop's thread (~40 us each in a turn's
#: commit): a backlog is taken in slices of this, so the loop never stops for more than a few ms
LOOP_BATCH = 128
#: SQLite: a commit landing with fewer operations waiting than this lets the next batch gather for
#: `Store.gather` seconds first (`Store._done`)
GATHER_BELOW = 16

#: the rows still to work on (messages, deliveries), the dead letters and the flooded messages (never
#: handled, so not in a conversation's chain of handled ones): the only ones indexed by status.
#: Partial indexes: a row leaving the state leaves the index, so the indexes stay as small as the
#: queues, and a handled message or a sent reply does not rewrite an index page of a `done`/`sent`
#: region that grows for ever (bench/README.md). Queries name the state as a literal, not a bound
#: parameter: PostgreSQL's generic plans (psycopg prepares a statement after a few runs) cannot prove
#: a partial index applies to `status = $1` (SQLite plans with the bound value; the literal costs it nothing).
PENDING: ColumnElement[str] = literal_column("'pending'")
DEAD: ColumnElement[str] = literal_column("'dead'")
FLOODED: ColumnElement[str] = literal_column("'flooded'")


def _where(status: str) -> dict[str, Any]:
    condition = text(f"status = '{status}'")
    return {"sqlite_where": condition, "postgresql_where": condition}


class InboxRow(SQLModel, table=True):
    """A message accepted from a platform; (platform, message_id) is the dedupe key."""

    __tablename__ = "inbox"
    __table_args__ = (
        UniqueConstraint("platform", "message_id", name="uq_inbox_platform_message"),
        Index("ix_inbox_pending", "conversation_key", "id", **_where("pending")),
        Index("ix_inbox_flooded", "conversation_key", "id", **_where("flooded")),
    )
    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=128)
    message_id: str = Field(max_length=300)
    conversation_key: str = Field(max_length=400)
    body: str
    status: str = Field(default="pending", max_length=16)
    received_at: float
    handled_at: float | None = None
    #: the conversation's handled message before this one, set when this one is handled: the
    #: views walk this chain back from `conversation.last_inbox_id` (no index by conversation
    #: over every row: each message would write a page of it, migration 0004)
    prev_id: int | None = None


class ConversationRow(SQLModel, table=True):
    """A conversation: the flow's state, and the lease of the node working on it."""

    __tablename__ = "conversation"
    key: str = Field(primary_key=True, max_length=400)
    platform: str = Field(max_length=128)
    external_id: str = Field(max_length=300)
    state: str | None = None
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_until: float = 0.0
    #: fencing token: bumped on every claim, checked on every write of a turn
    epoch: int = 0
    #: copied from the state on every turn, so the inbox and the admin API can query by owner
    owner: str = Field(default="bot", max_length=16, index=True)
    queue: str | None = Field(default=None, max_length=128)
    agent: str | None = Field(default=None, max_length=200)
    owner_since: float = 0.0
    created_at: float
    updated_at: float
    #: the newest handled message: the head of the inbox chain (`InboxRow.prev_id`)
    last_inbox_id: int | None = None


class OutboxRow(SQLModel, table=True):
    """One platform call to make, delivered in id order per conversation."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_pending", "conversation_key", "id", **_where("pending")),
        Index("ix_outbox_dead", "id", **_where("dead")),
    )
    id: int | None = Field(default=None, primary_key=True)
    conversation_key: str = Field(max_length=400)
    platform: str = Field(max_length=128)
    body: str
    idempotency_key: str = Field(max_length=80, unique=True)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    created_at: float
    sent_at: float | None = None


class TimerRow(SQLModel, table=True):
    """Something due later in a conversation; when due it becomes a `type: event` inbox message."""

    __tablename__ = "timer"
    __table_args__ = (
        Index("ix_timer_due", "status", "due_at"),
        Index("ix_timer_conversation", "conversation_key", "name", "status"),
    )
    id: int | None = Field(default=None, primary_key=True)
    conversation_key: str = Field(max_length=400)
    name: str = Field(max_length=64)
    due_at: float
    payload: str
    status: str = Field(default="pending", max_length=16)
    created_at: float


class OwnershipRow(SQLModel, table=True):
    """Every change of a conversation's owner: who made it, when and why (the audit trail)."""

    __tablename__ = "ownership"
    __table_args__ = (Index("ix_ownership_conversation", "conversation_key", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    conversation_key: str = Field(max_length=400)
    before: str = Field(max_length=16)
    after: str = Field(max_length=16)
    actor: str = Field(max_length=200)
    reason: str = Field(default="", max_length=500)
    at: float


class UserRow(SQLModel, table=True):
    """User-scope variables: kept per (platform, sender) across conversations."""

    __tablename__ = "user_vars"
    key: str = Field(primary_key=True, max_length=400)
    vars: str
    updated_at: float


class AgentRow(SQLModel, table=True):
    """An account of the built-in agent inbox; the password is kept as an argon2 hash."""

    __tablename__ = "agent"
    name: str = Field(primary_key=True, max_length=200)
    password_hash: str = Field(max_length=500)
    #: what the agent can take (languages, topics), comma-separated: matched against queues' `skills`
    skills: str = Field(default="", max_length=1000, sa_column_kwargs={"server_default": ""})
    created_at: float
    updated_at: float


class AgentSessionRow(SQLModel, table=True):
    """A signed-in agent: the session cookie's SHA-256 (never the cookie), its CSRF token, its expiry."""

    __tablename__ = "agent_session"
    __table_args__ = (Index("ix_agent_session_agent", "agent"), Index("ix_agent_session_expires", "expires_at"))
    token_hash: str = Field(primary_key=True, max_length=64)
    agent: str = Field(max_length=200)
    csrf: str = Field(max_length=100)
    created_at: float
    seen_at: float
    expires_at: float


class NodeRow(SQLModel, table=True):
    """A `switchboard serve` process that uses this node id now (middleware/cluster.py): the
    incarnation (random per process start) makes its lease owner unique; `seen_at` is its heartbeat."""

    __tablename__ = "node"
    node_id: str = Field(primary_key=True, max_length=180)
    incarnation: str = Field(max_length=16)
    #: kernel boot, pid and network namespaces and host name: equal means "the same machine's view"
    host: str = Field(max_length=300)
    pid: int
    #: the process's start time (clock ticks since boot), so a reused pid is not taken for it
    pid_start: int = 0
    state: str = Field(default="up", max_length=16)
    started_at: float
    seen_at: float


INBOX = InboxRow.__table__  # type: ignore[attr-defined]
CONVERSATION = ConversationRow.__table__  # type: ignore[attr-defined]
OUTBOX = OutboxRow.__table__  # type: ignore[attr-defined]
TIMER = TimerRow.__table__  # type: ignore[attr-defined]
USER = UserRow.__table__  # type: ignore[attr-defined]
OWNERSHIP = OwnershipRow.__table__  # type: ignore[attr-defined]
AGENT = AgentRow.__table__  # type: ignore[attr-defined]
AGENT_SESSION = AgentSessionRow.__table__  # type: ignore[attr-defined]
NODE = NodeRow.__table__  # type: ignore[attr-defined]


class StoreUnavailable(Exception):
    """The database did not answer; callers answer 503 and retry later."""


class LeaseLost(Exception):
    """The conversation's lease moved to another claim; this node must not write the turn."""


# Lease, PendingMessage and OutboxItem are made for every message: named tuples (immutable, built
# by one C call) rather than frozen dataclasses (an object.__setattr__ call per field)


class Lease(NamedTuple):
    key: str
    owner: str
    epoch: int
    state: ConversationState
    #: the conversation's pending messages when it was claimed (read in the claim's transaction)
    messages: tuple[PendingMessage, ...] = ()


class PendingMessage(NamedTuple):
    inbox_id: int
    inbound: Inbound


class OutboxItem(NamedTuple):
    id: int
    conversation_key: str
    platform: str
    item: Outgoing
    idempotency_key: str
    attempts: int
    next_attempt_at: float


def idempotency_key(platform: str, message_id: str, n: int | str, inbox_id: int | None = None) -> str:
    """Stable across retries, restarts and re-run turns: derived from the message it answers.

    40 hex digits (more past 2**48 stored messages). With `inbox_id` (the stored message's id: the
    same for every run of its turn, on any node) the key starts with it, so the outbox's unique
    index takes each new row at its right edge, on the one page the last commit wrote already; a
    hash alone lands every row on a random leaf, one more page written per reply (bench/README.md).
    Keys of rows already stored never change: the outbox sends the key its row holds."""
    digest = hashlib.sha256(f"{platform}\x00{message_id}\x00{n}".encode()).hexdigest()
    if inbox_id is None:
        return digest[:40]
    prefix = f"{inbox_id:012x}"
    return prefix + digest[: max(16, 40 - len(prefix))]


def _skills(stored: str | None) -> tuple[str, ...]:
    return tuple(skill for skill in (stored or "").split(",") if skill)


def _dumps(value: Any) -> str:
    return dumps(value).decode()


class Store:
    """Async access to the tables; every call is one operation of a group-committed transaction."""

    def __init__(self, url: str, *, batch_max: int = 512, durability: str = "full", gather: float = 0.001) -> None:
        self.url = normalise(url)
        self.dialect = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        self.batch_max = batch_max
        #: SQLite on a file: seconds the next batch waits for company when a commit lands with fewer
        #: than GATHER_BELOW operations waiting (`_done`); 0 starts it at once
        self.gather = gather
        self.engine = _make_engine(self.url, durability)
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._hot = HotSQL(self.dialect)
        #: PostgreSQL (and SQLite in memory): what the writer thread takes, batch by batch (None: stop)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: SQLite on a file: brief ops' statements run on the event loop's thread, the COMMIT (its
        #: fsync) on the writer thread (`_flush`); what else runs there comes through `_jobs`
        self._inline = self.dialect == "sqlite" and not _is_memory(self.url)
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        #: the operations waiting for the next batch, each with whether it is brief
        self._waiting: collections.deque[tuple[Callable[[Connection], Any], asyncio.Future[Any] | None, bool]] = (
            collections.deque()
        )
        self._in_flight = False
        self._flush_soon = False
        self._conn: Connection | None = None
        self._settled: asyncio.Event | None = None
        self.batches = 0
        self.operations = 0
        #: ops rerun after a deadlock or serialization failure with another node's transaction
        self.conflicts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, migrate: Policy = "auto") -> None:
        """Bring the schema to this version's (middleware/migrate.py), then start the writer.

        `migrate` (the config's `store.migrate`): `auto` upgrades the database (under a lock, in one
        transaction); `check` raises SchemaError unless it is at this version's head. A database at a
        newer revision than this version knows raises SchemaError either way: nothing is touched."""
        memory = _is_memory(self.url)
        if not memory:  # the migration's own connection: a transaction of its own, DDL included
            try:
                await asyncio.to_thread(self._create_tables, migrate)
            except Exception as exc:
                raise _translate(exc) from exc
        self._loop = asyncio.get_running_loop()
        if self._inline:
            self._held()
            self._settled = asyncio.Event()
            self._settled.set()
        target = self._worker if self._inline else self._writer
        self._thread = threading.Thread(target=target, name="store-writer", daemon=True)
        self._thread.start()
        if memory:  # one connection per database: the writer's
            await self.run(functools.partial(self._create_tables, migrate))

    def _create_tables(self, migrate: Policy, conn: Connection | None = None) -> None:
        if conn is not None:
            migrations.prepare(conn, migrate)
            return
        with migrations.transaction(self.url) as own:
            migrations.prepare(own, migrate)

    async def close(self) -> None:
        if self._thread is not None:
            if self._settled is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), 10)
            (self._jobs if self._inline else self._queue).put(None)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.engine.dispose()

    def run(
        self, op: Callable[[Connection], T], *, key: str | None = None, alone: bool = False, brief: bool = False
    ) -> asyncio.Future[T]:
        """Run `op(conn)` inside the next group-committed transaction; the future holds its result.
        (A plain function, not a coroutine: the op is queued at the call, and awaiting the future
        costs no coroutine of its own on the per-message paths.)

        `key`: the conversation whose rows the op locks. Several nodes commit batches at once;
        ops run in key order within a batch, so two nodes' batches lock conversations in the same
        order and never deadlock. `alone`: the op locks rows of many conversations (lease
        renewal), so it gets a transaction of its own. `brief`: the op touches a handful of rows
        by index (the hot path's statements); on SQLite it may run on the event loop's thread."""
        if self._loop is None or self._thread is None:
            raise StoreUnavailable("store is not started")
        future: asyncio.Future[T] = self._loop.create_future()
        # the key orders the writer thread's batches (`_lock_order`); the loop's SQLite batches need none
        self._put(op if (key is None and not alone) or self._inline else _Keyed(op, key, alone), future, brief)
        return future

    def submit(self, op: Callable[[Connection], Any], *, brief: bool = False) -> None:
        """Run `op(conn)` in the next group-committed transaction without waiting for it: for writes
        nothing reads back at once (a later operation of this store runs after it). A failure is
        logged; what the op would have recorded stays as it was (a sent mark not written means the
        row is sent again, under the same Idempotency-Key)."""
        if self._loop is None or self._thread is None:
            raise StoreUnavailable("store is not started")
        self._put(op, None, brief)

    def _put(self, op: Callable[[Connection], Any], future: asyncio.Future[Any] | None, brief: bool) -> None:
        if not self._inline:
            self._queue.put((op, future))
            return
        self._waiting.append((op, future, brief))
        if not self._in_flight and not self._flush_soon:
            assert self._loop is not None
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    # -- SQLite: statements on the loop's thread, the COMMIT on the writer's -----------------

    def _flush(self) -> None:
        """Start the next batch (one at a time: one connection, one writer). Brief ops run here, on
        the loop's thread, inside BEGIN IMMEDIATE; the writer thread commits (the fsync), then the
        batch's callers wake. Why: a statement on the writer thread gives the GIL up and, while the
        loop runs, waits up to the switch interval to get it back, so a batch of dozens of statements
        waited dozens of times (webhook-to-reply p50 5.9-10 ms at 1,200 messages/s against 3.1-5.1
        here: bench/README.md); here a batch waits once. A batch holding any other op (a scan, a
        purge: the loop must not wait on it), or finding the write lock taken by another process,
        runs on the writer thread, as every batch does on PostgreSQL."""
        self._flush_soon = False
        if self._in_flight or not self._waiting:
            return
        assert self._settled is not None
        count = min(self.batch_max, LOOP_BATCH, len(self._waiting))
        batch: list[_Item] = []
        all_brief = True
        take = self._waiting.popleft
        for _ in range(count):
            op, fut, brief = take()
            batch.append((op, fut))
            if not brief:
                all_brief = False
        self._in_flight = True
        self._settled.clear()
        if all_brief:
            conn: Connection | None = None
            try:
                conn = self._held()
                results = self._statements(conn, batch) if self._begin(conn) else None
            except Exception:  # one op failed, or the database: the writer thread runs the batch again
                if conn is not None:
                    self._discard(conn)
                results = None
            if conn is not None and results is not None:
                self._jobs.put(functools.partial(self._commit, conn, batch, results))
                return
        self._jobs.put(functools.partial(self._thread_batch, batch))

    def _held(self) -> Connection:
        """The connection the loop's batches use, opened once (again after a failure)."""
        if self._conn is None:
            conn = self.engine.connect()
            # the loop never waits for SQLite's write lock: held by another process, the batch goes
            # to the writer thread, which waits (the pool's other connections keep busy_timeout)
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            conn.commit()
            self._conn = conn
        return self._conn

    def _discard(self, conn: Connection) -> None:
        """Roll back the loop's transaction; a connection that cannot is closed (a new one next time)."""
        try:
            conn.rollback()
        except Exception:
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None

    @staticmethod
    def _begin(conn: Connection) -> bool:
        """BEGIN IMMEDIATE: the write lock now, so no statement of the batch waits for it. False,
        at once, when another process holds it."""
        conn.begin()
        try:
            execute(conn, "BEGIN IMMEDIATE", ())
        except OperationalError as exc:
            if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
                raise
            conn.rollback()
            return False
        return True

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def _commit(
        self,
        conn: Connection,
        batch: list[_Item],
        results: list[_Outcome],
    ) -> None:
        try:
            conn.commit()
        except Exception:  # nothing of the batch is stored: again, in a transaction of the writer's own
            self._discard(conn)
            self._thread_batch(batch)
            return
        self.batches += 1
        self.operations += len(batch)
        self._landed(results)

    def _thread_batch(self, batch: list[_Item]) -> None:
        self._landed(self._run_batch(batch))

    def _landed(self, results: list[_Outcome]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._done, results)

    def _done(self, results: list[_Outcome]) -> None:
        assert self._settled is not None
        self._in_flight = False
        _resolve(results)
        if not self._waiting:
            self._settled.set()
        elif self.gather > 0 and len(self._waiting) < GATHER_BELOW and not self._flush_soon:
            # the operations waiting came while the last commit was in flight: the service is busy,
            # and more are on their way. Starting at once, a moderate load (half the saturated
            # rate) took ~5 operations a commit and the commits' fsyncs a fifth of the core; a
            # millisecond's wait halves the commits for +0.7 ms at the median (bench/README.md).
            # An operation arriving with no commit in flight still starts one at once (`_put`).
            assert self._loop is not None
            self._flush_soon = True
            self._loop.call_later(self.gather, self._flush)
        else:
            self._flush()

    def _now(self) -> ColumnElement[float]:
        """The time leases are compared with, read in the database: PostgreSQL's clock, so that the
        nodes' own clocks may drift apart without a node taking a live lease (SQLite runs one node)."""
        if self.dialect == "postgresql":
            return cast(func.extract("epoch", func.clock_timestamp()), Float)
        return literal(time.time(), Float)

    def _writer(self) -> None:
        assert self._loop is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            for part in _lock_order(batch):
                results = self._run_batch(part)
                if any(fut is not None or err is not None for fut, _, err in results):
                    with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                        self._loop.call_soon_threadsafe(_resolve, results)
                # else nobody waits: no wake-up of the event loop
            if stop:
                return

    @staticmethod
    def _statements(conn: Connection, batch: list[_Item]) -> list[_Outcome]:
        """Run a batch's ops in the transaction open on `conn` (accepts and sent marks merged)."""
        results: list[_Outcome] = []
        merged = _Accept.merged(conn, [op for op, _ in batch if isinstance(op, _Accept)])
        sent = _Sent.merged(conn, [op for op, _ in batch if isinstance(op, _Sent)])
        for op, fut in batch:
            if id(op) in merged:
                results.append((fut, merged[id(op)], None))
            elif sent and isinstance(op, _Sent):
                results.append((fut, None, None))
            else:
                results.append((fut, op(conn), None))
        return results

    def _run_batch(self, batch: list[_Item]) -> list[_Outcome]:
        """A batch in a transaction of its own on the calling thread (each op alone if one fails)."""
        try:
            with self.engine.begin() as conn:
                results = self._statements(conn, batch)
            self.batches += 1
            self.operations += len(batch)
        except Exception as exc:  # one op failed (or the database): isolate each op in its own transaction
            if not _is_conflict(exc) and (len(batch) == 1 or _is_unavailable(exc)):
                err = _translate(exc)
                return [(fut, None, err) for _, fut in batch]
            # a deadlock or serialization failure with another node's transaction is retried
            return [(fut, *self._run_alone(op)) for op, fut in batch]
        return results

    def _run_alone(self, op: Callable[[Connection], Any], attempts: int = 4) -> tuple[Any, BaseException | None]:
        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    return op(conn), None
            except Exception as exc:
                if not _is_conflict(exc) or attempt == attempts - 1:
                    return None, _translate(exc)
                self.conflicts += 1
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- ingress -----------------------------------------------------------------------------

    async def accept(self, messages: Sequence[Inbound], flooded: Sequence[bool] = ()) -> list[bool]:
        """Persist new messages; returns, per message, whether it was new (False = duplicate).

        A message flagged in `flooded` (its sender is over its rate, middleware/flood.py) is stored
        as `flooded`: kept and deduped, but never pending, so no turn runs for it.
        """
        return [inbox_id is not None for inbox_id in await self.accept_ids(messages, flooded)]

    def accept_ids(self, messages: Sequence[Inbound], flooded: Sequence[bool] = ()) -> asyncio.Future[list[int | None]]:
        """`accept`, giving per message its inbox id when it was new (None = duplicate)."""
        if not messages:
            done: asyncio.Future[list[int | None]] = asyncio.get_running_loop().create_future()
            done.set_result([])
            return done
        now = time.time()
        flags = list(flooded) or [False] * len(messages)
        rows = [
            {
                "platform": m.platform,
                "message_id": m.message_id,
                "conversation_key": m.conversation_key,
                "body": _dumps(m.to_json()),
                "status": "flooded" if flood else "pending",
                "received_at": now,
                "handled_at": now if flood else None,
            }
            for m, flood in zip(messages, flags, strict=True)
        ]
        return self.run(_Accept(self._hot, rows), brief=True)

    # -- leases and turns --------------------------------------------------------------------

    async def claim(self, key: str, platform: str, external_id: str, owner: str, lease_seconds: float) -> Lease | None:
        """Take the conversation's lease if it is free, expired or already ours; None otherwise."""
        now = time.time()
        hot = self._hot
        params = {
            "key": key,
            "platform": platform,
            "external_id": external_id,
            "owner": owner,
            "lease": lease_seconds,
            "now": now,
            "db_now": now,
        }

        def op(conn: Connection) -> Lease | None:
            row = execute(conn, hot.claim, params).fetchone()
            if row is None:
                return None
            epoch, stored = row
            state = ConversationState.from_json(_loads(stored) if stored else None)
            pending = execute(conn, hot.pending, {"key": key, "limit": 32}).fetchall()
            messages = tuple(PendingMessage(i, Inbound.from_json(_loads(body))) for i, body in pending)
            return Lease(key, owner, epoch, state, messages)

        return await self.run(op, key=key, brief=True)

    async def renew(self, keys: Sequence[str], owner: str, lease_seconds: float) -> set[str]:
        """Extend our leases; returns the keys still ours."""
        if not keys:
            return set()
        c = CONVERSATION.c
        until = self._now() + lease_seconds
        stmt = (
            update(CONVERSATION)
            .where(c.key.in_(list(keys)), c.lease_owner == owner)
            .values(lease_until=until)
            .returning(c.key)
        )
        return await self.run(lambda conn: {r[0] for r in conn.execute(stmt)}, alone=True, brief=len(keys) <= 32)

    async def hand_back(self, lease: Lease) -> bool:
        """Give the lease up even with work pending (a node shutting down): any node may claim it
        at once. False if it was not ours any more."""
        c = CONVERSATION.c
        stmt = (
            update(CONVERSATION)
            .where(c.key == lease.key, c.lease_owner == lease.owner, c.epoch == lease.epoch)
            .values(lease_owner=None, lease_until=0.0)
        )
        return bool(await self.run(lambda conn: conn.execute(stmt).rowcount, key=lease.key, brief=True))

    async def expire_leases(self, owner: str) -> int:
        """End every lease `owner` holds (a dead incarnation's, or ours at the end of a shutdown)."""
        c = CONVERSATION.c
        stmt = update(CONVERSATION).where(c.lease_owner == owner).values(lease_owner=None, lease_until=0.0)
        return int(await self.run(lambda conn: conn.execute(stmt).rowcount, alone=True))

    async def release(self, lease: Lease) -> bool:
        """Give the lease up if the conversation has nothing pending; False means work remains."""
        params = {"key": lease.key, "owner": lease.owner, "epoch": lease.epoch}
        sql = self._hot.release
        return bool(await self.run(lambda conn: execute(conn, sql, params).rowcount, key=lease.key, brief=True))

    async def pending_messages(self, key: str, limit: int = 32) -> list[PendingMessage]:
        sql, params = self._hot.pending, {"key": key, "limit": limit}

        def op(conn: Connection) -> list[PendingMessage]:
            rows = execute(conn, sql, params).fetchall()
            return [PendingMessage(i, Inbound.from_json(_loads(body))) for i, body in rows]

        return await self.run(op, brief=True)

    def commit_turn(
        self,
        lease: Lease,
        inbox_ids: Sequence[int],
        state: ConversationState,
        outgoing: Sequence[tuple[Outgoing, str]],
        *,
        timers: Sequence[Timer] = (),
        cancel_timers: Sequence[str] = (),
        user_vars: tuple[str, dict[str, Any]] | None = None,
        transitions: Sequence[Transition] = (),
    ) -> asyncio.Future[list[OutboxItem]]:
        """Write a turn atomically: the conversation's state, its messages handled, its outbox rows,
        its timers (cancelled by name, then new ones) and changed user-scope variables.

        Returns the outbox rows it added, in order (a row whose idempotency key was stored already,
        by an earlier run of the same turn, is not added again and not returned).
        Raises LeaseLost (and writes nothing) if another claim took the conversation meanwhile.
        """
        now = time.time()
        hot = self._hot
        handoff = state.handoff or {}
        state_params = {
            "key": lease.key,
            "owner": lease.owner,
            "epoch": lease.epoch,
            "state": _dumps(state.to_json()),
            "updated_at": now,
            "new_owner": state.owner._value_,  # = .value, without Enum's Python-level property
            "queue": handoff.get("queue"),
            "agent": handoff.get("agent"),
            "last_inbox": None,
        }
        set_state = hot.set_state_since if transitions else hot.set_state
        platform = lease.key.split(":", 1)[0]
        rows = [
            {
                "conversation_key": lease.key,
                "platform": f"@{item.to}" if item.to else platform,
                "body": _dumps(item.to_json()),
                "idempotency_key": key,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": 0.0,
                "created_at": now,
            }
            for item, key in outgoing
        ]
        timer_rows = [
            {
                "conversation_key": lease.key,
                "name": timer.name,
                "due_at": now + timer.after,
                "payload": _dumps(timer.payload),
                "status": "pending",
                "created_at": now,
            }
            for timer in timers
        ]

        owner_rows = [
            {
                "conversation_key": lease.key,
                "before": t.before.value,
                "after": t.after.value,
                "actor": t.actor[:200],
                "reason": t.reason[:500],
                "at": now,
            }
            for t in transitions
        ]

        def op(conn: Connection) -> list[OutboxItem]:
            params = state_params
            if inbox_ids:  # first: each is linked to the chain's head before the state moves it
                params = {**state_params, "last_inbox": hot.mark_done(conn, lease.key, inbox_ids, now)}
            if execute(conn, set_state, params).rowcount != 1:
                raise LeaseLost(lease.key)  # the batch's transaction rolls back, the marks with it
            added: dict[str, int] = {}
            if rows:
                added = hot.insert_outbox(conn, rows)
            if cancel_timers:
                hot.cancel_timers(conn, lease.key, cancel_timers)
            if timer_rows:
                conn.execute(insert(TIMER), timer_rows)
            if user_vars is not None:
                self._merge_user(conn, user_vars[0], user_vars[1], now)
            if owner_rows:
                conn.execute(insert(OWNERSHIP), owner_rows)
            return [
                OutboxItem(added[key], lease.key, str(row["platform"]), item, key, 0, 0.0)
                for (item, key), row in zip(outgoing, rows, strict=True)
                if key in added
            ]

        return self.run(op, key=lease.key, brief=True)

    def _merge_user(self, conn: Connection, key: str, changes: dict[str, Any], now: float) -> None:
        row = conn.execute(select(USER.c.vars).where(USER.c.key == key)).first()
        current = _loads(row[0]) if row else {}
        for name, value in changes.items():
            if value is None:
                current.pop(name, None)
            else:
                current[name] = value
        stmt = self._insert(USER).values(key=key, vars=_dumps(current), updated_at=now)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["key"], set_={"vars": _dumps(current), "updated_at": now})
        )

    async def user_vars(self, key: str) -> dict[str, Any]:
        stmt = select(USER.c.vars).where(USER.c.key == key)

        def op(conn: Connection) -> dict[str, Any]:
            row = conn.execute(stmt).first()
            return dict(_loads(row[0])) if row else {}

        return await self.run(op, brief=True)

    # -- timers ------------------------------------------------------------------------------

    async def fire_due_timers(self, limit: int = 200) -> list[str]:
        """Turn due timers into `type: event` inbox messages, once each; returns their conversations.

        On PostgreSQL the rows are locked with SKIP LOCKED, so several nodes never fire one twice;
        the inbox's unique (platform, message_id) would stop a second firing anyway.
        """
        now = time.time()
        t = TIMER.c
        due = select(TIMER).where(t.status == "pending", t.due_at <= now).order_by(t.due_at).limit(limit)
        if self.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        add = self._insert(INBOX).on_conflict_do_nothing(index_elements=["platform", "message_id"])

        def op(conn: Connection) -> list[str]:
            rows = conn.execute(due).all()
            if not rows:
                return []
            inbox = []
            for r in rows:
                platform, _, external = r.conversation_key.partition(":")
                event = Inbound(
                    platform=platform,
                    message_id=f"timer:{r.id}",
                    conversation_id=external,
                    sender=Sender("switchboard", "switchboard"),
                    type="event",
                    payload={"event": "timer", "name": r.name, **_loads(r.payload)},
                )
                inbox.append(
                    {
                        "platform": platform,
                        "message_id": event.message_id,
                        "conversation_key": r.conversation_key,
                        "body": _dumps(event.to_json()),
                        "status": "pending",
                        "received_at": now,
                    }
                )
            conn.execute(add, inbox)
            conn.execute(update(TIMER).where(t.id.in_([r.id for r in rows])).values(status="fired"))
            return sorted({r.conversation_key for r in rows})

        return await self.run(op)

    async def pending_timers(self, key: str) -> list[dict[str, Any]]:
        t = TIMER.c
        stmt = select(TIMER).where(t.conversation_key == key, t.status == "pending").order_by(t.due_at)

        def op(conn: Connection) -> list[dict[str, Any]]:
            return [{"name": r.name, "due_at": r.due_at, "payload": _loads(r.payload)} for r in conn.execute(stmt)]

        return await self.run(op)

    # -- outbox ------------------------------------------------------------------------------

    async def due_outbox(self, key: str, limit: int = 32) -> list[OutboxItem]:
        """The conversation's pending outbox rows in order (due or not: order is per conversation)."""
        sql, params = self._hot.due_outbox, {"key": key, "limit": limit}

        def op(conn: Connection) -> list[OutboxItem]:
            return [
                OutboxItem(i, conversation, platform, Outgoing.from_json(_loads(body)), idem, attempts, next_at)
                for i, conversation, platform, body, idem, attempts, next_at in execute(conn, sql, params).fetchall()
            ]

        return await self.run(op, brief=True)

    async def mark_sent(self, outbox_id: int) -> None:
        await self.run(_Sent(self._hot, outbox_id, time.time()), brief=True)

    def mark_sent_soon(self, outbox_id: int) -> None:
        """`mark_sent` without waiting for it (`submit`): the outbox goes on to the next row at once."""
        self.submit(_Sent(self._hot, outbox_id, time.time()), brief=True)

    async def mark_retry(self, outbox_id: int, attempts: int, next_attempt_at: float, error: str) -> None:
        stmt = (
            update(OUTBOX)
            .where(OUTBOX.c.id == outbox_id)
            .values(attempts=attempts, next_attempt_at=next_attempt_at, last_error=error[:500])
        )
        await self.run(lambda conn: conn.execute(stmt), brief=True)

    async def mark_dead(self, outbox_id: int, attempts: int, error: str) -> None:
        stmt = (
            update(OUTBOX)
            .where(OUTBOX.c.id == outbox_id)
            .values(status="dead", attempts=attempts, last_error=error[:500])
        )
        await self.run(lambda conn: conn.execute(stmt), brief=True)

    async def dead_letters(self, limit: int = 100, platform: str | None = None) -> list[dict[str, Any]]:
        o = OUTBOX.c
        stmt = select(OUTBOX).where(o.status == DEAD).order_by(o.id.desc()).limit(limit)
        if platform is not None:
            stmt = stmt.where(o.platform == platform)

        def op(conn: Connection) -> list[dict[str, Any]]:
            return [
                {
                    "id": r.id,
                    "conversation": r.conversation_key,
                    "platform": r.platform,
                    "item": _loads(r.body),
                    "idempotency_key": r.idempotency_key,
                    "attempts": r.attempts,
                    "error": r.last_error,
                    "created_at": r.created_at,
                }
                for r in conn.execute(stmt)
            ]

        return await self.run(op)

    async def redeliver(self, outbox_id: int) -> str | None:
        """Put a dead letter back in line (it keeps its Idempotency-Key); returns its conversation."""
        o = OUTBOX.c
        stmt = (
            update(OUTBOX)
            .where(o.id == outbox_id, o.status == DEAD)
            .values(status="pending", attempts=0, next_attempt_at=0.0)
            .returning(o.conversation_key)
        )
        return await self.run(lambda conn: conn.execute(stmt).scalar())

    # -- recovery, health, housekeeping ------------------------------------------------------

    async def work_to_resume(self, owner: str, limit: int = 500) -> list[str]:
        """Conversations with pending messages or outbox rows and no live lease but ours."""
        now = self._now()
        c = CONVERSATION.c
        keys = union(
            select(INBOX.c.conversation_key.label("key")).where(INBOX.c.status == PENDING),
            select(OUTBOX.c.conversation_key.label("key")).where(OUTBOX.c.status == PENDING),
        ).subquery()
        held_elsewhere = exists().where(
            c.key == keys.c.key, c.lease_owner.is_not(None), c.lease_owner != owner, c.lease_until >= now
        )
        stmt = select(keys.c.key).where(~held_elsewhere).limit(limit)
        return await self.run(lambda conn: [r[0] for r in conn.execute(stmt)])

    async def with_pending_messages(self, keys: Sequence[str]) -> set[str]:
        """Those of `keys` with a message (or a fired timer's event) waiting for its turn."""
        if not keys:
            return set()
        i = INBOX.c
        stmt = select(i.conversation_key).where(i.conversation_key.in_(list(keys)), i.status == PENDING).distinct()
        return await self.run(lambda conn: {r[0] for r in conn.execute(stmt)})

    async def notify(self, channel: str, payload: str) -> None:
        """PostgreSQL NOTIFY in the next group commit (sent when it commits): middleware/notify.py."""
        if self.dialect != "postgresql":
            raise StoreUnavailable("NOTIFY needs PostgreSQL")
        stmt = text("SELECT pg_notify(:channel, :payload)")
        await self.run(lambda conn: conn.execute(stmt, {"channel": channel, "payload": payload}))

    # -- nodes (middleware/cluster.py) --------------------------------------------------------

    async def take_node(
        self, node_id: str, incarnation: str, host: str, pid: int, pid_start: int, busy: Callable[[Any], bool]
    ) -> dict[str, Any] | None:
        """Register this process as `node_id` unless `busy(row)` says the process in the row is
        alive; then the row (as a dict; `race` set if another process registered the id in this very
        instant) is returned and nothing changes. Taking the id over ends the leases of the
        incarnation it replaces (that process is gone, and lease owners name the incarnation)."""
        now = time.time()
        n = NODE.c
        values = {
            "incarnation": incarnation,
            "host": host[:300],
            "pid": pid,
            "pid_start": pid_start,
            "state": "up",
            "started_at": now,
            "seen_at": now,
        }

        def op(conn: Connection) -> dict[str, Any] | None:
            query = select(NODE).where(n.node_id == node_id)
            if self.dialect == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                added = (
                    self._insert(NODE).values(node_id=node_id, **values).on_conflict_do_nothing().returning(n.node_id)
                )
                if conn.execute(added).first() is None:  # another process registered it this instant
                    return {"node_id": node_id, "race": True}
                return None
            if row.incarnation != incarnation and busy(row):
                return dict(row._mapping)
            conn.execute(update(NODE).where(n.node_id == node_id).values(**values))
            old_owner = f"{row.incarnation}@{node_id}"
            c = CONVERSATION.c
            conn.execute(
                update(CONVERSATION).where(c.lease_owner == old_owner).values(lease_owner=None, lease_until=0.0)
            )
            return None

        return await self.run(op, alone=True)

    async def node_heartbeat(self, node_id: str, incarnation: str, state: str = "up") -> bool:
        """Mark this process seen now; False if another process has taken its node id over."""
        n = NODE.c
        stmt = (
            update(NODE)
            .where(n.node_id == node_id, n.incarnation == incarnation)
            .values(seen_at=time.time(), state=state)
        )
        return bool(await self.run(lambda conn: conn.execute(stmt).rowcount))

    async def pending_count(self) -> int:
        stmt = select(func.count()).select_from(INBOX).where(INBOX.c.status == PENDING)
        return int(await self.run(lambda conn: conn.execute(stmt).scalar() or 0))

    async def outbox_counts(self) -> dict[str, int]:
        o = OUTBOX.c
        count = select(func.count()).select_from(OUTBOX)

        def op(conn: Connection) -> dict[str, int]:
            return {
                "pending": int(conn.execute(count.where(o.status == PENDING)).scalar() or 0),
                "dead": int(conn.execute(count.where(o.status == DEAD)).scalar() or 0),
                "retrying": int(conn.execute(count.where(o.status == PENDING, o.attempts > 0)).scalar() or 0),
            }

        return await self.run(op)

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute(text("SELECT 1")).scalar())

    async def purge(self, older_than_days: float) -> int:
        """Forget handled messages (and their dedupe key) and sent outbox rows past the window."""
        before = time.time() - older_than_days * 86400

        def op(conn: Connection) -> int:
            handled = INBOX.c.status.in_(("done", "flooded"))
            n = conn.execute(delete(INBOX).where(handled, INBOX.c.handled_at < before)).rowcount
            n += conn.execute(delete(OUTBOX).where(OUTBOX.c.status == "sent", OUTBOX.c.sent_at < before)).rowcount
            n += conn.execute(
                delete(TIMER).where(TIMER.c.status.in_(("fired", "cancelled")), TIMER.c.due_at < before)
            ).rowcount
            return int(n)

        return await self.run(op)

    async def conversations(
        self, owner: str | None = None, queue: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Conversations by owner and queue, longest waiting first."""
        c = CONVERSATION.c
        stmt = select(c.key, c.platform, c.external_id, c.owner, c.queue, c.agent, c.owner_since, c.updated_at)
        if owner is not None:
            stmt = stmt.where(c.owner == owner)
        if queue is not None:
            stmt = stmt.where(c.queue == queue)
        stmt = stmt.order_by(c.owner_since, c.key).limit(limit)

        def op(conn: Connection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in conn.execute(stmt)]

        return await self.run(op)

    async def queue_counts(self) -> list[dict[str, Any]]:
        """Per queue: conversations waiting, with an agent, and the oldest wait's start."""
        c = CONVERSATION.c
        stmt = (
            select(c.queue, c.owner, func.count(), func.min(c.owner_since))
            .where(c.owner.in_(("queued", "agent")))
            .group_by(c.queue, c.owner)
        )

        def op(conn: Connection) -> list[dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for name, owner, n, since in conn.execute(stmt):
                row = out.setdefault(name or "default", {"queue": name or "default", "waiting": 0, "with_agent": 0})
                if owner == "queued":
                    row["waiting"] = int(n)
                    row["oldest_waiting_since"] = since
                else:
                    row["with_agent"] = int(n)
            return sorted(out.values(), key=lambda r: r["queue"])

        return await self.run(op)

    async def conversation_exists(self, key: str) -> bool:
        stmt = select(CONVERSATION.c.key).where(CONVERSATION.c.key == key)
        return await self.run(lambda conn: conn.execute(stmt).first() is not None)

    async def conversation(self, key: str) -> dict[str, Any] | None:
        c = CONVERSATION.c

        def op(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(select(CONVERSATION).where(c.key == key)).first()
            if row is None:
                return None
            i = INBOX.c
            messages = conn.execute(
                select(i.body, i.status, i.received_at, i.handled_at)
                .where(i.id.in_(select(_message_ids([key]).c.id)))
                .order_by(i.id)
            ).all()
            replies = conn.execute(
                select(
                    OUTBOX.c.body,
                    OUTBOX.c.status,
                    OUTBOX.c.created_at,
                    OUTBOX.c.attempts,
                    OUTBOX.c.last_error,
                    OUTBOX.c.sent_at,
                )
                .where(OUTBOX.c.conversation_key == key)
                .order_by(OUTBOX.c.id)
            ).all()
            changes = conn.execute(
                select(OWNERSHIP).where(OWNERSHIP.c.conversation_key == key).order_by(OWNERSHIP.c.id)
            ).all()
            return {
                "key": row.key,
                "platform": row.platform,
                "ownership": [
                    {"before": o.before, "after": o.after, "actor": o.actor, "reason": o.reason, "at": o.at}
                    for o in changes
                ],
                "conversation_id": row.external_id,
                "state": _loads(row.state) if row.state else None,
                "lease": {"owner": row.lease_owner, "until": row.lease_until, "epoch": row.epoch},
                "messages": [
                    {
                        **_loads(m.body),
                        "status": m.status,
                        "received_at": m.received_at,
                        "handled_at": m.handled_at,
                    }
                    for m in messages
                ],
                "outbox": [
                    {
                        **_loads(r.body),
                        "status": r.status,
                        "attempts": r.attempts,
                        "error": r.last_error,
                        "created_at": r.created_at,
                        "sent_at": r.sent_at,
                    }
                    for r in replies
                ],
            }

        return await self.run(op)

    async def seed_conversation(self, key: str, platform: str, external_id: str, state: ConversationState) -> bool:
        """Create a conversation with a starting state (the playground picks its flow this way);
        False, and nothing changed, if it exists already."""
        now = time.time()
        stmt = (
            self._insert(CONVERSATION)
            .values(
                key=key,
                platform=platform,
                external_id=external_id,
                state=_dumps(state.to_json()),
                owner=state.owner.value,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(CONVERSATION.c.key)
        )
        return await self.run(lambda conn: conn.execute(stmt).first() is not None)

    async def last_user_messages(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per conversation, the newest message a user sent (not an agent's or a timer's event), for
        previews: bodies are compact JSON (`_dumps`), so an event's holds `"type":"event"` and no user
        text can (it would be escaped); a payload or attribute with that very pair is left out too."""
        if not keys:
            return {}
        i = INBOX.c
        candidates = _message_ids(keys, depth=PREVIEW_DEPTH)
        newest = (
            select(func.max(i.id))
            .where(i.id.in_(select(candidates.c.id)), ~i.body.contains('"type":"event"'))
            .group_by(i.conversation_key)
        )
        stmt = select(i.conversation_key, i.body, i.received_at).where(i.id.in_(newest))

        def op(conn: Connection) -> dict[str, dict[str, Any]]:
            return {r[0]: {**_loads(r[1]), "received_at": r[2]} for r in conn.execute(stmt)}

        return await self.run(op)

    # -- agent accounts and sessions (the built-in inbox) -------------------------------------

    async def save_agent(
        self, name: str, password_hash: str, *, replace: bool = False, skills: Sequence[str] | None = None
    ) -> bool:
        """Add an agent; with `replace`, set a new password for an existing one (and end its
        sessions). False if the agent exists and `replace` is not given. `skills` (None: none for a
        new agent, unchanged for a replaced one) are what the agent can take (languages, topics)."""
        now = time.time()
        a = AGENT.c
        joined = ",".join(skills or ())
        stmt = self._insert(AGENT).values(
            name=name, password_hash=password_hash, skills=joined, created_at=now, updated_at=now
        )
        if replace:
            changed: dict[str, Any] = {"password_hash": password_hash, "updated_at": now}
            if skills is not None:
                changed["skills"] = joined
            stmt = stmt.on_conflict_do_update(index_elements=["name"], set_=changed)
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=["name"])

        def op(conn: Connection) -> bool:
            done = conn.execute(stmt.returning(a.name)).first() is not None
            if done and replace:
                conn.execute(delete(AGENT_SESSION).where(AGENT_SESSION.c.agent == name))
            return done

        return await self.run(op)

    async def agent_password_hash(self, name: str) -> str | None:
        stmt = select(AGENT.c.password_hash).where(AGENT.c.name == name)
        return await self.run(lambda conn: conn.execute(stmt).scalar())

    async def agents(self) -> list[dict[str, Any]]:
        """Every account: name, skills (a list), created_at, updated_at."""
        a = AGENT.c
        stmt = select(a.name, a.skills, a.created_at, a.updated_at).order_by(a.name)

        def op(conn: Connection) -> list[dict[str, Any]]:
            return [{**r._mapping, "skills": list(_skills(r.skills))} for r in conn.execute(stmt)]

        return await self.run(op)

    async def agent_skills(self, name: str) -> tuple[str, ...]:
        """The agent's skills (none for an unknown agent)."""
        stmt = select(AGENT.c.skills).where(AGENT.c.name == name)
        return await self.run(lambda conn: _skills(conn.execute(stmt).scalar()))

    async def remove_agent(self, name: str) -> bool:
        """Delete an account and end its sessions; False if there was none."""

        def op(conn: Connection) -> bool:
            conn.execute(delete(AGENT_SESSION).where(AGENT_SESSION.c.agent == name))
            return bool(conn.execute(delete(AGENT).where(AGENT.c.name == name)).rowcount)

        return await self.run(op)

    async def open_session(self, token_hash: str, agent: str, csrf: str, expires_at: float) -> None:
        """Store a new session (and forget expired ones)."""
        now = time.time()
        row = {
            "token_hash": token_hash,
            "agent": agent,
            "csrf": csrf,
            "created_at": now,
            "seen_at": now,
            "expires_at": expires_at,
        }

        def op(conn: Connection) -> None:
            conn.execute(delete(AGENT_SESSION).where(AGENT_SESSION.c.expires_at < now))
            conn.execute(insert(AGENT_SESSION), row)

        await self.run(op)

    async def agent_session(self, token_hash: str) -> dict[str, Any] | None:
        """A session that has not expired and whose agent still exists; None otherwise."""
        s = AGENT_SESSION.c
        stmt = (
            select(s.agent, s.csrf, s.created_at, s.seen_at, s.expires_at)
            .where(s.token_hash == token_hash, s.expires_at > time.time())
            .where(exists().where(AGENT.c.name == s.agent))
        )

        def op(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(stmt).first()
            return dict(row._mapping) if row is not None else None

        return await self.run(op)

    async def touch_session(self, token_hash: str, expires_at: float) -> None:
        s = AGENT_SESSION.c
        stmt = (
            update(AGENT_SESSION).where(s.token_hash == token_hash).values(seen_at=time.time(), expires_at=expires_at)
        )
        await self.run(lambda conn: conn.execute(stmt), brief=True)

    async def close_session(self, token_hash: str) -> None:
        stmt = delete(AGENT_SESSION).where(AGENT_SESSION.c.token_hash == token_hash)
        await self.run(lambda conn: conn.execute(stmt), brief=True)


#: how far back a preview looks through a conversation's handled messages for one a user sent
PREVIEW_DEPTH = 50
#: how far back the conversation view walks: every message in practice; a bound all the same, so a
#: walk ends whatever the links say (a row is linked once, when it is handled, so they make no cycle)
VIEW_DEPTH = 1_000_000


def _message_ids(keys: Sequence[str], depth: int = VIEW_DEPTH) -> Subquery:
    """The inbox ids of these conversations' messages: the handled ones by their chain (back from
    `conversation.last_inbox_id`, by primary key, at most `depth` links), the pending and flooded
    ones by their partial indexes."""
    c, i = CONVERSATION.c, INBOX.c
    keys = list(keys)
    chain = (
        select(c.key.label("k"), c.last_inbox_id.label("id"), literal(0).label("depth"))
        .where(c.key.in_(keys), c.last_inbox_id.is_not(None))
        .cte("chain", recursive=True)
    )
    link = select(chain.c.k, i.prev_id, chain.c.depth + 1).join(chain, i.id == chain.c.id)
    chain = chain.union_all(link.where(i.prev_id.is_not(None), i.conversation_key == chain.c.k, chain.c.depth < depth))
    waiting = [select(i.id).where(i.conversation_key.in_(keys), i.status == status) for status in (PENDING, FLOODED)]
    return union(select(chain.c.id), *waiting).subquery("messages")


_BY_MESSAGE = operator.itemgetter("platform", "message_id")


class _Accept:
    """The op of one `Store.accept`: on its own, one INSERT; in a batch with other accepts, all of
    them share one multi-row INSERT (the writes of many webhooks in one statement)."""

    __slots__ = ("hot", "keys", "rows")

    def __init__(self, hot: HotSQL, rows: list[dict[str, Any]]) -> None:
        self.hot = hot
        self.rows = rows
        self.keys = [(r["platform"], r["message_id"]) for r in rows]

    def __call__(self, conn: Connection) -> list[int | None]:
        inserted = self._insert(conn, self.hot, self.rows)
        # a message sent twice in one webhook is new the first time only
        return [inserted.pop(k, None) for k in self.keys]

    @staticmethod
    def _insert(conn: Connection, hot: HotSQL, rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
        # in key order: two nodes inserting the same duplicates wait for each other in one order, not in a cycle
        return hot.insert_inbox(conn, sorted(rows, key=_BY_MESSAGE) if len(rows) > 1 else rows)

    @classmethod
    def merged(cls, conn: Connection, ops: list[_Accept]) -> dict[int, list[int | None]]:
        """Run several accepts as one INSERT; each gets the keys that were new for it, with their
        ids (a key sent by two webhooks in one batch is new for the first only)."""
        if len(ops) < 2:
            return {}
        inserted = cls._insert(conn, ops[0].hot, [row for op in ops for row in op.rows])
        return {id(op): [inserted.pop(k, None) for k in op.keys] for op in ops}


class _Sent:
    """The op of one `Store.mark_sent_soon`: in a batch with others, all of them share one UPDATE."""

    __slots__ = ("hot", "now", "outbox_id")

    def __init__(self, hot: HotSQL, outbox_id: int, now: float) -> None:
        self.hot = hot
        self.outbox_id = outbox_id
        self.now = now

    def __call__(self, conn: Connection) -> None:
        execute(conn, self.hot.mark_sent, {"id": self.outbox_id, "now": self.now})

    @staticmethod
    def merged(conn: Connection, ops: list[_Sent]) -> bool:
        """Mark every op's row sent in one statement (at the latest of their times); False if
        there were too few to bother (each op then runs on its own)."""
        if len(ops) < 2:
            return False
        ops[0].hot.mark_sent_many(conn, [op.outbox_id for op in ops], max(op.now for op in ops))
        return True


class _Throttled:
    """One warning line per `every` seconds (with how many were held back): an outage makes every
    operation fail at once, and one line a second says as much as thousands."""

    def __init__(self, message: str, every: float = 5.0) -> None:
        self.message = message
        self.every = every
        self.last = 0.0
        self.held = 0

    def warning(self, detail: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.held += 1
            return
        more = f" (and {self.held} more in the last {self.every:g}s)" if self.held else ""
        log.warning("%s: %s%s", self.message, detail, more)
        self.last, self.held = now, 0


_UNAVAILABLE = _Throttled("store unavailable")


class _Keyed:
    """An op with what `_lock_order` needs: the conversation it locks, or that it runs alone."""

    __slots__ = ("alone", "key", "op")

    def __init__(self, op: Callable[[Connection], Any], key: str | None, alone: bool) -> None:
        self.op = op
        self.key = key
        self.alone = alone

    def __call__(self, conn: Connection) -> Any:
        return self.op(conn)


def _lock_key(op: Callable[[Connection], Any]) -> str:
    if isinstance(op, _Keyed) and op.key is not None:
        return op.key
    if isinstance(op, _Accept) and op.rows:
        return min(str(r["conversation_key"]) for r in op.rows)
    return ""


def _lock_order(
    batch: list[_Item],
) -> list[list[_Item]]:
    """The batch as transactions: its ops sorted by the conversation they lock (stable: one
    conversation's ops keep their order; ops without a key, reads mostly, first), then each op
    that locks many conversations in a transaction of its own. Every node's batches then lock
    conversation rows in one global order, so they cannot deadlock each other."""
    grouped = [item for item in batch if not (isinstance(item[0], _Keyed) and item[0].alone)]
    alone = [[item] for item in batch if isinstance(item[0], _Keyed) and item[0].alone]
    grouped.sort(key=lambda item: _lock_key(item[0]))
    return ([grouped] if grouped else []) + alone


def _is_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: another transaction won, and a retry may succeed."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40P01", "40001")


def _resolve(results: list[_Outcome]) -> None:
    for fut, value, err in results:
        if fut is None:  # submitted: nobody waits
            if err is not None:
                log.warning("store write not done (it is redone or resent later): %s", err)
            continue
        if fut.done():
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)


def _is_unavailable(exc: BaseException) -> bool:
    if _is_conflict(exc):
        return False
    if isinstance(exc, OperationalError | StoreUnavailable):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, LeaseLost):
        return exc
    if _is_unavailable(exc) or _is_conflict(exc):
        _UNAVAILABLE.warning(f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
        return StoreUnavailable(str(exc).splitlines()[0][:200])
    return exc


def _is_memory(url: str) -> bool:
    return ":memory:" in url or url.rstrip("/") == "sqlite:"


def _make_engine(url: str, durability: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        sync = "FULL" if durability == "full" else "NORMAL"

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute("PRAGMA busy_timeout=30000")
            # A multi-row INSERT or UPDATE inside a larger transaction keeps a statement journal (the
            # pages it changed, to undo it alone); past 64 KiB SQLite spills it to a temp file: an open,
            # writes and an unlink per statement, on the loop's thread. With a backlog of pending
            # messages a batch's accept touches that many index pages (ingest: 89 -> 82 us of CPU a
            # webhook in 5 alternating pairs, bench/README.md). Bounded by a batch: 128 operations,
            # 500 rows a statement.
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        return engine
    # without a connect timeout a server that accepts TCP but never answers hangs the writer thread forever
    timeout = {} if "connect_timeout=" in url else {"connect_timeout": 3}
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4, connect_args=timeout)


__all__ = [
    "AgentRow",
    "AgentSessionRow",
    "ConversationRow",
    "InboxRow",
    "Lease",
    "LeaseLost",
    "NodeRow",
    "OutboxItem",
    "OutboxRow",
    "PendingMessage",
    "Store",
    "StoreUnavailable",
    "idempotency_key",
]
