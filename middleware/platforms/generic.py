"""The generic JSON platform: any chat backend that can send and take JSON (docs/protocol.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from middleware.model import MESSAGE_TYPES, Attachment, Inbound, Outgoing, Sender
from middleware.platforms.base import (
    Parsed,
    Platform,
    PlatformConfig,
    Rejected,
    WebhookRequest,
    decode_json,
    hmac_sha256_hex,
    json_bytes,
    post_bytes,
    signature_matches,
)

SIGNATURE_HEADER = "X-Switchboard-Signature"
MAX_ID_LENGTH = 256


class GenericConfig(PlatformConfig):
    type: str = "generic"
    secret: str | None = None
    post_message_url: str
    typing_url: str | None = None
    read_url: str | None = None
    typing_ttl: float = 5.0


class GenericPlatform(Platform):
    Config = GenericConfig
    config: GenericConfig

    def __init__(self, name: str, config: PlatformConfig, http: Any) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, GenericConfig)
        self.supports_typing = config.typing_url is not None
        self.supports_read = config.read_url is not None
        self.typing_ttl = config.typing_ttl

    def parse(self, request: WebhookRequest) -> Parsed:
        if self.config.secret:
            presented = request.headers.get(SIGNATURE_HEADER.lower())
            if not presented:
                raise Rejected(401, f"missing {SIGNATURE_HEADER} header")
            if not signature_matches(self.config.secret, request.body, presented, prefix="sha256="):
                raise Rejected(401, f"bad {SIGNATURE_HEADER}")
        data = decode_json(request)
        if isinstance(data, dict):
            items, prefix = [data], ""
        elif isinstance(data, list):
            if not data:
                raise Rejected(400, "empty array: send at least one message")
            items, prefix = data, "[]"
        else:
            raise Rejected(400, "body must be a JSON object or an array of objects")
        messages = [self._one(item, f"[{i}]." if prefix else "") for i, item in enumerate(items)]
        return Parsed(messages)

    def _one(self, item: Any, at: str) -> Inbound:
        if not isinstance(item, dict):
            raise Rejected(400, f"{at or 'body'} must be a JSON object", at.rstrip(".") or None)
        message_id = _required_id(item, "message_id", at)
        conversation_id = _required_id(item, "conversation_id", at)
        sender = item.get("sender")
        if not isinstance(sender, dict):
            raise Rejected(400, f"{at}sender is required and must be an object", f"{at}sender")
        sender_id = _required_id(sender, "id", f"{at}sender.")
        name = sender.get("name")
        if name is not None and not isinstance(name, str):
            raise Rejected(400, f"{at}sender.name must be a string", f"{at}sender.name")
        attributes = sender.get("attributes", {})
        if not isinstance(attributes, dict):
            raise Rejected(400, f"{at}sender.attributes must be an object", f"{at}sender.attributes")
        mtype = item.get("type", "text")
        if mtype not in MESSAGE_TYPES:
            raise Rejected(400, f"{at}type must be one of {', '.join(MESSAGE_TYPES)}", f"{at}type")
        text = item.get("text", "")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise Rejected(400, f"{at}text must be a string", f"{at}text")
        payload = item.get("payload", {})
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise Rejected(400, f"{at}payload must be an object", f"{at}payload")
        timestamp = None
        raw_ts = item.get("timestamp")
        if raw_ts is not None:
            if not isinstance(raw_ts, str):
                raise Rejected(400, f"{at}timestamp must be an ISO 8601 string", f"{at}timestamp")
            try:
                timestamp = datetime.fromisoformat(raw_ts.replace("Z", "+00:00"))
            except ValueError as exc:
                raise Rejected(400, f"{at}timestamp is not ISO 8601: {raw_ts[:40]!r}", f"{at}timestamp") from exc
        attachments = _attachments(item.get("attachments", []), at)
        return Inbound(
            platform=self.name,
            message_id=message_id,
            conversation_id=conversation_id,
            sender=Sender(sender_id, name, attributes),
            type=mtype,
            text=text,
            payload=payload,
            attachments=attachments,
            timestamp=timestamp,
        )

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        if item.kind == "message":
            assert item.reply is not None
            url = self.config.post_message_url
            body: dict[str, Any] = {
                "conversation_id": item.conversation_id,
                "reply_to": item.reply_to,
                **item.reply.to_json(),
            }
        elif item.kind == "typing":
            if self.config.typing_url is None:
                return
            url = self.config.typing_url
            body = {"conversation_id": item.conversation_id, "typing": item.typing}
        else:
            if self.config.read_url is None:
                return
            url = self.config.read_url
            body = {"conversation_id": item.conversation_id, "message_id": item.message_id}
        raw = json_bytes(body)
        headers = {"content-type": "application/json", "Idempotency-Key": idempotency_key}
        if self.config.secret:
            headers[SIGNATURE_HEADER] = "sha256=" + hmac_sha256_hex(self.config.secret, raw)
        await post_bytes(self.http, url, raw, headers)


def _required_id(obj: dict[str, Any], key: str, at: str) -> str:
    value = obj.get(key)
    if type(value) is str and 0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value:  # the usual case
        return value
    if value is None or value == "":
        raise Rejected(400, f"{at}{key} is required", f"{at}{key}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Rejected(400, f"{at}{key} must be a string", f"{at}{key}")
    text = str(value)
    if "\x00" in text:  # PostgreSQL cannot store NUL in a text column
        raise Rejected(400, f"{at}{key} must not contain NUL characters", f"{at}{key}")
    if len(text) > MAX_ID_LENGTH:
        raise Rejected(400, f"{at}{key} is longer than {MAX_ID_LENGTH} characters", f"{at}{key}")
    return text


def _attachments(raw: Any, at: str) -> tuple[Attachment, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise Rejected(400, f"{at}attachments must be an array", f"{at}attachments")
    out = []
    for i, a in enumerate(raw):
        where = f"{at}attachments[{i}]"
        if not isinstance(a, dict) or not isinstance(a.get("url"), str) or not isinstance(a.get("type", ""), str):
            raise Rejected(400, f"{where} must be an object with a string url and type", where)
        name = a.get("name")
        out.append(Attachment(a.get("type", "file"), a["url"], name if isinstance(name, str) else None))
    return tuple(out)
