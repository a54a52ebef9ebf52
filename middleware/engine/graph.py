"""A flow's states and transitions as Mermaid text or Graphviz DOT (for `switchboard graph`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from middleware.engine.actions import CallAction, GotoAction
from middleware.engine.conditions import AllOf, AnyOf, Not, TextIs
from middleware.engine.flow import Action, Condition, Flow

Edge = tuple[str, str, str]  # (from, to, label)


def edges(flow: Flow) -> list[Edge]:
    out: list[Edge] = []

    def add(source: str, actions: Iterable[Action], label: str) -> None:
        for action in actions:
            if isinstance(action, GotoAction):
                out.append((source, action.state, label))
            elif isinstance(action, CallAction):
                out.append((source, f"flow:{action.flow}", f"call {label}".strip()))

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
    return text.replace('"', "'").replace("\n", " ")


def mermaid(flow: Flow) -> str:
    lines = ["flowchart TD", f"  {_id('__start')}(( )) --> {_id(flow.start)}"]
    for name in flow.states:
        shape = f'{_id(name)}(["{_label(name)}"])' if name == flow.start else f'{_id(name)}["{_label(name)}"]'
        lines.append(f"  {shape}")
    for source, target, label in edges(flow):
        arrow = f'-- "{_label(label)}" -->' if label else "-->"
        src = _id(source) if source in flow.states else f'{_id(source)}{{{{"{_label(source)}"}}}}'
        lines.append(f"  {src} {arrow} {_id(target)}")
    return "\n".join(lines) + "\n"


def dot(flow: Flow) -> str:
    lines = [
        f'digraph "{_label(flow.name)}" {{',
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="sans"];',
    ]
    lines.append("  __start [shape=point];")
    lines.append(f"  __start -> {_id(flow.start)};")
    for name in flow.states:
        lines.append(f'  {_id(name)} [label="{_label(name)}"];')
    for source, target, label in edges(flow):
        if source not in flow.states:
            lines.append(f'  {_id(source)} [label="{_label(source)}", shape=diamond];')
        if target not in flow.states:
            lines.append(f'  {_id(target)} [label="{_label(target)}", shape=folder];')
        lines.append(f'  {_id(source)} -> {_id(target)} [label="{_label(label)}", fontname="sans", fontsize=10];')
    lines.append("}")
    return "\n".join(lines) + "\n"
