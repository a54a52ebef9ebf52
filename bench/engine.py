"""The `engine` scenario: the flow engine deciding turns in-process, no HTTP, no store.

A generated flow of `STATES` states (each with text, regex, postback, variable and counter routes,
templates in its replies, a state timeout), two `always` routes, a business-hours calendar and a
`fallback:` rule is loaded by the real loader; then conversations, cycling over a fixed script of
messages, go through `Engine.decide` one turn after another for the measured window. Each turn's
state is the previous turn's result, so the conversations walk through all the states.

Figures: `turns_s` (turns per second over the window, the headline: its ratio to bare's req/s is
bare's time per request divided by the time per turn), `us_per_turn` (the window's mean),
`p50_us` / `p99_us` (per turn), `states` and `states_visited`.

`python -m bench.engine` runs it alone and prints the figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import aio
from bench.stats import percentile
from middleware.engine import Engine, load_flows
from middleware.model import ConversationState, Inbound, MessageType, Sender

STATES = 50
CONVERSATIONS = 20
NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # a Tuesday, 10:00 in Jakarta: inside office hours

#: what the users say, in turn; "next" walks to the following state, the rest exercise the routes
SCRIPT: tuple[tuple[MessageType, str], ...] = (
    ("text", "hello"),
    ("text", "next"),
    ("text", "order 123456"),
    ("postback", "pricing"),
    ("text", "what are your hours?"),
    ("text", "next"),
    ("text", "something the bot does not understand"),
    ("text", "count"),
    ("text", "next"),
)


def flow_yaml(states: int = STATES) -> str:
    """A flow of `states` states, each a small page of routes, the last one leading back to the first."""
    lines = [
        "flow: bench_engine",
        "vars: {brand: Acme, tries: 0}",
        "hours:",
        '  office: {timezone: Asia/Jakarta, mon-fri: "09:00-17:00", holidays: ["2026-12-25"]}',
        "fallback:",
        "  after: 5",
        '  do: [{reply: "Let me get a person."}, {set: {escalated: true}}]',
        "always:",
        '  - when: {text: {matches: "(?i)\\\\b(agent|human|operator)\\\\b"}}',
        '    do: [{reply: "Connecting you."}, {handoff: {queue: default, reason: asked}}]',
        "  - when: {all: [{text: {contains: [hours]}}, {hours: {within: office}}]}",
        "    do: [{reply: \"We are open now, {{ user.name or 'friend' }}.\"}]",
        "states:",
    ]
    for i in range(states):
        nxt = f"s{(i + 1) % states}"
        lines += [
            f"  s{i}:",
            f'    enter: [{{reply: "Step {i} of {states}."}}]',
            f"    timeout: {{after: 10m, do: [{{goto: s{i}}}]}}",
            "    routes:",
            f"      - when: {{text: next}}\n        do: [{{set: {{visited_{i}: true}}}}, {{goto: {nxt}}}]",
            '      - when: {text: {matches: "^order (\\\\d{6})$"}}',
            '        do: [{set: {order: "{{ message.text[6:] }}"}}, {reply: "Order {{ vars.order }} noted."}]',
            "      - when: {postback: [pricing, plans]}",
            '        do: [{reply: {text: "{{ vars.brand }}:", buttons: [Basic, Pro, {title: Back, payload: b}]}}]',
            "      - when: {all: [{text: count}, {counter: {asked: {gte: 3}}}]}",
            '        do: [{reply: "That\'s {{ counters.asked }} times."}, {count: {asked: 0}}]',
            "      - when: {text: count}",
            '        do: [{count: asked}, {reply: "Counted {{ counters.asked }}."}]',
            "      - when: {all: [{vars: {tries: {gte: 99}}}, {not: {type: text}}]}",
            "        do: [{reply: never}]",
            "      - miss: true",
            f'        do: [{{reply: "State {i}: you said {{{{ message.text }}}}. Say next."}}]',
        ]
    return "\n".join(lines) + "\n"


def _message(n: int, conversation: int) -> Inbound:
    kind, text = SCRIPT[n % len(SCRIPT)]
    payload = {"payload": text} if kind == "postback" else {}
    sender = Sender(f"u-{conversation}", "Ana", {})
    return Inbound("bench", f"m-{n}", f"c-{conversation}", sender, kind, text, payload)


async def _run(engine: Engine, warmup: float, seconds: float) -> tuple[int, float, list[float], set[str]]:
    states = [ConversationState() for _ in range(CONVERSATIONS)]
    messages = [_message(n, c) for n in range(len(SCRIPT)) for c in range(CONVERSATIONS)]
    visited: set[str] = set()
    samples: list[float] = []
    n = 0
    clock = time.perf_counter
    deadline = time.monotonic() + 3600
    window_start = end_warmup = clock() + warmup
    end = end_warmup + seconds
    while True:
        c = n % CONVERSATIONS
        message = messages[(n // CONVERSATIONS) % len(SCRIPT) * CONVERSATIONS + c]
        t0 = clock()
        result = await engine.decide(message, states[c], deadline, NOW)
        t1 = clock()
        states[c] = result.state
        visited.add(result.state.state or "")
        n += 1
        if t0 >= end_warmup:
            if not samples:
                window_start, n = t0, 1
            samples.append(t1 - t0)
            if t1 >= end:
                return n, t1 - window_start, samples, visited


def measure(warmup: float = 1.0, seconds: float = 5.0, states: int = STATES) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        path = Path(tmp) / "bench_engine.yaml"
        path.write_text(flow_yaml(states))
        flows = load_flows(path)
    engine = Engine(flows)
    turns, elapsed, samples, visited = aio.run(_run(engine, warmup, seconds))
    return {
        "turns_s": turns / elapsed,
        "us_per_turn": elapsed / turns * 1e6,
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "states": float(states),
        #: states the conversations went through (all of them, unless the window was very short)
        "states_visited": float(len(visited)),
    }


def main() -> int:
    figures = measure(seconds=float(sys.argv[1]) if len(sys.argv) > 1 else 5.0)
    for name, value in figures.items():
        print(f"{name:12} {value:,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
