"""Helpers for the browser-facing pages: a handoff flow, configs, signing in, reading event streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from middleware.settings import Settings, settings_from_text

#: set by the browser test: the folder its screenshots went to, printed at the end of the run
SCREENSHOTS: list[Path] = []

HELPDESK_FLOW = """\
flow: helpdesk
vars: {brand: Acme}
always:
  - when: {text: {matches: "(?i)\\\\b(human|person|agent)\\\\b"}}
    do:
      - reply: "Connecting you to a person at {{ vars.brand }}."
      - handoff: {queue: support, reason: asked, resume: rate}
states:
  start:
    routes:
      - when: {text: {matches: "(?i)^(hi|hello)"}}
        do: [{reply: "Hello {{ user.name }}! I'm the {{ vars.brand }} bot. Say 'human' to talk to a person."}]
      - do: [{reply: "I'm only a bot. Say 'human' to talk to a person."}]
  rate:
    enter:
      - reply: {text: "How would you rate the help you got?", buttons: [Great, OK, Poor]}
    routes:
      - do: [{set: {rating: "{{ message.text }}"}}, {reply: "Thanks for rating us: {{ vars.rating }}."}, {goto: start}]
"""

PASSWORD = "correct horse battery"


@pytest.fixture
def helpdesk_flows(tmp_path: Path) -> Path:
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / "helpdesk.yaml").write_text(HELPDESK_FLOW)
    return folder


def web_config(
    store_url: str, flows: Path, *, platform_url: str | None = None, inbox: str = "", extra: str = ""
) -> Settings:
    """A playground platform, a generic one (`myapp`) when `platform_url` is given, handoff queues
    support (capacity 2) and billing, and the inbox section (`inbox` replaces its settings)."""
    lines = [
        "store:",
        f'  url: "{store_url}"',
        f"flows: {flows}",
        "platforms:",
        "  playground:",
        "    type: playground",
    ]
    if platform_url:
        lines += ["  myapp:", "    type: generic", f"    post_message_url: {platform_url}/messages"]
    lines += [
        "handoff:",
        "  target: inbox",
        "  queues:",
        "    support: {capacity: 2}",
        "    billing: {}",
        "inbox:",
        *(f"  {line}" for line in (inbox or "secret: test-inbox-secret\nsession_minutes: 60").splitlines()),
    ]
    return settings_from_text("\n".join(lines) + "\n" + textwrap.dedent(extra), "<web test config>")


async def sign_in(client: httpx.AsyncClient, base: str, name: str, password: str = PASSWORD) -> httpx.Response:
    """Open the sign-in form (for its CSRF cookie and token) and send it; returns the answer."""
    form = await client.get(f"{base}/inbox/login")
    assert form.status_code == 200, form.text
    return await client.post(
        f"{base}/inbox/login",
        data={"csrf": csrf_of(form.text), "name": name, "password": password, "next": "/inbox"},
    )


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


class EventReader:
    """Reads a text/event-stream response event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.events: list[tuple[str, dict[str, Any], str | None]] = []

    async def next(self, within: float = 10.0) -> tuple[str, dict[str, Any], str | None]:
        kind, data, event_id = "message", "", None
        async with asyncio.timeout(within):
            async for line in self.lines:
                if line.startswith(":") or line.startswith("retry:"):
                    continue
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line == "" and data:
                    event = (kind, json.loads(data), event_id)
                    self.events.append(event)
                    return event
        raise AssertionError("the event stream ended")

    async def until(self, kind: str, within: float = 10.0, **match: Any) -> dict[str, Any]:
        """The next event of this kind whose data has the given values (others are skipped)."""
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event with {match} in {within}s; saw {self.events[-8:]}")
            got, data, _ = await self.next(left)
            if got == kind and all(data.get(k) == v for k, v in match.items()):
                return data


@contextlib.asynccontextmanager
async def events(client: httpx.AsyncClient, url: str, **headers: str) -> AsyncIterator[EventReader]:
    """An open event stream that has said `ready` (its subscription exists)."""
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = EventReader(response)
        await reader.until("ready")
        yield reader


async def eventually(check: Any, within: float = 10.0, what: str = "condition") -> Any:
    """Poll an async check until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for folder in SCREENSHOTS:
        terminalreporter.write_line(f"browser test screenshots: {folder}")
