"""A real Rasa 3.6 behind the `rasa` connector, calling Switchboard's own action endpoint.

`make test-rasa` (tests/peers/rasa.sh) builds Rasa 3.6.21 in a Python 3.10 venv outside the clone,
trains the tiny bot of tests/peers/rasa_bot once, and runs this file with SWITCHBOARD_RASA_VENV and
SWITCHBOARD_RASA_MODEL set; without them (or where no Python 3.10 exists) every test here is
skipped, with the reason.

Switchboard starts first; Rasa then starts with `endpoints.yml` pointing its action endpoint at
Switchboard's `/rasa/webhook`. A conversation goes through the generic platform to Switchboard, to
Rasa's REST channel and back: buttons, an image, NLU routing through /model/parse, a variable set by
`action_set_variable`, and a handoff requested by Rasa through `action_handoff`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from connectors.rasa import RasaConnector
from tests.conftest import fake_platform, free_port, generic_config, message, running
from tests.connectors.common import wait_for
from tests.peers.process import engine_process

VENV = os.environ.get("SWITCHBOARD_RASA_VENV")
MODEL = os.environ.get("SWITCHBOARD_RASA_MODEL")
WHY_NOT = os.environ.get("SWITCHBOARD_RASA_SKIP") or (
    "no Rasa: run `make test-rasa`, which builds it (Python 3.10 needed)" if not VENV or not MODEL else ""
)
pytestmark = [pytest.mark.rasa, pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)]

FLOW = """\
flow: main
nlu: rasa
states:
  start:
    routes:
      - when: {intent: {name: goodbye, min_confidence: 0.5}}
        do: [{reply: "Switchboard says goodbye too."}, {ask: {connector: rasa}}]
      - do: [{ask: {connector: rasa, fallback: [{reply: "Rasa is down."}]}}]
"""


async def test_a_conversation_through_switchboard_to_rasa_and_back(tmp_path: Path) -> None:
    assert VENV is not None and MODEL is not None
    rasa_port = free_port()
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "main.yaml").write_text(FLOW)
    extra = f"""
        connectors:
          rasa:
            type: rasa
            url: http://127.0.0.1:{rasa_port}
            timeout: 30
            actions: {{token: rasa-to-switchboard}}
        """
    async with fake_platform() as (platform_server, platform), httpx.AsyncClient(timeout=30) as http:
        settings = generic_config(f"sqlite:///{tmp_path}/sb.db", platform_server.url, flows, extra=extra)
        async with running(settings) as (server, services):
            project = tmp_path / "rasa"
            project.mkdir()
            (project / "credentials.yml").write_text("rest:\n")
            (project / "endpoints.yml").write_text(
                f'action_endpoint:\n  url: "{server.url}/rasa/webhook"\n  token: "rasa-to-switchboard"\n'
            )
            args = [f"{VENV}/bin/rasa", "run", "--enable-api", "-i", "127.0.0.1", "-p", str(rasa_port), "-m", MODEL]
            args += ["--endpoints", "endpoints.yml", "--credentials", "credentials.yml"]
            async with engine_process(
                args,
                f"http://127.0.0.1:{rasa_port}/status",
                tmp_path / "rasa.log",
                ready=lambda r: r.status_code == 200 and bool(r.json().get("model_file")),
                start_within=300,
                cwd=project,
                env={"RASA_TELEMETRY_ENABLED": "false"},
            ) as ready:
                print(f"\nRasa ready (model loaded) in {ready:.1f}s")

                def sent(conversation: str) -> list[dict[str, object]]:
                    return [
                        c.body
                        for c in platform.calls
                        if c.path == "/messages" and c.body["conversation_id"] == conversation
                    ]

                async def say(n: int, text: str, conversation: str = "c-1") -> float:
                    started = time.monotonic()
                    before = len([c for c in platform.calls if c.path == "/messages"])
                    await http.post(f"{server.url}/webhooks/myapp", json=message(n, conversation, text=text))
                    await wait_for(lambda: services.dispatcher.backlog == 0, within=60)
                    await wait_for(lambda: len([c for c in platform.calls if c.path == "/messages"]) > before, 60)
                    return time.monotonic() - started

                took = await say(1, "hello")
                greeting = sent("c-1")[0]
                print(f"hello -> {greeting['text']!r} in {took:.2f}s")
                assert greeting["text"] == "Hello from Rasa! What can I do for you?"
                assert greeting["buttons"] == [
                    {"title": "Talk to a person", "payload": "/human"},
                    {"title": "Say goodbye", "payload": "/goodbye"},
                ]

                took = await say(2, "my favourite colour is red")
                print(f"colour -> {sent('c-1')[1]['text']!r} in {took:.2f}s")
                assert sent("c-1")[1]["text"] == "red is a fine colour."
                state = (await services.store.conversation("myapp:c-1") or {})["state"]
                assert state["vars"]["colour"] == "red", "set by Rasa through action_set_variable"

                took = await say(3, "I want to talk to a human")
                print(f"human -> {sent('c-1')[2]['text']!r} in {took:.2f}s")
                assert sent("c-1")[2]["text"] == "Let me find a person for you."
                state = (await services.store.conversation("myapp:c-1") or {})["state"]
                assert state["owner"] == "queued", "handed off by Rasa through action_handoff"
                assert state["handoff"]["queue"] == "rasa-tier2" and state["handoff"]["reason"] == "rasa action_handoff"

                took = await say(4, "bye", conversation="c-2")
                await wait_for(lambda: len(sent("c-2")) >= 3, 30)
                print(f"bye -> {[m['text'] for m in sent('c-2')]} in {took:.2f}s")
                assert [m["text"] for m in sent("c-2")] == ["Switchboard says goodbye too.", "Goodbye!", ""]
                assert sent("c-2")[2]["attachments"] == [
                    {"type": "image", "url": "https://example.com/bye.png", "name": None}
                ]

                rasa = services.engine.resources.connectors["rasa"]
                assert isinstance(rasa, RasaConnector)
                health = rasa.health()
                print(f"rasa connector: {health['calls']} calls, errors {health['errors']}")
                assert health["errors"] == {} and health["breaker"]["state"] == "closed"
