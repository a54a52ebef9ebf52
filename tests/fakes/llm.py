"""A fake LLM API: OpenAI chat completions (and Azure's), Anthropic messages, Ollama chat, and a
Hugging Face text-generation-inference `/generate` for the template mode.

Shapes, from each API's documentation (answers recorded in tests/data/llm, see SOURCES.md):

- OpenAI, https://platform.openai.com/docs/api-reference/chat/create and
  https://platform.openai.com/docs/guides/function-calling : `POST /v1/chat/completions` with a
  bearer key, `{"model", "messages", "tools": [{"type": "function", "function": {...}}]}`, answering
  `{"choices": [{"message": {"content", "tool_calls": [{"function": {"name", "arguments": "<JSON
  text>"}}]}, "finish_reason"}]}`; 401 `{"error": {"message", "type": "invalid_request_error", "code":
  "invalid_api_key"}}`.
- Azure OpenAI, https://learn.microsoft.com/en-us/azure/ai-services/openai/reference :
  `POST /openai/deployments/{deployment}/chat/completions?api-version=...` with an `api-key` header.
- Anthropic, https://docs.anthropic.com/en/api/messages and https://docs.anthropic.com/en/api/errors :
  `POST /v1/messages` with `x-api-key` and `anthropic-version`, `{"model", "max_tokens", "system",
  "messages", "tools": [{"name", "description", "input_schema"}]}`, answering `{"content": [{"type":
  "text"} | {"type": "tool_use", "name", "input"}], "stop_reason"}`; 529 `overloaded_error`.
- Ollama, https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion :
  `POST /api/chat` `{"model", "messages", "stream": false, "tools"}` answering `{"message": {"content",
  "tool_calls": [{"function": {"name", "arguments": {...}}}]}, "done": true}`.
- TGI, https://huggingface.github.io/text-generation-inference/ : `POST /generate {"inputs",
  "parameters"}` answering `{"generated_text"}`.

What it answers depends on the last user message: one containing "agent" calls the handoff tool,
"order" the set_variable tool, "bye" the resolve tool (when the request offered tools), anything else
gets `You said: <text>` (and "say nothing" an empty answer).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.engines import FakeEngine, Recorded

DATA = Path(__file__).resolve().parent.parent / "data" / "llm"
KEY = "sk-test-123"


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content"))
    return ""


def _offered(body: dict[str, Any]) -> set[str]:
    names = set()
    for tool in body.get("tools") or ():
        names.add(tool.get("name") or tool.get("function", {}).get("name"))
    return names


def _tool_for(text: str, offered: set[str]) -> tuple[str, dict[str, Any]] | None:
    lowered = text.lower()
    if "agent" in lowered and "handoff" in offered:
        return "handoff", {"queue": "billing", "reason": "asked for a human"}
    if "order" in lowered and "set_variable" in offered:
        return "set_variable", {"name": "order", "value": "123456"}
    if "bye" in lowered and "resolve" in offered:
        return "resolve", {"reason": "the user said goodbye"}
    return None


@dataclass
class FakeLlm(FakeEngine):
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._openai, methods=["POST"]),
                Route("/openai/deployments/{deployment}/chat/completions", self._azure, methods=["POST"]),
                Route("/v1/messages", self._anthropic, methods=["POST"]),
                Route("/api/chat", self._ollama, methods=["POST"]),
                Route("/generate", self._tgi, methods=["POST"]),
            ]
        )

    async def _start(self, request: Request) -> tuple[Recorded, Response | None]:
        rec = await self.record(request)
        return rec, await self.failure()

    def _openai_answer(self, body: dict[str, Any]) -> Response:
        text = _last_user(body["messages"])
        tool = _tool_for(text, _offered(body))
        if tool is not None:
            answer = recorded("openai_tool_calls.json")
            call = answer["choices"][0]["message"]["tool_calls"][0]["function"]
            call["name"], call["arguments"] = tool[0], json.dumps(tool[1])
        else:
            answer = recorded("openai_chat_completion.json")
            answer["choices"][0]["message"]["content"] = "" if text == "say nothing" else f"You said: {text}"
        answer["model"] = body.get("model", "")
        return JSONResponse(answer)

    async def _openai(self, request: Request) -> Response:
        rec, failed = await self._start(request)
        if rec.headers.get("authorization") != f"Bearer {KEY}":
            error = {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
            return JSONResponse({"error": error}, status_code=401)
        return failed or self._openai_answer(rec.body)

    async def _azure(self, request: Request) -> Response:
        rec, failed = await self._start(request)
        if rec.headers.get("api-key") != KEY or "api-version" not in rec.query:
            error = {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}
            return JSONResponse({"error": error}, status_code=401)
        return failed or self._openai_answer(rec.body)

    async def _anthropic(self, request: Request) -> Response:
        rec, failed = await self._start(request)
        if rec.headers.get("x-api-key") != KEY or not rec.headers.get("anthropic-version"):
            return JSONResponse(recorded("anthropic_auth_error.json"), status_code=401)
        if failed is not None:
            return failed
        body = rec.body
        messages = body["messages"]
        roles = [m["role"] for m in messages]
        if roles[:1] != ["user"] or any(a == b for a, b in itertools.pairwise(roles)):
            error = {"type": "invalid_request_error", "message": "messages: roles must alternate, starting with user"}
            return JSONResponse({"type": "error", "error": error}, status_code=400)
        text = _last_user(messages)
        tool = _tool_for(text, _offered(body))
        if tool is not None:
            answer = recorded("anthropic_tool_use.json")
            answer["content"][1].update(name=tool[0], input=tool[1])
        else:
            answer = recorded("anthropic_message.json")
            answer["content"][0]["text"] = f"You said: {text}"
        return JSONResponse(answer)

    async def _ollama(self, request: Request) -> Response:
        rec, failed = await self._start(request)
        if failed is not None:
            return failed
        body = rec.body
        if body.get("stream") is not False:
            return Response('{"done": false}\n{"done": true}\n', media_type="application/x-ndjson")
        text = _last_user(body["messages"])
        tool = _tool_for(text, _offered(body))
        if tool is not None:
            answer = recorded("ollama_tool_calls.json")
            answer["message"]["tool_calls"][0]["function"] = {"name": tool[0], "arguments": tool[1]}
        else:
            answer = recorded("ollama_chat.json")
            answer["message"]["content"] = f"You said: {text}"
        return JSONResponse(answer)

    async def _tgi(self, request: Request) -> Response:
        rec, failed = await self._start(request)
        if failed is not None:
            return failed
        answer = copy.deepcopy(recorded("tgi_generate.json"))
        answer["generated_text"] = f"You said: {str(rec.body['inputs']).splitlines()[-1]}"
        return JSONResponse(answer)
