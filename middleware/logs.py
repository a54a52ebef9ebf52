"""One structured line per event: `level logger message key=value ...` or JSON with `--log-json`.

Secrets never reach a line: extras named like secrets are replaced, and every line (message,
extras, exception and traceback) is scrubbed of the config's secret values (`add_secrets`, called
with every secret of the config when the app is built) and of secret-shaped text: a Telegram bot
token in a URL, `token=`/`key=`/`signature=`... query parameters, bearer credentials, the password
of a URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}
_SECRET_WORDS = ("secret", "token", "password", "authorization", "api_key", "credential", "private_key")
_NOT_SECRET_SUFFIXES = ("_header", "_prefix", "_url", "_file", "_env", "_tokens", "_tolerance")


def _extras(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD or key.startswith("_"):
            continue
        out[key] = "[redacted]" if any(w in key.lower() for w in _SECRET_WORDS) else value
    return out


#: secret values from the config, longest first (a secret that contains another is replaced whole)
_SECRETS: list[str] = []
REDACTED = "[redacted]"
#: text shaped like a credential, whoever's it is: (pattern, replacement keeping the name)
_SHAPES = [
    (re.compile(r"/bot\d+:[A-Za-z0-9_-]+"), "/bot" + REDACTED),  # Telegram puts the bot token in the URL path
    (
        re.compile(
            r"(?i)\b((?:access_?token|api_?key|apikey|auth|hub\.verify_token|key|password|secret|sig|signature|token)=)"
            r"[^&\s\"'<>]+"
        ),
        r"\1" + REDACTED,
    ),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + REDACTED),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s/]+@"), r"\1" + REDACTED + "@"),  # user:password@host
]


def add_secrets(values: Iterable[str]) -> None:
    """Never write these strings (nor their JSON-escaped form) in a log line; shorter than 6 characters is
    too likely to be ordinary text to replace."""
    known = set(_SECRETS)
    for value in values:
        for form in (value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1]):
            if len(form) >= 6:
                known.add(form)
    _SECRETS[:] = sorted(known, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def secret_name(name: str) -> bool:
    """A config key whose value is a secret (`bot_token`, `app_secret`, `Authorization`), not one that
    names where a secret is or something else about it (`token_url`, `api_key_env`, `max_tokens`)."""
    lowered = name.lower()
    return any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith(_NOT_SECRET_SUFFIXES)


def secret_values(data: object, named: bool = False) -> Iterable[str]:
    """Every string in `data` (a config as plain data) under a key named like a secret (`bot_token`,
    `app_secret`, `headers: {Authorization: ...}`), the values of environment variables that
    `..._env` keys name for secrets (`api_key_env`), and the passwords of URLs."""
    if isinstance(data, dict):
        for key, value in data.items():
            name = str(key).lower()
            secretive = any(w in name for w in _SECRET_WORDS)
            if secretive and name.endswith("_env") and isinstance(value, str):
                yield os.environ.get(value, "")
            elif name.endswith(_NOT_SECRET_SUFFIXES):
                yield from secret_values(value, False)  # api_key_header, token_url, credentials_file, max_tokens
            else:
                yield from secret_values(value, named or secretive)
    elif isinstance(data, list | tuple):
        for value in data:
            yield from secret_values(value, named)
    elif isinstance(data, str):
        if named and data:
            yield data
        for match in re.finditer(r"://[^:/@\s]+:([^@\s/]+)@", data):
            yield match.group(1)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{ts}Z {record.levelname.lower()} {record.name}: {record.getMessage()}"]
        parts += [f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in _extras(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(data, default=str, ensure_ascii=False))


def configure(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per platform call otherwise
