"""A soak at half capacity: two nodes on PostgreSQL take a steady stream of webhooks for
`SWITCHBOARD_SOAK_SECONDS` (600 in `make test-faults`; set it lower for a local run).

1. Capacity is measured first, in this run, on this machine: a burst of messages over many
   conversations, as fast as 64 senders can post them; capacity = messages answered per second.
2. The soak sends at half that rate, paced (open loop), round-robin over 300 conversations. Every
   `WINDOW` seconds it samples each node's resident memory (/proc), the backlog (/metrics), the
   webhook-ack-to-reply latency of the messages answered in the window, and CPU time (below).
3. Pass: memory flat (no growth trend over the second half beyond `RSS_SLOPE_MB_PER_MIN`, and the
   last window within `RSS_GROWTH` of the first after warm-up), work flat (the CPU the nodes and
   PostgreSQL spend per message in the last quarter within `CPU_GROWTH` of the first), latency flat
   (the last windows' p50 and p99 within a factor of the first ones'), and, once the load stops,
   backlog zero: every message answered once, `switchboard_backlog` 0 on both nodes, no outbox row
   pending.

On a machine shared with other work, latency says more about the neighbours than about
Switchboard: each window also measures the CPU that processes outside the test used (from
/proc/stat), and latency is judged only on windows where that stayed under `QUIET` of the machine;
if too few windows were quiet the latency check is reported as not judged (CPU per message, which
contention hardly moves, still is).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import Server
from tests.faults.cluster import Node, PrivatePostgres, metric, msg, no_tracebacks, percentile, start_nodes, write_flows

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("SWITCHBOARD_SOAK_SECONDS", "600"))
WINDOW = 10.0 if SOAK_SECONDS >= 120 else max(2.0, SOAK_SECONDS / 8)
CONVERSATIONS = 300
BURST = 2400
#: RSS may grow by at most this much per minute over the soak's second half (a leak shows as a trend)
RSS_SLOPE_MB_PER_MIN = 1.5
#: and the last window's RSS may exceed the first (after warm-up) by at most this share plus 8 MiB
RSS_GROWTH = 0.15
#: the share of the soak's windows counted as warm-up
WARM_UP = 0.3
#: a shorter soak does not get past the warm-up of bounded caches (the live-event hub keeps the last
#: 64 events of each conversation: ~2 minutes to fill at this rate), so its memory is shown, not judged
MEMORY_JUDGED_FROM = 300
#: CPU per message may grow by at most this share from the first quarter to the last
CPU_GROWTH = 0.3
#: a window is quiet when processes outside the test used less than this share of the machine's CPU
QUIET = 0.15


@dataclass
class CountingPlatform:
    """A platform that keeps only what the checks need: first arrival per reply, repeats, keys."""

    arrived: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    repeats: int = 0
    other_keys: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/messages", self._messages, methods=["POST"])])

    async def _messages(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        mid, key = body["reply_to"], request.headers["idempotency-key"]
        if mid in self.keys:
            if self.keys[mid] == key:
                self.repeats += 1
            else:
                self.other_keys += 1
        else:
            self.keys[mid] = key
            self.arrived[mid] = time.monotonic()
            self.changed.set()
        return JSONResponse({"ok": True})

    async def wait_for(self, ids: set[str], within: float) -> None:
        deadline = time.monotonic() + within
        while not ids <= self.arrived.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(ids - self.arrived.keys())
                raise AssertionError(f"{len(missing)} messages unanswered after {within}s, e.g. {missing[:5]}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))


def soak_config(root: Path, name: str, store: str, platform_url: str, flows: Path) -> Path:
    config = root / f"{name}.yaml"
    config.write_text(
        f"""\
store:
  url: "{store}"
flows: {flows}
node_id: {name}
reload: false
platforms:
  myapp:
    type: generic
    post_message_url: {platform_url}/messages
dispatch: {{lease_seconds: 10, sweep_seconds: 2, max_concurrency: 128}}
# half the capacity over 300 senders passes flood control's default sustained rate (1 a second
# each) once two nodes answer more than 600 messages a second: flooded messages are stored without
# a turn; the soak is about steady load, flood control is tested in tests/security/test_security.py
ingress: {{sender_per_second: null}}
"""
    )
    return config


async def test_soak_at_half_capacity_memory_and_latency_flat_backlog_zero(
    tmp_path: Path, pg: PrivatePostgres, nodes: list[Node], http: httpx.AsyncClient
) -> None:
    fake = CountingPlatform()
    async with Server(fake.app()) as server:
        store = pg.new_store()
        flows = write_flows(tmp_path, wait="5ms")
        for name in ("n1", "n2"):
            nodes.append(Node(name, soak_config(tmp_path, name, store, server.url, flows), tmp_path))
        await start_nodes(nodes)
        urls = [n.url for n in nodes]
        acked: dict[str, float] = {}
        failures: list[str] = []
        counter = 0

        async def post(m: dict[str, Any]) -> None:
            url = urls[hash(m["message_id"]) % len(urls)]
            for _ in range(50):
                try:
                    r = await http.post(f"{url}/webhooks/myapp", json=m)
                except httpx.TransportError as exc:
                    failures.append(type(exc).__name__)
                    await asyncio.sleep(0.1)
                    continue
                if r.status_code == 200:
                    acked[m["message_id"]] = time.monotonic()
                    return
                failures.append(str(r.status_code))
                await asyncio.sleep(0.2)
            raise AssertionError(f"{m['message_id']} never acknowledged")

        def next_message() -> dict[str, Any]:
            nonlocal counter
            c, n = counter % CONVERSATIONS, counter // CONVERSATIONS
            counter += 1
            return msg(c, n)

        # 1. capacity, in this run
        burst = [next_message() for _ in range(BURST)]
        gate = asyncio.Semaphore(64)

        async def gated(m: dict[str, Any]) -> None:
            async with gate:
                await post(m)

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(gated(m) for m in burst)), 120)
        await fake.wait_for({m["message_id"] for m in burst}, 120)
        capacity = BURST / (time.monotonic() - started)
        rate = capacity / 2
        await asyncio.sleep(3)

        # 2. the soak, paced at half capacity
        ours = CpuMeter([n.proc.pid for n in nodes if n.proc is not None] + [os.getpid()], pg.postmaster_pid())
        ours.start()
        samples: list[dict[str, Any]] = []
        in_flight: set[asyncio.Task[None]] = set()
        soak_started = time.monotonic()
        next_sample = soak_started + WINDOW
        seen = len(fake.arrived)
        sent_total = 0
        sent_before = 0
        while True:
            now = time.monotonic()
            elapsed = now - soak_started
            if elapsed >= SOAK_SECONDS:
                break
            due = int(elapsed * rate) - sent_total
            for _ in range(max(0, due)):
                m = next_message()
                task = asyncio.create_task(post(m))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent_total += 1
            if now >= next_sample:
                arrived = list(fake.arrived)[seen:]  # answered in this window
                seen += len(arrived)
                samples.append(
                    await sample(http, nodes, fake, acked, arrived, sent_total - sent_before, now - soak_started)
                    | ours.window(len(arrived))
                )
                sent_before = sent_total
                next_sample += WINDOW
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*in_flight), 60)
        soak_ids = set(acked)
        stopped = time.monotonic()

        # 3. backlog zero at the end
        await fake.wait_for(soak_ids, 60)
        drained_in = time.monotonic() - stopped
        await asyncio.sleep(3)
        backlog = {n.name: await metric(http, n, "switchboard_backlog") for n in nodes}
        pending = pg.query(store, "SELECT count(*) FROM outbox WHERE status = 'pending'")[0][0]
        unhandled = pg.query(store, "SELECT count(*) FROM inbox WHERE status = 'pending'")[0][0]
        assert backlog == {"n1": 0, "n2": 0}, backlog
        assert pending == 0 and unhandled == 0, (pending, unhandled)
        assert fake.other_keys == 0, "a message answered under two Idempotency-Keys"
        assert len(fake.arrived) == len(soak_ids)

        # memory flat, latency flat (judged after the warm-up: caches and the live-event hub's
        # per-conversation backlog fill during the first part of the soak)
        steady = samples[int(len(samples) * WARM_UP) :] or samples
        second_half = samples[len(samples) // 2 :]
        rss_checks = []
        for node in nodes:
            rss = [s["rss"][node.name] for s in steady]
            slope = _slope([s["at"] for s in second_half], [s["rss"][node.name] for s in second_half]) * 60
            rss_checks.append((node.name, rss[0], rss[-1], slope))
        quarter = max(1, len(steady) // 4)
        cpu_first = statistics.median(s["cpu_ms"] for s in steady[:quarter])
        cpu_last = statistics.median(s["cpu_ms"] for s in steady[-quarter:])
        quiet = [s for s in steady if s["others"] < QUIET]
        judged = len(quiet) >= max(2, len(steady) // 4)
        q = max(1, len(quiet) // 4)
        first, last = (quiet[:q], quiet[-q:]) if judged else (steady[:quarter], steady[-quarter:])
        p50_first = statistics.median(s["p50"] for s in first)
        p50_last = statistics.median(s["p50"] for s in last)
        p99_first = statistics.median(s["p99"] for s in first)
        p99_last = statistics.median(s["p99"] for s in last)
        table = "\n".join(
            f"  t={s['at']:6.0f}s  sent/s {s['rate']:6.1f}  p50 {s['p50'] * 1000:6.1f} ms"
            f"  p99 {s['p99'] * 1000:7.1f} ms  backlog {s['backlog']:5.0f}  cpu/msg {s['cpu_ms']:5.2f} ms"
            f"  others {s['others'] * 100:3.0f}%  RSS " + " ".join(f"{k} {v:.1f}" for k, v in s["rss"].items())
            for s in samples
        )
        report = "; ".join(
            f"{name} RSS {a:.0f}->{b:.0f} MiB (2nd-half slope {slope:+.2f} MiB/min)" for name, a, b, slope in rss_checks
        )
        print(
            f"\ncapacity {capacity:.0f} msg/s (burst of {BURST}, 2 nodes + PostgreSQL + this process on "
            f"{os.cpu_count()} cores); soak {SOAK_SECONDS:.0f}s at {rate:.0f} msg/s, {len(soak_ids) - BURST} "
            f"messages; drained {drained_in:.1f}s after the load stopped; p50 {p50_first * 1000:.1f} -> "
            f"{p50_last * 1000:.1f} ms, p99 {p99_first * 1000:.1f} -> {p99_last * 1000:.1f} ms "
            f"({len(quiet)} of {len(steady)} windows quiet{'' if judged else ': latency NOT judged, machine busy'}); "
            f"CPU per message {cpu_first:.2f} -> {cpu_last:.2f} ms; "
            f"{report}{'' if SOAK_SECONDS >= MEMORY_JUDGED_FROM else ' (memory NOT judged: soak too short)'}; "
            f"redelivered {fake.repeats}; non-200 answers {len(failures)}\n{table}"
        )
        for name, a, b, slope in rss_checks if SOAK_SECONDS >= MEMORY_JUDGED_FROM else ():
            assert slope < RSS_SLOPE_MB_PER_MIN, f"{name}: memory grows {slope:.2f} MiB/min"
            assert b <= a * (1 + RSS_GROWTH) + 8, f"{name}: RSS {a:.0f} -> {b:.0f} MiB"
        assert cpu_last <= cpu_first * (1 + CPU_GROWTH), f"CPU per message grew: {cpu_first:.2f} -> {cpu_last:.2f} ms"
        if judged:
            assert p50_last <= 2 * p50_first + 0.05, (p50_first, p50_last)
            assert p99_last <= 3 * p99_first + 0.1, (p99_first, p99_last)
            assert max(s["backlog"] for s in quiet) < rate * 5, "a backlog built up during the soak"
        no_tracebacks(nodes)


async def sample(
    http: httpx.AsyncClient,
    nodes: list[Node],
    fake: CountingPlatform,
    acked: dict[str, float],
    arrived: list[str],
    sent: int,
    at: float,
) -> dict[str, Any]:
    latency = [fake.arrived[m] - acked[m] for m in arrived if m in acked]
    backlog = 0.0
    for node in nodes:
        backlog += await metric(http, node, "switchboard_backlog")
    return {
        "at": at,
        "rate": sent / WINDOW,
        "p50": percentile(latency, 50),
        "p99": percentile(latency, 99),
        "backlog": backlog,
        "rss": {n.name: n.rss_mb() for n in nodes},
    }


class CpuMeter:
    """CPU time of the test's own processes (the nodes, PostgreSQL's, this one) against the machine's."""

    def __init__(self, pids: list[int], postmaster: int | None) -> None:
        self.pids = pids
        self.postmaster = postmaster
        self.last = (0, 0, 0)
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.last = self._read()

    def _ticks(self, pid: int) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime

    def _tree(self) -> list[int]:
        pids = list(self.pids)
        if self.postmaster is not None:
            pids.append(self.postmaster)
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, IndexError, ValueError):
                        continue
                    if ppid == self.postmaster:
                        pids.append(int(entry.name))
        return pids

    def _read(self) -> tuple[int, int, int]:
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in cpu]
        idle = values[3] + values[4]
        total = sum(values[:8])
        return total, total - idle, sum(map(self._ticks, self._tree()))

    def window(self, messages: int) -> dict[str, float]:
        now = self._read()
        total, busy, ours = (now[i] - self.last[i] for i in range(3))
        ours = max(0, ours)  # a PostgreSQL backend that exited took its ticks along
        self.last = now
        return {
            "cpu_ms": ours / self.hz * 1000 / max(1, messages),
            "others": max(0.0, busy - ours) / max(1, total),
        }


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0
