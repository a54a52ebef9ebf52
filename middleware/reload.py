"""Hot reload of flows: a broken file keeps the old flows running; a good set swaps in between turns."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from middleware.engine import Engine, Known, load_flows
from middleware.yamlfile import ConfigError, Problem

log = logging.getLogger("switchboard.reload")


class FlowReloader:
    def __init__(self, engine: Engine, root: Path, known: Known) -> None:
        self.engine = engine
        self.root = root
        self.known = known
        #: the problems of the last reload that failed (empty after a good one)
        self.problems: list[Problem] = []
        self.generation = 0

    async def reload(self) -> list[Problem]:
        """Load the flows again; swap them in if valid, else keep the running ones. Returns the problems."""
        try:
            flows = await asyncio.to_thread(load_flows, self.root, self.known)
        except ConfigError as exc:
            self.problems = exc.problems
            for p in exc.problems:
                log.error("flow reload rejected, the previous flows keep running: %s", p)
            return self.problems
        self.engine.swap(flows)
        self.problems = []
        self.generation += 1
        log.info("flows reloaded", extra={"flows": sorted(flows), "generation": self.generation})
        return []

    async def watch(self) -> None:
        """Reload whenever a file under the flows folder changes (runs until cancelled)."""
        from watchfiles import awatch

        async for _changes in awatch(self.root, debounce=300, step=100):
            await self.reload()
