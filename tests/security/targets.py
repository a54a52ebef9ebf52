"""Every webhook platform as the hostile-input tests see it: its config, how it signs a body, a valid
text message, and the recorded payloads (tests/data/<type>/) the property tests mutate.

A `Hook` is one webhook as it goes over the wire (method, sub-path, headers, query, body); the same
value is sent through a running app (`Hook.url`) or handed to the parser (`Hook.request()`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from middleware.platforms import PLATFORM_TYPES, Platform, WebhookRequest

DATA = Path(__file__).resolve().parent.parent / "data"
HOSTILE = DATA / "hostile"

#: every secret in the configs below: none of them may ever appear in a log line
SECRETS = {
    "generic": "gen-secret-4f1a9c",
    "telegram_token": "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
    "telegram_secret": "tg-webhook_secret-77",
    "whatsapp_access": "EAAGm0PX4ZCpsBAhostile",
    "whatsapp_app_secret": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "whatsapp_verify": "wa-verify-token-9",
    "slack_bot_token": "xoxb-17653672481-19874698323-hostileTOKENx",
    "slack_signing": "8f742231b10e8888abcd99yyyzzz85a5",
    "matrix_as": "as_token_hostile_123",
    "matrix_hs": "hs_token_hostile_456",
    "chatwoot_bot": "cw-bot-access-token-31",
    "chatwoot_secret": "cw-webhook-secret-88",
    "chatwoot_token": "cw-url-token-55",
    "qiscus_secret_key": "sdk-secret-2820ae-hostile",
    "qiscus_signature": "qiscus-sig-token-8f2c",
    "mc_secret_key": "mc-secret-55aa-hostile",
    "mc_token": "mc-hook-token-7d1e",
}


@dataclass(frozen=True)
class Hook:
    method: str
    body: bytes
    headers: dict[str, str]
    query: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def request(self) -> WebhookRequest:
        return WebhookRequest(
            self.method, self.body, {k.lower(): v for k, v in self.headers.items()}, dict(self.query), self.path
        )

    def url(self, base: str, name: str) -> str:
        url = f"{base}/webhooks/{name}" + (f"/{self.path}" if self.path else "")
        return url + (f"?{urlencode(self.query)}" if self.query else "")

    def with_headers(self, **changes: str | None) -> Hook:
        headers = {k: v for k, v in self.headers.items() if k not in changes}
        headers.update({k: v for k, v in changes.items() if v is not None})
        return replace(self, headers=headers)


#: sign(body, content_type, secret, stamp) -> Hook; `secret` None = the configured one, `stamp` for timestamped schemes
Signer = Callable[..., Hook]


def _hex(secret: str, data: bytes) -> str:
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def _now() -> str:
    return str(int(time.time()))


def sign_generic(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    sig = "sha256=" + _hex(secret or SECRETS["generic"], body)
    return Hook("POST", body, {"content-type": ctype, "x-switchboard-signature": sig})


def sign_unsigned(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    return Hook("POST", body, {"content-type": ctype})


def sign_telegram(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    return Hook(
        "POST", body, {"content-type": ctype, "x-telegram-bot-api-secret-token": secret or SECRETS["telegram_secret"]}
    )


def sign_whatsapp(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    sig = "sha256=" + _hex(secret or SECRETS["whatsapp_app_secret"], body)
    return Hook("POST", body, {"content-type": ctype, "x-hub-signature-256": sig})


def sign_slack(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    stamp = stamp or _now()
    sig = "v0=" + _hex(secret or SECRETS["slack_signing"], b"v0:" + stamp.encode() + b":" + body)
    return Hook("POST", body, {"content-type": ctype, "x-slack-request-timestamp": stamp, "x-slack-signature": sig})


def sign_matrix(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    txn = hashlib.sha256(body).hexdigest()[:16]
    headers = {"content-type": ctype, "authorization": f"Bearer {secret or SECRETS['matrix_hs']}"}
    return Hook("PUT", body, headers, path=f"_matrix/app/v1/transactions/{txn}")


def sign_chatwoot(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    stamp = stamp or _now()
    sig = "sha256=" + _hex(secret or SECRETS["chatwoot_secret"], stamp.encode() + b"." + body)
    headers = {"content-type": ctype, "x-chatwoot-timestamp": stamp, "x-chatwoot-signature": sig}
    return Hook("POST", body, headers, {"token": SECRETS["chatwoot_token"]})


def sign_qiscus(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    return Hook(
        "POST", body, {"content-type": ctype, "qiscus-sdk-signature": _hex(secret or SECRETS["qiscus_signature"], body)}
    )


def sign_multichannel(body: bytes, ctype: str = "application/json", secret: str | None = None, stamp: str = "") -> Hook:
    return Hook("POST", body, {"content-type": ctype}, {"token": secret or SECRETS["mc_token"]})


def valid_generic(mid: str, conv: str, text: str) -> dict[str, Any]:
    return {"message_id": mid, "conversation_id": conv, "sender": {"id": f"u-{conv}", "name": "Ana"}, "text": text}


def _num(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:10], 16)


def valid_telegram(mid: str, conv: str, text: str) -> dict[str, Any]:
    user = {"id": _num("u" + conv), "is_bot": False, "first_name": "Ana"}
    chat = {"id": _num(conv), "type": "private"}
    message = {"message_id": _num(mid), "from": user, "chat": chat, "date": 1764291600, "text": text}
    return {"update_id": _num(mid), "message": message}


def valid_whatsapp(mid: str, conv: str, text: str) -> dict[str, Any]:
    phone = str(_num(conv))[:12]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "106540352242922"},
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": phone}],
        "messages": [
            {"from": phone, "id": f"wamid.{mid}", "timestamp": "1764291600", "type": "text", "text": {"body": text}}
        ],
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
    }


def valid_slack(mid: str, conv: str, text: str) -> dict[str, Any]:
    ts = f"{_num(mid) % 10**10}.000100"
    event = {"type": "message", "channel": f"C{_num(conv) % 10**9:09d}", "user": f"U{_num('u' + conv) % 10**9:09d}"}
    event |= {"text": text, "ts": ts, "event_ts": ts, "channel_type": "im"}
    return {
        "team_id": "T061EG9R6",
        "event": event,
        "type": "event_callback",
        "event_id": f"Ev{_num(mid)}",
        "authorizations": [{"team_id": "T061EG9R6", "user_id": "U0BOTUSER1", "is_bot": True}],
    }


def valid_matrix(mid: str, conv: str, text: str) -> dict[str, Any]:
    event = {
        "content": {"msgtype": "m.text", "body": text},
        "event_id": f"${mid}",
        "origin_server_ts": 1795830304981,
        "room_id": f"!{conv}:localhost",
        "sender": f"@u-{conv}:localhost",
        "type": "m.room.message",
    }
    return {"events": [event], "ephemeral": []}


def valid_chatwoot(mid: str, conv: str, text: str) -> dict[str, Any]:
    conv_id = _num(conv) % 10**6
    return {
        "event": "message_created",
        "id": _num(mid) % 10**9,
        "content": text,
        "message_type": "incoming",
        "private": False,
        "created_at": "2026-11-28T01:00:00.000Z",
        "sender": {"id": conv_id, "name": "Ana", "type": "contact"},
        "conversation": {"id": conv_id, "status": "pending", "inbox_id": 1},
        "inbox": {"id": 1, "name": "web"},
    }


def valid_qiscus(mid: str, conv: str, text: str) -> dict[str, Any]:
    message = {
        "id": _num(mid) % 10**9,
        "type": "text",
        "text": text,
        "unique_temp_id": f"bq{mid}",
        "unix_timestamp": 1752212797,
    }
    return {
        "type": "post_comment_mobile",
        "payload": {
            "from": {"email": f"{conv}@users.test", "id": 1, "name": "Ana"},
            "room": {"id": conv, "id_str": conv, "name": "Demo", "type": "single"},
            "message": message,
            "type": "post_comment_mobile",
        },
    }


def valid_multichannel(mid: str, conv: str, text: str) -> dict[str, Any]:
    options = {"channel": "wa", "source": "wa"}
    message = {"id": 0, "id_str": "0", "text": text, "type": "text", "unique_temp_id": f"wa_wamid.{mid}"}
    return {
        "app_code": "kovof-123",
        "payload": {
            "from": {"email": f"62{_num(conv) % 10**9}", "id": 0, "name": "Harpi"},
            "message": message,
            "room": {"id": conv, "id_str": conv, "options": json.dumps(options), "type": "group"},
            "type": "post_comment_mobile",
        },
        "type": "post_comment_mobile",
    }


@dataclass(frozen=True)
class Target:
    """One platform instance of the hostile app (`name` is its key under `platforms:`)."""

    name: str
    type: str
    config: dict[str, Any]
    sign: Signer
    valid: Callable[[str, str, str], dict[str, Any]]
    #: recorded payloads to mutate (tests/data/<seeds>/*.json)
    seeds: str | None = None
    #: recorded payloads that arrive form-encoded (`payload=<json>`), for Slack's interactivity
    form_seeds: frozenset[str] = frozenset()
    #: the platform answers a refused signature with one of these
    forged: tuple[int, ...] = (401,)
    #: statuses of a refused body (Matrix refuses with its own error shape, same statuses)
    json_error: bool = True

    def platform_config(self, api: str) -> dict[str, Any]:
        return {k: v.replace("{api}", api) if isinstance(v, str) else v for k, v in self.config.items()}

    def make(self, api: str = "http://api.invalid") -> Platform:
        cls = PLATFORM_TYPES[self.type]
        return cls(self.name, cls.Config.model_validate(self.platform_config(api)), None)  # type: ignore[arg-type]

    def hook(self, data: Any, ctype: str = "application/json", **sign: Any) -> Hook:
        return self.sign(data if isinstance(data, bytes) else json.dumps(data).encode(), ctype, **sign)

    def text_hook(self, mid: str, conv: str, text: str) -> Hook:
        return self.hook(self.valid(mid, conv, text))

    def seed_bodies(self) -> list[tuple[str, Any, bool]]:
        """(file name, payload, arrives as a form) for every recorded payload of this platform."""
        if self.seeds is None:
            return []
        out = []
        for path in sorted((DATA / self.seeds).glob("*.json")):
            out.append((path.name, json.loads(path.read_text()), path.name in self.form_seeds))
        return out

    def seed_hook(self, payload: Any, form: bool) -> Hook:
        if form:
            body = urlencode({"payload": json.dumps(payload)}).encode()
            return self.sign(body, "application/x-www-form-urlencoded")
        return self.hook(payload)


TARGETS: list[Target] = [
    Target(
        "generic",
        "generic",
        {"type": "generic", "secret": SECRETS["generic"], "post_message_url": "{api}/generic/messages"},
        sign_generic,
        valid_generic,
    ),
    Target(
        "open",
        "generic",
        {"type": "generic", "post_message_url": "{api}/generic/messages"},
        sign_unsigned,
        valid_generic,
    ),
    Target(
        "telegram",
        "telegram",
        {
            "type": "telegram",
            "token": SECRETS["telegram_token"],
            "secret_token": SECRETS["telegram_secret"],
            "api_base": "{api}/telegram",
        },
        sign_telegram,
        valid_telegram,
        "telegram",
    ),
    Target(
        "whatsapp",
        "whatsapp",
        {
            "type": "whatsapp",
            "access_token": SECRETS["whatsapp_access"],
            "app_secret": SECRETS["whatsapp_app_secret"],
            "verify_token": SECRETS["whatsapp_verify"],
            "phone_number_id": "106540352242922",
            "api_base": "{api}/whatsapp",
        },
        sign_whatsapp,
        valid_whatsapp,
        "whatsapp",
    ),
    Target(
        "slack",
        "slack",
        {
            "type": "slack",
            "bot_token": SECRETS["slack_bot_token"],
            "signing_secret": SECRETS["slack_signing"],
            "api_base": "{api}/slack",
        },
        sign_slack,
        valid_slack,
        "slack",
        frozenset({"block_actions.json", "block_actions_in_thread.json", "view_submission.json"}),
    ),
    Target(
        "matrix",
        "matrix",
        {
            "type": "matrix",
            "homeserver_url": "{api}/matrix",
            "as_token": SECRETS["matrix_as"],
            "hs_token": SECRETS["matrix_hs"],
            "bot_user_id": "@bot:localhost",
        },
        sign_matrix,
        valid_matrix,
        "matrix",
        forged=(403,),
    ),
    Target(
        "chatwoot",
        "chatwoot",
        {
            "type": "chatwoot",
            "base_url": "{api}/chatwoot",
            "account_id": 1,
            "bot_token": SECRETS["chatwoot_bot"],
            "webhook_secret": SECRETS["chatwoot_secret"],
            "webhook_token": SECRETS["chatwoot_token"],
        },
        sign_chatwoot,
        valid_chatwoot,
        "chatwoot",
    ),
    Target(
        "qiscus",
        "qiscus",
        {
            "type": "qiscus",
            "app_id": "sdksample",
            "secret_key": SECRETS["qiscus_secret_key"],
            "bot_user_id": "bot@qiscus.test",
            "base_url": "{api}/qiscus",
            "signature_secret": SECRETS["qiscus_signature"],
            "mqtt_url": None,
            "read_receipts": False,
        },
        sign_qiscus,
        valid_qiscus,
        "qiscus",
    ),
    Target(
        "multichannel",
        "qiscus_multichannel",
        {
            "type": "qiscus_multichannel",
            "app_code": "kovof-123",
            "secret_key": SECRETS["mc_secret_key"],
            "base_url": "{api}/multichannel",
            "webhook_token": SECRETS["mc_token"],
        },
        sign_multichannel,
        valid_multichannel,
        "qiscus_multichannel",
    ),
]

TARGETS.append(Target("playground", "playground", {"type": "playground"}, sign_unsigned, valid_generic))

BY_NAME = {t.name: t for t in TARGETS}
#: one target per platform type that takes webhooks and signs them (the unsigned generic one and the playground aside)
TYPED = [t for t in TARGETS if t.name not in ("open", "playground")]


def platforms_yaml(api: str) -> str:
    """The `platforms:` section of the hostile app's config."""
    lines = ["platforms:"]
    for t in TARGETS:
        lines.append(f"  {t.name}:")
        for key, value in t.platform_config(api).items():
            lines.append(f"    {key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
