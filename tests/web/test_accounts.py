"""Inbox accounts and sessions in the store (SQLite and PostgreSQL), and `switchboard agent`."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from middleware.agents import AccountError, add_agent, check_name, check_password, verify_agent
from middleware.cli import main
from middleware.store import Store
from tests.web.conftest import PASSWORD


async def test_accounts_and_sessions(store_url: str) -> None:
    store = Store(store_url)
    await store.start()
    try:
        assert await add_agent(store, "alice", PASSWORD)
        assert not await add_agent(store, "alice", "another password")  # exists: unchanged
        stored = await store.agent_password_hash("alice")
        assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
        assert await verify_agent(store, "alice", PASSWORD)
        assert not await verify_agent(store, "alice", "another password")
        assert not await verify_agent(store, "nobody", PASSWORD)
        assert not await verify_agent(store, "not a valid name!", PASSWORD)

        await store.open_session("h1", "alice", "csrf-1", time.time() + 60)
        await store.open_session("old", "alice", "csrf-0", time.time() - 1)  # already expired
        session = await store.agent_session("h1")
        assert session is not None and session["agent"] == "alice" and session["csrf"] == "csrf-1"
        assert await store.agent_session("old") is None
        await store.touch_session("h1", time.time() - 1)
        assert await store.agent_session("h1") is None  # expired
        await store.touch_session("h1", time.time() + 60)
        assert await store.agent_session("h1") is not None

        # a new password ends the agent's sessions
        assert await add_agent(store, "alice", "a new password", replace=True)
        assert await store.agent_session("h1") is None
        assert await verify_agent(store, "alice", "a new password")
        await store.open_session("h2", "alice", "csrf-2", time.time() + 60)
        await store.close_session("h2")
        assert await store.agent_session("h2") is None
        await store.open_session("h3", "alice", "csrf-3", time.time() + 60)
        assert [a["name"] for a in await store.agents()] == ["alice"]
        assert await store.remove_agent("alice")
        assert not await store.remove_agent("alice")
        assert await store.agent_session("h3") is None
    finally:
        await store.close()


def test_names_and_passwords_are_checked() -> None:
    assert check_name("alice.b@example-1") == "alice.b@example-1"
    for bad in ("", " alice", "a b", "<script>", "x" * 65, "-dash"):
        with pytest.raises(AccountError):
            check_name(bad)
    with pytest.raises(AccountError):
        check_password("short")
    assert check_password("long enough") == "long enough"


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "sb.yaml"
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "one.yaml").write_text(
        "flow: one\nstates:\n  start:\n    routes:\n      - do: [{reply: hi}]\n"
    )
    config.write_text(f"store:\n  url: sqlite:///{tmp_path}/sb.db\nflows: flows\nplatforms: {{}}\n")
    return config


def test_the_agent_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["agent", "add", "alice", "--password-stdin", "--config", config]) == 0
    assert "agent 'alice' added" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["agent", "add", "alice", "--password-stdin", "--config", config]) == 1
    assert "--replace" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["agent", "add", "bob", "--password-stdin", "--config", config]) == 1
    assert "at least 8 characters" in capsys.readouterr().err
    assert main(["agent", "add", "bad name", "--password-stdin", "--config", config]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("a new password\n"))
    assert main(["agent", "add", "alice", "--password-stdin", "--replace", "--config", config]) == 0
    assert main(["agent", "list", "--config", config]) == 0
    assert capsys.readouterr().out == "alice\n"
    assert main(["agent", "remove", "alice", "--config", config]) == 0
    assert main(["agent", "remove", "alice", "--config", config]) == 1
    assert main(["agent", "list", "--config", str(tmp_path / "missing.yaml")]) == 1


def test_the_agent_command_gives_skills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["agent", "add", "sari", "--skills", "id, en,id", "--password-stdin", "--config", config]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["agent", "add", "alice", "--password-stdin", "--config", config]) == 0
    assert main(["agent", "add", "bob", "--skills", "en,no way", "--password-stdin", "--config", config]) == 1
    assert "got 'no way'" in capsys.readouterr().err
    assert main(["agent", "list", "--config", config]) == 0
    assert capsys.readouterr().out == "alice\nsari\tskills: id,en\n"
    # a new password keeps the skills; --skills with --replace sets them
    monkeypatch.setattr("sys.stdin", io.StringIO("a new password\n"))
    assert main(["agent", "add", "sari", "--password-stdin", "--replace", "--config", config]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a new password\n"))
    assert main(["agent", "add", "alice", "--skills", "en", "--password-stdin", "--replace", "--config", config]) == 0
    capsys.readouterr()
    assert main(["agent", "list", "--config", config]) == 0
    assert capsys.readouterr().out == "alice\tskills: en\nsari\tskills: id,en\n"


async def test_an_agent_table_from_before_skills_gets_the_column(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the first release's tables (tests/data/migrations/), no skills
        conn.executescript((Path(__file__).parent.parent / "data" / "migrations" / "0001.sqlite.sql").read_text())
        conn.execute("INSERT INTO agent VALUES ('old', 'x', 1, 1)")
    store = Store(f"sqlite:///{db}")
    await store.start()
    try:
        assert await store.agents() == [{"name": "old", "skills": [], "created_at": 1, "updated_at": 1}]
        assert await store.agent_skills("old") == ()
        assert await add_agent(store, "new", PASSWORD, skills=["en"])
        assert await store.agent_skills("new") == ("en",)
    finally:
        await store.close()


def test_the_agent_command_asks_twice_without_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config(tmp_path))
    answers = iter([PASSWORD, "different"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main(["agent", "add", "alice", "--config", config]) == 1
    assert "differ" in capsys.readouterr().err
    answers = iter([PASSWORD, PASSWORD])
    assert main(["agent", "add", "alice", "--config", config]) == 0


async def test_seeded_conversations_and_previews(store_url: str) -> None:
    from middleware.model import ConversationState, Inbound, Sender

    store = Store(store_url)
    await store.start()
    try:
        assert await store.seed_conversation("pg:c-1", "pg", "c-1", ConversationState(flow="helpdesk"))
        assert not await store.seed_conversation("pg:c-1", "pg", "c-1", ConversationState(flow="other"))
        found = await store.conversation("pg:c-1")
        assert found is not None and found["state"]["flow"] == "helpdesk"
        ana = Sender("u-1", "Ana")
        await store.accept(
            [
                Inbound("pg", "m-1", "c-1", ana, text="first"),
                Inbound("pg", "m-2", "c-1", ana, text='I typed "type":"event" here'),
                Inbound("pg", "agent:1", "c-1", Sender("al"), type="event", payload={"event": "agent.note"}),
                Inbound("pg", "m-3", "c-2", ana, text="other conversation"),
            ]
        )
        previews = await store.last_user_messages(["pg:c-1", "pg:c-2", "pg:none"])
        assert previews["pg:c-1"]["text"] == 'I typed "type":"event" here'
        assert previews["pg:c-1"]["sender"]["name"] == "Ana"
        assert previews["pg:c-2"]["text"] == "other conversation"
        assert "pg:none" not in previews
        assert await store.last_user_messages([]) == {}
    finally:
        await store.close()
