"""Whole processes, as an operator and a bot builder run them.

- `switchboard serve` killed with SIGKILL while webhooks and turns are in flight, then restarted
  (on the same port: the node reclaims its own leases at once; on another port: it waits for them
  to expire): every acknowledged message is answered exactly once, without any new webhook.
- `make run` in a fresh `git clone`: installs, serves the default config on 127.0.0.1:8080, answers
  a generic webhook, and stops on SIGINT.
- `switchboard chat` on a pipe and, when tmux is there, on a terminal.

Every wait is bounded; every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Server, free_port
from tests.fakes.platform import FakePlatform
from tests.procs import Proc, port_free, switchboard_command, wait_ready

pytestmark = pytest.mark.slow


SLOW_FLOW = """\
flow: slow
states:
  start:
    routes:
      - do: [{wait: 300ms}, {reply: "re {{ message.text }}"}]
"""

CONVERSATIONS = 20
PER_CONVERSATION = 10
#: acks of the second wave of webhooks after which the process is killed
KILL_AFTER_ACKS = 30
#: longer than the server's start-up on a busy 2-core machine (up to ~5 s seen), so that the
#: restart on the same port shows its own leases taken back early, and on another port the wait
LEASE_SECONDS = 10


def crash_config(tmp_path: Path, platform_url: str) -> Path:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "slow.yaml").write_text(SLOW_FLOW)
    config = tmp_path / "switchboard.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            store:
              url: sqlite:///{tmp_path}/data/switchboard.db
            flows: {flows}
            platforms:
              myapp:
                type: generic
                post_message_url: {platform_url}/messages
                typing_url: {platform_url}/typing
                read_url: {platform_url}/read
            dispatch: {{lease_seconds: {LEASE_SECONDS}, sweep_seconds: 0.5}}
            """
        )
    )
    return config


def crash_message(conversation: int, n: int) -> dict[str, Any]:
    mid = f"m-{conversation:02d}-{n:02d}"
    return {
        "message_id": mid,
        "conversation_id": f"c-{conversation:02d}",
        "sender": {"id": f"u-{conversation:02d}", "name": "Ana"},
        "type": "text",
        "text": f"msg {mid}",
    }


def dead_leases(db: Path, node_suffix: str) -> dict[str, float]:
    """Conversation id -> lease end (epoch seconds) of the live leases a node left in the store."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT external_id, lease_until FROM conversation WHERE lease_owner LIKE ? AND lease_until > ?",
            (f"%{node_suffix}", time.time()),
        ).fetchall()
    return {cid: until for cid, until in rows}


def answered(fake: FakePlatform) -> set[str]:
    return {c.body["reply_to"] for c in fake.delivered()}


@pytest.mark.parametrize("restart_on", ["same-port", "other-port"])
async def test_kill_9_in_flight_then_restart_answers_every_accepted_message_once(
    tmp_path: Path, restart_on: str, procs: list[Proc]
) -> None:
    fake = FakePlatform()
    async with (
        Server(fake.app()) as platform_server,
        httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=32)) as client,
    ):
        config = crash_config(tmp_path, platform_server.url)
        port = free_port()

        def serve(p: int, n: int) -> Proc:
            proc = Proc(
                [switchboard_command(), "serve", "--config", str(config), "--port", str(p)],
                tmp_path / f"serve-{n}.log",
                cwd=tmp_path,
            )
            procs.append(proc)
            return proc

        first = serve(port, 1)
        await wait_ready(first, f"http://127.0.0.1:{port}/readyz", 30)
        url = f"http://127.0.0.1:{port}/webhooks/myapp"

        messages = {c: [crash_message(c, n) for n in range(PER_CONVERSATION)] for c in range(CONVERSATIONS)}
        every_id = {m["message_id"] for ms in messages.values() for m in ms}
        by_id = {m["message_id"]: m for ms in messages.values() for m in ms}
        acked: set[str] = set()

        # Wave 1: half the conversations, all their messages at once, all acknowledged before the kill.
        wave1 = [m for c in range(CONVERSATIONS // 2) for m in messages[c]]
        answers = await asyncio.gather(*(client.post(url, json=m) for m in wave1))
        for m, r in zip(wave1, answers, strict=True):
            assert r.status_code == 200, r.text
            assert r.json() == {"accepted": 1, "duplicates": 0}
            acked.add(m["message_id"])

        # Wave 2: the other half, at once; SIGKILL after a few of them are acknowledged.
        killed_at: float | None = None
        killed_wall = 0.0
        answered_at_kill: set[str] = set()
        errors: Counter[str] = Counter()
        other: list[tuple[str, int]] = []

        async def post_wave2(m: dict[str, Any]) -> None:
            nonlocal killed_at, killed_wall, answered_at_kill
            try:
                r = await client.post(url, json=m)
            except httpx.TransportError as exc:
                errors[type(exc).__name__] += 1
                return
            if r.status_code != 200:
                other.append((m["message_id"], r.status_code))
                return
            assert r.json() == {"accepted": 1, "duplicates": 0}
            acked.add(m["message_id"])
            if killed_at is None and len(acked) - len(wave1) >= KILL_AFTER_ACKS:
                first.popen.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                killed_wall = time.time()
                answered_at_kill = answered(fake)

        wave2 = [m for c in range(CONVERSATIONS // 2, CONVERSATIONS) for m in messages[c]]
        async with asyncio.timeout(30):
            await asyncio.gather(*(post_wave2(m) for m in wave2))
        assert killed_at is not None, "every webhook was answered before the kill"
        assert await first.wait(10) == -signal.SIGKILL
        assert not other, f"answers other than 200 before the kill: {other}"

        in_flight_at_kill = acked - answered_at_kill
        unacked = every_id - acked
        fully_acked = {c for c, ms in messages.items() if all(m["message_id"] in acked for m in ms)}
        waiting = {c for c in fully_acked if any(m["message_id"] in in_flight_at_kill for m in messages[c])}
        assert in_flight_at_kill, "no accepted message was waiting for its turn at the kill"
        assert unacked, "no webhook failed at the kill"
        assert waiting, "no fully acknowledged conversation had work left at the kill"
        assert sum(n for e, n in errors.items() if e != "ConnectError"), f"no webhook in flight at the kill: {errors}"

        # The leases the dead node left: (conversation id -> lease end, wall clock).
        leases = dead_leases(tmp_path / "data" / "switchboard.db", f":{port}")
        assert leases, "the killed node held no lease"

        # Restart; no webhook is sent until every acknowledged message is answered.
        new_port = port if restart_on == "same-port" else free_port()
        second = serve(new_port, 2)
        restarted = time.monotonic()
        ready_after = await wait_ready(second, f"http://127.0.0.1:{new_port}/readyz", 30)
        ready_wall = time.time()
        url = f"http://127.0.0.1:{new_port}/webhooks/myapp"
        try:
            await fake.wait_for(lambda: acked <= answered(fake), timeout=60)
        except AssertionError:
            missing = sorted(acked - answered(fake))
            pytest.fail(f"{len(missing)} acknowledged message(s) never answered, e.g. {missing[:5]}:\n{second.tail()}")
        all_acked_answered = time.monotonic()
        to_wall = time.time() - time.monotonic()
        first_call: dict[str, float] = {}
        for c in fake.calls:
            if c.at > restarted:
                first_call.setdefault(c.body["conversation_id"], c.at + to_wall)
        resumed_early = {cid for cid, until in leases.items() if cid in first_call and first_call[cid] < until}
        if restart_on == "other-port":
            # Another node id: a conversation is worked on only once the dead node's lease on it has expired.
            assert not {cid for cid in resumed_early if first_call[cid] < leases[cid] - 0.05}, {
                cid: (first_call[cid], leases[cid]) for cid in resumed_early
            }
        elif ready_wall < max(leases.values()) - 0.5:
            # The same node id: it takes its own leases back at once, without waiting for them to expire.
            assert resumed_early, "no conversation was resumed before the dead node's lease on it expired"
        after_restart = [c.at - restarted for c in fake.calls if c.path == "/messages" and c.at > restarted]
        reads_after_restart = [c.at - restarted for c in fake.calls if c.path == "/read" and c.at > restarted]

        # As a platform would: retry the webhooks that got no 200; each is answered once more at most.
        for mid in sorted(unacked):
            for _attempt in range(20):
                try:
                    r = await client.post(url, json=by_id[mid])
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
                    continue
                if r.status_code == 503:
                    await asyncio.sleep(0.2)
                    continue
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["accepted"] + body["duplicates"] == 1, body
                break
            else:
                pytest.fail(f"webhook {mid} never accepted after the restart")
        await fake.wait_for(lambda: every_id <= answered(fake), timeout=60)
        await asyncio.sleep(1.5)  # three sweeps: a late duplicate would show up now

        keys: dict[str, set[str]] = defaultdict(set)
        for call in fake.calls:
            assert call.path in ("/messages", "/typing", "/read"), call.path
            if call.path != "/messages":
                continue
            mid = call.body["reply_to"]
            assert mid in every_id, call.body
            assert call.body["conversation_id"] == by_id[mid]["conversation_id"], call.body
            assert call.body["text"] == f"re msg {mid}", call.body
            keys[mid].add(call.headers["idempotency-key"])
        twice = {mid: ks for mid, ks in keys.items() if len(ks) != 1}
        assert not twice, f"messages answered under more than one Idempotency-Key: {twice}"
        assert set(keys) == every_id
        assert len(fake.delivered()) == len(every_id)
        assert fake.bad_signatures == 0

        second.popen.send_signal(signal.SIGTERM)
        rc = await second.wait(30)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean exit.
        assert rc in (0, -signal.SIGTERM), f"exit code {rc} after SIGTERM:\n{second.tail()}"
        log = second.log.read_text()
        assert "Application shutdown complete" in log, second.tail()
        assert "Traceback" not in log, second.tail(200)

        repeats = sum(1 for c in fake.calls if c.path == "/messages" and c.repeat)
        print(
            f"\n[{restart_on}] acked before kill {len(acked)}/{len(every_id)}, answered at kill "
            f"{len(answered_at_kill)}, waiting at kill {len(in_flight_at_kill)}, webhook errors {dict(errors)}, "
            f"after restart: ready {ready_after:.2f}s, first read {min(reads_after_restart, default=-1):.2f}s, "
            f"first reply {min(after_restart, default=-1):.2f}s, "
            f"all acked answered {all_acked_answered - restarted:.2f}s after restart, "
            f"redelivered keys {repeats}, leases left {len(leases)}, lasting "
            f"{max(leases.values()) - killed_wall:.2f}s after the kill, resumed before expiry {len(resumed_early)}"
        )


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the running venv, as a fresh shell would have it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MYAPP_SECRET", "CONFIG")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(extra)
    return env


async def make_run_listening(make: Proc, within: float) -> None:
    """Wait until the server `make run` started says it listens on 127.0.0.1:8080.

    Its own log, not a 200 on the port, tells: another process may take the port while the
    clone installs. Skips if that happened (the server then cannot bind).
    """
    deadline = time.monotonic() + within
    while True:
        log = make.log.read_text(encoding="utf-8", errors="replace")
        if "switchboard ready" in log and "running on http://127.0.0.1:8080" in log:
            return
        if make.popen.poll() is not None:
            if "address already in use" in log:
                pytest.skip("port 8080 on 127.0.0.1 was taken by another process while `make run` installed")
            pytest.fail(f"make run exited with {make.popen.returncode}:\n{make.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"make run not listening after {within}s:\n{make.tail()}")
        await asyncio.sleep(0.2)


async def test_make_run_from_a_clean_clone(tmp_path: Path, procs: list[Proc]) -> None:
    for tool in ("git", "make"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not port_free(8080):
        pytest.skip("port 8080 on 127.0.0.1 is taken; `make run` serves there")
    clone = tmp_path / "clone"
    await asyncio.to_thread(subprocess.run, ["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=60)

    fake = FakePlatform()
    async with Server(fake.app()) as platform_server:
        env = clean_env(MYAPP_POST_URL=f"{platform_server.url}/messages")
        started = time.monotonic()
        make = Proc(["make", "run"], tmp_path / "make-run.log", cwd=clone, env=env)
        procs.append(make)
        await make_run_listening(make, 300)
        await wait_ready(make, "http://127.0.0.1:8080/healthz", 30)
        ready_in = time.monotonic() - started

        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(
                "http://127.0.0.1:8080/webhooks/myapp",
                json={
                    "message_id": "m-1",
                    "conversation_id": "c-1",
                    "sender": {"id": "u-1", "name": "Ana"},
                    "type": "text",
                    "text": "hello",
                    "payload": {},
                    "timestamp": "2026-11-28T01:00:00Z",
                },
            )
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 1, "duplicates": 0}
        await fake.wait_for(lambda: len(fake.delivered()) == 1, timeout=20)
        reply = fake.delivered()[0]
        assert reply.body["conversation_id"] == "c-1"
        assert reply.body["reply_to"] == "m-1"
        assert reply.body["text"].startswith("Hello Ana!"), reply.body
        assert reply.headers["idempotency-key"]
        assert (clone / "data" / "switchboard.db").exists(), "the default store is not SQLite under data/"

        # Ctrl-C as a terminal sends it: to the whole foreground process group (make and the server).
        os.killpg(make.pid, signal.SIGINT)
        rc = await make.wait(30)
        assert rc is not None, f"make run still running 30s after SIGINT:\n{make.tail()}"
        for _ in range(100):  # 10 s
            if not make.group_alive():
                break
            await asyncio.sleep(0.1)
        assert not make.group_alive(), f"the server outlived make after SIGINT:\n{make.tail()}"
        assert port_free(8080), "port 8080 still taken after SIGINT"
        log = make.tail(400)
        assert "Traceback" not in log, log
        print(f"\nmake run: ready {ready_in:.1f}s after start (clean clone: venv + install); make exited {rc}")


def test_chat_on_a_pipe() -> None:
    result = subprocess.run(
        [switchboard_command(), "chat"],
        input="hello\nhours\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    greeting = out.find("bot> Hello you! I'm the Switchboard demo bot. What can I do for you?")
    hours = out.find("bot> We are open Monday to Friday, 09:00-17:00 (Jakarta time).")
    assert greeting != -1, out
    assert hours > greeting, out
    assert "1. Opening hours" in out[greeting:hours], out
    assert "Traceback" not in result.stderr, result.stderr


async def test_chat_in_a_terminal(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    socket_name = f"sb-test-{os.getpid()}-{tmp_path.name}"

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", socket_name, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout

    async def screen_shows(text: str, within: float = 20) -> str:
        deadline = time.monotonic() + within
        while True:
            screen = tmux("capture-pane", "-p", "-t", "chat")
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"the terminal never showed {text!r}; it shows:\n{screen}")
            await asyncio.sleep(0.2)

    command = f"{switchboard_command()} chat; echo CHAT-EXITED=$?; sleep 60"
    tmux("new-session", "-d", "-s", "chat", "-x", "100", "-y", "30", "-c", str(REPO), command)
    try:
        await screen_shows("you>")
        tmux("send-keys", "-t", "chat", "hello", "Enter")
        await screen_shows("What can I do for you?")
        await screen_shows("3. Talk to a person")
        tmux("send-keys", "-t", "chat", "hours", "Enter")
        await screen_shows("We are open Monday to Friday")
        tmux("send-keys", "-t", "chat", "C-d")
        screen = await screen_shows("CHAT-EXITED=")
        assert "\nCHAT-EXITED=0" in screen, screen  # Ctrl-D ends the prompt's line
        print("\n--- tmux screen ---\n" + screen.rstrip() + "\n---")
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            tmux("kill-server")
