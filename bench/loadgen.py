"""Closed-loop load: wrk with bench/webhook.lua, or bench.aioload where wrk is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOAD_CORE, BenchError, pinned

LUA = Path(__file__).with_name("webhook.lua")
FRESH_LUA = Path(__file__).with_name("fresh.lua")
MARK = "BENCH_JSON "


@dataclass(frozen=True)
class LoadSpec:
    tool: str  # "wrk" or "aioload"
    connections: int = 64
    conversations: int = 100
    #: conversation ids are c-<offset>..c-<offset + conversations - 1>
    offset: int = 0


@dataclass(frozen=True)
class LoadResult:
    requests: int
    duration_s: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def ok_per_s(self) -> float:
        """Successful (2xx) responses per second: 503s past the backlog limit do not count."""
        ok = self.requests - self.non_2xx
        return ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def default_tool() -> str:
    return "wrk" if shutil.which("wrk") else "aioload"


def command(spec: LoadSpec, url: str, seconds: int, prefix: str) -> list[str]:
    if spec.tool == "wrk":
        wrk = shutil.which("wrk")
        if wrk is None:
            raise BenchError("wrk not found: `apt-get install -y wrk`, or pass --loadgen aioload")
        return [
            wrk, "-t1", f"-c{spec.connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(LUA), url, "--", str(spec.conversations), prefix, str(spec.offset),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "bench.aioload", url, "--seconds", str(seconds),
        "--connections", str(spec.connections), "--conversations", str(spec.conversations), "--prefix", prefix,
        "--offset", str(spec.offset),
    ]  # fmt: skip


def fresh_command(url: str, connections: int, seconds: int, prefix: str, stop_after: int) -> list[str]:
    """wrk with bench/fresh.lua: a new conversation per request, stopping after `stop_after` 2xx answers."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk not found: `apt-get install -y wrk`")
    return [
        wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(FRESH_LUA), url, "--", prefix, str(stop_after),
    ]  # fmt: skip


def start(spec: LoadSpec, url: str, seconds: int, prefix: str, core: int | None = LOAD_CORE) -> subprocess.Popen[str]:
    """Start the generator on the load core (None: unpinned); collect it with `finish`."""
    return spawn(command(spec, url, seconds, prefix), core)


def spawn(cmd: list[str], core: int | None = LOAD_CORE) -> subprocess.Popen[str]:
    cmd = pinned(cmd, core)
    cwd = Path(__file__).resolve().parent.parent
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)


def finish(proc: subprocess.Popen[str], seconds: int) -> LoadResult:
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise BenchError(f"load generator overran {seconds}s by 30s:\n{out[-2000:]}") from None
    return parse(out)


def run(spec: LoadSpec, url: str, seconds: int, prefix: str) -> LoadResult:
    return finish(start(spec, url, seconds, prefix), seconds)


def parse(output: str) -> LoadResult:
    for line in output.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK) :])
            errors = sum(int(data[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
            return LoadResult(
                requests=int(data["requests"]),
                duration_s=float(data["duration_s"]),
                non_2xx=int(data["non_2xx"]),
                errors=errors,
                p50_ms=float(data["p50_ms"]),
                p99_ms=float(data["p99_ms"]),
                max_ms=float(data["max_ms"]),
            )
    raise BenchError(f"no {MARK.strip()} line in the load generator's output:\n{output[-2000:]}")
