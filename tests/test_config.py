"""Config and flow mistakes are reported as `file:line:col: message`, at the token that is wrong.

Every expected position is computed from the text the test writes (`at(text, token)`), never typed in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from middleware.engine.loader import load_flows
from middleware.platforms import PLATFORM_TYPES
from middleware.settings import Settings, load_settings, settings_from_text
from middleware.yamlfile import ConfigError, Problem
from tests.conftest import REPO, fake_platform, message, running

SWITCHBOARD = Path(sys.executable).parent / "switchboard"
LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


def at(text: str, token: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based (line, column) of the `occurrence`-th `token` in `text`; a `‸` in `token` marks the character meant."""
    offset = max(token.find("‸"), 0)
    token = token.replace("‸", "")
    index = -1
    for _ in range(occurrence):
        index = text.index(token, index + 1)
    index += offset
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def problems(call: Callable[[], object]) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return info.value.problems


def only(found: list[Problem], file: str, text: str, token: str, *words: str, occurrence: int = 1) -> Problem:
    """Exactly one problem, at `token` in `text`, its message holding every one of `words`."""
    assert len(found) == 1, "\n".join(map(str, found))
    (p,) = found
    assert (p.file, p.line, p.col) == (file, *at(text, token, occurrence)), str(p)
    for w in words:
        assert w in p.message, str(p)
    assert LINE.match(str(p)), str(p)
    return p


# -- settings ------------------------------------------------------------------------------------

CFG = "/srv/sb/config/switchboard.yaml"
PLATFORM = """\
platforms:
  myapp:
    type: generic
    post_message_url: http://chat.internal/api/messages
"""


def settings(text: str, env: dict[str, str] | None = None) -> Settings:
    return settings_from_text(text, CFG, env={} if env is None else env)


def test_unknown_top_level_key_with_did_you_mean() -> None:
    text = "stor:\n  url: sqlite:///x.db\n" + PLATFORM
    only(problems(lambda: settings(text)), CFG, text, "stor", "unknown key 'stor'", "(did you mean 'store'?)")


def test_unknown_nested_keys_with_did_you_mean() -> None:
    text = PLATFORM + "server:\n  port: 8081\n  max_body_byte: 2048\n"
    only(problems(lambda: settings(text)), CFG, text, "max_body_byte", "(did you mean 'max_body_bytes'?)")
    text = PLATFORM.replace("    post_message_url", "    post_mesage_url")
    found = problems(lambda: settings(text))
    assert len(found) == 2, found
    missing, unknown = found
    assert (missing.line, missing.col) == at(text, "type: generic") and "missing required key 'post_message_url'" in (
        missing.message
    )
    assert (unknown.line, unknown.col) == at(text, "post_mesage_url")
    assert "unknown key 'post_mesage_url' (did you mean 'post_message_url'?)" in unknown.message


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    text = PLATFORM + "zebra: 1\n"
    p = only(problems(lambda: settings(text)), CFG, text, "zebra", "unknown key 'zebra'")
    assert "did you mean" not in p.message


def test_unset_env_without_default_is_an_error_at_its_value() -> None:
    text = PLATFORM + "    secret: ${SB_TEST_SECRET}\n"
    only(problems(lambda: settings(text)), CFG, text, "${SB_TEST_SECRET}", "SB_TEST_SECRET is not set")
    # set, it is used; it may sit inside a longer string
    s = settings(
        text.replace("http://chat.internal", "http://${SB_TEST_HOST}"), {"SB_TEST_SECRET": "k", "SB_TEST_HOST": "h:1"}
    )
    config = s.platforms["myapp"]
    assert getattr(config, "secret", None) == "k"
    assert getattr(config, "post_message_url", None) == "http://h:1/api/messages"


def test_env_with_default() -> None:
    text = "store:\n  url: ${SB_TEST_URL:-sqlite:////var/sb/x.db}\n" + PLATFORM + "    secret: ${SB_TEST_SECRET:-}\n"
    s = settings(text)
    assert s.store.url == "sqlite:////var/sb/x.db"
    assert getattr(s.platforms["myapp"], "secret", "unset") in ("", None)
    s = settings(text, {"SB_TEST_URL": "postgresql://sb@db/sb", "SB_TEST_SECRET": "k"})
    assert s.store.url == "postgresql://sb@db/sb"
    assert getattr(s.platforms["myapp"], "secret", None) == "k"
    # as in sh, `:-` also covers a variable set to nothing; without a default an empty value stays empty
    assert settings(text, {"SB_TEST_URL": ""}).store.url == "sqlite:////var/sb/x.db"
    bare = PLATFORM + "    secret: ${SB_TEST_SECRET}\n"
    assert getattr(settings(bare, {"SB_TEST_SECRET": ""}).platforms["myapp"], "secret", "unset") in ("", None)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "http://db", "data/x.db", "sqlite:/x.db"])
def test_bad_store_url(url: str) -> None:
    text = f"store:\n  url: {url}\n" + PLATFORM
    only(problems(lambda: settings(text)), CFG, text, url, "store url must start with sqlite:// or postgresql://")


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("sqlite:///x.db", f"sqlite:///{Path(CFG).parent / 'x.db'}"),
        ("sqlite:////var/lib/sb.db", "sqlite:////var/lib/sb.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgres://u@h:5433/db?sslmode=require", "postgres://u@h:5433/db?sslmode=require"),
    ],
)
def test_good_store_urls(url: str, resolved: str) -> None:
    assert settings(f"store:\n  url: '{url}'\n" + PLATFORM).store.url == resolved


def test_env_comes_from_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_TEST_FROM_ENV", "from-env")
    monkeypatch.delenv("SB_TEST_NOT_SET", raising=False)
    s = settings_from_text(PLATFORM + "    secret: ${SB_TEST_FROM_ENV}\n", CFG)
    assert getattr(s.platforms["myapp"], "secret", None) == "from-env"
    text = PLATFORM + "    secret: ${SB_TEST_NOT_SET}\n"
    only(problems(lambda: settings_from_text(text, CFG)), CFG, text, "${SB_TEST_NOT_SET}", "is not set")


def test_unknown_platform_type_lists_the_known_ones() -> None:
    known = ", ".join(sorted(PLATFORM_TYPES))
    text = PLATFORM.replace("type: generic", "type: generik")
    only(
        problems(lambda: settings(text)),
        CFG,
        text,
        "generik",
        "unknown platform type 'generik'",
        "(did you mean 'generic'?)",
        f"known: {known}",
    )
    for bad in ("[generic]", "{a: 1}", "42"):
        text = PLATFORM.replace("type: generic", f"type: {bad}")
        only(problems(lambda t=text: settings(t)), CFG, text, bad, "unknown platform type", f"known: {known}")
    text = PLATFORM.replace("    type: generic\n", "")
    only(problems(lambda: settings(text)), CFG, text, "post_message_url", "unknown platform type", f"known: {known}")


def test_missing_post_message_url() -> None:
    text = "platforms:\n  myapp:\n    type: generic\n    secret: x\n"
    only(problems(lambda: settings(text)), CFG, text, "type: generic", "missing required key 'post_message_url'")
    text = "platforms:\n  myapp: {type: generic}\n"
    only(problems(lambda: settings(text)), CFG, text, "{type", "missing required key 'post_message_url'")


def test_wrong_value_types_are_positioned() -> None:
    text = PLATFORM + "server:\n  port: 99999\ndispatch:\n  max_backlog: lots\n"
    found = problems(lambda: settings(text))
    assert [(p.line, p.col) for p in found] == [at(text, "99999"), at(text, "lots")]
    assert "server.port" in found[0].message and "65535" in found[0].message
    assert "dispatch.max_backlog" in found[1].message


def test_every_problem_is_reported_in_file_order() -> None:
    text = (
        "stor: {}\n" + PLATFORM.replace("generic", "generik") + "  other:\n    type: generic\n    secret: ${SB_NOPE}\n"
    )
    found = problems(lambda: settings(text))
    assert [(p.line, p.col) for p in found] == sorted((p.line, p.col) for p in found)
    assert {(p.line, p.col) for p in found} >= {at(text, "stor"), at(text, "generik"), at(text, "${SB_NOPE}")}


def test_config_yaml_syntax_error_and_bad_values_are_positioned(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    text = PLATFORM + "server:\n  port: 80: 80\n"
    path.write_text(text)
    only(problems(lambda: load_settings(path, {})), str(path), text, "80‸: 80", "YAML syntax", "mapping values")
    text = PLATFORM + "server:\n  port: !!int eighty\n"
    path.write_text(text)
    only(problems(lambda: load_settings(path, {})), str(path), text, "!!int", "YAML value")
    text = PLATFORM + "    secret: ${SB_UNSET}\nserver: {port: !!bool perhaps}\n"
    path.write_text(text)
    found = problems(lambda: load_settings(path, {}))
    assert [(p.line, p.col) for p in found] == [at(text, "!!bool")] and "YAML value" in found[0].message
    path.write_bytes(PLATFORM.encode() + "    secret: caf\u00e9 ".encode() + b"\xe9\n")
    found = problems(lambda: load_settings(path, {}))
    text = PLATFORM + "    secret: caf\u00e9 ?\n"
    assert [(p.line, p.col) for p in found] == [at(text, "?")] and "not UTF-8" in found[0].message, found


def test_merge_keys_are_honoured() -> None:
    text = textwrap.dedent(
        """\
        platforms:
          a: &generic
            type: generic
            post_message_url: http://chat/a
          b:
            <<: *generic
            post_message_url: http://chat/b
            secret: k
        """
    )
    s = settings(text)
    assert [getattr(s.platforms[n], "post_message_url", None) for n in ("a", "b")] == ["http://chat/a", "http://chat/b"]
    assert s.platforms["b"].type == "generic" and getattr(s.platforms["b"], "secret", None) == "k"
    bad = text.replace("<<: *generic", "<<: 5")
    only(problems(lambda: settings(bad)), CFG, bad, "5", "YAML value", "merging")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "deploy" / "config"
    conf.mkdir(parents=True)
    (conf / "sb.yaml").write_text("store:\n  url: sqlite:///../data/sb.db\nflows: ../flows\n" + PLATFORM)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for path in (conf / "sb.yaml", Path("../deploy/config/sb.yaml")):
        s = load_settings(path, {})
        assert s.flows.resolve() == (tmp_path / "deploy" / "flows").resolve()
        assert s.store.url == f"sqlite:///{(tmp_path / 'deploy' / 'data' / 'sb.db').resolve()}"
    (conf / "abs.yaml").write_text(f"store:\n  url: sqlite:////var/x.db\nflows: {tmp_path}/f\n" + PLATFORM)
    s = load_settings(conf / "abs.yaml", {})
    assert s.store.url == "sqlite:////var/x.db" and s.flows.resolve() == (tmp_path / "f").resolve()
    (conf / "mem.yaml").write_text("store:\n  url: 'sqlite:///:memory:'\n" + PLATFORM)
    s = load_settings(conf / "mem.yaml", {})
    assert s.store.url == "sqlite:///:memory:"
    assert s.flows.resolve() == (conf / "flows").resolve(), "the default flows folder is beside the config too"


async def test_store_flows_and_platforms_alone_make_a_complete_config(tmp_path: Path) -> None:
    """Only the three keys, and a flows folder holding only demo.yaml: it starts, is ready, and answers."""
    (tmp_path / "flows").mkdir()
    shutil.copy(REPO / "flows" / "demo.yaml", tmp_path / "flows" / "demo.yaml")
    async with fake_platform() as (platform_server, fake), httpx.AsyncClient(timeout=30) as client:
        text = (
            "store:\n  url: sqlite:///data/sb.db\nflows: flows\nplatforms:\n  myapp:\n    type: generic\n"
            f"    post_message_url: {platform_server.url}/messages\n"
        )
        (tmp_path / "switchboard.yaml").write_text(text)
        s = load_settings(tmp_path / "switchboard.yaml", {})
        assert s.server == Settings().server and s.dispatch == Settings().dispatch and s.outbox == Settings().outbox
        async with running(s) as (server, _services):
            r = await client.get(f"{server.url}/readyz")
            assert r.status_code == 200 and r.json()["ready"] is True, r.text
            r = await client.post(f"{server.url}/webhooks/myapp", json=message(1, text="what can you do?"))
            assert r.status_code == 200, r.text
            await fake.wait_for(lambda: len(fake.delivered()) >= 1, timeout=15)
            assert fake.delivered()[0].body["text"]
        assert (tmp_path / "data" / "sb.db").exists(), "the store path resolved against the config folder"


# -- flows ---------------------------------------------------------------------------------------

BASE = """\
flow: base
states:
  start:
    routes:
      - when: {text: {matches: "^hi"}}
        do: [{reply: "Hello {{ user.name }}"}, {goto: second}]
      - when: {type: [image, file]}
        do: [{reply: "thanks"}]
      - do: [{reply: "echo {{ message.text }}"}]
  second:
    routes:
      - do: [{reply: "back"}, {goto: start}]
"""

BLOCK = BASE.replace(
    '      - do: [{reply: "echo {{ message.text }}"}]\n',
    "      - do:\n          - reply: |\n              You said {{ message.text }}.\n"
    "              {% if user.name %}Hi {{ user.name }}{% endif %}\n              {% endfor %}\n",
)

# (id, the flow's text, the token the problem must point at, words the message must hold)
FLOW_FAULTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    (
        "unknown-route-key",
        BASE.replace('      - do: [{reply: "echo', '      - whn: {type: text}\n        do: [{reply: "echo'),
        "whn",
        ("unknown key 'whn' in route", "(did you mean 'when'?)"),
    ),
    (
        "unknown-state-key",
        BASE.replace("  second:\n", "  second:\n    descripton: back again\n"),
        "descripton",
        ("unknown key 'descripton' in state 'second'", "(did you mean 'description'?)"),
    ),
    ("unknown-flow-key", BASE.replace("states:", "stats: {}\nstates:"), "stats", ("did you mean 'states'",)),
    ("bad-regex", BASE.replace('"^hi"', '"^(hi"'), '"^(hi"', ("bad regular expression",)),
    ("regex-too-big", BASE.replace('"^hi"', '"a{99999999999}"'), '"a{', ("bad regular expression",)),
    (
        "goto-unknown-state",
        BASE.replace("{goto: start}", "{goto: strat}"),
        "strat",
        ("unknown state 'strat'", "'start'"),
    ),
    (
        "template-syntax-one-line",
        BASE.replace('"Hello {{ user.name }}"', '"Hello {{ user.name"'),
        '"Hello {{',
        ("template syntax",),
    ),
    ("template-unknown-filter", BASE.replace("{{ user.name }}", "{{ user.name | uper }}"), '"Hello', ("uper",)),
    ("template-block-scalar-third-line", BLOCK, "{% endfor %}", ("template syntax", "endfor")),
    (
        "unknown-action",
        BASE.replace('{reply: "thanks"}', '{replyy: "thanks"}'),
        "replyy",
        ("unknown action 'replyy'", "'reply'"),
    ),
    (
        "unknown-condition",
        BASE.replace("{type: [image, file]}", "{typ: [image, file]}"),
        "typ:",
        ("unknown condition 'typ'", "'type'"),
    ),
    (
        "unknown-type-in-list",
        BASE.replace("[image, file]", "[image, flie]"),
        "flie",
        ("unknown message type 'flie'", "'file'"),
    ),
    ("unknown-type-scalar", BASE.replace("[image, file]", "imag"), "imag", ("unknown message type 'imag'", "'image'")),
    ("yaml-syntax-stray-bracket", BASE.replace('"thanks"}]', '"thanks"}]]'), '"thanks"}]‸]', ("YAML syntax", "']'")),
    ("yaml-syntax-unclosed-quote", BASE.replace('"back"', '"back'), '"back', ("YAML syntax", "quoted scalar")),
    (
        "yaml-syntax-unclosed-bracket",
        BASE.replace("{goto: start}]", "{goto: start}"),
        '[{reply: "back',
        ("YAML syntax",),
    ),
    ("yaml-syntax-tab", BASE.replace("  second:", "\tsecond:"), "\tsecond", ("YAML syntax",)),
    ("yaml-unknown-tag", BASE.replace('{reply: "back"}', "{reply: !shout back}"), "!shout", ("YAML value", "!shout")),
    ("yaml-bad-int", BASE.replace('{reply: "back"}', '{reply: !!int "back"}'), "!!int", ("YAML value",)),
]


@pytest.mark.parametrize(("case", "text", "token", "words"), FLOW_FAULTS, ids=[f[0] for f in FLOW_FAULTS])
def test_flow_fault_is_reported_at_its_token(
    tmp_path: Path, case: str, text: str, token: str, words: tuple[str, ...]
) -> None:
    (tmp_path / "base.yaml").write_text(text)
    only(problems(lambda: load_flows(tmp_path)), str(tmp_path / "base.yaml"), text, token, *words)


def test_the_base_flow_is_valid(tmp_path: Path) -> None:
    for text in (BASE, BLOCK.replace("              {% endfor %}\n", "")):
        (tmp_path / "base.yaml").write_text(text)
        assert set(load_flows(tmp_path)) == {"base"}


def test_duplicate_flow_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    other = "# the same name again\n" + BASE
    (tmp_path / "b.yaml").write_text(other)
    p = only(problems(lambda: load_flows(tmp_path)), str(tmp_path / "b.yaml"), other, "base", "'base'", "already used")
    assert str(tmp_path / "a.yaml") in p.message


def test_flow_file_not_utf8(tmp_path: Path) -> None:
    raw = BASE.encode().replace(b'"back"', b'"caf\xe9"')
    (tmp_path / "base.yaml").write_bytes(raw)
    text = BASE.replace('"back"', '"caf?"')
    found = problems(lambda: load_flows(tmp_path))
    line, col = at(text, "?")
    assert [(p.line, p.col) for p in found] == [(line, col)] and "not UTF-8" in found[0].message, found


def test_all_files_and_all_problems_are_reported(tmp_path: Path) -> None:
    one = BASE.replace("{goto: start}", "{goto: strat}").replace('"^hi"', '"(("')
    two = BASE.replace("flow: base", "flow: two").replace('reply: "back"', "replyy: back")
    (tmp_path / "one.yaml").write_text(one)
    (tmp_path / "two.yaml").write_text(two)
    found = problems(lambda: load_flows(tmp_path))
    assert [(Path(p.file).name, p.line, p.col) for p in found] == [
        ("one.yaml", *at(one, '"(("')),
        ("one.yaml", *at(one, "strat")),
        ("two.yaml", *at(two, "replyy")),
    ], found


# -- switchboard check ---------------------------------------------------------------------------


def check(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "SWITCHBOARD_"))}
    return subprocess.run(
        [str(SWITCHBOARD), "check", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_check_reports_each_problem_as_file_line_col(tmp_path: Path) -> None:
    d = tmp_path / "flows"
    d.mkdir()
    files: dict[str, tuple[str, str, str]] = {}  # name -> (text, token, words)
    for case, text, token, words in FLOW_FAULTS:
        name = f"{case}.yaml"
        text = text.replace("flow: base", f"flow: {case}")
        (d / name).write_text(text)
        files[name] = (text, token, words[0])
    (d / "fine.yaml").write_text(BASE.replace("flow: base", "flow: fine"))
    (d / "fine.test.yaml").write_text("tests: not a flow, not checked as one: [\n")
    result = check(d)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert len(lines) == len(files), result.stdout
    seen = set()
    for line in lines:
        m = LINE.match(line)
        assert m, line
        name = Path(m["file"]).name
        text, token, words = files[name]
        assert (int(m["line"]), int(m["col"])) == at(text, token), line
        assert words in m["message"], line
        seen.add(name)
    assert seen == set(files)
    assert f"{len(files)} problem(s)" in result.stderr


@pytest.mark.slow
def test_check_passes_on_the_shipped_flows_and_config() -> None:
    result = check("flows", "config/switchboard.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "" and "ok:" in result.stderr
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_check_reports_config_problems_and_missing_paths(tmp_path: Path) -> None:
    text = "store:\n  url: mysql://x\nflows: flows\n" + PLATFORM.replace("generic", "generik")
    (tmp_path / "sb.yaml").write_text(text)
    result = check(tmp_path / "sb.yaml", tmp_path / "nowhere")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'nowhere'}:1:1: no such file or folder",
        "{}:{}:{}: store.url: store url must start with sqlite:// or postgresql://".format(
            tmp_path / "sb.yaml", *at(text, "mysql")
        ),
        "{}:{}:{}: unknown platform type 'generik' (did you mean 'generic'?); known: {}".format(
            tmp_path / "sb.yaml", *at(text, "generik"), ", ".join(sorted(PLATFORM_TYPES))
        ),
    ]
    # a valid config whose flows folder has a broken flow: the flow's problem, in the flow's file
    (tmp_path / "flows").mkdir()
    broken = BASE.replace("{goto: start}", "{goto: strat}")
    (tmp_path / "flows" / "f.yaml").write_text(broken)
    (tmp_path / "ok.yaml").write_text("store:\n  url: sqlite:///x.db\nflows: flows\n" + PLATFORM)
    result = check(tmp_path / "ok.yaml", cwd=tmp_path.parent)
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    m = LINE.match(line)
    assert m and Path(m["file"]).resolve() == (tmp_path / "flows" / "f.yaml").resolve(), line
    assert (int(m["line"]), int(m["col"])) == at(broken, "strat")


# -- secrets written in the file instead of ${ENV} ---------------------------------------------------

LITERAL_SECRETS = """\
store:
  url: postgresql://sb:hunter2-pg@db.internal/sb
flows: flows
platforms:
  tg:
    type: telegram
    token: "123456:literal-bot-token"
    secret_token: ${TG_SECRET}
  myapp:
    type: generic
    secret: literal-hmac-secret
    post_message_url: http://chat.internal/api/messages
connectors:
  bot:
    type: http
    url: http://bot.internal/turn
    headers: {Authorization: "Bearer literal-bearer-value"}
admin: {token: "${ADMIN_TOKEN:-}"}
"""


def test_each_literal_secret_is_warned_once_by_path_never_by_value(caplog: pytest.LogCaptureFixture) -> None:
    env = {"TG_SECRET": "from-the-env", "ADMIN_TOKEN": "also-env"}
    with caplog.at_level("WARNING", logger="switchboard.config"):
        loaded = settings_from_text(LITERAL_SECRETS, "sb.yaml", env)
    assert loaded.platforms["myapp"].secret == "literal-hmac-secret", "a warning, not an error"  # type: ignore[attr-defined]
    warned = [r.getMessage() for r in caplog.records if r.name == "switchboard.config"]
    expected = {
        "store.url": "postgresql",
        "platforms.tg.token": '"123456',
        "platforms.myapp.secret": "literal-hmac",
        "connectors.bot.headers.Authorization": '"Bearer',
    }
    assert len(warned) == len(expected), warned
    for field, token in expected.items():
        line, col = at(LITERAL_SECRETS, token)
        assert any(w.startswith(f"sb.yaml:{line}:{col}: {field} ") for w in warned), (field, warned)
    assert all("environment" in w for w in warned)
    for value in ("hunter2-pg", "literal-bot-token", "literal-hmac-secret", "literal-bearer-value"):
        assert value not in caplog.text
    assert not any("secret_token" in w or "admin" in w for w in warned), "values from ${ENV} are fine"


@pytest.mark.slow
def test_check_reports_literal_secrets_as_warnings_and_passes(tmp_path: Path) -> None:
    text = "store:\n  url: sqlite:///x.db\nflows: flows\n" + PLATFORM + "    secret: literal-hmac-secret\n"
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "f.yaml").write_text(BASE)
    (tmp_path / "sb.yaml").write_text(text)
    result = check(tmp_path / "sb.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    line, col = at(text, "literal-hmac-secret")
    (reported,) = result.stdout.splitlines()
    assert reported.startswith(f"{tmp_path / 'sb.yaml'}:{line}:{col}: warning: platforms.myapp.secret "), reported
    assert "literal-hmac-secret" not in result.stdout + result.stderr
    assert "1 warning(s)" in result.stderr
