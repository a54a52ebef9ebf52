"""Schema migrations (middleware/migrate.py, middleware/migrations/) on SQLite and PostgreSQL: the upgrade
from the first released schema with its data, databases made before migrations, head against the
models, `switchboard migrate` and its exit codes, and the start-up policy (auto, check, newer)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, DefaultClause, Engine, MetaData, create_engine, inspect, select, text
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from middleware import migrate
from middleware.dburl import normalise
from middleware.model import Inbound, Sender
from middleware.store import Store
from tests.conftest import REPO

DATA = Path(__file__).parent / "data" / "migrations"
#: rows the store of the first release wrote by real operations (tests/data/migrations/README.md)
ROWS: dict[str, list[dict[str, Any]]] = json.loads((DATA / "0001.rows.json").read_text(encoding="utf-8"))
HEAD = migrate.head()
SERIAL = ("inbox", "outbox", "timer", "ownership")

pytestmark = pytest.mark.slow


def engine(url: str) -> Engine:
    return create_engine(normalise(url), poolclass=NullPool)


def dialect(url: str) -> str:
    return "postgresql" if url.startswith("postgres") else "sqlite"


def create_first_release(url: str, *, rows: bool = True) -> None:
    """The tables exactly as the first release's store created them (the recorded DDL), with its rows."""
    ddl = (DATA / f"0001.{dialect(url)}.sql").read_text(encoding="utf-8")
    statements = [s for s in "\n".join(x for x in ddl.splitlines() if not x.startswith("--")).split(";") if s.strip()]
    eng = engine(url)
    try:
        with eng.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            if rows:
                tables = MetaData()
                tables.reflect(conn)
                for name, table_rows in ROWS.items():
                    conn.execute(tables.tables[name].insert(), table_rows)
                if dialect(url) == "postgresql":  # ids were given: move the sequences past them, as use would
                    for name in SERIAL:
                        conn.execute(
                            text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), max(id)) FROM {name}")
                        )
    finally:
        eng.dispose()


def table_rows(url: str) -> dict[str, list[dict[str, Any]]]:
    eng = engine(url)
    try:
        with eng.connect() as conn:
            tables = MetaData()
            tables.reflect(conn, only=list(ROWS))
            return {
                name: [
                    dict(r._mapping)
                    for r in conn.execute(select(tables.tables[name]).order_by(*tables.tables[name].primary_key))
                ]
                for name in ROWS
            }
    finally:
        eng.dispose()


def version_rows(url: str) -> list[str]:
    eng = engine(url)
    try:
        with eng.connect() as conn:
            if "alembic_version" not in inspect(conn).get_table_names():
                return []
            return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        eng.dispose()


def _plain(sql: str) -> str:
    sql = sql.strip()
    while sql.startswith("(") and sql.endswith(")"):
        sql = sql[1:-1].strip()
    return sql.split("::", 1)[0]


def default_differences(conn: Connection, metadata: MetaData) -> list[tuple[str, str, str | None, str | None]]:
    """Server defaults, database against metadata. Alembic's own comparison takes SQLite's `('')` for
    another default than `''`, and a comparator of our own does not stop it (alembic 1.20)."""
    insp = inspect(conn)
    found = []
    for table in metadata.sorted_tables:
        reflected = {c["name"]: c.get("default") for c in insp.get_columns(table.name)}
        for column in table.columns:
            default = reflected.get(column.name)
            if default is not None and default.startswith("nextval("):  # PostgreSQL's SERIAL
                default = None
            server_default = column.server_default
            want = None
            if isinstance(server_default, DefaultClause):
                arg = server_default.arg
                want = "'" + arg.replace("'", "''") + "'" if isinstance(arg, str) else str(arg)
            if want is not None and want.startswith("nextval("):
                want = None
            have = None if default is None else _plain(default)
            if have != (None if want is None else _plain(want)):
                found.append((table.name, column.name, have, want))
    return found


def differences(url: str, metadata: MetaData = SQLModel.metadata) -> list[Any]:
    """What autogenerate would write to make the database match `metadata` (the models by default),
    and the server defaults that differ."""
    eng = engine(url)
    try:
        with eng.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": metadata})
            return [*compare_metadata(context, metadata), *default_differences(conn, metadata)]
    finally:
        eng.dispose()


def config(tmp_path: Path, url: str, policy: str = "auto") -> Path:
    flows = tmp_path / "flows"
    flows.mkdir(exist_ok=True)
    (flows / "demo.yaml").write_text((REPO / "flows" / "demo.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    path = tmp_path / "switchboard.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            store:
              url: "{url}"
              migrate: {policy}
            flows: flows
            platforms:
              myapp: {{type: generic, post_message_url: "http://127.0.0.1:9/messages"}}
            """
        ),
        encoding="utf-8",
    )
    return path


def switchboard_migrate(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "middleware.cli", "migrate", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cfg.parent,
    )


def inbound(n: int, conversation: str) -> Inbound:
    return Inbound(
        platform="myapp",
        message_id=f"m-{n}",
        conversation_id=conversation,
        sender=Sender(f"u-{conversation}", "Ana Sutrisno"),
        text=f"after the upgrade {n}",
    )


# -- (a) the upgrade from the first release, with its data -----------------------------------------


async def test_upgrade_from_the_first_release_keeps_every_row(store_url: str, tmp_path: Path) -> None:
    create_first_release(store_url)
    cfg = config(tmp_path, store_url)

    check = switchboard_migrate(cfg, "--check")
    assert check.returncode == 1, check
    assert check.stdout.strip() == (
        f"database at revision 0001 (made before migrations, not stamped yet), this version needs {HEAD}: "
        "run `switchboard migrate`"
    )

    done = switchboard_migrate(cfg)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"database upgraded from 0001 to {HEAD} (recognised as 0001, stamped)"
    assert version_rows(store_url) == [HEAD]

    expected = {name: [dict(r) for r in rows] for name, rows in ROWS.items()}
    for agent in expected["agent"]:
        agent["skills"] = ""
    # 0004: each handled message linked to the one handled before it in its conversation, whose
    # row names its newest handled message
    handled: dict[str, list[int]] = {}
    for message in expected["inbox"]:
        done = message["status"] == "done"
        chain = handled.setdefault(str(message["conversation_key"]), [])
        message["prev_id"] = (chain[-1] if chain else None) if done else None
        if done:
            chain.append(int(message["id"]))
    for conversation in expected["conversation"]:
        conversation["last_inbox_id"] = (handled.get(str(conversation["key"])) or [None])[-1]
    assert any(m["prev_id"] for m in expected["inbox"]), "the recorded rows must make a chain to check"
    assert table_rows(store_url) == expected
    assert differences(store_url) == []

    again = switchboard_migrate(cfg)
    assert (again.returncode, again.stdout.strip()) == (0, f"database already at revision {HEAD}")
    check = switchboard_migrate(cfg, "--check")
    assert (check.returncode, check.stdout.strip()) == (0, f"database at revision {HEAD}, this version's head")

    # the store of this version works on it: old pending messages, expired leases, agents
    store = Store(store_url)
    await store.start(migrate="check")
    try:
        assert await store.accept([inbound(6, "c-3"), inbound(1, "c-1")]) == [True, False]  # m-1 still dedupes
        lease = await store.claim("myapp:c-3", "myapp", "c-3", "inc2@node-b", 30)
        assert lease is not None and lease.epoch == 1
        assert [m.inbound.message_id for m in lease.messages] == ["m-5", "m-6"]
        assert lease.messages[0].inbound.type == "postback" and lease.messages[0].inbound.payload == {"choice": "yes"}
        taken = await store.claim("myapp:c-2", "myapp", "c-2", "inc2@node-b", 30)  # the old node's lease expired
        assert taken is not None and taken.epoch == 2
        assert [m.inbound.payload for m in taken.messages] == [{"ref": "ad-7"}]
        c1 = await store.conversation("myapp:c-1")
        assert c1 is not None and c1["state"]["owner"] == "queued" and c1["state"]["vars"]["order"] == "123456"
        assert [o["after"] for o in c1["ownership"]] == ["queued"]
        assert [m["status"] for m in c1["messages"]] == ["done", "done"]
        assert [r["status"] for r in c1["outbox"]] == ["sent", "dead", "pending"]
        assert [row["name"] for row in await store.agents()] == ["ana"]
        assert await store.agent_skills("ana") == ()
        assert await store.save_agent("budi", "$argon2id$x", skills=["id", "en"])
        assert await store.agent_skills("budi") == ("id", "en")
        assert {d["idempotency_key"] for d in await store.dead_letters()} == {ROWS["outbox"][1]["idempotency_key"]}
    finally:
        await store.close()


async def test_revision_0001_creates_the_recorded_first_release_schema(store_url: str, tmp_path: Path) -> None:
    create_first_release(store_url, rows=False)
    recorded = MetaData()
    eng = engine(store_url)
    try:
        with eng.begin() as conn:
            recorded.reflect(conn)
            for name in ROWS:
                conn.execute(text(f"DROP TABLE {name}"))
    finally:
        eng.dispose()
    done = switchboard_migrate(config(tmp_path, store_url), "--to", "0001")
    assert (done.returncode, done.stdout.strip()) == (0, "database upgraded from nothing to 0001"), done.stderr
    assert differences(store_url, recorded) == []


# -- (b) databases made before migrations ----------------------------------------------------------


#: from this version's schema back to revision 0002's: the status indexes over every row (0003 made
#: them partial), the inbox indexed by conversation and no chain of handled messages (0004)
SCHEMA_0002 = (
    "DROP INDEX ix_inbox_pending",
    "CREATE INDEX ix_inbox_pending ON inbox (status, conversation_key, id)",
    "DROP INDEX ix_outbox_pending",
    "CREATE INDEX ix_outbox_pending ON outbox (status, conversation_key, id)",
    "DROP INDEX ix_outbox_dead",
    "DROP INDEX ix_inbox_flooded",
    "CREATE INDEX ix_inbox_conversation ON inbox (conversation_key, id)",
    "ALTER TABLE inbox DROP COLUMN prev_id",
    "ALTER TABLE conversation DROP COLUMN last_inbox_id",
)


async def test_a_database_made_before_migrations_is_recognised_and_stamped(store_url: str) -> None:
    """The last version before migrations made the tables with create_all: revision 0002's schema
    (agent.skills included, the status indexes over every row)."""
    eng = engine(store_url)
    try:
        with eng.begin() as conn:
            SQLModel.metadata.create_all(conn)
            for statement in SCHEMA_0002:
                conn.exec_driver_sql(statement)
            conn.execute(
                text(
                    "INSERT INTO agent (name, password_hash, skills, created_at, updated_at) "
                    "VALUES ('ana', 'h', 'id', 1, 1)"
                )
            )
        with eng.begin() as conn:
            assert migrate.state(conn) == migrate.SchemaState("0002", HEAD, versioned=False, known=True)
    finally:
        eng.dispose()
    store = Store(store_url)
    with pytest.raises(migrate.SchemaError, match="revision 0002 \\(made before migrations"):
        await store.start(migrate="check")  # behind: a checking node refuses, and stamps nothing
    await store.close()
    assert version_rows(store_url) == []
    store = Store(store_url)
    await store.start()
    try:
        assert version_rows(store_url) == [HEAD]
        assert await store.agent_skills("ana") == ("id",)
    finally:
        await store.close()
    assert differences(store_url) == []
    assert status_indexes(store_url) == PARTIAL_STATUS_INDEXES


#: what revisions 0003 and 0004 leave: index -> the condition of its rows
PARTIAL_STATUS_INDEXES = {
    "ix_inbox_pending": "status = 'pending'",
    "ix_inbox_flooded": "status = 'flooded'",
    "ix_outbox_pending": "status = 'pending'",
    "ix_outbox_dead": "status = 'dead'",
}


def status_indexes(url: str) -> dict[str, str | None]:
    """The partial indexes' conditions as the database holds them (alembic's comparison ignores them)."""
    names = tuple(PARTIAL_STATUS_INDEXES)
    eng = engine(url)
    try:
        with eng.connect() as conn:
            if dialect(url) == "sqlite":
                rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'")).all()
            else:
                rows = conn.execute(text("SELECT indexname, indexdef FROM pg_indexes")).all()
    finally:
        eng.dispose()
    found: dict[str, str | None] = {}
    for name, sql in rows:
        if name in names:
            where = sql.split(" WHERE ", 1)[1] if " WHERE " in sql else None
            # PostgreSQL writes it back as ((status)::text = 'pending'::text)
            found[name] = where and where.replace("(", "").replace(")", "").replace("::text", "")
    return found


async def test_first_release_database_under_check_refuses_to_start_and_auto_upgrades(store_url: str) -> None:
    create_first_release(store_url)
    store = Store(store_url)
    with pytest.raises(migrate.SchemaError) as refused:
        await store.start(migrate="check")
    assert str(refused.value) == (
        f"database at revision 0001 (made before migrations, not stamped yet), this version needs {HEAD}: "
        "run `switchboard migrate` (store.migrate is check)"
    )
    await store.close()
    assert version_rows(store_url) == []
    assert "skills" not in {c["name"] for c in inspect(engine(store_url)).get_columns("agent")}
    store = Store(store_url)
    await store.start()  # auto, the default
    await store.close()
    assert version_rows(store_url) == [HEAD]
    assert len(table_rows(store_url)["inbox"]) == len(ROWS["inbox"])


async def test_some_tables_without_a_version_are_refused(store_url: str) -> None:
    eng = engine(store_url)
    try:
        with eng.begin() as conn:
            SQLModel.metadata.tables["inbox"].create(conn)
    finally:
        eng.dispose()
    store = Store(store_url)
    with pytest.raises(migrate.SchemaError, match="has some of Switchboard's tables but not agent, agent_session"):
        await store.start()
    await store.close()


# -- (c) head is the models ------------------------------------------------------------------------


async def test_head_matches_the_models_exactly(store_url: str) -> None:
    """Fails when a model changes without a migration: `switchboard migrate --new "what changed"`."""
    store = Store(store_url)
    await store.start()
    await store.close()
    assert version_rows(store_url) == [HEAD]
    assert differences(store_url) == []
    assert status_indexes(store_url) == PARTIAL_STATUS_INDEXES


async def test_down_to_nothing_and_up_again(store_url: str, tmp_path: Path) -> None:
    cfg = config(tmp_path, store_url)
    assert switchboard_migrate(cfg).stdout.strip() == f"database upgraded from nothing to {HEAD}"
    down = switchboard_migrate(cfg, "--to", "0001")
    assert (down.returncode, down.stdout.strip()) == (0, f"database downgraded from {HEAD} to 0001"), down.stderr
    assert "skills" not in {c["name"] for c in inspect(engine(store_url)).get_columns("agent")}
    assert switchboard_migrate(cfg, "--to", "base").stdout.strip() == "database downgraded from 0001 to nothing"
    assert set(inspect(engine(store_url)).get_table_names()) == {"alembic_version"}
    assert switchboard_migrate(cfg).returncode == 0
    assert differences(store_url) == []


async def test_nodes_starting_at_once_on_an_empty_database_take_turns(store_url: str) -> None:
    stores = [Store(store_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        assert await stores[1].accept([inbound(1, "c-1")]) == [True]
    finally:
        for s in stores:
            await s.close()
    assert version_rows(store_url) == [HEAD]


# -- (d) --check, (e) a newer database -------------------------------------------------------------


async def test_check_exit_codes(store_url: str, tmp_path: Path) -> None:
    cfg = config(tmp_path, store_url)
    empty = switchboard_migrate(cfg, "--check")
    assert empty.returncode == 1 and f"this version needs revision {HEAD}" in empty.stdout, empty
    assert switchboard_migrate(cfg, "--to", "0001").returncode == 0
    behind = switchboard_migrate(cfg, "--check")
    assert (behind.returncode, behind.stdout.strip()) == (
        1,
        f"database at revision 0001, this version needs {HEAD}: run `switchboard migrate`",
    )
    assert switchboard_migrate(cfg).returncode == 0
    assert switchboard_migrate(cfg, "--check").returncode == 0
    bad = switchboard_migrate(cfg, "--to", "0042")
    known = ", ".join(rev for rev, _ in migrate.history())
    assert (bad.returncode, bad.stderr.strip()) == (2, f"no revision '0042'; this version knows {known}")


async def test_a_database_at_a_newer_revision_is_never_touched(store_url: str, tmp_path: Path) -> None:
    cfg = config(tmp_path, store_url)
    assert switchboard_migrate(cfg).returncode == 0
    eng = engine(store_url)
    try:
        with eng.begin() as conn:  # what a newer Switchboard's migrate leaves (plus its changes)
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    finally:
        eng.dispose()
    newer = f"database at revision 0099, newer than this version knows (its head is {HEAD})"
    policies: tuple[migrate.Policy, ...] = ("auto", "check")
    for policy in policies:
        store = Store(store_url)
        with pytest.raises(migrate.SchemaError) as refused:
            await store.start(migrate=policy)
        assert str(refused.value).startswith(newer + ":"), refused.value
        await store.close()
    check = switchboard_migrate(cfg, "--check")
    assert (check.returncode, check.stdout.strip()) == (2, newer)
    up = switchboard_migrate(cfg)
    assert (up.returncode, up.stderr.strip()) == (2, f"{newer}: run a Switchboard that knows it")
    assert version_rows(store_url) == ["0099"]
    assert differences(store_url) == []


# -- the command's other modes ---------------------------------------------------------------------


def test_history_and_offline_sql(tmp_path: Path) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "middleware.cli", "migrate", "--history"], capture_output=True, text=True, check=True
    )
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [rev for rev, _ in migrate.history()]
    assert lines[-1].endswith("(head)")
    cfg = config(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    sql = switchboard_migrate(cfg, "--sql", "--from", "0001")
    assert sql.returncode == 0, sql.stderr
    assert "ALTER TABLE agent ADD COLUMN skills VARCHAR(1000) DEFAULT '' NOT NULL;" in sql.stdout
    assert "UPDATE alembic_version SET version_num='0002'" in sql.stdout
