"""A flow's states and transitions as Mermaid text or Graphviz DOT (for `switchboard graph`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from middleware.engine.actions import AskAction, CallAction, GotoAction, HandoffAction
from middleware.engine.conditions import AllOf, AnyOf, Not, TextIs
from middleware.engine.flow import Action, Condition, Flow


class Edge(NamedTuple):
    source: str
    target: str
    label: str
    #: not a move in this turn: where the bot resumes after a handoff, when a person gives it back
    resume: bool = False


def edges(flow: Flow) -> list[Edge]:
    out: list[Edge] = []

    def add(source: str, actions: Iterable[Action], label: str) -> None:
        for action in actions:
            if isinstance(action, GotoAction):
                out.append(Edge(source, action.state, label))
            elif isinstance(action, CallAction):
                out.append(Edge(source, f"flow:{action.flow}", f"call {label}".strip()))
            elif isinstance(action, HandoffAction) and action.resume:
                # where the bot resumes when the person gives the conversation back
                out.append(Edge(source, action.resume, f"{label}: handoff {action.queue}".lstrip(": "), resume=True))
            elif isinstance(action, AskAction):
                add(source, (a for a in action.fallback if isinstance(a, Action)), f"{label} fallback".strip())

    for route in flow.always:
        add("*", route.do, describe(route.when))
    for event, actions in flow.on.items():
        add(f"on:{event}", actions, "")
    for state in flow.states.values():
        add(state.name, state.enter, "enter")
        for route in state.routes:
            add(state.name, route.do, describe(route.when))
        if state.timeout is not None:
            add(state.name, state.timeout.do, f"timeout {state.timeout.after:g}s")
    if flow.fallback is not None:
        add("fallback", flow.fallback.do, f"after {flow.fallback.after} misses")
    return out


def describe(condition: Condition | None) -> str:
    if condition is None:
        return "else"
    if isinstance(condition, TextIs):
        parts = [*(f'"{v}"' for v in condition.equals), *(f"~{v}" for v in condition.contains)]
        if condition.pattern is not None:
            parts.append(f"/{condition.pattern.pattern}/")
        return " ".join(parts)[:40]
    if isinstance(condition, AllOf):
        return " & ".join(describe(c) for c in condition.parts)[:40]
    if isinstance(condition, AnyOf):
        return " | ".join(describe(c) for c in condition.parts)[:40]
    if isinstance(condition, Not):
        return f"not {describe(condition.part)}"[:40]
    fields = [str(v) for v in vars_of(condition)]
    return f"{condition.key} {' '.join(fields)}".strip()[:40]


def vars_of(condition: Condition) -> list[object]:
    slots = getattr(condition, "__slots__", ())
    values: list[object] = []
    for name in slots:
        value = getattr(condition, name, None)
        if isinstance(value, tuple):
            values.append(",".join(str(v) if not isinstance(v, tuple) else str(v[0]) for v in value))
        elif value is not None:
            values.append(value)
    return values


def _id(name: str) -> str:
    return "n_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _label(text: str) -> str:
    """Text inside a Mermaid "..." (which has no escapes: a double quote becomes a single one)."""
    return text.replace('"', "'").replace("\n", " ")


def _dot(text: str) -> str:
    """Text inside a DOT "...": backslashes and double quotes escaped (a regex's `\\d` stays `\\d`,
    a trailing backslash cannot end the string early)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def mermaid(flow: Flow) -> str:
    lines = ["flowchart TD", f"  {_id('__start')}(( )) --> {_id(flow.start)}"]
    for name in flow.states:
        shape = f'{_id(name)}(["{_label(name)}"])' if name == flow.start else f'{_id(name)}["{_label(name)}"]'
        lines.append(f"  {shape}")
    for source, target, label, resume in edges(flow):
        # a handoff's resume is dotted: it happens when a person gives the conversation back
        solid = f'-- "{_label(label)}" -->' if label else "-->"
        arrow = f'-. "{_label(label)}" .->' if resume else solid
        src = _id(source) if source in flow.states else f'{_id(source)}{{{{"{_label(source)}"}}}}'
        lines.append(f"  {src} {arrow} {_id(target)}")
    return "\n".join(lines) + "\n"


def dot(flow: Flow) -> str:
    lines = [
        f'digraph "{_dot(flow.name)}" {{',
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="sans"];',
    ]
    lines.append("  __start [shape=point];")
    lines.append(f"  __start -> {_id(flow.start)};")
    for name in flow.states:
        lines.append(f'  {_id(name)} [label="{_dot(name)}"];')
    for source, target, label, resume in edges(flow):
        if source not in flow.states:
            lines.append(f'  {_id(source)} [label="{_dot(source)}", shape=diamond];')
        if target not in flow.states:
            lines.append(f'  {_id(target)} [label="{_dot(target)}", shape=folder];')
        style = ", style=dashed" if resume else ""
        lines.append(f'  {_id(source)} -> {_id(target)} [label="{_dot(label)}", fontname="sans", fontsize=10{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
