"""Schema migrations: Alembic, with its scripts in middleware/migrations/versions/ (one per change).

Store.start and `switchboard migrate` run them; no alembic.ini is needed (the store URL comes
from the Switchboard config). What they guarantee:

- A migration runs in one transaction: on PostgreSQL (transactional DDL) under an advisory lock,
  so nodes starting at once take turns and the second finds the work done; on SQLite under
  `BEGIN IMMEDIATE` on a connection of its own (pysqlite would otherwise commit each DDL at once).
- A database made before migrations (the tables, no `alembic_version`) is recognised by its tables
  and stamped with the revision they are (`UNVERSIONED`), then upgraded like any other.
- A database at a revision this version does not know (a newer Switchboard migrated it) is never
  touched: start-up fails with a clear error instead.

Start-up policy (`store.migrate`): `auto` upgrades to this version's head; `check` refuses to start
unless the database is at it (`switchboard migrate` then does it, once, for a cluster).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, event, inspect, text
from sqlalchemy.pool import NullPool

from middleware.dburl import normalise

log = logging.getLogger("switchboard.migrate")
# alembic says "Context impl ..." and "Will assume ..." at INFO on every start: our own line says what changed
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
Policy = Literal["auto", "check"]

#: Switchboard's tables, as every version since the first release (revision 0001) has them
TABLES = frozenset(
    {"inbox", "conversation", "outbox", "timer", "ownership", "user_vars", "agent", "agent_session", "node"}
)
#: Held (PostgreSQL) while the schema is created or changed: the key the versions before migrations
#: took for create_all, so that old and new nodes starting at once on an empty database take turns too.
LOCK = "SELECT pg_advisory_xact_lock(hashtext('switchboard.create_tables'))"


class SchemaError(Exception):
    """The database's schema is not one this version runs on (and it was not, or may not be, upgraded)."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    #: the database's revision: from `alembic_version`, or recognised from its tables; None: no tables
    revision: str | None
    #: this version's newest revision
    head: str
    #: `alembic_version` says so (False: made before migrations, or empty)
    versioned: bool
    #: the revision is one of this version's (False: a newer version migrated the database)
    known: bool

    @property
    def current(self) -> bool:
        return self.revision == self.head

    @property
    def newer(self) -> bool:
        return not self.known

    def describe(self) -> str:
        if self.revision is None:
            return f"database is empty, this version needs revision {self.head}"
        made = "" if self.versioned else " (made before migrations, not stamped yet)"
        if self.current:
            return f"database at revision {self.revision}, this version's head{made}"
        if self.known:
            return f"database at revision {self.revision}{made}, this version needs {self.head}"
        return f"database at revision {self.revision}, newer than this version knows (its head is {self.head})"


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's config without an alembic.ini: our scripts, and the connection (or, for --sql, the URL)."""
    cfg = Config(output_buffer=io.StringIO())
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def history() -> list[tuple[str, str]]:
    """(revision, what it does), oldest first."""
    return [(s.revision, (s.doc or "").strip()) for s in reversed(list(scripts().walk_revisions()))]


def head() -> str:
    rev = scripts().get_current_head()
    if rev is None:
        raise SchemaError("no migrations found in " + str(MIGRATIONS))
    return rev


def _order() -> list[str]:
    return [rev for rev, _ in history()]


def state(conn: Connection) -> SchemaState:
    """Where the database is, read in `conn`'s transaction."""
    order = _order()
    heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) > 1:
        raise SchemaError(f"database has several revisions at once ({', '.join(heads)}): not a schema Switchboard made")
    if heads:
        return SchemaState(heads[0], order[-1], versioned=True, known=heads[0] in order)
    return SchemaState(_recognise(conn), order[-1], versioned=False, known=True)


def _recognise(conn: Connection) -> str | None:
    """The revision of a database made before migrations (create_all), from its tables. Frozen: every
    version since has an `alembic_version`, so later revisions never need recognising."""
    insp = inspect(conn)
    present = TABLES & set(insp.get_table_names())
    if not present:
        return None
    if missing := TABLES - present:
        raise SchemaError(
            f"database has some of Switchboard's tables but not {', '.join(sorted(missing))}, and no "
            "alembic_version: not a schema Switchboard made (or one damaged by hand)"
        )
    return "0002" if "skills" in {col["name"] for col in insp.get_columns("agent")} else "0001"


def upgrade(conn: Connection, target: str = "head") -> tuple[SchemaState, SchemaState]:
    """Bring the database to `target` (a revision, `head`, or `base`: down as well as up), in `conn`'s
    transaction; a database made before migrations is stamped first. Returns (before, after)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(LOCK))
    before = state(conn)
    if before.newer:
        raise SchemaError(f"{before.describe()}: run a Switchboard that knows it")
    order = _order()
    goal = order[-1] if target == "head" else target
    if goal != "base" and goal not in order:
        raise SchemaError(f"no revision {goal!r}; this version knows {', '.join(order)}")
    if before.revision == (None if goal == "base" else goal):
        if not before.versioned and before.revision is not None:
            command.stamp(alembic_config(conn), before.revision)
        return before, state(conn)
    if conn.dialect.name == "postgresql":
        # a migration waiting for a table lock queues every node's statements on that table behind it
        conn.execute(text("SET LOCAL lock_timeout = '15s'"))
    cfg = alembic_config(conn)
    if not before.versioned and before.revision is not None:
        command.stamp(cfg, before.revision)
    position = -1 if before.revision is None else order.index(before.revision)
    if goal == "base" or order.index(goal) < position:
        command.downgrade(cfg, goal)
    else:
        command.upgrade(cfg, goal)
    return before, state(conn)


def prepare(conn: Connection, policy: Policy) -> SchemaState:
    """At a node's start: `auto` upgrades to head; `check` refuses to start unless the database is at
    head. A database at a newer revision than this version knows is refused either way."""
    if policy == "auto":
        before, after = upgrade(conn)
        if before.revision != after.revision:
            log.info("database schema upgraded from %s to %s", before.revision or "nothing", after.revision)
        elif not before.versioned and before.revision is not None:
            log.info("database made before migrations recognised as revision %s and stamped", before.revision)
        return after
    now = state(conn)
    if now.current:
        return now
    if now.newer:
        raise SchemaError(
            f"{now.describe()}: this node runs an older Switchboard than the database; upgrade it (or, to roll "
            f"back, run the newer version's `switchboard migrate --to {now.head}` first)"
        )
    raise SchemaError(f"{now.describe()}: run `switchboard migrate` (store.migrate is check)")


@contextlib.contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """One transaction on a connection of its own (not the store's pool), committed at the end."""
    url = normalise(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and not path.startswith(":memory:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # pysqlite's own transactions begin only before DML: off, and BEGIN IMMEDIATE of our own instead,
        # so the DDL is in the transaction too and two processes migrating at once take turns
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30, "isolation_level": None})
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    else:
        timeout = {} if "connect_timeout=" in url else {"connect_timeout": 3}
        engine = create_engine(url, poolclass=NullPool, connect_args=timeout)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def sqlite_missing(url: str) -> bool:
    """A SQLite store whose file does not exist yet (`--check` says so without creating it)."""
    if not url.startswith("sqlite"):
        return False
    path = url.split("///", 1)[1] if "///" in url else ""
    return bool(path) and not path.startswith(":memory:") and not Path(path.split("?", 1)[0]).exists()


def offline_sql(url: str, target: str = "head", start: str | None = None) -> str:
    """The SQL of the migrations from `start` (default: nothing) to `target`, for the URL's dialect,
    without a connection: for a DBA who runs it by hand."""
    cfg = alembic_config(url=normalise(url))
    order = _order()
    goal = order[-1] if target == "head" else target
    command.upgrade(cfg, f"{start}:{goal}" if start else goal, sql=True)
    buffer = cfg.output_buffer
    assert isinstance(buffer, io.StringIO)
    return buffer.getvalue()


def new_revision(message: str) -> Path:
    """For contributors: a new migration script from the difference between the tables' models and
    head, autogenerated against a scratch SQLite database. Review it (and its PostgreSQL behaviour)."""
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/scratch.db"
        with transaction(url) as conn:
            upgrade(conn)
        with transaction(url) as conn:
            number = f"{int(head()) + 1:04d}"
            script = command.revision(alembic_config(conn), message=message, autogenerate=True, rev_id=number)
    assert script is not None and not isinstance(script, list)
    path = Path(script.path)
    with contextlib.suppress(OSError):  # ruff is a test extra: tidy the imports and quotes when it is there
        for args in (["check", "--fix", "--quiet"], ["format", "--quiet"]):
            subprocess.run([sys.executable, "-m", "ruff", *args, str(path)], check=False, capture_output=True)
    return path


__all__ = [
    "SchemaError",
    "SchemaState",
    "alembic_config",
    "head",
    "history",
    "new_revision",
    "offline_sql",
    "prepare",
    "sqlite_missing",
    "state",
    "transaction",
    "upgrade",
]
