"""Helpers the connector tests share: a turn to ask with, and a flow run by the real engine."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from connectors.base import Connector, ConnectorTurn, HistoryEntry
from middleware.engine import Engine, Known, Resources, load_flows
from middleware.model import ConversationState, Inbound, Sender, TurnResult


def inbound(text: str = "hello", conversation: str = "c-1", **extra: Any) -> Inbound:
    return Inbound("myapp", f"m-{abs(hash(text)) % 10_000}", conversation, Sender("u-1", "Ana"), text=text, **extra)


def make_turn(
    text: str = "hello",
    vars: Mapping[str, Any] | None = None,
    history: Sequence[HistoryEntry] = (),
    timeout: float = 5.0,
    conversation: str = "c-1",
    options: Mapping[str, Any] | None = None,
    **extra: Any,
) -> ConnectorTurn:
    message = inbound(text, conversation, **extra)
    return ConnectorTurn(
        message, dict(vars or {}), list(history), time.monotonic() + timeout, message.conversation_key, options or {}
    )


FALLBACK_FLOW = """\
flow: main
states:
  start:
    routes:
      - do:
          - ask: {connector: primary, fallback: [backup, {reply: "Both engines are down."}, {handoff: tier1}]}
"""


async def run_flow(
    tmp_path: Path,
    connectors: Mapping[str, Connector],
    text: str = "hello",
    flow: str = FALLBACK_FLOW,
    state: ConversationState | None = None,
    seconds: float = 10.0,
) -> TurnResult:
    """One turn of `flow` (YAML) with these connectors, through the flow engine."""
    folder = tmp_path / "flows"
    folder.mkdir(exist_ok=True)
    (folder / "main.yaml").write_text(textwrap.dedent(flow))
    flows = load_flows(folder, Known(connectors=frozenset(connectors)))
    engine = Engine(flows, Resources(connectors=connectors))
    return await engine.decide(inbound(text), state or ConversationState(), time.monotonic() + seconds)


async def wait_for(check: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 (polling what a server task changes)
            await asyncio.sleep(0.02)
