"""apscheduler wiring: the sweep that resumes left-over work, lease renewal, housekeeping."""

from __future__ import annotations

import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from middleware.dispatch import Dispatcher
from middleware.store import Store, StoreUnavailable

log = logging.getLogger("switchboard.scheduler")


def build_scheduler(
    store: Store, dispatcher: Dispatcher, sweep_seconds: float, lease_seconds: float, dedupe_days: float
) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})

    async def sweep() -> None:
        try:
            await dispatcher.resume()
            await dispatcher.resync_backlog()
        except StoreUnavailable as exc:
            log.warning("sweep skipped, store unavailable: %s", exc)

    async def renew() -> None:
        try:
            await dispatcher.renew_leases()
        except StoreUnavailable as exc:
            log.warning("lease renewal skipped, store unavailable: %s", exc)

    async def purge() -> None:
        try:
            n = await store.purge(dedupe_days)
            if n:
                log.info("purged %d handled rows older than %s days", n, dedupe_days)
        except StoreUnavailable as exc:
            log.warning("purge skipped, store unavailable: %s", exc)

    async def timers() -> None:
        try:
            for key in await store.fire_due_timers():
                dispatcher.notify(key)
        except StoreUnavailable as exc:
            log.warning("timers skipped, store unavailable: %s", exc)

    scheduler.add_job(sweep, "interval", seconds=sweep_seconds, id="sweep")
    scheduler.add_job(timers, "interval", seconds=1, id="timers")
    scheduler.add_job(renew, "interval", seconds=max(1.0, lease_seconds / 3), id="renew-leases")
    scheduler.add_job(purge, "interval", hours=1, id="purge")
    return scheduler
