"""`llm`: a language model over HTTP, by preset or by template.

```yaml
connectors:
  gpt:
    type: llm
    preset: openai                      # openai | anthropic | ollama | template
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY         # the key is read from this variable at each call, never logged
    system_prompt: "You answer for {{ vars.brand }}. Be brief."
    history_turns: 6                    # earlier user turns (with the bot's answers) sent along
    history_chars: 6000                 # ... and at most this many characters of them
    tools: [handoff, resolve, set_variable]   # what the model may do besides answering
    queues: [tier1, billing]            # the handoff tool's choice of queues
```

Presets:
- `openai`: `POST {url}/chat/completions` (url default https://api.openai.com/v1) with a bearer key;
  the same API as vLLM, llama.cpp's server, LM Studio and Ollama's /v1. Azure OpenAI: `url:
  https://RESOURCE.openai.azure.com/openai/deployments/DEPLOYMENT` and `api_version: 2024-10-21`,
  which adds `?api-version=` and sends the key in an `api-key` header.
- `anthropic`: `POST {url}/v1/messages` (url default https://api.anthropic.com) with `x-api-key` and
  `anthropic-version`.
- `ollama`: `POST {url}/api/chat` (url default http://localhost:11434), not streamed.
- `template`: `POST {url}` with the JSON that the Jinja2 template `body` renders (it sees `model`,
  `system`, `messages`, `message`, `vars`, `max_tokens`, `temperature`), and the reply text found at
  `reply_path` (dots and list indices: `choices.0.message.content`) in the answer.

Tool calls (OpenAI `tools` / Anthropic `tool_use` / Ollama `tools`): `handoff(queue, reason)`,
`resolve(reason)` and `set_variable(name, value)` become the matching actions, only for the tools
listed in `tools`. One request per turn: tool results are not sent back to the model.

A flow's `ask: {connector: gpt, options: {system: "..."}}` replaces the system prompt for that call.
Requests are safe to repeat, so 429 and 5xx answers are retried with backoff within the budget. The
answer is not streamed: the turn needs the whole reply (and its tool calls) before it can act.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from jinja2 import ChainableUndefined, TemplateSyntaxError
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import Field, field_validator, model_validator

from connectors.base import (
    ConnectorAuthError,
    ConnectorBadResponse,
    ConnectorConfig,
    ConnectorResult,
    ConnectorTurn,
    HistoryEntry,
)
from connectors.resilience import Call, HttpConnector, HttpConnectorConfig, result_of
from middleware.model import Action, Handoff, Reply, Resolve, SetVariable

log = logging.getLogger("switchboard.connectors.llm")

_env = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)
VAR_NAME = re.compile(r"^(user\.)?[A-Za-z_][A-Za-z0-9_]*$")
Tool = Literal["handoff", "resolve", "set_variable"]
DEFAULT_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "ollama": "http://localhost:11434",
}


class LlmConfig(HttpConnectorConfig):
    type: str = "llm"
    preset: Literal["openai", "anthropic", "ollama", "template"] = "openai"
    #: the API's base URL (the full endpoint for `template`); default per preset
    url: str | None = None
    model: str = ""
    #: the environment variable holding the API key (none: no key is sent)
    api_key_env: str | None = None
    #: Azure OpenAI's api-version; set, the key goes in an `api-key` header
    api_version: str | None = None
    anthropic_version: str = "2023-06-01"
    #: Jinja2, rendered with vars, message, conversation, user, now
    system_prompt: str = ""
    history_turns: int = Field(default=6, ge=0)
    history_chars: int = Field(default=6000, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    tools: tuple[Tool, ...] = ()
    #: the queues the handoff tool may name (empty: any; the default below when none is named)
    queues: tuple[str, ...] = ()
    handoff_queue: str = "default"
    #: the variables set_variable may set (empty: any valid name)
    variables: tuple[str, ...] = ()
    #: merged into the request body as is (seed, top_p, stop, ...)
    extra: dict[str, Any] = Field(default_factory=dict)
    #: sent with every request (not for keys: use api_key_env)
    headers: dict[str, str] = Field(default_factory=dict)
    #: template mode: the request body (Jinja2 rendering JSON) and where the reply text is
    body: str | None = None
    reply_path: str | None = None
    #: template mode: the header carrying the key, and what precedes it
    api_key_header: str = "Authorization"
    api_key_prefix: str = "Bearer "

    @field_validator("system_prompt", "body")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v:
            try:
                _env.parse(v)
            except TemplateSyntaxError as exc:
                raise ValueError(f"template error on its line {exc.lineno}: {exc.message}") from exc
        return v

    @model_validator(mode="after")
    def _complete(self) -> LlmConfig:
        if self.preset == "template":
            missing = [k for k in ("url", "body", "reply_path") if not getattr(self, k)]
            if missing:
                raise ValueError(f"preset template needs {', '.join(missing)}")
        elif not self.model and self.api_version is None:
            raise ValueError(f"preset {self.preset} needs `model`")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


def history_window(history: Sequence[HistoryEntry], turns: int, chars: int) -> list[HistoryEntry]:
    """The last `turns` user turns (each with the bot's answers), oldest dropped past `chars` characters."""
    groups: list[list[HistoryEntry]] = []
    for entry in history:
        if entry.role == "user" or not groups:
            groups.append([])
        groups[-1].append(entry)
    picked = [e for group in groups[-turns:] for e in group] if turns else []
    total = sum(len(e.text) for e in picked)
    while picked and total > chars:
        total -= len(picked.pop(0).text)
    return picked


def _path(data: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(data, list) and part.lstrip("-").isdigit() and -len(data) <= int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            raise ConnectorBadResponse(f"reply_path {path!r}: nothing at {part!r}")
    return data


class LlmConnector(HttpConnector):
    """A chat model (OpenAI-compatible, Anthropic, Ollama, or templated HTTP) answering each turn."""

    Config = LlmConfig
    config: LlmConfig

    def __init__(self, name: str, config: ConnectorConfig, http: Any) -> None:
        super().__init__(name, config, http)
        cfg = self.config
        self._system = _env.from_string(cfg.system_prompt) if cfg.system_prompt else None
        self._body = _env.from_string(cfg.body) if cfg.body else None

    # -- the pieces of a request

    def _key(self) -> str | None:
        name = self.config.api_key_env
        if not name:
            return None
        key = os.environ.get(name)
        if not key:
            raise ConnectorAuthError(f"environment variable {name} (the API key) is not set")
        return key

    def _system_prompt(self, turn: ConnectorTurn) -> str:
        if "system" in turn.options:
            return str(turn.options["system"])
        if self._system is None:
            return ""
        m = turn.message
        context = {
            "vars": dict(turn.vars),
            "message": {"text": m.text, "type": m.type, "platform": m.platform, "channel": m.channel},
            "conversation": {"key": turn.conversation_key, "id": m.conversation_id, "platform": m.platform},
            "user": {"id": m.sender.id, "name": m.sender.name or "", **m.sender.attributes},
            "now": datetime.now(UTC),
        }
        try:
            return self._system.render(context)
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise ConnectorBadResponse(f"system_prompt template failed: {type(exc).__name__}: {exc}") from exc

    def _messages(self, turn: ConnectorTurn) -> list[dict[str, str]]:
        cfg = self.config
        past = history_window(list(turn.history), cfg.history_turns, cfg.history_chars)
        out = [{"role": "user" if e.role == "user" else "assistant", "content": e.text} for e in past]
        out.append({"role": "user", "content": turn.message.text or str(turn.message.payload.get("payload", ""))})
        return out

    def _tool_specs(self) -> list[tuple[str, str, dict[str, Any]]]:
        cfg = self.config
        queue: dict[str, Any] = {"type": "string", "description": "the team to hand the conversation to"}
        if cfg.queues:
            queue["enum"] = list(cfg.queues)
        name: dict[str, Any] = {"type": "string", "description": "the variable's name"}
        if cfg.variables:
            name["enum"] = list(cfg.variables)
        specs = {
            "handoff": (
                "Hand the conversation to a human agent when the user asks for one or you cannot help.",
                {"type": "object", "properties": {"queue": queue, "reason": {"type": "string"}}},
            ),
            "resolve": (
                "End the conversation when the user's matter is settled.",
                {"type": "object", "properties": {"reason": {"type": "string"}}},
            ),
            "set_variable": (
                "Remember a fact about the conversation (an order number, an email) under a name.",
                {
                    "type": "object",
                    "properties": {"name": name, "value": {"type": "string"}},
                    "required": ["name", "value"],
                },
            ),
        }
        return [(tool, *specs[tool]) for tool in cfg.tools]

    def _with_extra(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, **self.config.extra}

    # -- presets

    async def call_ask(self, call: Call, turn: ConnectorTurn) -> ConnectorResult:
        preset = self.config.preset
        if preset == "anthropic":
            text, calls = await self._anthropic(call, turn)
        elif preset == "ollama":
            text, calls = await self._ollama(call, turn)
        elif preset == "template":
            text, calls = await self._template(call, turn), []
        else:
            text, calls = await self._openai(call, turn)
        actions = self._actions(calls)
        if not text.strip() and not actions:
            raise ConnectorBadResponse("the model answered nothing")
        return result_of([Reply(text.strip())] if text.strip() else [], actions)

    async def _openai(self, call: Call, turn: ConnectorTurn) -> tuple[str, list[tuple[str, Any]]]:
        cfg = self.config
        base = (cfg.url or DEFAULT_URLS["openai"]).rstrip("/")
        headers = dict(cfg.headers)
        params = None
        key = self._key()
        if cfg.api_version is not None:
            params = {"api-version": cfg.api_version}
            if key:
                headers["api-key"] = key
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        system = self._system_prompt(turn)
        messages = ([{"role": "system", "content": system}] if system else []) + self._messages(turn)
        body: dict[str, Any] = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        tools = self._tool_specs()
        if tools:
            body["tools"] = [
                {"type": "function", "function": {"name": n, "description": d, "parameters": p}} for n, d, p in tools
            ]
            body["tool_choice"] = "auto"
        url = f"{base}/chat/completions"
        response = await self.send(
            call, "POST", url, json=self._with_extra(body), headers=headers, params=params, safe=True
        )
        data = self.json_of(response)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ConnectorBadResponse(f"no choices in the answer{_error_text(data)}")
        message = choices[0].get("message") or {}
        calls = [
            (str(fn.get("name")), fn.get("arguments"))
            for tc in message.get("tool_calls") or ()
            if isinstance(tc, dict) and isinstance(fn := tc.get("function"), dict)
        ]
        return _content_text(message.get("content")), calls

    async def _anthropic(self, call: Call, turn: ConnectorTurn) -> tuple[str, list[tuple[str, Any]]]:
        cfg = self.config
        base = (cfg.url or DEFAULT_URLS["anthropic"]).rstrip("/")
        headers = {**cfg.headers, "anthropic-version": cfg.anthropic_version}
        key = self._key()
        if key:
            headers["x-api-key"] = key
        body: dict[str, Any] = {
            "model": cfg.model,
            "max_tokens": cfg.max_tokens,
            "messages": _alternating(self._messages(turn)),
        }
        system = self._system_prompt(turn)
        if system:
            body["system"] = system
        if cfg.temperature is not None:
            body["temperature"] = min(cfg.temperature, 1.0)
        tools = self._tool_specs()
        if tools:
            body["tools"] = [{"name": n, "description": d, "input_schema": p} for n, d, p in tools]
        response = await self.send(
            call, "POST", f"{base}/v1/messages", json=self._with_extra(body), headers=headers, safe=True
        )
        data = self.json_of(response)
        content = data.get("content") if isinstance(data, dict) else None
        if not isinstance(content, list):
            raise ConnectorBadResponse(f"no content in the answer{_error_text(data)}")
        text = "".join(str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text")
        calls = [
            (str(b.get("name")), b.get("input")) for b in content if isinstance(b, dict) and b.get("type") == "tool_use"
        ]
        return text, calls

    async def _ollama(self, call: Call, turn: ConnectorTurn) -> tuple[str, list[tuple[str, Any]]]:
        cfg = self.config
        base = (cfg.url or DEFAULT_URLS["ollama"]).rstrip("/")
        headers = dict(cfg.headers)
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        system = self._system_prompt(turn)
        messages = ([{"role": "system", "content": system}] if system else []) + self._messages(turn)
        options: dict[str, Any] = {"num_predict": cfg.max_tokens}
        if cfg.temperature is not None:
            options["temperature"] = cfg.temperature
        # Ollama streams NDJSON unless told not to (its API docs, "Generate a chat completion")
        body: dict[str, Any] = {"model": cfg.model, "messages": messages, "stream": False, "options": options}
        tools = self._tool_specs()
        if tools:
            body["tools"] = [
                {"type": "function", "function": {"name": n, "description": d, "parameters": p}} for n, d, p in tools
            ]
        url = f"{base}/api/chat"
        response = await self.send(call, "POST", url, json=self._with_extra(body), headers=headers, safe=True)
        data = self.json_of(response)
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict):
            raise ConnectorBadResponse(f"no message in the answer{_error_text(data)}")
        calls = [
            (str(fn.get("name")), fn.get("arguments"))
            for tc in message.get("tool_calls") or ()
            if isinstance(tc, dict) and isinstance(fn := tc.get("function"), dict)
        ]
        return _content_text(message.get("content")), calls

    async def _template(self, call: Call, turn: ConnectorTurn) -> str:
        cfg = self.config
        assert self._body is not None and cfg.url is not None and cfg.reply_path is not None
        context = {
            "model": cfg.model,
            "system": self._system_prompt(turn),
            "messages": self._messages(turn),
            "message": turn.message.text,
            "vars": dict(turn.vars),
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
        }
        try:
            body = json.loads(self._body.render(context))
        except (TemplateError, ValueError, TypeError, LookupError, AttributeError) as exc:
            raise ConnectorBadResponse(f"the body template did not render JSON: {type(exc).__name__}: {exc}") from exc
        headers = dict(cfg.headers)
        key = self._key()
        if key:
            headers[cfg.api_key_header] = f"{cfg.api_key_prefix}{key}"
        response = await self.send(call, "POST", cfg.url, json=body, headers=headers, safe=True)
        return _content_text(_path(self.json_of(response), cfg.reply_path))

    # -- tool calls

    def _actions(self, calls: list[tuple[str, Any]]) -> list[Action]:
        cfg = self.config
        actions: list[Action] = []
        for name, raw in calls:
            if name not in cfg.tools:
                log.warning("model %s called tool %r, which is not enabled: ignored", self.name, name)
                continue
            args = _arguments(raw)
            if name == "handoff":
                queue = str(args.get("queue") or cfg.handoff_queue)
                if cfg.queues and queue not in cfg.queues:
                    queue = cfg.handoff_queue
                actions.append(Handoff(queue, str(args.get("reason") or f"llm {self.name}")))
            elif name == "resolve":
                actions.append(Resolve(str(args.get("reason") or f"llm {self.name}")))
            else:
                var = str(args.get("name") or "")
                if not VAR_NAME.match(var) or (cfg.variables and var not in cfg.variables):
                    log.warning("model %s asked to set variable %r: not allowed, ignored", self.name, var)
                    continue
                actions.append(SetVariable(var, args.get("value")))
        return actions


def _arguments(raw: Any) -> dict[str, Any]:
    """Tool arguments: a JSON string (OpenAI) or an object (Anthropic, Ollama); malformed ones are empty."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str) and raw.strip():
        try:
            parsed = json.loads(raw)
        except ValueError:
            log.warning("tool call with arguments that are not JSON: ignored")
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return str(content)


def _error_text(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return f": {str(data['error'].get('message') or '')[:200]}"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return f": {data['error'][:200]}"
    return ""


def _alternating(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Anthropic wants user first and the roles alternating: merge neighbours, drop a leading answer."""
    out: list[dict[str, str]] = []
    for m in messages:
        if not out and m["role"] != "user":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": f"{out[-1]['content']}\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


__all__ = ["LlmConfig", "LlmConnector", "history_window"]
