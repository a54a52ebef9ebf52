"""The `llm` connector: OpenAI (and Azure), Anthropic, Ollama and template mode against a fake LLM API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from connectors.base import (
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorTimeout,
    ConnectorUnavailable,
    HistoryEntry,
)
from connectors.llm import LlmConfig, LlmConnector, history_window
from middleware.model import Handoff, Reply, SetVariable
from tests.conftest import Server, fake_platform, generic_config, message, running
from tests.connectors.common import make_turn, run_flow, wait_for
from tests.fakes.engines import client
from tests.fakes.llm import KEY, FakeLlm, recorded

KEY_ENV = "SWITCHBOARD_TEST_LLM_KEY"
HISTORY = [
    HistoryEntry("user", "first question"),
    HistoryEntry("bot", "first answer"),
    HistoryEntry("user", "second question"),
    HistoryEntry("bot", "second answer"),
    HistoryEntry("bot", "a follow-up"),
]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def llm(fake: FakeLlm, name: str = "gpt", **config: Any) -> LlmConnector:
    raw = {"type": "llm", "model": "gpt-4o-mini", "api_key_env": KEY_ENV, "url": "http://llm.test/v1", **config}
    return LlmConnector(name, LlmConfig.model_validate({"backoff": 0.01, **raw}), client(fake.app()))


def test_the_history_window_is_bounded_by_turns_and_characters() -> None:
    assert [e.text for e in history_window(HISTORY, 1, 10_000)] == ["second question", "second answer", "a follow-up"]
    assert [e.text for e in history_window(HISTORY, 5, 10_000)] == [e.text for e in HISTORY]
    assert [e.text for e in history_window(HISTORY, 5, 30)] == ["second answer", "a follow-up"]
    assert history_window(HISTORY, 0, 10_000) == []
    assert [e.text for e in history_window([HistoryEntry("bot", "welcome")], 2, 100)] == ["welcome"]


async def test_openai_request_shape_system_prompt_and_history() -> None:
    fake = FakeLlm()
    gpt = llm(
        fake, system_prompt="You answer for {{ vars.brand }}{{ vars.missing }}.", history_turns=1, temperature=0.2
    )
    result = await gpt.ask(make_turn("what are your hours?", vars={"brand": "Acme"}, history=HISTORY))
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "gpt-4o-mini" and request.body["max_tokens"] == 512
    assert request.body["temperature"] == 0.2 and "tools" not in request.body
    assert request.body["messages"] == [
        {"role": "system", "content": "You answer for Acme."},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "assistant", "content": "a follow-up"},
        {"role": "user", "content": "what are your hours?"},
    ]
    assert result.replies == (Reply("You said: what are your hours?"),) and result.actions == ()


async def test_openai_tool_calls_hand_off_set_and_resolve() -> None:
    fake = FakeLlm()
    gpt = llm(fake, tools=["handoff", "resolve", "set_variable"], queues=["billing", "tier1"], variables=["order"])
    result = await gpt.ask(make_turn("I want an agent"))
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in fake.requests[0].body["tools"]}
    assert set(tools) == {"handoff", "resolve", "set_variable"} and fake.requests[0].body["tool_choice"] == "auto"
    assert tools["handoff"]["properties"]["queue"]["enum"] == ["billing", "tier1"]
    assert result.replies == () and result.actions == (Handoff("billing", "asked for a human"),)
    result = await gpt.ask(make_turn("my order is 123456"))
    assert result.actions == (SetVariable("order", "123456"),)
    result = await gpt.ask(make_turn("bye"))
    assert result.end and result.actions == ()
    narrow = llm(fake, tools=["handoff"], queues=["tier1"], handoff_queue="tier1")
    assert (await narrow.ask(make_turn("agent please"))).actions == (Handoff("tier1", "asked for a human"),)
    only_handoff = llm(fake, tools=["handoff"], variables=["email"])
    assert (await only_handoff.ask(make_turn("my order is 1"))).replies == (Reply("You said: my order is 1"),)


async def test_azure_uses_api_version_and_the_api_key_header() -> None:
    fake = FakeLlm()
    azure = llm(fake, url="http://llm.test/openai/deployments/gpt4o", api_version="2024-10-21", model="")
    result = await azure.ask(make_turn("hello"))
    (request,) = fake.requests
    assert request.query == {"api-version": "2024-10-21"} and request.headers["api-key"] == KEY
    assert "authorization" not in request.headers
    assert result.replies == (Reply("You said: hello"),)


async def test_anthropic_messages_headers_alternation_and_tool_use() -> None:
    fake = FakeLlm()
    claude = llm(
        fake,
        preset="anthropic",
        url="http://llm.test",
        model="claude-sonnet-4-5",
        system_prompt="Be brief.",
        tools=["set_variable"],
        temperature=1.5,
    )
    history = [HistoryEntry("bot", "Welcome!"), HistoryEntry("user", "hi"), HistoryEntry("user", "are you there?")]
    result = await claude.ask(make_turn("my order is 123456", history=history))
    (request,) = fake.requests
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == KEY and request.headers["anthropic-version"] == "2023-06-01"
    body = request.body
    assert body["system"] == "Be brief." and body["max_tokens"] == 512 and body["temperature"] == 1.0
    assert body["messages"] == [{"role": "user", "content": "hi\nare you there?\nmy order is 123456"}]
    assert body["tools"][0]["name"] == "set_variable" and "input_schema" in body["tools"][0]
    assert result.replies == (Reply("I'll note that order number."),)
    assert result.actions == (SetVariable("order", "123456"),)


async def test_ollama_is_not_streamed_and_its_tool_calls_count() -> None:
    fake = FakeLlm()
    ollama = llm(fake, preset="ollama", url="http://llm.test", model="llama3.2", api_key_env=None, tools=["resolve"])
    result = await ollama.ask(make_turn("hello"))
    assert fake.requests[0].body["stream"] is False and fake.requests[0].body["options"] == {"num_predict": 512}
    assert result.replies == (Reply("You said: hello"),)
    assert (await ollama.ask(make_turn("bye now"))).end


async def test_template_mode_renders_a_body_and_reads_a_path() -> None:
    fake = FakeLlm()
    body = """{"inputs": {{ (system ~ "\\n" ~ message) | tojson }},
               "parameters": {"max_new_tokens": {{ max_tokens }}, "brand": {{ vars.brand | tojson }}}}"""
    tgi = llm(
        fake,
        preset="template",
        url="http://llm.test/generate",
        model="",
        body=body,
        reply_path="generated_text",
        system_prompt="System says hi",
        api_key_header="X-Token",
        api_key_prefix="",
    )
    result = await tgi.ask(make_turn("what is deep learning?", vars={"brand": 'A"cme'}))
    (request,) = fake.requests
    assert request.body == {
        "inputs": "System says hi\nwhat is deep learning?",
        "parameters": {"max_new_tokens": 512, "brand": 'A"cme'},
    }
    assert request.headers["x-token"] == KEY
    assert result.replies == (Reply("You said: what is deep learning?"),)
    wrong_path = llm(fake, preset="template", url="http://llm.test/generate", body=body, reply_path="choices.0.text")
    with pytest.raises(ConnectorBadResponse, match="nothing at 'choices'"):
        await wrong_path.ask(make_turn("x", vars={"brand": "b"}))


async def test_429_and_5xx_are_retried_within_the_deadline() -> None:
    fake = FakeLlm()
    gpt = llm(fake, retries=3)
    fake.fail.extend([429, 503])
    assert (await gpt.ask(make_turn("hello"))).replies == (Reply("You said: hello"),)
    assert len(fake.requests) == 3 and gpt.guard.stats.retries == 2
    claude = llm(fake, preset="anthropic", url="http://llm.test", model="claude")
    fake.fail.append(529)  # Anthropic's "overloaded"
    assert (await claude.ask(make_turn("hello"))).replies == (Reply("You said: hello"),)
    fake.fail.extend([500, 500, 500])
    with pytest.raises(ConnectorUnavailable, match="HTTP 500"):
        await llm(fake, retries=2).ask(make_turn("hello"))
    # a retry that cannot finish before the deadline is not started
    slow_backoff = llm(fake, retries=3, backoff=5.0, backoff_max=5.0, timeout=1.0)
    fake.requests.clear()
    fake.fail.append(503)
    with pytest.raises(ConnectorUnavailable):
        await slow_backoff.ask(make_turn("hello"))
    assert len(fake.requests) == 1


async def test_timeout_malformed_and_empty_answers() -> None:
    fake = FakeLlm()
    gpt = llm(fake, timeout=0.3)
    fake.fail.append(("slow", 2.0))
    with pytest.raises(ConnectorTimeout):
        await gpt.ask(make_turn("hello"))
    fake.fail.append("malformed")
    with pytest.raises(ConnectorBadResponse, match="not JSON"):
        await gpt.ask(make_turn("hello"))
    with pytest.raises(ConnectorBadResponse, match="answered nothing"):
        await gpt.ask(make_turn("say nothing"))


async def test_auth_failures_never_show_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeLlm()
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, "sk-wrong-secret-999")
    with pytest.raises(ConnectorAuthError, match="HTTP 401") as refused:
        await llm(fake).ask(make_turn("hello"))
    monkeypatch.setenv(KEY_ENV, KEY)
    fake.fail.extend([503, 503, 503])
    with pytest.raises(ConnectorUnavailable) as down:
        await llm(fake).ask(make_turn("hello"))
    assert "retrying gpt" in caplog.text
    for secret in ("sk-wrong-secret-999", KEY):
        assert secret not in caplog.text and secret not in str(refused.value) and secret not in str(down.value)
    monkeypatch.delenv(KEY_ENV)
    fake.requests.clear()
    with pytest.raises(ConnectorAuthError, match=f"{KEY_ENV} .* is not set"):
        await llm(fake).ask(make_turn("hello"))
    assert fake.requests == []
    assert recorded("anthropic_auth_error.json")["error"]["type"] == "authentication_error"


async def test_flow_options_replace_the_system_prompt() -> None:
    fake = FakeLlm()
    await llm(fake, system_prompt="default").ask(make_turn("hi", options={"system": "Answer in Indonesian."}))
    assert fake.requests[0].body["messages"][0] == {"role": "system", "content": "Answer in Indonesian."}


async def test_the_fallback_chain_takes_over_in_a_flow(tmp_path: Path) -> None:
    down, up = FakeLlm(), FakeLlm()
    down.fail.extend([503] * 5)
    result = await run_flow(tmp_path, {"primary": llm(down, "primary", retries=1), "backup": llm(up, "backup")})
    assert [r.text for r in result.replies] == ["You said: hello"]
    up.fail.extend([("slow", 3.0)])
    both_down = await run_flow(
        tmp_path, {"primary": llm(down, "primary", retries=0), "backup": llm(up, "backup", timeout=0.3)}
    )
    assert [r.text for r in both_down.replies] == ["Both engines are down."]


def test_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="needs url, body, reply_path"):
        LlmConfig.model_validate({"type": "llm", "preset": "template"})
    with pytest.raises(ValidationError, match="needs `model`"):
        LlmConfig.model_validate({"type": "llm", "preset": "anthropic"})
    with pytest.raises(ValidationError, match="template error"):
        LlmConfig.model_validate({"type": "llm", "model": "m", "system_prompt": "{{ vars.x "})


async def test_end_to_end_through_the_running_app(tmp_path: Path) -> None:
    """A platform webhook in, the llm connector to a fake OpenAI-style server on a real port, replies
    and actions out; then the fake fails and the flow's fallback answers."""
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "main.yaml").write_text(
        "flow: main\nvars: {brand: Acme}\nstates:\n  start:\n    routes:\n"
        '      - do: [{ask: {connector: gpt, fallback: [{reply: "The assistant is unavailable."}]}}]\n'
    )
    fake = FakeLlm()
    async with (
        Server(fake.app()) as llm_server,
        fake_platform() as (platform_server, platform),
        httpx.AsyncClient(timeout=10) as http,
    ):
        extra = f"""
            admin: {{token: t0ken}}
            connectors:
              gpt:
                type: llm
                url: {llm_server.url}/v1
                model: gpt-4o-mini
                api_key_env: {KEY_ENV}
                system_prompt: "You answer for {{{{ vars.brand }}}}."
                tools: [handoff, set_variable]
                retries: 1
                backoff: 0.01
            """
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, flows, extra=extra)
        async with running(settings) as (server, services):

            def texts(conversation: str) -> list[str]:
                return [
                    c.body["text"]
                    for c in platform.calls
                    if c.path == "/messages" and c.body["conversation_id"] == conversation
                ]

            for n, text in enumerate(["hello", "my order is 123456", "I need an agent"], 1):
                await http.post(f"{server.url}/webhooks/myapp", json=message(n, text=text))
                await wait_for(lambda n=n: len(fake.requests) == n and services.dispatcher.backlog == 0)
            # the set_variable and handoff answers carry no text: one reply in all
            assert texts("c-1") == ["You said: hello"]
            first, _, third = (r.body for r in fake.requests)
            assert first["messages"][0] == {"role": "system", "content": "You answer for Acme."}
            assert third["messages"][1:] == [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "You said: hello"},
                {"role": "user", "content": "my order is 123456"},
                {"role": "user", "content": "I need an agent"},
            ]
            conversation = await services.store.conversation("myapp:c-1")
            assert conversation is not None
            assert conversation["state"]["vars"]["order"] == "123456"
            assert conversation["state"]["owner"] == "queued"
            assert conversation["state"]["handoff"]["queue"] == "billing"

            fake.fail.extend([503, 503])
            await http.post(f"{server.url}/webhooks/myapp", json=message(9, conversation="c-2", text="anyone?"))
            await wait_for(lambda: texts("c-2") == ["The assistant is unavailable."])
            listed = await http.get(f"{server.url}/api/v1/connectors", headers={"authorization": "Bearer t0ken"})
            (gpt,) = listed.json()["connectors"]
            assert gpt["name"] == "gpt" and gpt["type"] == "llm"
            assert gpt["errors"] == {"unavailable": 1} and gpt["retries"] == 1 and gpt["ok"] == 3
            assert (await http.get(f"{server.url}/api/v1/connectors")).status_code == 401


async def test_a_recorded_llama_cpp_answer_reads_as_openai() -> None:
    answer = recorded("llamacpp_chat_completion.json")

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer)

    cfg = LlmConfig.model_validate({"type": "llm", "url": "http://127.0.0.1:8000/v1", "model": "smollm2"})
    local = LlmConnector("local", cfg, httpx.AsyncClient(transport=httpx.MockTransport(server)))
    result = await local.ask(make_turn("Say hello in one short sentence."))
    assert result.replies == (Reply("I'm here to help with any creative writing project."),)
