"""The `memory` scenario: what 100,000 stored conversations cost, on disk and in the service's memory.

One service (on `--store`, pinned as in `ingest`, with the default flood control: every conversation
here has a sender of its own, so each one gets a flood bucket, as in production) takes
`--memory-conversations` new conversations, each one message answered by one turn and one reply,
in `--memory-steps` equal steps. A step is wrk with `bench/fresh.lua` (a new conversation id and
sender per request, stopped once the step's count is stored) and then the drain: waiting until the
fake platform has a reply for every stored message. After a warm-up step of its own, and after every
step, the service's VmRSS is read from /proc; at the end the store's size (SQLite: file + WAL + shm;
PostgreSQL: `pg_total_relation_size` of every table, indexes and TOAST included).

Per-conversation figures are the growth from the warm-up to the end over the conversations stored in
between; `rss_slope_bytes_per_conv` takes the growth from the first step's end to the last's, so the
allocator's first growth (and the backlog's peak during a step) weigh less. The `*_per_100k`
figures are those per-conversation figures times 100,000: a linear extrapolation when fewer
conversations were stored (20,000 by default, to keep a run short).
"""

from __future__ import annotations

import json
import signal
import time

from bench import loadgen
from bench.procs import LOAD_CORE, OPENER, BenchError, Proc, memory_kib, running
from bench.scenarios import Metrics, Options, Skipped, start_fake, start_service
from bench.stores import Scratch, count_rows, scratch, store_bytes

#: the longest one step's wrk may run, and the longest the drain may go without a new reply
STEP_SECONDS = 600
STALL_SECONDS = 60.0
MIB = 1024 * 1024


def measure(opts: Options) -> Metrics:
    if opts.load.tool != "wrk":
        raise Skipped("the memory scenario needs wrk (bench/fresh.lua)")
    steps = max(1, opts.memory_steps)
    per_step = max(1, opts.memory_conversations // steps)
    warm = max(100, min(1000, per_step // 5))
    fake, fake_base = start_fake(opts)
    with running([fake]), scratch(opts.store, opts.workdir / "store") as store:
        server, url = start_service(opts, fake_base, store, flood_control=opts.memory_flood)
        with running([server]):
            fill(opts, store, server, url, fake_base, "w", warm)
            base_rows = count_rows(store, "conversation")
            base_bytes = store_bytes(store)
            base_rss = rss_mib(server)
            started = time.monotonic()
            step_rss: list[float] = []
            for step in range(steps):
                fill(opts, store, server, url, fake_base, f"k{step}", per_step)
                step_rss.append(rss_mib(server))
            elapsed = time.monotonic() - started
            end_bytes = store_bytes(store)
            conversations = count_rows(store, "conversation") - base_rows
            hwm = memory_kib(server.popen.pid).get("VmHWM", float("nan")) / 1024
            rows = {f"rows_{t}": float(count_rows(store, t)) for t in ("inbox", "outbox", "conversation")}
    if conversations <= 0:
        raise BenchError("no conversation was stored")
    return figures(conversations, elapsed, base_bytes, end_bytes, base_rss, step_rss, hwm) | rows


def figures(
    conversations: int,
    elapsed: float,
    base_bytes: dict[str, float],
    end_bytes: dict[str, float],
    base_rss: float,
    step_rss: list[float],
    hwm: float,
) -> Metrics:
    grown = {name: end_bytes[name] - base_bytes.get(name, 0.0) for name in end_bytes if name != "sqlite_shm_bytes"}
    # tables that did not grow (agent, timer, ...) say nothing per conversation
    per_conv = {f"{name}_per_conv": size / conversations for name, size in grown.items() if size > 0}
    per_conv.setdefault("store_bytes_per_conv", 0.0)
    rss_growth = (step_rss[-1] - base_rss) * MIB / conversations
    slope = (
        (step_rss[-1] - step_rss[0]) * MIB / (conversations * (len(step_rss) - 1) / len(step_rss))
        if len(step_rss) > 1
        else rss_growth
    )
    out: Metrics = {
        "conversations": float(conversations),
        "conversations_s": conversations / elapsed,
        **per_conv,
        "store_mib_per_100k": per_conv["store_bytes_per_conv"] * 100_000 / MIB,
        "store_mib_end": end_bytes["store_bytes"] / MIB,
        "rss_base_mib": base_rss,
        **{f"rss_step{i + 1}_mib": v for i, v in enumerate(step_rss)},
        "rss_end_mib": step_rss[-1],
        "rss_hwm_mib": hwm,
        "rss_bytes_per_conv": rss_growth,
        "rss_slope_bytes_per_conv": slope,
        "rss_mib_per_100k": slope * 100_000 / MIB,
    }
    for name in ("sqlite_db_bytes", "sqlite_wal_bytes"):
        if name in end_bytes:
            out[name.replace("_bytes", "_mib_end")] = end_bytes[name] / MIB
    return out


def rss_mib(server: Proc) -> float:
    time.sleep(1.0)  # let the last turn's garbage go
    rss = memory_kib(server.popen.pid).get("VmRSS")
    if rss is None:
        raise BenchError(f"the service is gone:\n{server.tail()}")
    return rss / 1024


def fill(opts: Options, store: Scratch, server: Proc, url: str, fake_base: str, prefix: str, target: int) -> None:
    """`target` new conversations stored (wrk stopped once they are), then every stored message answered."""
    before = count_rows(store, "inbox")
    cmd = loadgen.fresh_command(url, opts.load.connections, STEP_SECONDS, prefix, target)
    wrk = loadgen.spawn(cmd, LOAD_CORE)
    try:
        while wrk.poll() is None and count_rows(store, "inbox") - before < target:
            if server.popen.poll() is not None:
                raise BenchError(f"the service exited with {server.popen.returncode}:\n{server.tail()}")
            time.sleep(0.5)
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)  # wrk prints its summary and exits
        loadgen.finish(wrk, STEP_SECONDS)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait(5)
    drain(store, server, fake_base)


def drain(store: Scratch, server: Proc, fake_base: str) -> None:
    """Wait until the fake has a reply for every message in the store; fail if replies stop coming."""
    stored = count_rows(store, "inbox")
    last, progress = -1, time.monotonic()
    while True:
        answered = replies(fake_base)
        if answered >= stored:
            return
        now = time.monotonic()
        if answered != last:
            last, progress = answered, now
        elif now - progress > STALL_SECONDS:
            raise BenchError(f"replies stalled at {answered} of {stored} stored messages:\n{server.tail()}")
        time.sleep(0.5)


def replies(fake_base: str) -> int:
    with OPENER.open(f"{fake_base}/count", timeout=30) as resp:
        return int(json.loads(resp.read())["distinct"])


__all__ = ["measure"]
