"""The webhook the bench sends: a generic-platform text message (same shape as bench/webhook.lua)."""

from __future__ import annotations

import json

WEBHOOK_HEADERS = {"Content-Type": "application/json"}


def webhook_body(message_id: str, conversation: int) -> bytes:
    return json.dumps(
        {
            "message_id": message_id,
            "conversation_id": f"c-{conversation}",
            "sender": {"id": f"u-{conversation}"},
            "type": "text",
            "text": "hello",
        },
        separators=(",", ":"),
    ).encode()
