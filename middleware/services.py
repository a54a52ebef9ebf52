"""The running parts of one app, built by its lifespan and reached through `app.state.services`."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from middleware.dispatch import Dispatcher
from middleware.engine import Engine
from middleware.metrics import Metrics
from middleware.notify import Bus
from middleware.platforms import Platform
from middleware.settings import Settings
from middleware.store import Store
from middleware.turn import TurnRunner


@dataclass
class Services:
    settings: Settings
    store: Store
    http: httpx.AsyncClient
    engine: Engine
    platforms: dict[str, Platform]
    metrics: Metrics
    dispatcher: Dispatcher
    turns: TurnRunner
    node_id: str
    started_at: float
    #: signals between nodes (middleware/notify.py)
    bus: Bus | None = None
