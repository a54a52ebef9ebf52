"""Hot reload of flows: a broken file keeps the old flows running; a good set swaps in between turns.

With several nodes, a reload on one (the admin API, or its watcher seeing a file change) is
announced on the notify bus (middleware/notify.py, channel `reload`) with the digest of the flow
files it loaded; every other node reloads its own copy of the flows folder unless it already runs
files with that digest, and warns when its files differ from the announcing node's. A node whose bus
reconnected (it may have missed an announcement) checks its files once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from middleware.engine import Engine, Known, load_flows
from middleware.engine.loader import flow_files
from middleware.notify import Bus, Signal
from middleware.yamlfile import ConfigError, Problem

log = logging.getLogger("switchboard.reload")

#: the notify channel of reload announcements
CHANNEL = "reload"


def flows_digest(root: Path) -> str:
    """SHA-256 over the flow files under `root` (relative names and contents)."""
    h = hashlib.sha256()
    base = root if root.is_dir() else root.parent
    for path in flow_files(root):
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            h.update(str(path.relative_to(base)).encode() + b"\x00" + data + b"\x00")
    return h.hexdigest()[:32]


class FlowReloader:
    def __init__(self, engine: Engine, root: Path, known: Known) -> None:
        self.engine = engine
        self.root = root
        self.known = known
        #: the problems of the last reload that failed (empty after a good one)
        self.problems: list[Problem] = []
        self.generation = 0
        #: the digest of the flow files running now ("" until known)
        self.digest = ""
        self.bus: Bus | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, bus: Bus) -> None:
        """Announce reloads to the other nodes and follow theirs."""
        self.bus = bus
        bus.subscribe(CHANNEL, self._on_signal)
        bus.on_reconnect(lambda: self._spawn(self._follow(None)))

    async def start(self) -> None:
        """Record the digest of the flows loaded at start-up."""
        self.digest = await asyncio.to_thread(flows_digest, self.root)

    async def reload(self, *, announce: bool = True) -> list[Problem]:
        """Load the flows again; swap them in if valid, else keep the running ones. Returns the problems.

        A good reload is announced to the other nodes (unless `announce` is False)."""
        async with self._lock:
            try:
                digest = await asyncio.to_thread(flows_digest, self.root)
                flows = await asyncio.to_thread(load_flows, self.root, self.known)
            except ConfigError as exc:
                self.problems = exc.problems
                for p in exc.problems:
                    log.error("flow reload rejected, the previous flows keep running: %s", p)
                return self.problems
            self.engine.swap(flows)
            self.problems = []
            self.generation += 1
            self.digest = digest
            log.info("flows reloaded", extra={"flows": sorted(flows), "generation": self.generation, "digest": digest})
        if announce and self.bus is not None:
            await self.bus.publish(CHANNEL, json.dumps({"digest": digest}))
        return []

    def _on_signal(self, signal: Signal) -> None:
        if self.bus is None or signal.mine(self.bus):
            return
        try:
            digest = str(json.loads(signal.payload).get("digest", ""))
        except (ValueError, AttributeError):
            return
        self._spawn(self._follow(digest))

    async def _follow(self, announced: str | None) -> None:
        """Another node reloaded (or we may have missed that): reload unless our files are the ones running."""
        on_disk = await asyncio.to_thread(flows_digest, self.root)
        if on_disk == self.digest and announced in (None, on_disk):
            return
        if on_disk != self.digest:
            await self.reload(announce=False)
        if announced is not None and announced != on_disk:
            log.warning(
                "another node reloaded flows that differ from this node's files: deploy the same flows everywhere",
                extra={"theirs": announced, "ours": on_disk},
            )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def watch(self) -> None:
        """Reload whenever a file under the flows folder changes (runs until cancelled)."""
        from watchfiles import awatch

        async for _changes in awatch(self.root, debounce=300, step=100):
            await self.reload()
