"""Conversation tests: `switchboard test [PATH...]` runs `*.test.yaml` files beside the flows.

```yaml
connectors:                       # engines replaced by canned answers (see connectors/canned.py)
  rasa:
    answers: [{when: {contains: order}, intent: {name: order_status, confidence: 0.9}}]
tests:
  - name: greets by name
    user: {id: u-1, name: Ana, attributes: {vip: true}}   # optional
    platform: myapp                                        # optional, default "test"
    clock: "2026-12-01T10:00:00+07:00"                     # optional: fixes business hours
    steps:
      - user: hello                                        # or postback: PAYLOAD, event: NAME, wait: 10m
        expect:
          replies: ["Hello Ana!", {matches: "^How can"}]   # every reply, in order
          buttons: [Opening hours, Pricing]                # on the last reply
          vars: {greeted: true}
          state: start
```

The flows run in-process with the real engine; `wait` moves a test clock and fires the timers
(state timeouts, `expect`, `schedule`) that fall due, as the scheduler would.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from connectors.canned import CannedConfig, CannedConnector
from middleware.engine import Engine, FlowFailed, Resources, load_flows
from middleware.engine.durations import parse_duration
from middleware.handoff import HandoffMachine, HandoffSettings
from middleware.model import (
    Attachment,
    ConversationState,
    Handoff,
    Inbound,
    Owner,
    Reply,
    Resolve,
    Sender,
    Timer,
    TurnResult,
)
from middleware.yamlfile import ConfigError, Problem, YamlDoc, load_yaml, pydantic_problems

FALLBACK_REPLY = "Sorry, something went wrong on our side. Please try again in a moment."
STEP_KINDS = ("user", "postback", "image", "file", "event", "wait")
STEP_EXTRAS = ("expect", "with")
EXPECT_KEYS = ("replies", "reply", "no_reply", "buttons", "vars", "state", "owner", "handoff", "resolve")


def test_files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.name.endswith((".test.yaml", ".test.yml")))
        elif p.exists():
            out.append(p)
    return out


@dataclass
class Failure:
    where: str
    title: str
    lines: list[str]


@dataclass
class Outcome:
    passed: int = 0
    failures: list[Failure] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class _Clock:
    now: datetime
    timers: list[tuple[datetime, int, Timer]] = field(default_factory=list)
    seq: int = 0

    async def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def run_files(files: list[Path], flows_dir: Path | None = None) -> Outcome:
    outcome = Outcome()
    for file in files:
        try:
            doc = load_yaml(file)
        except ConfigError as exc:
            outcome.problems += exc.problems
            continue
        await _run_file(doc, flows_dir or file.parent, outcome)
    return outcome


async def _run_file(doc: YamlDoc, flows_dir: Path, outcome: Outcome) -> None:
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        outcome.problems.append(doc.problem((), "a test file needs 'tests', a list of {name, steps}"))
        return
    connectors: dict[str, CannedConnector] = {}
    for name, raw in (data.get("connectors") or {}).items():
        try:
            config = CannedConfig.model_validate({"type": "canned", **(raw or {})})
        except ValidationError as exc:
            outcome.problems += pydantic_problems(doc, ("connectors", name), exc.errors())
            continue
        connectors[str(name)] = CannedConnector(str(name), config, None)
    try:
        handoff = HandoffMachine(HandoffSettings.model_validate(data.get("handoff") or {}))
    except ValidationError as exc:
        outcome.problems += pydantic_problems(doc, ("handoff",), exc.errors())
        return
    root = Path(doc.file).parent / str(data["flows"]) if "flows" in data else flows_dir
    try:
        flows = load_flows(root)
    except ConfigError as exc:
        outcome.problems += exc.problems
        return
    for i, test in enumerate(data["tests"]):
        if not isinstance(test, dict) or not isinstance(test.get("steps"), list):
            outcome.problems.append(doc.problem(("tests", i), "a test is {name, steps: [...]}"))
            continue
        await _run_test(doc, i, test, flows, connectors, handoff, outcome)


async def _run_test(
    doc: YamlDoc,
    index: int,
    test: dict[str, Any],
    flows: Any,
    connectors: dict[str, CannedConnector],
    handoff: HandoffMachine,
    outcome: Outcome,
) -> None:
    line, _ = doc.where(("tests", index))
    name = str(test.get("name", f"test {index + 1}"))
    where = f"{doc.file}:{line}"
    clock = _Clock(_parse_clock(test.get("clock")))
    engine = Engine(flows, Resources(connectors=connectors, sleep=clock.sleep, handoff=handoff))
    user = test.get("user") or {}
    sender = Sender(str(user.get("id", "tester")), user.get("name"), dict(user.get("attributes") or {}))
    platform = str(test.get("platform", "test"))
    state = ConversationState()
    if "flow" in test:
        state.flow = str(test["flow"])
    ids = iter(range(1, 1_000_000))
    for s, step in enumerate(test["steps"]):
        spath = ("tests", index, "steps", s)
        if not isinstance(step, dict) or sum(k in step for k in STEP_KINDS) != 1:
            outcome.problems.append(doc.problem(spath, f"a step has one of {', '.join(STEP_KINDS)}, and 'expect'"))
            return
        results: list[TurnResult] = []
        kind = next(k for k in STEP_KINDS if k in step)
        if kind == "wait":
            seconds = parse_duration(step["wait"])
            if seconds is None:
                outcome.problems.append(doc.problem((*spath, "wait"), "wait takes a duration such as 10m"))
                return
            until = clock.now + timedelta(seconds=seconds)
            while clock.timers and clock.timers[0][0] <= until:
                due, _, timer = clock.timers.pop(0)
                clock.now = due
                event = _message(
                    platform,
                    sender,
                    f"timer-{next(ids)}",
                    "event",
                    payload={"event": "timer", "name": timer.name, **timer.payload},
                )
                state = await _turn(engine, event, state, clock, results)
            clock.now = until
        else:
            message = _step_message(kind, step[kind], platform, sender, f"m-{next(ids)}", step.get("with"))
            state = await _turn(engine, message, state, clock, results)
        problems = _check(step.get("expect"), results, state)
        if problems:
            said = f"{kind}: {step[kind]!r}"
            outcome.failures.append(Failure(where, f"{name}, step {s + 1} ({said})", problems))
            return
    outcome.passed += 1


async def _turn(
    engine: Engine, message: Inbound, state: ConversationState, clock: _Clock, results: list[TurnResult]
) -> ConversationState:
    try:
        result = await engine.decide(message, state, time.monotonic() + 30, clock.now)
    except FlowFailed as exc:
        kept = state.copy()
        result = TurnResult((_fallback(),), (), kept, (f"failed: {exc}",))
    results.append(result)
    for name in result.cancel_timers:
        clock.timers = [t for t in clock.timers if t[2].name != name]
    for timer in result.timers:
        clock.seq += 1
        clock.timers.append((clock.now + timedelta(seconds=timer.after), clock.seq, timer))
    clock.timers.sort(key=lambda t: (t[0], t[1]))
    return result.state


def _fallback() -> Reply:
    return Reply(FALLBACK_REPLY)


def _parse_clock(raw: Any) -> datetime:
    if raw is None:
        return datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # a Tuesday, 10:00 in Jakarta
    if isinstance(raw, datetime):
        return raw if raw.tzinfo else raw.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _message(
    platform: str, sender: Sender, mid: str, kind: Any, text: str = "", payload: dict[str, Any] | None = None
) -> Inbound:
    return Inbound(platform, mid, "test-conversation", sender, kind, text, payload or {})


def _step_message(
    kind: str, value: Any, platform: str, sender: Sender, mid: str, extra: dict[str, Any] | None = None
) -> Inbound:
    if kind == "user":
        return _message(platform, sender, mid, "text", str(value))
    if kind == "postback":
        return _message(platform, sender, mid, "postback", str(value), {"payload": str(value)})
    if kind == "image":
        return Inbound(platform, mid, "test-conversation", sender, "image", "", {}, (Attachment("image", str(value)),))
    if kind == "file":
        return Inbound(platform, mid, "test-conversation", sender, "file", "", {}, (Attachment("file", str(value)),))
    return _message(platform, sender, mid, "event", payload={**(extra or {}), "event": str(value)})


def _check(expect: Any, results: list[TurnResult], state: ConversationState) -> list[str]:
    if expect is None:
        return []
    if not isinstance(expect, dict):
        return ["expect must be a mapping"]
    problems = [f"unknown expectation {k!r}; one of {', '.join(EXPECT_KEYS)}" for k in expect if k not in EXPECT_KEYS]
    replies = [r for res in results for r in res.replies]
    actual_texts = [r.text for r in replies]
    wanted = expect.get("replies")
    if "reply" in expect:
        wanted = [expect["reply"]]
    if wanted is not None:
        wanted = wanted if isinstance(wanted, list) else [wanted]
        ok = len(wanted) == len(replies) and all(_reply_fits(w, r.text) for w, r in zip(wanted, replies, strict=False))
        if not ok:
            shown = [
                w
                if isinstance(w, str)
                else f"/{w.get('matches')}/"
                if isinstance(w, dict) and "matches" in w
                else str(w)
                for w in wanted
            ]
            problems.append("replies differ (- expected, + actual):")
            problems += ["  " + d for d in difflib.ndiff(shown, actual_texts) if not d.startswith("?")]
    if expect.get("no_reply") and replies:
        problems.append(f"expected no reply, got {actual_texts}")
    if "buttons" in expect:
        got = [b.title for b in replies[-1].buttons + replies[-1].quick_replies] if replies else []
        if got != list(expect["buttons"]):
            problems.append(f"buttons: expected {expect['buttons']}, got {got}")
    for name, value in (expect.get("vars") or {}).items():
        present = name in state.vars
        if not present or state.vars[name] != value:
            problems.append(f"vars.{name}: expected {value!r}, got {state.vars.get(name, '<unset>')!r}")
    if "state" in expect:
        want = str(expect["state"])
        got_state = f"{state.flow}/{state.state}" if "/" in want else str(state.state)
        if got_state != want:
            problems.append(f"state: expected {want!r}, got {got_state!r}")
    if "owner" in expect and state.owner != Owner(str(expect["owner"])):
        problems.append(f"owner: expected {expect['owner']!r}, got {state.owner.value!r}")
    handoffs = [a for res in results for a in res.actions if isinstance(a, Handoff)]
    if "handoff" in expect:
        want_h = expect["handoff"]
        if want_h is False and handoffs:
            problems.append(f"expected no handoff, got {handoffs}")
        elif want_h is True and not handoffs:
            problems.append("expected a handoff, got none")
        elif isinstance(want_h, str) and not any(h.queue == want_h for h in handoffs):
            problems.append(f"expected a handoff to {want_h!r}, got {[h.queue for h in handoffs] or 'none'}")
    if expect.get("resolve") and not any(isinstance(a, Resolve) for res in results for a in res.actions):
        problems.append("expected the conversation resolved, it was not")
    if problems:
        trace = [line for res in results for line in res.trace]
        problems += ["trace:", *("  " + t for t in trace)]
    return problems


def _reply_fits(want: Any, text: str) -> bool:
    if isinstance(want, str):
        return want == text
    if isinstance(want, dict):
        if "matches" in want and re.search(str(want["matches"]), text) is None:
            return False
        if "contains" in want and str(want["contains"]) not in text:
            return False
        return not ("text" in want and want["text"] != text)
    return False
