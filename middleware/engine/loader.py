"""YAML flows -> validated `Flow` objects, every mistake reported at its file:line:col.

Flow files are `*.yaml` / `*.yml` in the flows folder; `*.test.yaml` files beside them are
conversation tests, not flows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from middleware.engine.flow import (
    Action,
    AllOf,
    Always,
    AnyOf,
    Condition,
    Flow,
    GotoAction,
    Not,
    PostbackIs,
    ReplyAction,
    Route,
    SetAction,
    State,
    StopAction,
    TextContains,
    TextEquals,
    TextMatches,
    TypeIs,
    WaitAction,
)
from middleware.engine.templates import Template, template_error
from middleware.model import MESSAGE_TYPES
from middleware.yamlfile import ConfigError, PathKey, Problem, YamlDoc, load_yaml, nearest

FLOW_KEYS = ("$schema", "flow", "description", "match", "vars", "always", "states", "start")
STATE_KEYS = ("enter", "routes", "description")
ROUTE_KEYS = ("when", "do", "description")
MATCH_KEYS = ("platform",)
TEXT_KEYS = ("equals", "contains", "matches")
CONDITION_KEYS = ("text", "type", "postback", "all", "any", "not")
ACTION_KEYS = ("reply", "goto", "set", "wait", "stop")
REPLY_KEYS = ("text", "buttons")
BUTTON_KEYS = ("title", "payload")


def is_flow_file(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") and not path.name.endswith((".test.yaml", ".test.yml"))


def flow_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and is_flow_file(p))


def load_flows(root: Path) -> dict[str, Flow]:
    """Load every flow under `root`; raise ConfigError with all problems of all files."""
    problems: list[Problem] = []
    flows: dict[str, Flow] = {}
    files = flow_files(root)
    if not files:
        raise ConfigError([Problem(str(root), 1, 1, "no flow files (*.yaml) found")])
    for path in files:
        try:
            doc = load_yaml(path)
        except ConfigError as exc:
            problems += exc.problems
            continue
        compiler = _Compiler(doc)
        flow = compiler.flow()
        problems += compiler.problems
        if flow is None:
            continue
        if flow.name in flows:
            problems.append(
                doc.problem(("flow",), f"flow name {flow.name!r} is already used by {flows[flow.name].file}")
            )
            continue
        flows[flow.name] = flow
    if problems:
        raise ConfigError(problems)
    return flows


class _Compiler:
    def __init__(self, doc: YamlDoc) -> None:
        self.doc = doc
        self.problems: list[Problem] = []
        self.gotos: list[tuple[PathKey, str]] = []

    def error(self, path: PathKey, message: str, *, key: bool = False) -> None:
        self.problems.append(self.doc.problem(path, message, key=key))

    def keys(self, value: dict[str, Any], path: PathKey, allowed: tuple[str, ...], what: str) -> None:
        for k in value:
            if k not in allowed:
                self.error((*path, k), f"unknown key '{k}' in {what}{nearest(k, allowed)}", key=True)

    def flow(self) -> Flow | None:
        data = self.doc.data
        if not isinstance(data, dict):
            self.error((), "a flow file must be a mapping with 'flow' and 'states'")
            return None
        self.keys(data, (), FLOW_KEYS, "flow")
        name = data.get("flow")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            self.error(("flow",) if "flow" in data else (), "flow needs a name (letters, digits, _ . -)")
            name = Path(self.doc.file).stem
        raw_states = data.get("states")
        if not isinstance(raw_states, dict) or not raw_states:
            self.error(
                ("states",) if "states" in data else (), "a flow needs 'states', a mapping of state name -> state"
            )
            return None
        states = {}
        for sname, raw in raw_states.items():
            state = self.state(sname, raw, ("states", sname))
            if state is not None:
                states[sname] = state
        always = self.routes(data.get("always", []), ("always",))
        start = data.get("start", next(iter(raw_states)))
        if start not in raw_states:
            self.error(("start",), f"start state {start!r} is not defined{nearest(str(start), raw_states)}")
        for path, target in self.gotos:
            if target not in raw_states:
                self.error(path, f"goto to unknown state {target!r}{nearest(target, raw_states)}")
        variables = data.get("vars", {})
        if not isinstance(variables, dict):
            self.error(("vars",), "vars must be a mapping")
            variables = {}
        platforms = self.match(data.get("match", {}))
        return Flow(
            name=name,
            file=self.doc.file,
            states=states,
            start=start,
            always=always,
            vars=variables,
            platforms=platforms,
        )

    def match(self, raw: Any) -> tuple[str, ...]:
        if not isinstance(raw, dict):
            self.error(("match",), "match must be a mapping, e.g. {platform: [myapp]}")
            return ()
        self.keys(raw, ("match",), MATCH_KEYS, "match")
        platform = raw.get("platform", [])
        return tuple(self.strings(platform, ("match", "platform")))

    def strings(self, raw: Any, path: PathKey) -> list[str]:
        items = raw if isinstance(raw, list) else [raw]
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str | int | float) or isinstance(item, bool):
                self.error((*path, i) if isinstance(raw, list) else path, "expected a string")
            else:
                out.append(str(item))
        return out

    def state(self, name: str, raw: Any, path: PathKey) -> State | None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error(path, f"state {name!r} must be a mapping with 'enter' and/or 'routes'")
            return None
        self.keys(raw, path, STATE_KEYS, f"state {name!r}")
        enter = self.actions(raw.get("enter", []), (*path, "enter"))
        routes = self.routes(raw.get("routes", []), (*path, "routes"))
        return State(name, enter, routes)

    def routes(self, raw: Any, path: PathKey) -> tuple[Route, ...]:
        if not isinstance(raw, list):
            self.error(path, "routes must be a list of {when, do}")
            return ()
        out = []
        for i, item in enumerate(raw):
            rpath = (*path, i)
            if not isinstance(item, dict):
                self.error(rpath, "a route must be a mapping with 'do' (and optionally 'when')")
                continue
            self.keys(item, rpath, ROUTE_KEYS, "route")
            when = self.condition(item["when"], (*rpath, "when")) if "when" in item else Always()
            if "do" not in item:
                self.error(rpath, "a route needs 'do', the actions to take")
            line, _ = self.doc.where(rpath)
            out.append(Route(when, self.actions(item.get("do", []), (*rpath, "do")), f"{self.doc.file}:{line}"))
        return tuple(out)

    def condition(self, raw: Any, path: PathKey) -> Condition:
        if not isinstance(raw, dict) or not raw:
            self.error(path, "a condition must be a mapping, e.g. {text: {matches: '^hi'}}")
            return Always()
        parts: list[Condition] = []
        for key, value in raw.items():
            cpath = (*path, key)
            parser = self._condition_parsers.get(key)
            if parser is None:
                self.error(cpath, f"unknown condition '{key}'{nearest(key, CONDITION_KEYS)}", key=True)
                continue
            parts.append(parser(self, value, cpath))
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def _text(self, value: Any, path: PathKey) -> Condition:
        if isinstance(value, str):
            return TextEquals((value,))
        if not isinstance(value, dict) or not value:
            self.error(path, "text takes a string or {equals | contains | matches}")
            return Always()
        self.keys(value, path, TEXT_KEYS, "text condition")
        parts: list[Condition] = []
        if "equals" in value:
            parts.append(TextEquals(tuple(self.strings(value["equals"], (*path, "equals")))))
        if "contains" in value:
            parts.append(TextContains(tuple(self.strings(value["contains"], (*path, "contains")))))
        if "matches" in value:
            pattern = value["matches"]
            if not isinstance(pattern, str):
                self.error((*path, "matches"), "matches takes a regular expression string")
            else:
                try:
                    parts.append(TextMatches(re.compile(pattern)))
                except re.error as exc:
                    self.error((*path, "matches"), f"bad regular expression: {exc}")
        if not parts:
            return Always()
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def _type(self, value: Any, path: PathKey) -> Condition:
        types = self.strings(value, path)
        for t in types:
            if t not in MESSAGE_TYPES:
                self.error(
                    path, f"unknown message type {t!r}{nearest(t, MESSAGE_TYPES)}; one of {', '.join(MESSAGE_TYPES)}"
                )
        return TypeIs(tuple(types))

    def _postback(self, value: Any, path: PathKey) -> Condition:
        return PostbackIs(tuple(self.strings(value, path)))

    def _all(self, value: Any, path: PathKey) -> Condition:
        return AllOf(tuple(self._list_of_conditions(value, path)))

    def _any(self, value: Any, path: PathKey) -> Condition:
        return AnyOf(tuple(self._list_of_conditions(value, path)))

    def _not(self, value: Any, path: PathKey) -> Condition:
        return Not(self.condition(value, path))

    def _list_of_conditions(self, value: Any, path: PathKey) -> list[Condition]:
        if not isinstance(value, list) or not value:
            self.error(path, "expected a non-empty list of conditions")
            return []
        return [self.condition(v, (*path, i)) for i, v in enumerate(value)]

    _condition_parsers: dict[str, Callable[[_Compiler, Any, PathKey], Condition]] = {
        "text": _text,
        "type": _type,
        "postback": _postback,
        "all": _all,
        "any": _any,
        "not": _not,
    }

    def actions(self, raw: Any, path: PathKey) -> tuple[Action, ...]:
        if not isinstance(raw, list):
            self.error(path, "expected a list of actions")
            return ()
        out: list[Action] = []
        for i, item in enumerate(raw):
            apath = (*path, i)
            if isinstance(item, str) and item == "stop":
                out.append(StopAction())
                continue
            if not isinstance(item, dict) or len(item) != 1:
                self.error(apath, f"an action is a mapping with one key: {', '.join(ACTION_KEYS)}")
                continue
            ((key, value),) = item.items()
            parser = self._action_parsers.get(key)
            if parser is None:
                self.error((*apath, key), f"unknown action '{key}'{nearest(key, ACTION_KEYS)}", key=True)
                continue
            action = parser(self, value, (*apath, key))
            if action is not None:
                out.append(action)
        return tuple(out)

    def template(self, raw: Any, path: PathKey) -> Template:
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            self.error(path, "expected text")
            return Template("")
        source = str(raw)
        err = template_error(source)
        if err is not None:
            line, col = self.doc.where(path)
            self.problems.append(Problem(self.doc.file, line + err[0] - 1, col, f"template syntax: {err[1]}"))
            return Template("")
        return Template(source)

    def _reply(self, value: Any, path: PathKey) -> Action | None:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return ReplyAction(self.template(value, path))
        if not isinstance(value, dict):
            self.error(path, "reply takes text or {text, buttons}")
            return None
        self.keys(value, path, REPLY_KEYS, "reply")
        text = self.template(value.get("text", ""), (*path, "text"))
        buttons = []
        raw_buttons = value.get("buttons", [])
        if not isinstance(raw_buttons, list):
            self.error((*path, "buttons"), "buttons must be a list of {title, payload} or strings")
            raw_buttons = []
        for i, b in enumerate(raw_buttons):
            bpath = (*path, "buttons", i)
            if isinstance(b, str):
                buttons.append((self.template(b, bpath), b))
            elif isinstance(b, dict) and "title" in b:
                self.keys(b, bpath, BUTTON_KEYS, "button")
                payload = b.get("payload", b["title"])
                buttons.append((self.template(b["title"], (*bpath, "title")), str(payload)))
            else:
                self.error(bpath, "a button is a string or {title, payload}")
        return ReplyAction(text, tuple(buttons))

    def _goto(self, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, str):
            self.error(path, "goto takes a state name")
            return None
        self.gotos.append((path, value))
        return GotoAction(value)

    def _set(self, value: Any, path: PathKey) -> Action | None:
        if not isinstance(value, dict) or not value:
            self.error(path, "set takes a mapping of variable -> value")
            return None
        values: list[tuple[str, Any]] = []
        for name, v in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                self.error((*path, name), f"bad variable name {name!r}", key=True)
                continue
            values.append((name, self.template(v, (*path, name)) if isinstance(v, str) else v))
        return SetAction(tuple(values))

    def _stop(self, value: Any, path: PathKey) -> Action | None:
        return StopAction()

    def _wait(self, value: Any, path: PathKey) -> Action | None:
        seconds = parse_duration(value)
        if seconds is None or seconds > 300:
            self.error(path, "wait takes a duration up to 5m, e.g. 1.5s, 500ms, 2m")
            return None
        return WaitAction(seconds)

    _action_parsers: dict[str, Callable[[_Compiler, Any, PathKey], Action | None]] = {
        "reply": _reply,
        "goto": _goto,
        "set": _set,
        "stop": _stop,
        "wait": _wait,
    }


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from `1.5s`, `500ms`, `10m`, `2h` or a bare number of seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _DURATION.match(value)
    if m is None:
        return None
    return float(m.group(1)) * _UNIT[m.group(2)]


def check_flows(root: Path) -> list[Problem]:
    try:
        load_flows(root)
    except ConfigError as exc:
        return exc.problems
    return []
