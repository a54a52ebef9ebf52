"""The `nodes` scenario: one `switchboard serve` node, then two, on one PostgreSQL database, same load.

Three phases, each on a fresh scratch database with fresh nodes: `_1` one node, `_2` two nodes, `_2d`
two nodes with the conversations divided between them. The load is two wrk processes of
connections/2 each in every phase: with one node both target it, with two nodes one each, so the
load generator's shape and cost are the same and only the nodes change. In `_1` and `_2` both wrk
processes cycle over the same conversations (no sticky sessions: one conversation's messages reach
both nodes, so leases, cross-node wake-ups and the dedupe are all exercised); in `_2d` each keeps to
its own half of them, as a load balancer routing by conversation would. Message ids differ per wrk.
While the window runs, the nodes' PostgreSQL connections are polled every 0.1 s (`pg_running`,
`pg_lock_wait`, `pg_io_wait`, `pg_idle_in_tx`: backends in each state, on average) to show whether
PostgreSQL works, waits for locks or I/O, or waits for the node inside a transaction.

Nothing is pinned in this scenario (the nodes, wrk and the fake may use every core): PostgreSQL is a
shared server the bench does not pin, and with two cores any pinning of two nodes + PostgreSQL + wrk
would decide the answer by itself. Instead the CPU of every process is measured over the window:
each node, PostgreSQL's backends for the scratch database (`pg_cpu`) and all its processes
(`pg_cpu_all`), the wrk processes, the fake, and the whole machine (`machine_busy`, in cores: what
is left after ours is other people's work on the shared machine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from bench import loadgen
from bench.procs import ALL_CORES, Proc, busy_cores, cpu_seconds, running
from bench.scenarios import (
    Metrics,
    Options,
    fetch_arrivals,
    first_arrivals,
    reset_fake,
    start_fake,
    start_service,
)
from bench.stores import ACTIVITY, PgProbe, StoreSpec, scratch

LOADS = 2  # wrk processes, in every phase
#: figure suffix -> (nodes, whether the two wrk processes split the conversations between them)
PHASES = {"1": (1, False), "2": (2, False), "2d": (2, True)}


def measure(opts: Options) -> Metrics:
    pg = replace(opts, store=StoreSpec("postgresql", opts.store.pg_admin))
    fake, fake_base = start_fake(pg, core=None)
    out: Metrics = {}
    with running([fake]):
        for suffix, (count, split) in PHASES.items():
            figures = phase(pg, fake, fake_base, count, split)
            out |= {f"{k}_{suffix}": v for k, v in figures.items()}
    one = out["replies_s_1"]
    out["scaling"] = out["replies_s_2"] / one if one > 0 else float("nan")
    out["scaling_split"] = out["replies_s_2d"] / one if one > 0 else float("nan")
    out["duplicate_replies"] = sum(out[f"duplicate_replies_{suffix}"] for suffix in PHASES)
    out["cores"] = float(len(ALL_CORES))
    return out


def phase(opts: Options, fake: Proc, fake_base: str, count: int, split: bool) -> Metrics:
    """`count` nodes on a fresh database; replies/s at the fake and CPU by process over the window.

    With `split`, each wrk process keeps to its own half of the conversations (as a load balancer with
    sticky sessions by conversation would): no conversation gets messages at both nodes.
    """
    with scratch(opts.store, opts.workdir / f"store-{count}{'d' if split else ''}") as store:
        nodes: list[Proc] = []
        urls: list[str] = []
        with running(nodes):
            for _ in range(count):  # one after the other: the first creates the tables
                node, url = start_service(opts, fake_base, store, core=None)
                nodes.append(node)
                urls.append(url)
            probe = PgProbe(store)
            try:
                return window(opts, nodes, urls, fake, fake_base, probe, split)
            finally:
                probe.close()


def window(
    opts: Options,
    nodes: Sequence[Proc],
    urls: Sequence[str],
    fake: Proc,
    fake_base: str,
    probe: PgProbe,
    split: bool,
) -> Metrics:
    reset_fake(fake_base)
    spec = replace(opts.load, connections=max(1, opts.load.connections // LOADS))
    half = max(1, opts.load.conversations // LOADS)
    specs = [replace(spec, conversations=half, offset=i * half) if split else spec for i in range(LOADS)]
    # a second past the window, so the wrk processes are still running (and measurable) at its end
    seconds = opts.warmup + opts.seconds + 1
    launched = time.monotonic()
    wrks = [
        loadgen.start(specs[i], urls[i % len(urls)], seconds, prefix=f"n{len(urls)}{chr(97 + i)}", core=None)
        for i in range(LOADS)
    ]
    pids = {"node": [n.popen.pid for n in nodes], "wrk": [w.pid for w in wrks], "fake": [fake.popen.pid]}
    time.sleep(max(0.0, launched + opts.warmup - time.monotonic()))
    cpu0 = {name: [cpu_seconds(p) for p in group] for name, group in pids.items()}
    pg0, (busy0, start) = probe.sample(), busy_cores()
    activity = dict.fromkeys(ACTIVITY, 0.0)
    polls = 0
    while time.monotonic() < start + opts.seconds - 0.1:  # what the nodes' connections are doing
        for kind, n in probe.activity().items():
            activity[kind] += n
        polls += 1
        time.sleep(0.1)
    time.sleep(max(0.0, start + opts.seconds - time.monotonic()))
    busy1, end = busy_cores()
    pg1 = probe.sample()
    cpu1 = {name: [cpu_seconds(p) for p in group] for name, group in pids.items()}
    elapsed = end - start
    results = [loadgen.finish(w, seconds) for w in wrks]
    arrivals = fetch_arrivals(fake_base)
    replies = sum(1 for _, at in arrivals if start <= at < end)
    _, repeats = first_arrivals(arrivals)
    cpu = {name: sum(b - a for a, b in zip(cpu0[name], cpu1[name], strict=True)) / elapsed for name in pids}
    ours = sum(cpu.values())
    metrics: Metrics = {
        "replies_s": replies / elapsed,
        "ack_s": sum(r.ok_per_s for r in results),
        "ack_p99_ms": max(r.p99_ms for r in results),
        "ack_non_2xx": float(sum(r.non_2xx for r in results)),
        "duplicate_replies": float(repeats),
        "node_cpu": cpu["node"],
        "node_cpu_max": max((b - a) / elapsed for a, b in zip(cpu0["node"], cpu1["node"], strict=True)),
        "wrk_cpu": cpu["wrk"],
        "fake_cpu": cpu["fake"],
        "machine_busy": (busy1 - busy0) / elapsed,
        "node_ms_per_reply": cpu["node"] * 1000 / (replies / elapsed) if replies else float("nan"),
    }
    metrics |= probe.figures(pg0, pg1, elapsed, float(replies))
    metrics |= {kind: total / max(1, polls) for kind, total in activity.items()}
    metrics["other_cpu"] = metrics["machine_busy"] - ours - metrics["pg_cpu_all"]
    return metrics
