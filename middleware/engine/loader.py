"""YAML flows -> validated `Flow` objects, every mistake reported at its file:line:col.

Flow files are `*.yaml` / `*.yml` in the flows folder; `*.test.yaml` files beside them are
conversation tests, not flows. Checks beyond the shape: unknown states, flows, connectors,
queues and hours calendars; bad regular expressions and template syntax; states nothing leads
to; states with no way out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from middleware.engine.actions import ACTIONS
from middleware.engine.conditions import CONDITIONS, AllOf, needs_nlu
from middleware.engine.durations import UNIT, parse_duration
from middleware.engine.flow import Action, Coalesce, Condition, Fallback, Flow, Match, Route, State, StateTimeout
from middleware.engine.hours import Hours, parse_hours
from middleware.engine.templates import Template, template_error
from middleware.yamlfile import ConfigError, PathKey, Problem, YamlDoc, load_yaml, nearest

FLOW_KEYS = (
    "$schema",
    "flow",
    "description",
    "match",
    "vars",
    "always",
    "states",
    "start",
    "hours",
    "on",
    "fallback",
    "coalesce",
    "nlu",
)
STATE_KEYS = ("enter", "routes", "timeout", "description")
ROUTE_KEYS = ("when", "do", "miss", "description")
MATCH_KEYS = ("platform", "channel", "sender")
EVENTS = ("conversation.started", "agent.resolved", "agent.assigned", "connector.failed", "handoff.timeout")


@dataclass(frozen=True, slots=True)
class Known:
    """Names a flow may refer to that live outside it; None means "not checked"."""

    connectors: frozenset[str] | None = None
    queues: frozenset[str] | None = None


def is_flow_file(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") and not path.name.endswith((".test.yaml", ".test.yml"))


def flow_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and is_flow_file(p))


def load_flows(root: Path, known: Known | None = None) -> dict[str, Flow]:
    """Load every flow under `root`; raise ConfigError with all problems of all files."""
    known = known or Known()
    problems: list[Problem] = []
    flows: dict[str, Flow] = {}
    compilers: list[Compiler] = []
    files = flow_files(root)
    if not files:
        raise ConfigError([Problem(str(root), 1, 1, "no flow files (*.yaml) found")])
    for path in files:
        try:
            doc = load_yaml(path)
        except ConfigError as exc:
            problems += exc.problems
            continue
        compiler = Compiler(doc, known)
        flow = compiler.flow()
        compilers.append(compiler)
        if flow is None:
            continue
        if flow.name in flows:
            compiler.error(("flow",), f"flow name {flow.name!r} is already used by {flows[flow.name].file}")
            continue
        flows[flow.name] = flow
    for compiler in compilers:
        compiler.check_flow_refs(flows)
        problems += compiler.problems
    if problems:
        raise ConfigError(problems)
    return flows


def check_flows(root: Path, known: Known | None = None) -> list[Problem]:
    try:
        load_flows(root, known)
    except ConfigError as exc:
        return exc.problems
    return []


def _nlu_key(path: PathKey, raw: Any) -> PathKey:
    """The path of the first `intent` / `entity` key in a `when:` (inside all / any / not too)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key in ("intent", "entity"):
                return (*path, key)
            if key in ("all", "any", "not"):
                items = value if isinstance(value, list) else [value]
                for i, item in enumerate(items):
                    found = _nlu_key((*path, key, i) if isinstance(value, list) else (*path, key), item)
                    if found[-1] in ("intent", "entity"):
                        return found
    return path


def _human(seconds: float) -> str:
    """`2592000` -> `30d`, `300` -> `5m`: a duration limit as a bot builder would write it."""
    for unit in ("d", "h", "m"):
        if seconds >= UNIT[unit] and seconds % UNIT[unit] == 0:
            return f"{seconds / UNIT[unit]:g}{unit}"
    return f"{seconds:g}s"


class Compiler:
    """Compiles one flow document; conditions and actions call back into it for shared checks."""

    def __init__(self, doc: YamlDoc, known: Known) -> None:
        self.doc = doc
        self.known = known
        self.problems: list[Problem] = []
        self.gotos: list[tuple[str, PathKey, str]] = []
        self.flow_refs: list[tuple[str, PathKey]] = []
        self.hours_refs: list[tuple[str, PathKey]] = []
        self.scheduled_actions: dict[str, tuple[Action, ...]] = {}
        self.uses_nlu: list[PathKey] = []
        self.user_scope = False
        #: states with mistakes of their own: a broken route may be the exit they lack
        self.faulty: set[str] = set()

    # -- reporting -----------------------------------------------------------------------------

    def error(self, path: PathKey, message: str, *, key: bool = False) -> None:
        self.problems.append(self.doc.problem(path, message, key=key))

    def unknown(self, path: PathKey, name: str, valid: Iterable[str], what: str, *, key: bool = True) -> None:
        valid = list(valid)
        where = (*path, name) if key else path
        self.error(where, f"unknown {what} {name!r}{nearest(str(name), valid)}", key=key)

    def known_keys(self, value: dict[str, Any], path: PathKey, allowed: Iterable[str], what: str) -> None:
        allowed = tuple(allowed)
        for k in value:
            if k not in allowed:
                self.error((*path, k), f"unknown key '{k}' in {what}{nearest(k, allowed)}", key=True)

    def shape(
        self, raw: Any, path: PathKey, allowed: tuple[str, ...], required: tuple[str, ...], what: str, usage: str
    ) -> bool:
        """A mapping with only `allowed` keys and every `required` one; reports one problem per mistake:
        an unknown key (with the nearest valid one) says more than the usage line would."""
        if not isinstance(raw, dict):
            self.error(path, usage)
            return False
        unknown = [k for k in raw if k not in allowed]
        self.known_keys(raw, path, allowed, what)
        if any(k not in raw for k in required):
            if not unknown:
                self.error(path, usage)
            return False
        return True

    # -- shared value parsers ------------------------------------------------------------------

    def strings(self, raw: Any, path: PathKey) -> list[str]:
        items = raw if isinstance(raw, list) else [raw]
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str | int | float) or isinstance(item, bool):
                self.error((*path, i) if isinstance(raw, list) else path, "expected a string")
            else:
                out.append(str(item))
        return out

    def regex(self, raw: Any, path: PathKey) -> re.Pattern[str] | None:
        if not isinstance(raw, str):
            self.error(path, "expected a regular expression string")
            return None
        try:
            return re.compile(raw)
        except (re.error, OverflowError, RecursionError) as exc:  # `a{99999999999}` overflows
            self.error(path, f"bad regular expression: {exc}")
            return None

    def template(self, raw: Any, path: PathKey) -> Template:
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            self.error(path, "expected text")
            return Template("")
        source = str(raw)
        err = template_error(source)
        if err is not None:
            line, col = self.doc.where(path)
            line += err[0] - 1
            span = self.doc.folded.get(tuple(path))
            if span is not None:  # folded lines: find the error in the file's raw text, where lines are lines
                raw = template_error(self.doc.text[span[0] : span[1]])
                if raw is not None and raw[1] == err[1]:
                    line = self.doc.text.count("\n", 0, span[0]) + raw[0]
                    if raw[0] > 1:
                        text = self.doc.text.splitlines()[line - 1]
                        col = len(text) - len(text.lstrip()) + 1
                else:
                    line = self.doc.where(path)[0]
            self.problems.append(Problem(self.doc.file, line, col, f"template syntax: {err[1]}"))
            return Template("")
        return Template(source)

    def duration(self, raw: Any, path: PathKey, maximum: float = 30 * 86400) -> float | None:
        seconds = parse_duration(raw)
        if seconds is None or seconds > maximum:
            self.error(path, f"expected a duration such as 500ms, 1.5s, 10m, 2h (at most {_human(maximum)})")
            return None
        return seconds

    # -- references checked after the whole flow (or all flows) are read -----------------------

    def note_goto(self, state: str, path: PathKey, what: str = "goto to") -> None:
        """A state this flow must define; `what` starts the message if it does not ("goto to", ...)."""
        self.gotos.append((state, path, what))

    def note_flow(self, flow: str, path: PathKey) -> None:
        self.flow_refs.append((flow, path))

    def note_variable(self, name: str) -> None:
        if name.startswith("user."):
            self.user_scope = True

    def note_hours(self, name: str, path: PathKey) -> None:
        self.hours_refs.append((name, path))

    def note_connector(self, name: str, path: PathKey) -> None:
        known = self.known.connectors
        if known is not None and name not in known:
            listed = ", ".join(sorted(known)) or "none configured"
            self.error(path, f"unknown connector {name!r}{nearest(name, known)}; configured: {listed}")

    def note_queue(self, name: str, path: PathKey) -> None:
        known = self.known.queues
        if known is not None and name not in known:
            listed = ", ".join(sorted(known)) or "none configured"
            self.error(path, f"unknown queue {name!r}{nearest(name, known)}; configured: {listed}")

    def scheduled(self, raw: Any, path: PathKey) -> str:
        """Compile actions to run later; returns the reference a timer carries."""
        ref = ".".join(str(p) for p in path)
        self.scheduled_actions[ref] = self.actions(raw, path)
        return ref

    # -- structure -----------------------------------------------------------------------------

    def flow(self) -> Flow | None:
        data = self.doc.data
        if not isinstance(data, dict):
            self.error((), "a flow file must be a mapping with 'flow' and 'states'")
            return None
        self.known_keys(data, (), FLOW_KEYS, "flow")
        name = data.get("flow")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            self.error(("flow",) if "flow" in data else (), "flow needs a name (letters, digits, _ . -)")
            name = Path(self.doc.file).stem
        raw_states = data.get("states")
        if not isinstance(raw_states, dict) or not raw_states:
            self.error(("states",) if "states" in data else (), "a flow needs 'states', a mapping of name -> state")
            return None
        hours = self.hours(data.get("hours", {}))
        states: dict[str, State] = {}
        for sname, raw in raw_states.items():
            reported = len(self.problems)
            state = self.state(str(sname), raw, ("states", sname))
            if state is not None:
                states[str(sname)] = state
            if len(self.problems) > reported:
                self.faulty.add(str(sname))
        always = self.routes(data.get("always", []), ("always",))
        start = str(data.get("start", next(iter(raw_states))))
        if start not in raw_states:
            self.error(("start",), f"start state {start!r} is not defined{nearest(start, raw_states)}")
        on = self.events(data.get("on", {}))
        fallback = self.fallback(data["fallback"]) if "fallback" in data else None
        coalesce = self.coalesce(data["coalesce"]) if "coalesce" in data else None
        for target, path, what in self.gotos:
            if target not in raw_states:
                self.error(path, f"{what} unknown state {target!r}{nearest(target, raw_states)}")
        # a calendar with mistakes of its own is still defined: its references are not mistakes too
        declared = [str(k) for k in data["hours"]] if isinstance(data.get("hours"), dict) else []
        for cal, path in self.hours_refs:
            if cal not in declared:
                listed = ", ".join(sorted(declared)) or "none defined under hours:"
                self.error(path, f"unknown hours {cal!r}{nearest(cal, declared)}; defined: {listed}")
        variables = data.get("vars", {})
        if not isinstance(variables, dict):
            self.error(("vars",), "vars must be a mapping")
            variables = {}
        nlu = data.get("nlu")
        if nlu is not None:
            if isinstance(nlu, str):
                self.note_connector(nlu, ("nlu",))
            else:
                self.error(("nlu",), "nlu takes the name of a connector")
                nlu = None
        elif self.uses_nlu:
            self.error(self.uses_nlu[0], "intent/entity conditions need the flow's `nlu: CONNECTOR`", key=True)
        if start in states:
            self.reachability(states, always, start, on)
        return Flow(
            name=name,
            file=self.doc.file,
            states=states,
            start=start,
            always=always,
            vars=variables,
            match=self.match(data.get("match", {})),
            hours=hours,
            on=on,
            fallback=fallback,
            coalesce=coalesce,
            nlu=nlu,
            scheduled=self.scheduled_actions,
            user_scope=self.user_scope,
        )

    def check_flow_refs(self, flows: dict[str, Flow]) -> None:
        for target, path in self.flow_refs:
            if target not in flows:
                self.error(path, f"call to unknown flow {target!r}{nearest(target, flows)}")

    def hours(self, raw: Any) -> dict[str, Hours]:
        if not isinstance(raw, dict):
            self.error(("hours",), "hours takes a mapping of name -> {timezone, mon-fri: 09:00-17:00, holidays}")
            return {}
        out = {}
        for name, spec in raw.items():
            path = ("hours", name)
            if not isinstance(spec, dict):
                self.error(path, "a calendar is {timezone, mon-fri: HH:MM-HH:MM, holidays: [YYYY-MM-DD]}")
                continue
            hours, problems = parse_hours(str(name), spec)
            for where, message in problems:
                key, _, index = where.rpartition(".")
                at = (*path, key, int(index)) if key and index.isdigit() else (*path, where)
                # an unknown key is reported at the key, a bad value (or list item) at the value
                self.error(at, message, key=message.startswith("unknown key"))
            if hours is not None:
                out[str(name)] = hours
        return out

    def match(self, raw: Any) -> Match:
        if not isinstance(raw, dict):
            self.error(("match",), "match must be a mapping, e.g. {platform: [myapp]}")
            return Match()
        self.known_keys(raw, ("match",), MATCH_KEYS, "match")
        sender = raw.get("sender", {})
        if not isinstance(sender, dict):
            self.error(("match", "sender"), "sender takes a mapping of attribute -> value")
            sender = {}
        return Match(
            tuple(self.strings(raw.get("platform", []), ("match", "platform"))),
            tuple(self.strings(raw.get("channel", []), ("match", "channel"))),
            tuple((str(k), v) for k, v in sender.items()),
        )

    def events(self, raw: Any) -> dict[str, tuple[Action, ...]]:
        if not isinstance(raw, dict):
            self.error(("on",), "on takes a mapping of event -> actions")
            return {}
        out = {}
        for event, actions in raw.items():
            if event not in EVENTS:
                self.unknown(("on",), str(event), EVENTS, "event")
                continue
            out[str(event)] = self.actions(actions, ("on", event))
        return out

    def fallback(self, raw: Any) -> Fallback | None:
        usage = "fallback takes {after: N, do: [actions]}: after N turns not understood"
        if not self.shape(raw, ("fallback",), ("after", "do"), ("after", "do"), "fallback", usage):
            return None
        after = raw["after"]
        if not isinstance(after, int) or isinstance(after, bool) or after < 1:
            self.error(("fallback", "after"), "after takes a whole number of turns, at least 1")
            return None
        return Fallback(after, self.actions(raw["do"], ("fallback", "do")))

    def coalesce(self, raw: Any) -> Coalesce | None:
        usage = "coalesce takes {window: DURATION, cancel_inflight: true|false}"
        if not self.shape(raw, ("coalesce",), ("window", "cancel_inflight"), ("window",), "coalesce", usage):
            return None
        window = self.duration(raw["window"], ("coalesce", "window"), maximum=10)
        cancel = raw.get("cancel_inflight", False)
        if not isinstance(cancel, bool):
            self.error(("coalesce", "cancel_inflight"), "cancel_inflight takes true or false")
        return Coalesce(window, bool(cancel)) if window is not None else None

    def state(self, name: str, raw: Any, path: PathKey) -> State | None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error(path, f"state {name!r} must be a mapping with 'enter', 'routes' and/or 'timeout'")
            return None
        self.known_keys(raw, path, STATE_KEYS, f"state {name!r}")
        enter = self.actions(raw.get("enter", []), (*path, "enter"))
        routes = self.routes(raw.get("routes", []), (*path, "routes"))
        timeout = None
        if "timeout" in raw:
            t = raw["timeout"]
            tpath = (*path, "timeout")
            usage = "timeout takes {after: DURATION, do: [actions]}"
            if self.shape(t, tpath, ("after", "do"), ("after", "do"), "timeout", usage):
                after = self.duration(t["after"], (*tpath, "after"))
                if after is not None:
                    timeout = StateTimeout(after, self.actions(t["do"], (*tpath, "do")))
        return State(name, enter, routes, timeout)

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
            self.known_keys(item, rpath, ROUTE_KEYS, "route")
            when = self.condition(item["when"], (*rpath, "when")) if "when" in item else None
            if needs_nlu(when):
                self.uses_nlu.append(_nlu_key((*rpath, "when"), item["when"]))
            if "do" not in item:
                self.error(rpath, "a route needs 'do', the actions to take")
            miss = item.get("miss", False)
            if not isinstance(miss, bool):
                self.error((*rpath, "miss"), "miss takes true or false")
            line, _ = self.doc.where(rpath)
            out.append(
                Route(when, self.actions(item.get("do", []), (*rpath, "do")), f"{self.doc.file}:{line}", miss is True)
            )
        return tuple(out)

    def condition(self, raw: Any, path: PathKey) -> Condition:
        if not isinstance(raw, dict) or not raw:
            self.error(path, "a condition must be a mapping, e.g. {text: {matches: '^hi'}}")
            return AllOf(())
        parts: list[Condition] = []
        for key, value in raw.items():
            cls = CONDITIONS.get(key)
            if cls is None:
                self.unknown(path, str(key), CONDITIONS, "condition")
                continue
            parts.append(cls.from_yaml(self, value, (*path, key)))
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def condition_list(self, value: Any, path: PathKey) -> list[Condition]:
        if not isinstance(value, list) or not value:
            self.error(path, "expected a non-empty list of conditions")
            return []
        return [self.condition(v, (*path, i)) for i, v in enumerate(value)]

    def actions(self, raw: Any, path: PathKey, start: int = 0) -> tuple[Action, ...]:
        if not isinstance(raw, list):
            self.error(path, "expected a list of actions")
            return ()
        out: list[Action] = []
        for i, item in enumerate(raw, start):
            apath = (*path, i)
            if isinstance(item, str) and item in ("stop", "return", "resolve"):
                item = {item: None}
            if not isinstance(item, dict) or len(item) != 1:
                self.error(apath, f"an action is a mapping with one key: {', '.join(ACTIONS)}")
                continue
            ((key, value),) = item.items()
            cls = ACTIONS.get(key)
            if cls is None:
                self.unknown(apath, str(key), ACTIONS, "action")
                continue
            action = cls.from_yaml(self, value, (*apath, key))
            if action is not None:
                out.append(action)
        return tuple(out)

    # -- whole-flow checks ---------------------------------------------------------------------

    def reachability(
        self, states: dict[str, State], always: tuple[Route, ...], start: str, on: dict[str, tuple[Action, ...]]
    ) -> None:
        """States nothing leads to, and states a conversation can enter but never leave."""

        def targets(actions: Iterable[Action]) -> set[str]:
            out: set[str] = set()
            for a in actions:
                out.update(a.targets())
            return out

        def exits(state: State) -> set[str]:
            out = targets(state.enter)
            for r in state.routes:
                out |= targets(r.do)
            if state.timeout is not None:
                out |= targets(state.timeout.do)
            return out

        global_targets = set().union(*(targets(r.do) for r in always), *(targets(a) for a in on.values()))
        for acts in self.scheduled_actions.values():
            global_targets |= targets(acts)
        seen = {start} | global_targets
        todo = list(seen)
        while todo:
            name = todo.pop()
            if name in states:
                for nxt in exits(states[name]) - seen:
                    seen.add(nxt)
                    todo.append(nxt)
        for name in states:
            if name not in seen:
                self.error(("states", name), f"state {name!r} is unreachable: no goto leads to it", key=True)
        leaves_anywhere = bool(always) or bool(global_targets)
        for name, state in states.items():
            if leaves_anywhere or name == start or name not in seen or name in self.faulty:
                continue  # an unreachable state is reported once, as unreachable
            if not (exits(state) - {name}):
                self.error(("states", name), f"state {name!r} has no way out: no routes and no goto", key=True)
