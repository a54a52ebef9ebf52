"""apscheduler wiring: the sweep that resumes left-over work, lease renewal (and this node's
heartbeat), timers, housekeeping.

`Jobs.stop()` pauses the jobs and waits (bounded) for the ones running to finish before the store
closes under them: a shutdown never cuts a sweep off mid-query.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from middleware.dispatch import Dispatcher
from middleware.store import Store, StoreUnavailable

log = logging.getLogger("switchboard.scheduler")


class Jobs:
    """The scheduler and the jobs running in it right now."""

    def __init__(self, scheduler: AsyncIOScheduler) -> None:
        self.scheduler = scheduler
        self.running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def guard(self, name: str, job: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            self.running += 1
            self._idle.clear()
            try:
                await job()
            except StoreUnavailable as exc:  # the store logs the outage itself
                log.debug("%s skipped, store unavailable: %s", name, exc)
            except asyncio.CancelledError:  # the scheduler shut down under it
                log.info("%s cancelled by the shutdown", name)
            finally:
                self.running -= 1
                if self.running == 0:
                    self._idle.set()

        run.__name__ = name
        return run

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self, wait: float = 5.0) -> None:
        if not self.scheduler.running:
            return
        self.scheduler.pause()
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._idle.wait(), wait)
        except TimeoutError:
            log.warning("jobs still running after %.1fs at shutdown: %d", time.monotonic() - started, self.running)
        self.scheduler.shutdown(wait=False)


def build_scheduler(
    store: Store, dispatcher: Dispatcher, sweep_seconds: float, lease_seconds: float, dedupe_days: float
) -> Jobs:
    scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
    jobs = Jobs(scheduler)

    async def sweep() -> None:
        if dispatcher.draining:
            return
        await dispatcher.resume()
        await dispatcher.resync_backlog()

    async def renew() -> None:
        await dispatcher.renew_leases()

    async def purge() -> None:
        n = await store.purge(dedupe_days)
        if n:
            log.info("purged %d handled rows older than %s days", n, dedupe_days)

    async def timers() -> None:
        if dispatcher.draining:  # the other nodes fire them
            return
        for key in await store.fire_due_timers():
            dispatcher.notify(key)

    scheduler.add_job(jobs.guard("sweep", sweep), "interval", seconds=sweep_seconds, id="sweep")
    scheduler.add_job(jobs.guard("timers", timers), "interval", seconds=1, id="timers")
    scheduler.add_job(
        jobs.guard("lease renewal", renew), "interval", seconds=max(1.0, lease_seconds / 3), id="renew-leases"
    )
    scheduler.add_job(jobs.guard("purge", purge), "interval", hours=1, id="purge")
    return jobs
