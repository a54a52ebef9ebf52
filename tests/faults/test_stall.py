"""A node stalled mid-delivery (SIGSTOP: a long GC pause, a frozen VM, a partition) must not send
once it wakes up, because its lease expired meanwhile and another node took the conversation.

Node n1 takes a message whose turn gives three replies; the platform takes 1.5 s per reply. While
n1's first send is in flight it is stopped. Its lease runs out; n2's sweep takes the conversation
and delivers all three replies (the first again, under its Idempotency-Key). Then n1 is continued:
it finds its lease gone before its next send and sends nothing more. Without the fence it would
send the second and third replies again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import Server
from tests.fakes.platform import FakePlatform
from tests.faults.cluster import Node, PrivatePostgres, Sender, add_nodes, msg, start_nodes, write_flows

pytestmark = [pytest.mark.faults, pytest.mark.slow]

THREE_REPLIES = """\
flow: three
states:
  start:
    routes:
      - do: [{reply: "a {{ message.text }}"}, {reply: "b {{ message.text }}"}, {reply: "c {{ message.text }}"}]
"""
LEASE_SECONDS = 3


@dataclass
class SlowPlatform(FakePlatform):
    delay: float = 1.5

    async def _messages(self, request: Request) -> Response:
        await asyncio.sleep(self.delay)
        return await super()._messages(request)


async def test_a_node_stalled_past_its_lease_sends_nothing_when_it_wakes(
    tmp_path: Path, pg: PrivatePostgres, nodes: list[Node], http: httpx.AsyncClient
) -> None:
    fake = SlowPlatform()
    async with Server(fake.app()) as server:
        store = pg.new_store()
        flows = write_flows(tmp_path, text=THREE_REPLIES)
        add_nodes(
            nodes,
            tmp_path,
            ("n1", "n2"),
            store,
            server.url,
            flows,
            extra="outbox: {timeout: 10}\n",
            dispatch=f"lease_seconds: {LEASE_SECONDS}, sweep_seconds: 0.5",
        )
        await start_nodes(nodes)
        n1, _n2 = nodes
        sender = Sender(http, [n1.url])
        m = msg(1, 0, "hi")
        await sender.post(m)
        # n1's first send is in flight (the platform answers after 1.5 s): stop n1
        await asyncio.sleep(0.5)
        n1.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await fake.wait_for(lambda: len(fake.delivered()) == 3, timeout=30)
            taken_over = time.monotonic() - stopped
            calls_before = [c for c in fake.calls if c.path.startswith("/messages")]
            await asyncio.sleep(max(0.0, LEASE_SECONDS + 4 - (time.monotonic() - stopped)))
        finally:
            n1.signal(signal.SIGCONT)
        continued = time.monotonic()
        await asyncio.sleep(4)  # n1 catches up: its renewal, its send's answer, its next send
        late = [c for c in fake.calls if c.path.startswith("/messages") and c.at > continued]
        assert late == [], f"the stalled node sent after it woke: {[(c.body['text'], c.repeat) for c in late]}"
        texts = [c.body["text"] for c in fake.delivered()]
        assert texts == ["a hi", "b hi", "c hi"], texts
        keys = {
            c.body["text"]: {x.headers["idempotency-key"] for x in calls_before if x.body["text"] == c.body["text"]}
            for c in fake.delivered()
        }
        assert all(len(k) == 1 for k in keys.values()), keys
        log = n1.log_text()
        assert "lease lost" in log, log[-3000:]
        assert n1.alive() and (await http.get(f"{n1.url}/readyz")).status_code == 200, "n1 works on"
        repeats = [c.body["text"] for c in calls_before if c.repeat]
        print(
            f"\nn1 stopped mid-send; n2 delivered all three {taken_over:.1f}s later (repeated under the same key: "
            f"{repeats}); n1, continued after {continued - stopped:.1f}s, sent nothing more and logged its lease lost"
        )
