"""What the fault tests stand on: a private PostgreSQL they may stop and start, Switchboard nodes as
real `switchboard serve` processes, a platform's retrying sender, and checks on what the fake
platform received. Everything listens on 127.0.0.1; every wait is bounded.

The private PostgreSQL (`PrivatePostgres`) is initdb'd into a temporary folder from the server
binaries under /usr/lib/postgresql/*/bin and runs on a free port, as the `postgres` user when the
tests run as root (initdb refuses root). The machine's own cluster on 5432 is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import shutil
import signal
import subprocess
import textwrap
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import free_port
from tests.fakes.platform import Call, FakePlatform
from tests.procs import Proc, switchboard_command, wait_ready

# -- a private PostgreSQL ---------------------------------------------------------------------------


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL server of the tests' own, in `root`, on a free port of 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (.ci/run installs them)")
        self.bin = bin_dir
        self.root = root
        self.data = root / "data"
        self.sock = root / "sock"
        self.log = root / "pg.log"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        self.starts = 0

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
            os.chmod(self.root, 0o755)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=64MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start")
        self.starts += 1

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_store(self) -> str:
        """A store URL on a fresh schema."""
        schema = f"f_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return f"{self.dsn()}?options=-csearch_path%3D{schema}"

    def query(self, store_url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        dsn = store_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            return list(conn.execute(sql, params).fetchall())

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


# -- Switchboard nodes as processes -------------------------------------------------------------------

ECHO_FLOW = """\
flow: echo
states:
  start:
    routes:
      - do: [{wait: %s}, {reply: "re {{ message.text }}"}]
"""


def write_flows(root: Path, wait: str = "50ms", text: str | None = None) -> Path:
    flows = root / "flows"
    flows.mkdir(exist_ok=True)
    (flows / "echo.yaml").write_text(text if text is not None else ECHO_FLOW % wait)
    return flows


def node_config(
    root: Path, name: str, store_url: str, platform_url: str, flows: Path, extra: str = "", dispatch: str = ""
) -> Path:
    config = root / f"{name}.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            store:
              url: "{store_url}"
            flows: {flows}
            node_id: {name}
            reload: false
            platforms:
              myapp:
                type: generic
                post_message_url: {platform_url}/messages
                typing_url: {platform_url}/typing
                read_url: {platform_url}/read
            dispatch: {{{dispatch or "lease_seconds: 4, sweep_seconds: 0.5"}}}
            admin: {{token: fault-token}}
            """
        )
        + textwrap.dedent(extra)
    )
    return config


@dataclass
class Node:
    name: str
    config: Path
    root: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    runs: int = 0
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proc:
        self.runs += 1
        self.proc = Proc(
            [switchboard_command(), "serve", "--config", str(self.config), "--port", str(self.port)],
            self.root / f"{self.name}-{self.runs}.log",
            cwd=self.root,
        )
        self.procs.append(self.proc)
        return self.proc

    async def ready(self, within: float = 60) -> float:
        assert self.proc is not None
        return await wait_ready(self.proc, f"{self.url}/readyz", within)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.popen.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the node's process, MiB (from /proc)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def log_text(self) -> str:
        return "\n".join(p.log.read_text(errors="replace") for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.close()


def add_nodes(
    nodes: list[Node],
    root: Path,
    names: Iterable[str],
    store_url: str,
    platform_url: str,
    flows: Path,
    *,
    extra: str = "",
    dispatch: str = "",
) -> None:
    """A config (`node_config`) and a `Node` for each name, appended to `nodes` (the fixture stops them)."""
    for name in names:
        nodes.append(Node(name, node_config(root, name, store_url, platform_url, flows, extra, dispatch), root))


async def start_nodes(nodes: Iterable[Node], within: float = 90) -> list[float]:
    nodes = list(nodes)
    for node in nodes:
        node.start()
    return list(await asyncio.gather(*(node.ready(within) for node in nodes)))


async def metric(client: httpx.AsyncClient, node: Node, name: str) -> float:
    """The sum of a Prometheus metric's samples on one node."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(f"{node.url}/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


# -- a platform's sender: retries on 503 (after Retry-After) and on connection errors ---------------


@dataclass
class Sender:
    """Posts webhooks to the nodes as a platform would: a 503 (with Retry-After) or a refused
    connection is retried (at another node when there are several) until it is acknowledged."""

    client: httpx.AsyncClient
    urls: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    #: message id -> answers (200 bodies)
    acks: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    #: message id -> monotonic time of its first 200
    acked_at: dict[str, float] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    #: 503 answers without a Retry-After header (must stay 0)
    bare_503: int = 0
    #: retry-after cap, seconds (the test's patience, not the platform's)
    retry_cap: float = 1.0

    async def post(self, message: dict[str, Any], url: str | None = None, within: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + within
        target = url
        while True:
            base = target or self.rng.choice(self.urls)
            try:
                r = await self.client.post(f"{base}/webhooks/myapp", json=message)
            except httpx.TransportError as exc:
                self.statuses[type(exc).__name__] += 1
                target = None
                await asyncio.sleep(0.05)
            else:
                self.statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    body: dict[str, Any] = r.json()
                    self.acks[message["message_id"]].append(body)
                    self.acked_at.setdefault(message["message_id"], time.monotonic())
                    return body
                assert r.status_code == 503, f"{r.status_code}: {r.text}"
                if "retry-after" not in r.headers:
                    self.bare_503 += 1
                target = None
                await asyncio.sleep(min(self.retry_cap, float(r.headers.get("retry-after", "1"))))
            if time.monotonic() > deadline:
                raise AssertionError(f"{message['message_id']} never acknowledged within {within}s: {self.statuses}")

    def accepted_once(self) -> dict[str, int]:
        """Per message id: how many 200s said `accepted` (the rest said `duplicate`)."""
        return {mid: sum(b["accepted"] for b in bodies) for mid, bodies in self.acks.items()}


def msg(conversation: int, n: int, text: str | None = None) -> dict[str, Any]:
    mid = f"m-{conversation:03d}-{n:03d}"
    return {
        "message_id": mid,
        "conversation_id": f"c-{conversation:03d}",
        "sender": {"id": f"u-{conversation:03d}", "name": "Ana"},
        "type": "text",
        "text": text if text is not None else f"msg {mid}",
    }


# -- what the platform received -------------------------------------------------------------------------


def replies(fake: FakePlatform) -> list[Call]:
    return fake.delivered()


def answered(fake: FakePlatform) -> set[str]:
    return {c.body["reply_to"] for c in fake.delivered()}


@dataclass
class Verdict:
    replies: int
    repeats: int
    per_conversation: dict[str, list[str]]


def check_exactly_once_in_order(fake: FakePlatform, sent: dict[str, list[str]], prefix: str = "re msg ") -> Verdict:
    """Each sent message answered by exactly one Idempotency-Key (a repeat of that key is a
    redelivery, allowed), with the right text, and per conversation in the order sent."""
    keys: dict[str, set[str]] = defaultdict(set)
    for call in fake.calls:
        if call.path != "/messages":
            continue
        mid = call.body["reply_to"]
        keys[mid].add(call.headers["idempotency-key"])
        assert call.body["text"] == f"{prefix}{mid}", call.body
    every = {m for ms in sent.values() for m in ms}
    missing = sorted(every - set(keys))
    assert not missing, f"{len(missing)} acknowledged messages never answered, e.g. {missing[:5]}"
    twice = {m: k for m, k in keys.items() if len(k) != 1}
    assert not twice, f"answered under more than one Idempotency-Key: {dict(list(twice.items())[:5])}"
    assert set(keys) == every, f"replies to messages never sent: {sorted(set(keys) - every)[:5]}"
    per: dict[str, list[str]] = defaultdict(list)
    for call in fake.delivered():
        per[call.body["conversation_id"]].append(call.body["reply_to"])
    for conversation, ids in sent.items():
        assert per[conversation] == ids, f"{conversation}: replies {per[conversation]} != sent {ids}"
    repeats = sum(1 for c in fake.calls if c.path == "/messages" and c.repeat)
    return Verdict(len(fake.delivered()), repeats, dict(per))


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def no_tracebacks(nodes: Iterable[Node]) -> None:
    for node in nodes:
        text = node.log_text()
        assert "Traceback" not in text, f"{node.name} logged a traceback:\n{text[-4000:]}"


__all__ = [
    "ECHO_FLOW",
    "Node",
    "PrivatePostgres",
    "Sender",
    "Verdict",
    "answered",
    "check_exactly_once_in_order",
    "metric",
    "msg",
    "no_tracebacks",
    "node_config",
    "percentile",
    "replies",
    "start_nodes",
    "write_flows",
]
