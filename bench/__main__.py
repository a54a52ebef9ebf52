"""`python -m bench`: run the scenarios N times, print median (min..max) and ratios to bare, save JSON.

Every repeat measures the bare Starlette endpoint first and again after each other scenario, and that
scenario's headline figure is divided by the mean of the two bare req/s around it: the machine is
shared and noisy (its speed drifts within a minute), so only ratios to a bracketing bare compare.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cluster, loadgen, memory, procs, report
from bench.loadgen import LoadSpec
from bench.scenarios import HEADLINE, BenchError, Options, Scenario, Skipped, find_switchboard, with_workdir
from bench.scenarios import SCENARIOS as SINGLE_NODE
from bench.stores import PG_ADMIN, STORES, StoreSpec

#: every scenario by name: one node's (bench/scenarios.py), two nodes against one (bench/cluster.py),
#: memory per conversation (bench/memory.py)
SCENARIOS: dict[str, Scenario] = {**SINGLE_NODE, "nodes": cluster.measure, "memory": memory.measure}

#: more figures the progress line shows, beside the headline
BRIEF = {
    "nodes": ("replies_s_1", "scaling", "duplicate_replies"),
    "memory": ("conversations", "store_bytes_per_conv", "rss_slope_bytes_per_conv"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="repeats; figures are medians (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="measured window per phase (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up before each window (default 1)")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), dest="scenarios",
        help="repeatable; default: all but nodes and memory. bare always runs, as the base of the ratios",
    )  # fmt: skip
    parser.add_argument("--connections", type=int, default=64, help="closed-loop connections (default 64)")
    parser.add_argument("--conversations", type=int, default=100, help="distinct conversations (default 100)")
    parser.add_argument("--loadgen", choices=["wrk", "aioload"], default=loadgen.default_tool())
    parser.add_argument("--paced-rate", type=float, help="paced webhooks/s (default: half of saturation)")
    parser.add_argument(
        "--store", choices=STORES, default="sqlite",
        help="the service's store in ingest, roundtrip and memory (default sqlite); postgresql: a scratch "
        "database per phase on --pg, created and dropped by the bench (nodes always uses postgresql)",
    )  # fmt: skip
    parser.add_argument("--pg", default=PG_ADMIN, help=f"PostgreSQL to make scratch databases on ({PG_ADMIN})")
    parser.add_argument(
        "--memory-conversations", type=int, default=20_000,
        help="new conversations the memory scenario stores (default 20000; figures are per conversation)",
    )  # fmt: skip
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of the memory scenario (default 4)")
    parser.add_argument(
        "--memory-no-flood", dest="memory_flood", action="store_false",
        help="memory scenario: the service without flood control (no per-sender buckets), to tell them apart",
    )  # fmt: skip
    parser.add_argument("--drain", type=float, default=10.0, help="max wait for late replies (default 10 s)")
    parser.add_argument("--switchboard", type=Path, help="the switchboard command (default: found)")
    parser.add_argument("--log-level", default="warning", help="the service's --log-level (default warning)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs, stores)")
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds < 1 or args.warmup < 0:
        parser.error("--runs and --seconds must be >= 1, --warmup >= 0")
    if args.memory_conversations < 1 or args.memory_steps < 1:
        parser.error("--memory-conversations and --memory-steps must be >= 1")
    return args


#: run only when named with --scenario: they need PostgreSQL or take minutes
OPT_IN = ("nodes", "memory")


def selected(args: argparse.Namespace) -> list[str]:
    chosen = args.scenarios or [name for name in SCENARIOS if name not in OPT_IN]
    return ["bare", *(name for name in SCENARIOS if name in chosen and name != "bare")]


def options(args: argparse.Namespace, workdir: Path) -> Options:
    return Options(
        seconds=args.seconds,
        warmup=args.warmup,
        load=LoadSpec(args.loadgen, args.connections, args.conversations),
        workdir=workdir,
        switchboard=find_switchboard(args.switchboard),
        log_level=args.log_level,
        drain=args.drain,
        paced_rate=args.paced_rate,
        store=StoreSpec(args.store, args.pg),
        memory_conversations=args.memory_conversations,
        memory_steps=args.memory_steps,
        memory_flood=args.memory_flood,
    )


def run_one(name: str, opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result: dict[str, Any] = dict(SCENARIOS[name](opts))
    except Skipped as exc:
        return {"skipped": str(exc)}
    except BenchError as exc:
        return {"error": str(exc)}
    except (OSError, ValueError) as exc:  # a process died mid-run, the fake's record did not parse
        return {"error": f"{type(exc).__name__}: {exc}"}
    log(f"  {name}: {_brief(name, result)} ({time.monotonic() - started:.0f} s)")
    return result


def _brief(name: str, result: dict[str, Any]) -> str:
    keys = [HEADLINE.get(name, ""), "p99_ms", "e2e_p50_ms", "e2e_p99_ms", *BRIEF.get(name, ())]
    return ", ".join(f"{k} {report.fmt(float(result[k]))}" for k in keys if k in result)


def run_all(args: argparse.Namespace, workdir: Path) -> list[report.Repeat]:
    names = selected(args)
    repeats: list[report.Repeat] = []
    for i in range(args.runs):
        log(f"repeat {i + 1}/{args.runs}")
        opts = options(args, workdir)
        repeat: report.Repeat = {}
        before: float | None = None
        for n, name in enumerate(names):
            repeat[name] = run_one(name, with_workdir(opts, workdir / f"r{i + 1}-{name}"))
            _say_problem(name, repeat[name], first=i == 0)
            if name == "bare":
                before = _req_s(repeat[name])
                continue
            if name not in HEADLINE or "error" in repeat[name] or "skipped" in repeat[name]:
                continue  # no ratio to take: no bare run after it
            # bare again after each scenario: the scenario's base is the mean of the two around it
            after = run_one("bare", with_workdir(opts, workdir / f"r{i + 1}-bare-{n}"))
            bracket = report.bracket(before, _req_s(after))
            if bracket is not None:
                repeat[name] = {**repeat[name], **bracket}
            before = _req_s(after)
        repeats.append(repeat)
    return repeats


def _req_s(result: dict[str, Any]) -> float | None:
    value = result.get("req_s")
    return float(value) if value is not None else None


def _say_problem(name: str, result: dict[str, Any], first: bool) -> None:
    if "error" in result:
        log(f"  {name}: ERROR {result['error']}")
    elif "skipped" in result and first:
        log(f"  {name}: skipped: {result['skipped']}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    machine = report.machine(args.loadgen)
    procs.pin_self()
    tmp = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    try:
        repeats = run_all(args, tmp)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = report.summarize(repeats, HEADLINE)
    print(report.table(summary, repeats))
    if not args.no_json:
        document = {
            "started": started,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine,
            "headline": HEADLINE,
            "repeats": repeats,
            "summary": summary,
        }
        log(f"wrote {report.write_json(document)}")
    failed = all("error" in r.get("bare", {}) for r in repeats)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
