"""The helpdesk webhook: a handoff target for any helpdesk that takes a JSON push.

Switchboard POSTs to `handoff.webhook_url` (signed like the generic platform when
`handoff.webhook_secret` is set, with an Idempotency-Key):

- `{"event": "handoff", "conversation", "platform", "conversation_id", "queue", "reason", "transcript"}`
- `{"event": "message", "conversation", "platform", "conversation_id", "message_id", "text"}`:
  what the user wrote while a human owns the conversation
- `{"event": "resumed", "conversation", "platform", "conversation_id"}`: the bot took it back

The helpdesk answers through `POST /api/v1/conversations/{key}/events` (agent messages,
resolve, release), see docs/handoff.md.
"""

from __future__ import annotations

from typing import Any

import httpx

from middleware.model import Outgoing
from middleware.platforms.base import hmac_sha256_hex, json_bytes, post_bytes
from middleware.platforms.generic import SIGNATURE_HEADER

TARGET = "helpdesk"


class HelpdeskWebhook:
    #: the outbox's platform column for rows that go to the helpdesk
    row_platform = f"@{TARGET}"

    def __init__(self, url: str, secret: str | None, http: httpx.AsyncClient) -> None:
        self.url = url
        self.secret = secret
        self.http = http

    async def send(self, conversation: str, item: Outgoing, idempotency_key: str) -> None:
        platform, _, conversation_id = conversation.partition(":")
        base: dict[str, Any] = {"conversation": conversation, "platform": platform, "conversation_id": conversation_id}
        if item.kind == "handoff" and item.handoff is not None:
            body = {
                "event": "handoff",
                **base,
                "queue": item.handoff.queue,
                "reason": item.handoff.reason,
                "transcript": [{"role": r, "text": t} for r, t in item.transcript],
            }
        elif item.kind == "release":
            body = {"event": "resumed", **base}
        else:
            text = item.reply.text if item.reply is not None else ""
            body = {"event": "message", **base, "message_id": item.reply_to, "text": text}
        raw = json_bytes(body)
        headers = {"content-type": "application/json", "Idempotency-Key": idempotency_key}
        if self.secret:
            headers[SIGNATURE_HEADER] = "sha256=" + hmac_sha256_hex(self.secret, raw)
        await post_bytes(self.http, self.url, raw, headers)
