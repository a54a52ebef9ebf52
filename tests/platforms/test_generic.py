from __future__ import annotations

import json

from middleware.platforms import WebhookRequest
from middleware.platforms.base import hmac_sha256_hex
from tests.platforms.contract import Case, ContractSuite

SECRET = "s3cret"


def text_webhook(mid: str, conv: str, text: str) -> WebhookRequest:
    body = json.dumps({"message_id": mid, "conversation_id": conv, "sender": {"id": "u-1"}, "text": text}).encode()
    headers = {"content-type": "application/json", "x-switchboard-signature": "sha256=" + hmac_sha256_hex(SECRET, body)}
    return WebhookRequest("POST", body, headers)


def forge(request: WebhookRequest) -> WebhookRequest:
    return WebhookRequest("POST", request.body, {**request.headers, "x-switchboard-signature": "sha256=" + "0" * 64})


class TestGenericContract(ContractSuite):
    case = Case(
        type="generic",
        config={
            "type": "generic",
            "secret": SECRET,
            "post_message_url": "http://chat.test/messages",
            "typing_url": "http://chat.test/typing",
            "read_url": "http://chat.test/read",
        },
        text_webhook=text_webhook,
        forge=forge,
    )
