"""Child processes for the tests that run Switchboard (or `make`) as an operator would: each in a
session of its own with its output in a log file, waited for with bounded waits, and killed (the
whole process group) however the test ends. Used by tests/test_processes.py, tests/test_handoff.py
and tests/faults/; the `procs` fixture is registered in tests/conftest.py.
(tests/peers/process.py starts the real engines, Rasa and llama.cpp, the same way, asynchronously.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

#: the `switchboard` command of the venv running the tests
SWITCHBOARD = Path(sys.executable).with_name("switchboard")


class Proc:
    """A child process in a session of its own, its output in a log file."""

    def __init__(
        self, args: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.args = args
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 60) -> str:
        self._out.flush()
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait(self, seconds: float) -> int | None:
        """The exit code, or None if still running after that many seconds."""
        try:
            return await asyncio.to_thread(self.popen.wait, seconds)
        except subprocess.TimeoutExpired:
            return None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close(self) -> None:
        """Kill what is left of the process and its group; close the log."""
        if self.popen.poll() is None or self.group_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._out.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test started; whatever is left of them is killed at teardown."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()


def switchboard_command() -> str:
    """The installed `switchboard` command: the venv's, else the one on PATH."""
    if SWITCHBOARD.exists():
        return str(SWITCHBOARD)
    found = shutil.which("switchboard")
    if found is None:
        pytest.fail("the switchboard command is not installed (make installs it)")
    return found


async def wait_ready(proc: Proc, url: str, within: float) -> float:
    """Poll GET url until 200; fail if the process exits first. Returns the seconds it took."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.args} exited with {proc.popen.returncode} before it was ready:\n{proc.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > within:
                pytest.fail(f"{url} not ready after {within}s:\n{proc.tail()}")
            await asyncio.sleep(0.1)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
