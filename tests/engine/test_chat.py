"""`switchboard chat --flow NAME`: a terminal conversation with one flow, whatever its `match:` names."""

from __future__ import annotations

import asyncio

import pytest

from middleware.chat import run_chat
from tests.conftest import REPO


async def test_chat_with_a_flow_whose_match_leaves_the_console_out(capsys: pytest.CaptureFixture[str]) -> None:
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    for text in ("where is my order", "123456", "/quit"):
        lines.put_nowait(text)
    code = await run_chat(REPO / "config" / "switchboard.yaml", None, lines, flow="support")
    out = capsys.readouterr().out
    assert code == 0
    assert "Talking to flow support." in out
    assert "What is your order number? It has 6 digits." in out
    assert "Thanks! Order 123456 is noted" in out
    # the trace: the NLU's answer, the route by file:line, the move, the variables
    assert "nlu rasa: order_status (0.93)" in out
    assert "support.yaml:" in out and "goto ask_order" in out
    assert '"order": "123456"' in out


async def test_chat_with_an_unknown_flow_names_the_loaded_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_chat(REPO / "config" / "switchboard.yaml", None, asyncio.Queue(), flow="nope")
    assert code == 1
    assert "no flow named 'nope'; loaded: demo, faq_llm, support" in capsys.readouterr().err
