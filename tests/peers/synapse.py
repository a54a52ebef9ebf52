"""A real Synapse homeserver for tests.

Synapse is installed once per machine in a venv of its own, outside the clone:
`${XDG_CACHE_HOME:-~/.cache}/switchboard/synapse-venv` (or `$SWITCHBOARD_SYNAPSE_VENV`), made with the
machine's `python3 -m venv` and `pip install matrix-synapse`. A file lock keeps concurrent test runs from
installing at the same time; a marker file names the requirement that was installed, so a changed pin
reinstalls. `install()` raises `Unavailable` when that cannot work here (no PyPI, no venv module), and the
tests skip with that reason.

Each test then runs its own homeserver (`Homeserver`) on 127.0.0.1 with SQLite in a temporary folder,
with `trusted_key_servers: []` so nothing leaves the machine.

`python -m tests.peers.synapse` installs it by hand and prints the version and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

#: pinned for repeatable runs; 1.163.2 is the version tried on this machine kind
REQUIREMENT = os.environ.get("SWITCHBOARD_SYNAPSE_REQUIREMENT", "matrix-synapse==1.163.2")
INSTALL_TIMEOUT = 900.0
SERVER_NAME = "localhost"


class Unavailable(Exception):
    """Synapse cannot be installed on this machine; the message says why."""


@dataclass(frozen=True)
class Installed:
    python: Path
    version: str
    #: seconds spent installing now (0 when the cached venv was used), and waiting for another run's lock
    install_seconds: float
    lock_wait_seconds: float

    @property
    def bin(self) -> Path:
        return self.python.parent


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "switchboard"


def venv_path() -> Path:
    override = os.environ.get("SWITCHBOARD_SYNAPSE_VENV")
    return Path(override) if override else cache_root() / "synapse-venv"


def install(timeout: float = INSTALL_TIMEOUT) -> Installed:
    """Synapse's venv, installed if it is not there yet (blocking: call it from a thread in async code)."""
    venv = venv_path()
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    marker = venv / ".switchboard-requirement"
    deadline = time.monotonic() + timeout
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        waited = _lock(lock, deadline)
        if python.exists() and marker.exists() and marker.read_text() == REQUIREMENT:
            return Installed(python, _version(python), 0.0, waited)
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        base = shutil.which("python3") or sys.executable
        _run([base, "-m", "venv", str(venv)], deadline, "python3 -m venv")
        _run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", REQUIREMENT],
            deadline,
            f"pip install {REQUIREMENT}",
        )
        version = _version(python)
        marker.write_text(REQUIREMENT)
        return Installed(python, version, time.monotonic() - started, waited)


def _lock(lock: Any, deadline: float) -> float:
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return time.monotonic() - started
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Unavailable(f"another run held {lock.name} for too long") from None
            time.sleep(0.5)


def _run(args: list[str], deadline: float, what: str) -> str:
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"{what} did not finish in time") from exc
    except OSError as exc:
        raise Unavailable(f"{what}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise Unavailable(f"{what} failed with exit code {done.returncode}:\n{tail}")
    return done.stdout


def _version(python: Path) -> str:
    out = _run([str(python), "-c", "import synapse; print(synapse.__version__)"], time.monotonic() + 60, "import")
    return out.strip()


@dataclass(frozen=True)
class AppService:
    """An application service registration, as Synapse reads it from YAML."""

    url: str
    as_token: str
    hs_token: str
    sender_localpart: str
    id: str = "switchboard"

    @property
    def bot_user_id(self) -> str:
        return f"@{self.sender_localpart}:{SERVER_NAME}"

    def registration(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "rate_limited": False,
            "receive_ephemeral": True,
            "namespaces": {
                "users": [{"exclusive": True, "regex": f"@{self.sender_localpart}:{SERVER_NAME}"}],
                "aliases": [],
                "rooms": [],
            },
        }


class Homeserver:
    """One Synapse process on 127.0.0.1:`port`, its config, database and log under `workdir`."""

    def __init__(self, installed: Installed, workdir: Path, port: int, appservice: AppService) -> None:
        self.installed = installed
        self.workdir = workdir
        self.port = port
        self.appservice = appservice
        self.config = workdir / "homeserver.yaml"
        self.log = workdir / "synapse.out"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def configure(self) -> None:
        """Generate the config (SQLite, signing key, shared secret), then bind it to loopback only."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self._exec(
            str(self.installed.python),
            "-m",
            "synapse.app.homeserver",
            "--server-name",
            SERVER_NAME,
            "--config-path",
            str(self.config),
            "--data-directory",
            str(self.workdir),
            "--generate-config",
            "--report-stats=no",
        )
        registration = self.workdir / "appservice.yaml"
        registration.write_text(yaml.safe_dump(self.appservice.registration()))
        config = yaml.safe_load(self.config.read_text())
        config["listeners"] = [
            {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        config["trusted_key_servers"] = []
        config["suppress_key_server_warning"] = True
        config["app_service_config_files"] = [str(registration)]
        config["presence"] = {"enabled": False}
        self.config.write_text(yaml.safe_dump(config))

    async def start(self, limit: float = 90.0) -> float:
        """Start Synapse and wait until it answers; returns the seconds that took."""
        started = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                str(self.installed.python),
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.config),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"synapse exited with {self.proc.returncode}:\n{self.tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.url}/_matrix/client/versions")).status_code == 200:
                        break
                if time.monotonic() - started > limit:
                    raise RuntimeError(f"synapse not ready after {limit:.0f}s:\n{self.tail()}")
                await asyncio.sleep(0.1)
        self.starts.append(time.monotonic() - started)
        return self.starts[-1]

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after 15 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)

    async def register_user(self, user: str, password: str) -> str:
        """A local user, made with `register_new_matrix_user` and the config's shared secret."""
        await self._exec(
            str(self.installed.bin / "register_new_matrix_user"),
            "-c",
            str(self.config),
            "-u",
            user,
            "-p",
            password,
            "--no-admin",
            self.url,
        )
        return f"@{user}:{SERVER_NAME}"

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def _exec(self, *args: str, limit: float = 60.0) -> None:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{args[0]} did not finish in {limit:.0f}s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{out.decode(errors='replace')}")


if __name__ == "__main__":
    try:
        done = install()
    except Unavailable as exc:
        sys.exit(f"synapse unavailable: {exc}")
    how = f"installed in {done.install_seconds:.1f}s" if done.install_seconds else "already installed"
    sys.stdout.write(f"matrix-synapse {done.version} in {done.python.parent.parent} ({how})\n")
