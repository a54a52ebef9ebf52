"""`switchboard chat`: the whole pipeline in-process, with the terminal as the platform.

Messages typed go through the same store, dispatcher, flow engine and outbox as a webhook's;
replies come back through the console platform. The store is a throwaway SQLite file.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from middleware.app import create_app
from middleware.platforms.console import ConsoleConfig, ConsolePlatform
from middleware.services import Services
from middleware.settings import Settings, StoreSettings, TypingSettings, load_settings
from middleware.yamlfile import ConfigError


async def run_chat(config: Path, flows: Path | None, lines: asyncio.Queue[str | None] | None = None) -> int:
    exists = await asyncio.to_thread(config.exists)
    try:
        settings = load_settings(config) if exists else Settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="switchboard-chat-") as tmp:
        settings = settings.model_copy(
            update={
                "flows": flows or settings.flows,
                "platforms": {"console": ConsoleConfig()},
                "store": StoreSettings(url=f"sqlite:///{tmp}/chat.db"),
                "typing": TypingSettings(delay=0.5),
                "admin": settings.admin,
            }
        )
        try:
            app = create_app(settings)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            console = services.platforms["console"]
            assert isinstance(console, ConsolePlatform)
            print(f"Talking to flows {', '.join(sorted(services.engine.flows))}. Ctrl-D or /quit to leave.")
            while True:
                text = await (lines.get() if lines is not None else _read_line())
                if text is None or text.strip() == "/quit":
                    return 0
                if not text.strip():
                    continue
                message = console.inbound(text)
                await services.store.accept([message])
                services.dispatcher.notify(message.conversation_key)
                await services.dispatcher.settled(message.conversation_key)


async def _read_line() -> str | None:
    try:
        return await asyncio.to_thread(input, "you> ")
    except EOFError:
        return None

