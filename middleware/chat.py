"""`switchboard chat`: the whole pipeline in-process, with the terminal as the platform.

Messages typed go through the same store, dispatcher, flow engine and outbox as a webhook's;
replies come back through the console platform. The store is a throwaway SQLite file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from middleware.app import create_app
from middleware.engine.flow import Match
from middleware.model import TurnResult
from middleware.platforms.console import ConsoleConfig, ConsolePlatform
from middleware.services import Services
from middleware.settings import Settings, StoreSettings, TypingSettings, load_settings
from middleware.yamlfile import ConfigError


def print_trace(result: TurnResult, seconds: float) -> None:
    """What `switchboard chat` shows after each turn: the route, actions, variables and timing."""
    for line in result.trace:
        print(f"  · {line}")
    state = result.state
    shown = {k: v for k, v in state.vars.items() if k != "user"}
    print(f"  · now in {state.flow}/{state.state}, owner {state.owner.value}, vars {json.dumps(shown, default=str)}")
    for action in result.actions:
        print(f"  · action: {action}")
    print(f"  · turn took {seconds * 1000:.1f} ms")


async def run_chat(
    config: Path,
    flows: Path | None,
    lines: asyncio.Queue[str | None] | None = None,
    flow: str | None = None,
    trace: bool = True,
) -> int:
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
            if flow is not None:
                if flow not in services.engine.flows:
                    print(
                        f"no flow named {flow!r}; loaded: {', '.join(sorted(services.engine.flows))}", file=sys.stderr
                    )
                    return 1
                # first, and whatever its `match:` names (the console is rarely among them); the other
                # flows stay loaded for its `call`s
                chosen = dataclasses.replace(services.engine.flows[flow], match=Match())
                others = {k: v for k, v in services.engine.flows.items() if k != flow}
                services.engine.swap({flow: chosen, **others})
            traces: list[tuple[TurnResult, float]] = []
            if trace:
                services.turns.observers.append(lambda _m, result, seconds: traces.append((result, seconds)))
            names = flow or ", ".join(sorted(services.engine.flows))
            print(f"Talking to {'flow' if flow else 'flows'} {names}. Ctrl-D or /quit to leave.")
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
                for result, seconds in traces:
                    print_trace(result, seconds)
                traces.clear()


async def _read_line() -> str | None:
    try:
        return await asyncio.to_thread(input, "you> ")
    except EOFError:
        print()  # end the prompt's line, so the shell's prompt does not follow "you> "
        return None
