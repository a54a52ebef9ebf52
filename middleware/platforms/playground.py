"""The playground platform: the browser page at `/` (middleware/web/playground.py) as a chat platform.

The page POSTs what the user types to `/webhooks/{name}` in the generic protocol's shape
(docs/protocol.md, one object, no signature), so a playground message travels the same path as
any platform's: ingress -> store -> dispatcher -> turn -> outbox. Deliveries (replies, typing,
read receipts) are published on the app's live-event hub under the conversation's topic, and the
page receives them over server-sent events together with each turn's trace.

A user can send what a user sends (text, postbacks, files, locations); `type: event` is refused,
since events (an agent's resolve, a timer) come from the agent side, not from the user.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from middleware.hub import Hub, LocalHub, playground_topic
from middleware.model import Outgoing, conversation_key
from middleware.platforms.base import Parsed, Platform, PlatformConfig, Rejected, WebhookRequest
from middleware.platforms.generic import GenericConfig, GenericPlatform


class PlaygroundConfig(PlatformConfig):
    type: str = "playground"
    #: typing indicators last this long in the page without a refresh
    typing_ttl: float = Field(default=30.0, gt=0)


class PlaygroundPlatform(Platform):
    Config = PlaygroundConfig
    config: PlaygroundConfig
    supports_typing = True
    supports_read = True

    def __init__(self, name: str, config: PlatformConfig, http: Any) -> None:
        super().__init__(name, config, http)
        assert isinstance(config, PlaygroundConfig)
        self.typing_ttl = config.typing_ttl
        #: where deliveries go; the app replaces it with its own hub (middleware/web/ui.py)
        self.hub: Hub = LocalHub()
        # the page speaks the generic protocol: its parser checks every field the same way
        self._generic = GenericPlatform(name, GenericConfig(post_message_url="http://playground.invalid/"), http)

    def parse(self, request: WebhookRequest) -> Parsed:
        if request.method != "POST":
            raise Rejected(405, "POST the message as JSON")
        parsed = self._generic.parse(request)
        for i, message in enumerate(parsed.messages):
            if message.type == "event":
                field = "type" if len(parsed.messages) == 1 else f"[{i}].type"
                raise Rejected(400, "the playground sends what a user sends; events come from agents and timers", field)
        return parsed

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        topic = playground_topic(conversation_key(self.name, item.conversation_id))
        if item.kind == "message" and item.reply is not None:
            # `reply_to` names the message answered; the page knows from that turn's trace whether
            # it was an agent's message (an agent spoke) or anything else (the bot spoke)
            self.hub.publish(
                topic,
                {
                    "kind": "reply",
                    "id": idempotency_key,
                    "reply_to": item.reply_to,
                    "plain": item.reply.plain_text(),
                    **item.reply.to_json(),
                },
            )
        elif item.kind == "typing":
            self.hub.publish(topic, {"kind": "typing", "on": item.typing, "ttl": self.typing_ttl})
        elif item.kind == "read":
            self.hub.publish(topic, {"kind": "read", "message_id": item.message_id})
