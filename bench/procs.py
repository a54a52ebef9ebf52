"""Child processes for the bench: free ports, CPU pinning, readiness, CPU time, clean stop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the core the server under test gets; the load generator, fakes and this process share the other one
SERVER_CORE = 0
LOAD_CORE = 1
#: the cores this process could use when it started (before `pin_self`): what "unpinned" children get
ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class BenchError(RuntimeError):
    """A scenario could not run (a process did not start, a tool is missing)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def can_pin() -> bool:
    """Pinning needs two cores we could use when we started; with fewer, everything shares what there is.

    Judged on the start-up mask, not the current one: `pin_self` narrows ours to the load core, and
    a check on that put every process on the load core, the server under test included."""
    return {SERVER_CORE, LOAD_CORE} <= set(ALL_CORES)


def pin_self(core: int = LOAD_CORE) -> None:
    """Put this process (and the children that inherit its mask) on the load-generator core."""
    if can_pin():
        os.sched_setaffinity(0, {core})


def cores(core: int | None) -> set[int]:
    """One core, or (None) every core this process started with: unpinned, despite `pin_self`."""
    return {core} if core is not None else set(ALL_CORES)


def pinned(cmd: Sequence[str], core: int | None) -> list[str]:
    """`taskset -c CORE cmd...` where taskset exists; `Proc.start` falls back to sched_setaffinity."""
    taskset = shutil.which("taskset")
    if can_pin() and taskset:
        return [taskset, "-c", ",".join(map(str, sorted(cores(core)))), *cmd]
    return list(cmd)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (field 3 onwards); None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads), plus its reaped children's; 0 once gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def ppid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def memory_kib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak resident) of a process, in KiB; empty once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = float(value.split()[0])
    return out


def busy_cores() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall seconds), from /proc/stat: diff two samples."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK, time.monotonic()


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies (even by SIGKILL), so no server is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        name: str,
        cmd: Sequence[str],
        core: int | None,
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        with log.open("wb") as out:
            popen = subprocess.Popen(
                pinned(cmd, core),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=None if env is None else {**os.environ, **env},
                preexec_fn=die_with_parent,
            )
        if can_pin() and not shutil.which("taskset"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(popen.pid, cores(core))
        return cls(name, popen, log)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far; 0 once it is gone."""
        return cpu_seconds(self.popen.pid)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Poll `url` until it answers 200; fail with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            if http_ok(url):
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready at {url} after {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (uvicorn and aiohttp shut down gracefully on it), then SIGKILL if it lingers."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never a proxy


def http_ok(url: str) -> bool:
    try:
        with OPENER.open(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process in `procs` on the way out, the last started first."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()
