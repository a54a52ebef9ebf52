"""The scenarios: each starts its processes on 127.0.0.1, measures, stops them, and returns its figures.

Figures are plain floats keyed by name; `HEADLINE` names the one each scenario is judged by, reported as a
ratio to the bare endpoint's req/s of the same repeat.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import aio, loadgen
from bench.loadgen import LoadResult, LoadSpec
from bench.paced import Pace, PacedResult, send_paced
from bench.procs import LOAD_CORE, OPENER, SERVER_CORE, BenchError, Proc, busy_cores, free_port, running
from bench.stats import percentile
from bench.stores import PgProbe, Scratch, StoreSpec, scratch

REPO = Path(__file__).resolve().parent.parent
PLATFORM = "bench"
FLOW = """\
flow: bench
states:
  start:
    routes:
      - do:
          - reply: "echo {{ message.text }}"
"""

Metrics = dict[str, float]


class Skipped(Exception):
    """A scenario that cannot run here (the service's CLI is missing); the message says why."""


@dataclass(frozen=True)
class Options:
    seconds: int
    warmup: int
    load: LoadSpec
    workdir: Path
    switchboard: Path | None
    log_level: str = "warning"
    #: the longest the paced run waits for the last replies after it stops sending
    drain: float = 10.0
    #: paced webhooks/s; None means half the saturated replies/s
    paced_rate: float | None = None
    #: the service's store in `ingest`, `roundtrip` and `memory` (`nodes` is on PostgreSQL always)
    store: StoreSpec = field(default_factory=StoreSpec)
    #: conversations the memory scenario creates, in `memory_steps` equal steps
    memory_conversations: int = 20_000
    memory_steps: int = 4
    #: the memory scenario's service keeps the default flood control (a bucket per sender)
    memory_flood: bool = True


# -- processes ---------------------------------------------------------------------------------------


def find_switchboard(explicit: Path | None = None) -> Path | None:
    """The `switchboard` entry point: --switchboard, beside this Python, the repo's .venv, or PATH."""
    if explicit is not None:
        return explicit if explicit.is_file() else None
    found = shutil.which("switchboard")
    candidates = [Path(sys.executable).parent / "switchboard", REPO / ".venv/bin/switchboard"]
    for path in [*candidates, Path(found) if found else None]:
        if path is not None and path.is_file():
            return path
    return None


def start_bare(opts: Options) -> tuple[Proc, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "bench.bare:app", "--app-dir", str(REPO),
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
        "--loop", "uvloop", "--http", "httptools",
    ]  # fmt: skip
    proc = Proc.start("bare", cmd, SERVER_CORE, opts.workdir / f"bare-{port}.log", cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{base}/healthz")
    return proc, f"{base}/webhooks/{PLATFORM}"


def start_fake(opts: Options, core: int | None = LOAD_CORE) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.fake_platform", "--port", str(port)]
    proc = Proc.start("fake platform", cmd, core, opts.workdir / f"fake-{port}.log", cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{base}/healthz")
    return proc, base


def write_service_files(
    folder: Path, fake_base: str, store_url: str, flood_control: bool = False, extra: str = ""
) -> Path:
    """The store's URL, the one-state echo flow and a generic platform pointing at the fake;
    `extra`: more top-level YAML."""
    flows = folder / "flows"
    flows.mkdir(parents=True)
    (flows / "bench.yaml").write_text(FLOW)
    config = folder / "switchboard.yaml"
    config.write_text(
        "store:\n"
        f"  url: {json.dumps(store_url)}\n"
        f"flows: {json.dumps(str(flows))}\n"
        # the load generator is a few senders at thousands of messages a second: no flood control
        # (unless every message comes from a sender of its own, as in the memory scenario)
        + ("" if flood_control else "ingress:\n  sender_per_second: null\n")
        + "platforms:\n"
        f"  {PLATFORM}:\n"
        "    type: generic\n"
        f"    post_message_url: {json.dumps(fake_base + '/messages')}\n" + extra
    )
    return config


def start_service(
    opts: Options,
    fake_base: str,
    store: Scratch,
    core: int | None = SERVER_CORE,
    flood_control: bool = False,
) -> tuple[Proc, str]:
    if opts.switchboard is None:
        raise Skipped("no `switchboard` command (or --switchboard is not a file): `make run` installs it")
    port = free_port()
    folder = opts.workdir / f"service-{port}"
    config = write_service_files(folder, fake_base, store.url, flood_control)
    cmd = [
        str(opts.switchboard), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--log-level", opts.log_level,
    ]  # fmt: skip
    proc = Proc.start("switchboard", cmd, core, folder / "serve.log", cwd=folder)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{base}/readyz", timeout=60)
    return proc, f"{base}/webhooks/{PLATFORM}"


# -- the fake platform's record ----------------------------------------------------------------------


def fetch_arrivals(fake_base: str) -> list[tuple[str, float]]:
    with OPENER.open(f"{fake_base}/arrivals", timeout=30) as resp:
        data = json.loads(resp.read())
    return [(str(reply_to), float(at)) for reply_to, at in data["arrivals"]]


def reset_fake(fake_base: str) -> None:
    with OPENER.open(f"{fake_base}/reset", data=b"", timeout=10) as resp:
        resp.read()


def first_arrivals(arrivals: list[tuple[str, float]]) -> tuple[dict[str, float], int]:
    """reply_to -> first arrival, and how many arrivals repeated a reply_to already seen."""
    first: dict[str, float] = {}
    repeats = 0
    for reply_to, at in arrivals:
        if reply_to in first:
            repeats += 1
        else:
            first[reply_to] = at
    return first, repeats


# -- measurements ------------------------------------------------------------------------------------


def closed_loop(opts: Options, server: Proc, url: str, probe: PgProbe | None = None) -> Metrics:
    """A warm-up run, then the measured run; CPU of the server (and PostgreSQL) over the measured run."""
    if opts.warmup > 0:
        loadgen.run(opts.load, url, opts.warmup, prefix="w")
    pg0 = probe.sample() if probe else None
    (busy0, t0), cpu0 = busy_cores(), server.cpu_seconds()
    result = loadgen.run(opts.load, url, opts.seconds, prefix="m")
    busy1, t1 = busy_cores()
    elapsed = t1 - t0
    cpu = (server.cpu_seconds() - cpu0) / elapsed
    metrics = {**load_metrics(result), "server_cpu": cpu, "machine_busy": (busy1 - busy0) / elapsed}
    if probe and pg0:
        metrics |= probe.figures(pg0, probe.sample(), elapsed, result.ok_per_s * elapsed)
    return metrics


def load_metrics(result: LoadResult) -> Metrics:
    return {
        "req_s": result.ok_per_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "non_2xx": float(result.non_2xx),
        "errors": float(result.errors),
    }


def saturate(opts: Options, server: Proc, url: str, fake_base: str, probe: PgProbe | None = None) -> Metrics:
    """Unthrottled webhooks for warmup + seconds; replies counted at the fake after the warm-up."""
    reset_fake(fake_base)
    launched = time.monotonic()
    proc = loadgen.start(opts.load, url, opts.warmup + opts.seconds, prefix="s")
    time.sleep(opts.warmup)
    pg0 = probe.sample() if probe else None
    (busy0, window_start), cpu0 = busy_cores(), server.cpu_seconds()
    time.sleep(max(0.0, launched + opts.warmup + opts.seconds - time.monotonic()))
    busy1, now = busy_cores()
    elapsed = now - window_start
    cpu = (server.cpu_seconds() - cpu0) / elapsed
    pg1 = probe.sample() if probe else None
    result = loadgen.finish(proc, opts.warmup + opts.seconds)
    window_end = window_start + opts.seconds
    arrivals = fetch_arrivals(fake_base)
    in_window = sum(1 for _, at in arrivals if window_start <= at < window_end)
    _, repeats = first_arrivals(arrivals)
    metrics = {
        "replies_s": in_window / opts.seconds,
        "ack_s": result.ok_per_s,
        "ack_p99_ms": result.p99_ms,
        "ack_non_2xx": float(result.non_2xx),
        "duplicate_replies": float(repeats),
        "server_cpu": cpu,
        "machine_busy": (busy1 - busy0) / elapsed,
    }
    if probe and pg0 and pg1:
        metrics |= probe.figures(pg0, pg1, elapsed, in_window * elapsed / opts.seconds)
    return metrics


def paced(opts: Options, url: str, fake_base: str, rate: float) -> Metrics:
    """Webhooks at `rate`/s; latency from each send to its reply's arrival at the fake."""
    reset_fake(fake_base)
    pace = Pace(rate=rate, warmup=opts.warmup, seconds=opts.seconds, conversations=opts.load.conversations)
    sent = aio.run(send_paced(url, pace))
    first = wait_for_replies(fake_base, set(sent.sent_at), opts.drain)
    return paced_metrics(sent, first, rate)


def wait_for_replies(fake_base: str, ids: set[str], drain: float) -> dict[str, float]:
    deadline = time.monotonic() + drain
    while True:
        first, _ = first_arrivals(fetch_arrivals(fake_base))
        if ids <= first.keys() or time.monotonic() >= deadline:
            return first
        time.sleep(0.2)


def paced_metrics(sent: PacedResult, first: dict[str, float], rate: float) -> Metrics:
    latencies = [first[mid] - at for mid, at in sent.sent_at.items() if mid in first]
    total = len(sent.sent_at)
    ok = sum(n for status, n in sent.statuses.items() if 200 <= status < 300)
    return {
        "paced_rate": rate,
        "paced_achieved": sent.achieved_rate(rate),
        "paced_lag_max_ms": sent.max_lag * 1000,
        "e2e_p50_ms": percentile(latencies, 50) * 1000,
        "e2e_p99_ms": percentile(latencies, 99) * 1000,
        "e2e_max_ms": max(latencies, default=math.nan) * 1000,
        "delivered": len(latencies) / total if total else math.nan,
        "paced_ack_p50_ms": percentile(sent.acks, 50) * 1000,
        "paced_ack_p99_ms": percentile(sent.acks, 99) * 1000,
        "paced_non_2xx": float(total - ok),
    }


# -- scenarios ---------------------------------------------------------------------------------------


def bare(opts: Options) -> Metrics:
    server, url = start_bare(opts)
    with running([server]):
        metrics = closed_loop(opts, server, url)
    # the time one request costs at saturation, next to the engine scenario's time per turn
    return {**metrics, "us_per_req": 1e6 / metrics["req_s"] if metrics["req_s"] > 0 else math.nan}


@contextlib.contextmanager
def probing(store: Scratch) -> Iterator[PgProbe | None]:
    """A PostgreSQL probe on the phase's scratch database; None on SQLite."""
    if store.kind != "postgresql":
        yield None
        return
    probe = PgProbe(store)
    try:
        yield probe
    finally:
        probe.close()


def ingest(opts: Options) -> Metrics:
    """Webhook req/s through the ingest path alone (bench/ingest.py): verify, dedupe, durable
    persist, 200; no turn runs behind the ack (`roundtrip`'s `ack_s` is the whole service's)."""
    with scratch(opts.store, opts.workdir / "store-i") as store:
        port = free_port()
        folder = opts.workdir / f"ingest-{port}"
        # the platform's post_message_url is never called: nothing is delivered here; no turn takes
        # messages off the backlog either, so its bound (still checked per webhook) is set out of reach
        backlog = "dispatch:\n  max_backlog: 1000000000\n"
        config = write_service_files(folder, "http://127.0.0.1:9", store.url, extra=backlog)
        cmd = [sys.executable, "-m", "bench.ingest", "--port", str(port), "--log-level", opts.log_level]
        env = {"SWITCHBOARD_BENCH_CONFIG": str(config), "PYTHONPATH": str(REPO)}
        server = Proc.start("ingest", cmd, SERVER_CORE, folder / "ingest.log", cwd=folder, env=env)
        with running([server]), probing(store) as probe:
            server.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
            return closed_loop(opts, server, f"http://127.0.0.1:{port}/webhooks/{PLATFORM}", probe)


def roundtrip(opts: Options) -> Metrics:
    """Replies/s at saturation, then webhook-to-reply latency at half that rate, each on a fresh service."""
    fake, fake_base = start_fake(opts)
    with running([fake]):
        with scratch(opts.store, opts.workdir / "store-s") as store:
            server, url = start_service(opts, fake_base, store)
            with running([server]), probing(store) as probe:
                saturated = saturate(opts, server, url, fake_base, probe)
        rate = opts.paced_rate or saturated["replies_s"] / 2
        if rate < 1:
            return {**saturated, "paced_rate": rate}
        with scratch(opts.store, opts.workdir / "store-p") as store:
            server, url = start_service(opts, fake_base, store)
            with running([server]):
                return {**saturated, **paced(opts, url, fake_base, rate)}


def engine(opts: Options) -> Metrics:
    """The flow engine alone, in this process: turns/s of `Engine.decide` on a generated 50-state flow."""
    try:
        from bench.engine import measure
    except ImportError as exc:
        raise Skipped(f"the project is not importable ({exc}): `make run` or `pip install -e .`") from exc
    return measure(opts.warmup, opts.seconds)


Scenario = Callable[[Options], Metrics]
#: the scenarios of this module; `nodes` (bench/cluster.py) and `memory` (bench/memory.py) build on its
#: helpers and join them in bench/__main__.py
SCENARIOS: dict[str, Scenario] = {
    "bare": bare,
    "ingest": ingest,
    "roundtrip": roundtrip,
    "engine": engine,
}
#: the figure each scenario is judged by; its ratio is taken to bare's req_s of the same repeat
#: (`memory` has none: bytes per conversation are not a rate)
HEADLINE = {
    "bare": "req_s",
    "ingest": "req_s",
    "roundtrip": "replies_s",
    "engine": "turns_s",
    "nodes": "replies_s_2",
}


def with_workdir(opts: Options, workdir: Path) -> Options:
    workdir.mkdir(parents=True, exist_ok=True)
    return replace(opts, workdir=workdir)


__all__ = ["HEADLINE", "SCENARIOS", "BenchError", "Metrics", "Options", "Scenario", "Skipped", "find_switchboard"]
