"""Start a real engine (Rasa, llama.cpp's server) as a child process on 127.0.0.1, wait until it
answers, and stop it however the test ends. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import httpx


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _stop(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        # Rasa's Sanic server can ignore SIGTERM for a long while
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@contextlib.asynccontextmanager
async def engine_process(
    args: list[str],
    ready_url: str,
    log: Path,
    *,
    ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    start_within: float = 240.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    grace: float = 15.0,
) -> AsyncIterator[float]:
    """Run `args` in its own process group; yields the seconds it took to answer `ready_url`."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                if proc.returncode is not None:
                    tail = _tail(log)
                    raise RuntimeError(f"{args[0]} exited with {proc.returncode} before it was ready:\n{tail}")
                if time.monotonic() - started > start_within:
                    tail = _tail(log)
                    raise RuntimeError(f"{args[0]} not ready within {start_within:.0f}s:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if ready(await http.get(ready_url)):
                        break
                await asyncio.sleep(0.5)
        yield time.monotonic() - started
    finally:
        await _stop(proc, grace)
