"""The statements every message runs, as plain SQL on the database driver's own cursor.

For statements this small SQLAlchemy's execution layer (compiled-cache lookup, parameter
processing, result wrapping) costs ten times what SQLite itself takes: 15 us against 1.5 us for a
one-row UPDATE here, and about a fifth of the service's CPU under load (bench/README.md). These run
inside the store's group-committed transaction (`Store.run`), on the same connection, so they
commit or roll back with everything else; the rest of the store stays on SQLAlchemy.

One text per statement for both databases, with `:name` parameters (sqlite3's named style; turned
into psycopg's `%(name)s`); multi-row INSERTs use positional markers and are cached per row count.
A driver error is raised as SQLAlchemy's wrapper of it (`DBAPIError.instance`), so the store tells
an outage or a deadlock from a bug exactly as it does for its other statements.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

_NAMED = re.compile(r"(?<!:):(\w+)")

# Python's sqlite3 binds a None only after asking its adaptation protocol, which looks `__adapt__`
# up on a type and so builds and drops an AttributeError (CPython 3.11, Modules/_sqlite/
# microprotocols.c, `pysqlite_microprotocols_adapt`): ~3,300 instructions a NULL, three a reply
# (a bot-owned conversation's queue and agent, a new message's handled_at). An adapter registered
# for None's type is found in the registry first, and answers None from a dict, in C.
# Process-wide, and the same NULL for every connection.
_NONE: dict[None, None] = {None: None}
sqlite3.register_adapter(type(None), _NONE.__getitem__)

INBOX_COLUMNS = ("platform", "message_id", "conversation_key", "body", "status", "received_at", "handled_at")
OUTBOX_COLUMNS = (
    "conversation_key",
    "platform",
    "body",
    "idempotency_key",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
)


class HotSQL:
    """The hot statements for one dialect (`sqlite` or `postgresql`)."""

    #: rows per multi-row INSERT (SQLite allows 32766 parameters: 8 a row)
    CHUNK = 500

    def __init__(self, dialect: str) -> None:
        self.postgres = dialect == "postgresql"
        # leases are compared with the database's clock on PostgreSQL (nodes' clocks may drift);
        # on SQLite (one node) with the caller's time
        now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)" if self.postgres else ":db_now"
        self._marker = "%s" if self.postgres else "?"
        self._many: dict[tuple[str, int], str] = {}
        ours = '"key" = :key AND lease_owner = :owner AND epoch = :epoch'
        self.claim = self._named(
            'INSERT INTO conversation ("key", platform, external_id, lease_owner, lease_until, epoch, owner,'
            " owner_since, created_at, updated_at)"
            f" VALUES (:key, :platform, :external_id, :owner, {now} + :lease, 1, 'bot', 0.0, :now, :now)"
            ' ON CONFLICT ("key") DO UPDATE SET lease_owner = :owner,'
            f" lease_until = {now} + :lease, epoch = conversation.epoch + 1"
            " WHERE conversation.lease_owner IS NULL OR conversation.lease_until < "
            f"{now} OR conversation.lease_owner = :owner"
            " RETURNING epoch, state"
        )
        self.pending = self._named(
            "SELECT id, body FROM inbox WHERE conversation_key = :key AND status = 'pending' ORDER BY id LIMIT :limit"
        )
        state = (
            "state = :state, updated_at = :updated_at, owner = :new_owner, queue = :queue, agent = :agent,"
            " last_inbox_id = COALESCE(:last_inbox, last_inbox_id)"
        )
        self.set_state = self._named(f"UPDATE conversation SET {state} WHERE {ours}")
        self.set_state_since = self._named(f"UPDATE conversation SET {state}, owner_since = :updated_at WHERE {ours}")
        # a handled message is linked to the conversation's previous one (read before the turn's
        # state moves the chain's head); a row handled already keeps its link
        self.done_first = self._named(
            "UPDATE inbox SET status = 'done', handled_at = :now, prev_id ="
            ' (SELECT last_inbox_id FROM conversation WHERE "key" = :key)'
            " WHERE id = :id AND status = 'pending'"
        )
        self.done_next = self._named(
            "UPDATE inbox SET status = 'done', handled_at = :now, prev_id = :prev WHERE id = :id AND status = 'pending'"
        )
        self.due_outbox = self._named(
            "SELECT id, conversation_key, platform, body, idempotency_key, attempts, next_attempt_at FROM outbox"
            " WHERE conversation_key = :key AND status = 'pending' ORDER BY id LIMIT :limit"
        )
        self.mark_sent = self._named(
            "UPDATE outbox SET status = 'sent', sent_at = :now, last_error = NULL WHERE id = :id"
        )
        # SQLite, one row an INSERT, its id from `lastrowid` (`insert_outbox`, `insert_inbox`)
        self._outbox_row = _insert_one("outbox", OUTBOX_COLUMNS, "(idempotency_key)")
        self._inbox_row = _insert_one("inbox", INBOX_COLUMNS, "(platform, message_id)")
        self.release = self._named(
            f"UPDATE conversation SET lease_owner = NULL, lease_until = 0.0 WHERE {ours}"
            " AND NOT EXISTS (SELECT 1 FROM inbox WHERE conversation_key = :key AND status = 'pending')"
            " AND NOT EXISTS (SELECT 1 FROM outbox WHERE conversation_key = :key AND status = 'pending')"
        )

    def _named(self, sql: str) -> str:
        return _NAMED.sub(r"%(\1)s", sql) if self.postgres else sql

    # -- statements ------------------------------------------------------------------------------

    def insert_inbox(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
        """New inbox rows (a (platform, message_id) already stored is skipped): key -> id."""
        out: dict[tuple[str, str], int] = {}
        if len(rows) == 1 and not self.postgres:  # a batch of one webhook: no RETURNING (`insert_outbox`)
            row = rows[0]
            cursor = execute(conn, self._inbox_row, [row[c] for c in INBOX_COLUMNS])
            if cursor.rowcount == 1:
                out[(row["platform"], row["message_id"])] = cursor.lastrowid
            return out
        for chunk in _chunks(rows, self.CHUNK) if len(rows) > self.CHUNK else (rows,):
            sql = self._insert_many(
                "inbox", INBOX_COLUMNS, len(chunk), "(platform, message_id)", "platform, message_id, id"
            )
            cursor = execute(conn, sql, [row[c] for row in chunk for c in INBOX_COLUMNS])
            out.update(((r[0], r[1]), r[2]) for r in cursor.fetchall())
        return out

    def insert_outbox(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        """New outbox rows (an idempotency key already stored is skipped): key -> id."""
        out: dict[str, int] = {}
        if not self.postgres:
            # a row at a time, its id from `lastrowid`: SQLite runs RETURNING through an ephemeral
            # table (a b-tree and pager of its own, opened and zeroed per statement), 4.2 against
            # 2.7 us for a one-row INSERT here, and a turn's replies are one row or a few
            for row in rows:
                cursor = execute(conn, self._outbox_row, [row[c] for c in OUTBOX_COLUMNS])
                if cursor.rowcount == 1:
                    out[row["idempotency_key"]] = cursor.lastrowid
            return out
        for chunk in _chunks(rows, self.CHUNK) if len(rows) > self.CHUNK else (rows,):
            sql = self._insert_many("outbox", OUTBOX_COLUMNS, len(chunk), "(idempotency_key)", "id, idempotency_key")
            cursor = execute(conn, sql, [row[c] for row in chunk for c in OUTBOX_COLUMNS])
            out.update((r[1], r[0]) for r in cursor.fetchall())
        return out

    def mark_done(self, conn: Connection, key: str, ids: Sequence[int], now: float) -> int | None:
        """The turn's messages handled, in order, each linked to the one handled before it;
        returns the newest one linked (the chain's new head), None if all were handled already.
        Run before `set_state`, which moves the head. One statement a message: a turn has one,
        or a short burst."""
        last: int | None = None
        for inbox_id in ids:
            if last is None:
                cursor = execute(conn, self.done_first, {"now": now, "key": key, "id": inbox_id})
            else:
                cursor = execute(conn, self.done_next, {"now": now, "prev": last, "id": inbox_id})
            if cursor.rowcount == 1:
                last = inbox_id
        return last

    def mark_sent_many(self, conn: Connection, ids: Sequence[int], now: float) -> None:
        """Several outbox rows sent (a batch's sent marks in one statement)."""
        if self.postgres:
            sql = "UPDATE outbox SET status = 'sent', sent_at = %s, last_error = NULL WHERE id = ANY(%s)"
            execute(conn, sql, [now, list(ids)])
            return
        for chunk in _chunks(ids, self.CHUNK):
            marks = ", ".join("?" * len(chunk))
            sql = f"UPDATE outbox SET status = 'sent', sent_at = ?, last_error = NULL WHERE id IN ({marks})"
            execute(conn, sql, [now, *chunk])

    def cancel_timers(self, conn: Connection, key: str, names: Sequence[str]) -> None:
        """The conversation's pending timers of these names (a state left, a timer re-armed) cancelled."""
        if self.postgres:
            sql = "UPDATE timer SET status = 'cancelled' WHERE conversation_key = %s AND status = 'pending'"
            execute(conn, sql + " AND name = ANY(%s)", [key, list(names)])
            return
        for chunk in _chunks(names, self.CHUNK):
            marks = ", ".join("?" * len(chunk))
            sql = "UPDATE timer SET status = 'cancelled' WHERE conversation_key = ? AND status = 'pending'"
            execute(conn, f"{sql} AND name IN ({marks})", [key, *chunk])

    def _insert_many(self, table: str, columns: Sequence[str], n: int, conflict: str, returning: str) -> str:
        sql = self._many.get((table, n))
        if sql is None:
            row = "(" + ", ".join([self._marker] * len(columns)) + ")"
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([row] * n)}"
                f" ON CONFLICT {conflict} DO NOTHING RETURNING {returning}"
            )
            self._many[(table, n)] = sql
        return sql


def _insert_one(table: str, columns: Sequence[str], conflict: str) -> str:
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT {conflict} DO NOTHING"


def execute(conn: Connection, sql: str, params: dict[str, Any] | Sequence[Any]) -> Any:
    """Run `sql` on the driver's cursor of `conn` (inside its transaction); returns the cursor."""
    driver = conn.connection.dbapi_connection
    assert driver is not None
    cursor = driver.cursor()
    try:
        cursor.execute(sql, params)
    except Exception as exc:
        dialect = conn.dialect
        if not isinstance(exc, dialect.loaded_dbapi.Error):
            raise
        wrapped = DBAPIError.instance(
            sql,
            params,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=dialect.is_disconnect(exc, driver, cursor),
            dialect=dialect,
        )
        raise wrapped from exc
    return cursor


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
