"""The service's store for a phase: a fresh SQLite file, or a scratch PostgreSQL database made and dropped here.

`--store postgresql` gives every phase a database of its own, `bench_<pid>_<n>` on the server that
`--pg` names (127.0.0.1:5432 by default; only a loopback host is accepted), created before the service
starts and dropped (`WITH (FORCE)`) when the phase ends, so no run sees another's rows. Also here:
what the store costs, as CPU of the PostgreSQL processes (from /proc), commits and WAL, and bytes on disk.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procs import BenchError, cpu_seconds, ppid

if TYPE_CHECKING:
    import psycopg

PG_ADMIN = os.environ.get("SWITCHBOARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
STORES = ("sqlite", "postgresql")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_serial = itertools.count(1)
#: backends of the scratch database, averaged over a window: running a statement, waiting for a row
#: lock (another transaction holds the row), waiting on I/O or WAL (IO, LWLock, IPC), or idle inside
#: a transaction, i.e. waiting for the node to send the next statement
ACTIVITY = ("pg_running", "pg_lock_wait", "pg_io_wait", "pg_idle_in_tx")


@dataclass(frozen=True)
class StoreSpec:
    kind: str = "sqlite"  # "sqlite" or "postgresql"
    #: a database on the PostgreSQL server to connect to for CREATE/DROP DATABASE and the statistics
    pg_admin: str = PG_ADMIN


@dataclass(frozen=True)
class Scratch:
    """The store of one phase: the URL the service's config gets, and where its bytes live."""

    kind: str
    url: str
    sqlite_path: Path | None = None
    pg_admin: str | None = None
    pg_database: str | None = None


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection; psycopg is imported here, so the kit runs without it for SQLite."""
    try:
        import psycopg
    except ImportError as exc:  # the project depends on it, but the kit runs without the project too
        raise BenchError("--store postgresql needs psycopg (`pip install -e .`)") from exc
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise BenchError(f"cannot connect to PostgreSQL ({exc})") from exc


def _admin_parts(admin: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    parts = {k: str(v) for k, v in conninfo_to_dict(admin).items() if v is not None}
    host = parts.get("host", "")
    if host not in LOOPBACK:
        raise BenchError(f"the bench talks to 127.0.0.1 only; --pg host is {host!r}")
    return parts


def service_url(admin: str, database: str) -> str:
    """`postgresql://user[:password]@host:port/database`, the form the service's config takes."""
    parts = _admin_parts(admin)
    user = parts.get("user", "postgres")
    password = f":{parts['password']}" if "password" in parts else ""
    return f"postgresql://{user}{password}@{parts['host']}:{parts.get('port', '5432')}/{database}"


@contextlib.contextmanager
def scratch(spec: StoreSpec, folder: Path) -> Iterator[Scratch]:
    """A fresh store for one phase; a PostgreSQL one is dropped on the way out, whatever happened."""
    if spec.kind == "sqlite":
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "sb.db"
        yield Scratch("sqlite", f"sqlite:///{path}", sqlite_path=path)
        return
    if spec.kind != "postgresql":
        raise BenchError(f"unknown store {spec.kind!r} (one of {', '.join(STORES)})")
    database = f"bench_{os.getpid()}_{next(_serial)}"
    url = service_url(spec.pg_admin, database)
    with connect(spec.pg_admin) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield Scratch("postgresql", url, pg_admin=spec.pg_admin, pg_database=database)
    finally:
        with connect(spec.pg_admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# -- what the store costs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PgSample:
    #: CPU seconds of the backends connected to the scratch database, by pid
    backends: dict[int, float]
    #: CPU seconds of every PostgreSQL process (postmaster, its children, and the children it reaped)
    all_cpu: float
    commits: int
    wal_lsn: str


class PgProbe:
    """Samples the PostgreSQL server's cost over a window: CPU from /proc, commits and WAL from its views.

    `pg_cpu` counts the backends of the scratch database (the nodes' connections); `pg_cpu_all` every
    PostgreSQL process (background writer, WAL writer, checkpointer, autovacuum, and other people's
    backends on a shared machine) with the CPU of exited children, which the postmaster reaps.
    """

    def __init__(self, scratch: Scratch) -> None:
        assert scratch.pg_admin is not None and scratch.pg_database is not None
        self.database = scratch.pg_database
        self.conn = connect(scratch.pg_admin)
        self.postmaster: int | None = None

    def close(self) -> None:
        self.conn.close()

    def sample(self) -> PgSample:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.database,)
        ).fetchall()
        backends = {int(pid): cpu_seconds(int(pid)) for (pid,) in rows}
        if self.postmaster is None:
            self.postmaster = ppid(int(self.conn.info.backend_pid)) or 0
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT xact_commit, pg_current_wal_lsn()::text FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        commits, lsn = (int(row[0]), str(row[1])) if row else (0, "0/0")
        return PgSample(backends, _tree_cpu(self.postmaster) if self.postmaster else 0.0, commits, lsn)

    def activity(self) -> dict[str, int]:
        """What the scratch database's backends are doing right now, by kind (see `ACTIVITY`)."""
        rows = self.conn.execute(
            "SELECT state, wait_event_type FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.database,),
        ).fetchall()
        counts = dict.fromkeys(ACTIVITY, 0)
        for state, wait in rows:
            if state == "idle in transaction":
                counts["pg_idle_in_tx"] += 1
            elif state == "active" and wait == "Lock":
                counts["pg_lock_wait"] += 1
            elif state == "active" and wait in ("IO", "LWLock", "IPC"):
                counts["pg_io_wait"] += 1
            elif state == "active":
                counts["pg_running"] += 1
        return counts

    def figures(self, before: PgSample, after: PgSample, seconds: float, messages: float) -> dict[str, float]:
        """pg_cpu / pg_cpu_all in cores, commits/s, and PostgreSQL CPU ms and WAL bytes per message handled."""
        ours = sum(cpu - before.backends.get(pid, 0.0) for pid, cpu in after.backends.items())
        wal = self.conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after.wal_lsn, before.wal_lsn)).fetchone()
        wal_bytes = float(wal[0]) if wal else 0.0
        per = 1 / messages if messages > 0 else float("nan")
        return {
            "pg_cpu": ours / seconds,
            "pg_cpu_all": (after.all_cpu - before.all_cpu) / seconds,
            "pg_commits_s": (after.commits - before.commits) / seconds,
            "pg_ms_per_msg": ours * 1000 * per,
            "pg_wal_bytes_per_msg": wal_bytes * per,
        }


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root`, its live children, and its reaped children (cutime + cstime)."""
    total = cpu_seconds(root, children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != root and ppid(int(entry.name)) == root:
            total += cpu_seconds(int(entry.name))
    return total


def store_bytes(scratch: Scratch) -> dict[str, float]:
    """Bytes the store takes: SQLite's file, WAL and shm; PostgreSQL's tables with indexes and TOAST."""
    if scratch.sqlite_path is not None:
        sizes = {}
        for suffix, name in (("", "db"), ("-wal", "wal"), ("-shm", "shm")):
            path = Path(f"{scratch.sqlite_path}{suffix}")
            sizes[f"sqlite_{name}_bytes"] = float(path.stat().st_size) if path.exists() else 0.0
        return {"store_bytes": sum(sizes.values()), **sizes}
    assert scratch.pg_database is not None
    with connect(scratch.url) as conn:
        rows = conn.execute(
            "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables ORDER BY relname"
        ).fetchall()
    tables = {f"pg_{name}_bytes": float(size) for name, size in rows}
    return {"store_bytes": sum(tables.values()), **tables}


def count_rows(scratch: Scratch, table: str) -> int:
    """Rows in one of the service's tables, read beside the running service."""
    query = f"SELECT count(*) FROM {table}"  # the table names are the bench's own constants
    if scratch.sqlite_path is not None:
        conn = sqlite3.connect(f"file:{scratch.sqlite_path}?mode=ro", uri=True, timeout=30)
        try:
            return int(conn.execute(query).fetchone()[0])
        finally:
            conn.close()
    with connect(scratch.url) as pg:
        row = pg.execute(query).fetchone()
        return int(row[0]) if row else 0
