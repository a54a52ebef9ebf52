"""The console platform: the terminal behind `switchboard chat`.

Messages come from the keyboard through `ConsolePlatform.inbound`; replies, typing and read
receipts go to a writer (standard output by default).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from middleware.model import Inbound, Outgoing, Sender
from middleware.platforms.base import Parsed, Platform, PlatformConfig, Rejected, WebhookRequest


class ConsoleConfig(PlatformConfig):
    type: str = "console"
    user: str = "you"


class ConsolePlatform(Platform):
    Config = ConsoleConfig
    config: ConsoleConfig
    supports_typing = True
    supports_read = False
    methods: ClassVar[frozenset[str]] = frozenset()  # no webhooks at all

    def __init__(self, name: str, config: PlatformConfig, http: Any) -> None:
        super().__init__(name, config, http)
        self._ids = itertools.count(1)
        self.write: Callable[[str], None] = lambda line: print(line, file=sys.stdout, flush=True)

    def parse(self, request: WebhookRequest) -> Parsed:
        raise Rejected(405, "the console platform takes no webhooks; use `switchboard chat`")

    def inbound(self, text: str, conversation_id: str = "console") -> Inbound:
        return Inbound(
            platform=self.name,
            message_id=f"console-{next(self._ids)}",
            conversation_id=conversation_id,
            sender=Sender(self.config.user, self.config.user),
            text=text,
        )

    async def deliver(self, item: Outgoing, idempotency_key: str) -> None:
        if item.kind == "message" and item.reply is not None:
            self.write(f"bot> {item.reply.plain_text()}")
        elif item.kind == "typing" and item.typing:
            self.write("bot is typing…")
