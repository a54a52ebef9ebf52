"""Config: `config/switchboard.yaml` with `${ENV}` interpolation, validated, with file:line:col errors.

A config holding only `store`, `flows` and `platforms` is complete; everything else has defaults.
Relative paths resolve against the config file's folder.

Secrets come from the environment: a value under a key named like a secret (`token`, `bot_token`,
`app_secret`, `password`, `api_key`, `Authorization`...) or a URL's password written literally in
the file is accepted, with one warning per field naming its path (never its value): logged when the
config is loaded, and reported by `switchboard check` as `file:line:col: warning: ...`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors import ConnectorConfig, connector_class
from middleware.handoff import HandoffSettings
from middleware.logs import secret_name
from middleware.platforms import PLATFORM_TYPES, PlatformConfig
from middleware.yamlfile import (
    ConfigError,
    PathKey,
    Problem,
    YamlDoc,
    interpolate_env,
    load_yaml,
    nearest,
    parse_yaml,
    pydantic_problems,
)

log = logging.getLogger("switchboard.config")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreSettings(_Section):
    url: str = "sqlite:///data/switchboard.db"
    #: most writes one group commit takes
    batch_max: int = Field(default=512, ge=1)
    #: SQLite: when a commit lands with only a few writes waiting (the service is busy), the next
    #: one waits this long for more to share it; 0: at once
    commit_gather_ms: float = Field(default=1.0, ge=0, le=100)
    #: days a handled message id is kept for dedupe
    dedupe_days: float = Field(default=7.0, gt=0)
    #: at start: `auto` upgrades the schema (under a lock: safe with nodes starting at once); `check`
    #: refuses to start unless it is current (`switchboard migrate` does it). Either way a node refuses a
    #: database a newer version migrated (docs/operations.md#upgrades-and-schema-migrations).
    migrate: Literal["auto", "check"] = "auto"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("store url must start with sqlite:// or postgresql://")
        return v


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)


class IngressSettings(_Section):
    """Flood control per sender at the webhook (middleware/flood.py, docs/operations.md)."""

    #: messages a second that one sender (platform, sender id) gets turns for; null: no limit
    sender_per_second: float | None = Field(default=1.0, gt=0)
    #: messages a sender may send at once before the rate applies; past both they are stored, unanswered
    sender_burst: int = Field(default=20, ge=1)


class DispatchSettings(_Section):
    #: conversations worked on at once by this node
    max_concurrency: int = Field(default=64, ge=1)
    #: accepted messages not yet turned into replies; past it webhooks get 503 + Retry-After
    max_backlog: int = Field(default=10_000, ge=1)
    #: past this many accepted messages waiting for their turns, a webhook's answer is held (up to
    #: `hold_seconds`) until the backlog goes down: a sender faster than the turns is slowed to their
    #: pace instead of piling up work that waits; null: answer at once until `max_backlog`
    hold_backlog: int | None = Field(default=256, ge=1)
    hold_seconds: float = Field(default=1.0, ge=0)
    retry_after_seconds: int = Field(default=5, ge=1)
    lease_seconds: float = Field(default=30.0, gt=1)
    sweep_seconds: float = Field(default=2.0, gt=0)
    #: a conversation keeps its lease (and its state in memory) this long after its last turn, so
    #: that its next message runs without claiming it again; 0 releases at once
    linger_seconds: float = Field(default=2.0, ge=0)
    #: a turn's whole deadline (flow engine and connectors)
    turn_timeout: float = Field(default=30.0, gt=0)
    #: SIGTERM: webhooks get 503, turns in flight finish (or go to another node), leases are handed
    #: back and the outbox flushed within this many seconds; the process exits a few seconds later
    shutdown_seconds: float = Field(default=10.0, gt=0)


class TypingSettings(_Section):
    #: a turn shorter than this sends no typing indicator at all
    delay: float = Field(default=0.8, ge=0)


class OutboxSettings(_Section):
    max_attempts: int = Field(default=10, ge=1)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=60.0, gt=0)
    #: the longest a 429 Retry-After is honoured before it counts as a failure
    retry_after_max: float = Field(default=300.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=100, ge=1)


class AdminSettings(_Section):
    #: bearer token for /api/v1; unset means the admin API answers 401 to everyone but loopback
    token: str | None = None


class InboxSettings(_Section):
    """The built-in agent inbox at /inbox (accounts: `switchboard agent add NAME`)."""

    #: a signed-in agent's session ends after this many minutes without a request
    session_minutes: float = Field(default=480.0, gt=0)
    #: signs the sign-in form's CSRF token; give every node the same one (e.g. ${SWITCHBOARD_INBOX_SECRET});
    #: unset or empty: a random one per process, with a warning at start-up
    secret: str | None = None
    #: failed sign-ins for one name (four times as many from one address) within 15 minutes before sign-in pauses
    max_failed_logins: int = Field(default=5, ge=1)


class Settings(_Section):
    store: StoreSettings = StoreSettings()
    flows: Path = Path("flows")
    platforms: dict[str, PlatformConfig] = Field(default_factory=dict)
    connectors: dict[str, ConnectorConfig] = Field(default_factory=dict)
    #: hosts a flow's `http` action may call; empty allows any
    http_allow: tuple[str, ...] = ()
    #: watch the flows folder and swap in valid changes between turns
    reload: bool = True
    server: ServerSettings = ServerSettings()
    ingress: IngressSettings = IngressSettings()
    dispatch: DispatchSettings = DispatchSettings()
    typing: TypingSettings = TypingSettings()
    outbox: OutboxSettings = OutboxSettings()
    admin: AdminSettings = AdminSettings()
    handoff: HandoffSettings = HandoffSettings()
    inbox: InboxSettings = InboxSettings()
    node_id: str | None = None
    fallback_reply: str = "Sorry, something went wrong on our side. Please try again in a moment."
    #: where the config came from; relative paths were resolved against its folder
    source: str = "<defaults>"

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source != "<defaults>" else Path.cwd()


def load_settings(path: Path | str, env: dict[str, str] | None = None, *, warn: bool = True) -> Settings:
    """Read, interpolate and validate a config file; raise ConfigError listing every problem.

    With `warn`, each literal secret in the file is logged as a warning (see `literal_secrets`)."""
    path = Path(path)
    doc = load_yaml(path)
    return settings_from_doc(doc, env, warn=warn)


def settings_from_text(text: str, file: str = "<config>", env: dict[str, str] | None = None) -> Settings:
    return settings_from_doc(parse_yaml(text, file), env)


#: a URL's `user:password@`, the password not from the environment
_URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s/]+)@")


def literal_secrets(doc: YamlDoc) -> list[Problem]:
    """The secrets written in the file instead of `${ENV}`, one per field, at the value's position.

    Read before `${ENV}` interpolation: a value holding any `${...}` is taken from the environment."""
    found: list[Problem] = []

    def walk(value: Any, path: PathKey, named: bool) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key), named or secret_name(str(key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*path, i), named)
        elif isinstance(value, str) and value.strip():
            field = ".".join(str(k) for k in path)
            if named and "${" not in value:
                found.append(
                    doc.problem(path, f"{field} is a secret written in the file; put it in the environment: ${{NAME}}")
                )
            elif any("${" not in m.group(1) for m in _URL_PASSWORD.finditer(value)):
                found.append(
                    doc.problem(
                        path, f"{field} holds a password written in the file; put it in the environment: ${{NAME}}"
                    )
                )

    walk(doc.data, (), False)
    return found


def settings_from_doc(doc: YamlDoc, env: dict[str, str] | None = None, *, warn: bool = True) -> Settings:
    if warn:
        for literal in literal_secrets(doc):
            log.warning("%s", literal)
    problems = interpolate_env(doc, env)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([doc.problem((), "config must be a mapping of sections")])
    base = Path(doc.file).resolve().parent if not doc.file.startswith("<") else Path.cwd()
    raw_platforms = data.get("platforms") or {}
    platforms: dict[str, PlatformConfig] = {}
    if not isinstance(raw_platforms, dict):
        problems.append(doc.problem(("platforms",), "platforms must be a mapping of name -> platform config"))
        raw_platforms = {}
    for name, raw in raw_platforms.items():
        platform = _platform_config(doc, name, raw, problems)
        if platform is not None:
            platforms[name] = platform
    raw_connectors = data.get("connectors") or {}
    connectors: dict[str, ConnectorConfig] = {}
    if not isinstance(raw_connectors, dict):
        problems.append(doc.problem(("connectors",), "connectors must be a mapping of name -> connector config"))
        raw_connectors = {}
    for name, raw in raw_connectors.items():
        connector = _connector_config(doc, name, raw, problems)
        if connector is not None:
            connectors[name] = connector
    rest = {k: v for k, v in data.items() if k not in ("platforms", "connectors")}
    known: dict[PathKey, Any] = {(): Settings.model_fields.keys()}
    for key, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            known[(key,)] = ann.model_fields.keys()
    try:
        settings = Settings.model_validate({**rest, "source": doc.file})
    except ValidationError as exc:
        problems += pydantic_problems(doc, (), exc.errors(), known)
        raise ConfigError(problems) from exc
    if problems:
        raise ConfigError(problems)
    flows = (settings.flows if settings.flows.is_absolute() else base / settings.flows).resolve()
    store_url = _resolve_sqlite(settings.store.url, base)
    return settings.model_copy(
        update={
            "flows": flows,
            "platforms": platforms,
            "connectors": connectors,
            "store": settings.store.model_copy(update={"url": store_url}),
        }
    )


def _platform_config(doc: YamlDoc, name: str, raw: Any, problems: list[Problem]) -> PlatformConfig | None:
    at = ("platforms", name)
    if not isinstance(raw, dict):
        problems.append(doc.problem(at, f"platform '{name}' must be a mapping with a 'type'"))
        return None
    ptype = raw.get("type")
    if not isinstance(ptype, str) or ptype not in PLATFORM_TYPES:
        known = ", ".join(sorted(PLATFORM_TYPES))
        hint = nearest(str(ptype), PLATFORM_TYPES) if ptype else ""
        problems.append(doc.problem((*at, "type"), f"unknown platform type {ptype!r}{hint}; known: {known}"))
        return None
    model = PLATFORM_TYPES[ptype].Config
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems += pydantic_problems(doc, at, exc.errors(), {at: model.model_fields.keys()})
        return None


def _connector_config(doc: YamlDoc, name: str, raw: Any, problems: list[Problem]) -> ConnectorConfig | None:
    at = ("connectors", name)
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        problems.append(doc.problem(at, f"connector '{name}' must be a mapping with a 'type'"))
        return None
    try:
        cls = connector_class(raw["type"])
    except LookupError as exc:
        problems.append(doc.problem((*at, "type"), str(exc)))
        return None
    try:
        return cls.Config.model_validate(raw)
    except ValidationError as exc:
        problems += pydantic_problems(doc, at, exc.errors(), {at: cls.Config.model_fields.keys()})
        return None


def _resolve_sqlite(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        rel = url[len(prefix) :]
        if rel and not Path(rel).is_absolute():
            return prefix + str((base / rel).resolve())
    return url
