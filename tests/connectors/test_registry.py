"""The registry of connector types, their configs in `connectors:`, and docs/connectors.md kept true:
its YAML examples validate and its custom connector runs."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import httpx
import pytest

from connectors import CONNECTOR_TYPES, connector_class
from middleware.model import Handoff, Reply
from middleware.settings import settings_from_text
from middleware.yamlfile import ConfigError
from tests.conftest import REPO
from tests.connectors.common import make_turn

DOC = (REPO / "docs" / "connectors.md").read_text()
ENV = {name: "x" for name in ("RASA_TOKEN", "RASA_ACTIONS_TOKEN", "MYBOT_TOKEN", "MYBOT_SECRET", "OPENAI_API_KEY")}


def test_every_engine_is_registered() -> None:
    assert set(CONNECTOR_TYPES) == {"canned", "dialogflow", "http", "llm", "rasa"}


def test_an_unknown_type_names_the_built_in_ones() -> None:
    text = "flows: flows\nconnectors:\n  brain:\n    type: rasaa\n"
    with pytest.raises(ConfigError) as failed:
        settings_from_text(text, "sb.yaml")
    (problem,) = failed.value.problems
    assert (problem.line, "built in: canned, dialogflow, http, llm, rasa") == (4, problem.message.split("; ")[1])


def test_a_bad_engine_setting_points_at_its_line() -> None:
    text = "connectors:\n  gpt:\n    type: llm\n    preset: template\n    url: http://x\n"
    with pytest.raises(ConfigError) as failed:
        settings_from_text(text, "sb.yaml")
    assert "needs body, reply_path" in str(failed.value)


@pytest.mark.parametrize(
    "block",
    [b for b in re.findall(r"```yaml\n(.*?)```", DOC, re.S) if b.startswith("connectors:")],
    ids=lambda b: b.splitlines()[1].strip().split(":")[0],
)
def test_the_docs_config_examples_validate(block: str) -> None:
    settings = settings_from_text(block, "docs/connectors.md", env=ENV)
    assert settings.connectors


async def test_the_docs_custom_connector_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = DOC.split("## Your own connector", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    assert len(code.group(1).strip().splitlines()) <= 25
    (tmp_path / "mybot_echo.py").write_text(code.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = connector_class("mybot_echo.Echo")
    settings = settings_from_text(
        textwrap.dedent(
            """\
            connectors:
              echo: {type: mybot_echo.Echo, url: "http://bot.test/", retries: 1, backoff: 0}
            """
        )
    )

    def bot(request: httpx.Request) -> httpx.Response:
        text = httpx.Response(200, content=request.content).json()["text"]
        return httpx.Response(200, json={"text": f"echo {text}", "human": text == "agent"})

    echo = cls("echo", settings.connectors["echo"], httpx.AsyncClient(transport=httpx.MockTransport(bot)))
    result = await echo.ask(make_turn("agent"))
    assert result.replies == (Reply("echo agent"),) and result.actions == (Handoff("tier1", "the bot asked"),)
