"""Conditions of `when:`. Several keys in one mapping must all hold.

To add one: subclass `Condition`, set `key`, implement `test` and `from_yaml`, and add the
class to `CONDITIONS`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from middleware.engine.flow import Condition, TurnContext
from middleware.model import MESSAGE_TYPES, Owner

if TYPE_CHECKING:
    from middleware.engine.loader import Compiler
    from middleware.yamlfile import PathKey

TEXT_KEYS = ("equals", "contains", "matches")
COMPARE_KEYS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "exists", "matches")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


@dataclass(frozen=True, slots=True)
class Comparison:
    """`{eq: 3}`, `{gte: 2, lt: 5}`, `{in: [a, b]}`, `{exists: true}`, `{matches: regex}`, or a bare value (eq)."""

    checks: tuple[tuple[str, Any], ...]

    def holds(self, present: bool, value: Any) -> bool:
        for op, expected in self.checks:
            if op == "exists":
                if present != bool(expected):
                    return False
                continue
            if not present:
                return False
            if op == "in":
                if value not in expected:
                    return False
            elif op == "matches":
                if not isinstance(value, str) or expected.search(value) is None:
                    return False
            else:
                try:
                    if not _OPS[op](value, expected):
                        return False
                except TypeError:
                    return False
        return True

    @classmethod
    def parse(cls, c: Compiler, value: Any, path: PathKey) -> Comparison:
        if not isinstance(value, dict):
            return cls((("eq", value),))
        checks: list[tuple[str, Any]] = []
        for op, expected in value.items():
            if op not in COMPARE_KEYS:
                c.unknown(path, op, COMPARE_KEYS, "comparison")
                continue
            if op == "matches":
                pattern = c.regex(expected, (*path, op))
                if pattern is not None:
                    checks.append((op, pattern))
            elif op == "in" and not isinstance(expected, list):
                c.error((*path, op), "in takes a list")
            else:
                checks.append((op, expected))
        return cls(tuple(checks))


@dataclass(frozen=True, slots=True)
class TextIs(Condition):
    key = "text"
    equals: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def test(self, ctx: TurnContext) -> bool:
        text = ctx.message.text
        folded = text.strip().casefold()
        if self.equals and folded not in self.equals:
            return False
        if self.contains and not any(v in folded for v in self.contains):
            return False
        return not (self.pattern is not None and self.pattern.search(text) is None)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if isinstance(value, str):
            return cls(equals=(value.strip().casefold(),))
        if not isinstance(value, dict) or not value:
            c.error(path, "text takes a string or {equals | contains | matches}")
            return cls()
        c.known_keys(value, path, TEXT_KEYS, "text condition")
        equals = tuple(v.strip().casefold() for v in c.strings(value.get("equals", []), (*path, "equals")))
        contains = tuple(v.casefold() for v in c.strings(value.get("contains", []), (*path, "contains")))
        pattern = c.regex(value["matches"], (*path, "matches")) if "matches" in value else None
        return cls(equals, contains, pattern)


@dataclass(frozen=True, slots=True)
class TypeIs(Condition):
    key = "type"
    types: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        return ctx.message.type in self.types

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        types = c.strings(value, path)
        for i, t in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(t, str | int | float) and not isinstance(t, bool) and str(t) not in MESSAGE_TYPES:
                at = (*path, i) if isinstance(value, list) else path
                c.unknown(at, str(t), MESSAGE_TYPES, "message type", key=False)
        return cls(tuple(types))


@dataclass(frozen=True, slots=True)
class PostbackIs(Condition):
    key = "postback"
    payloads: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        if ctx.message.type != "postback":
            return False
        value = ctx.message.payload.get("payload", ctx.message.text)
        return str(value) in self.payloads

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(tuple(c.strings(value, path)))


@dataclass(frozen=True, slots=True)
class EventIs(Condition):
    key = "event"
    names: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        return ctx.message.type == "event" and ctx.message.payload.get("event") in self.names

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(tuple(c.strings(value, path)))


@dataclass(frozen=True, slots=True)
class IntentIs(Condition):
    key = "intent"
    needs_nlu = True
    names: tuple[str, ...]
    min_confidence: float = 0.0

    def test(self, ctx: TurnContext) -> bool:
        nlu = ctx.nlu
        if nlu is None or nlu.intent is None:
            return False
        return (not self.names or nlu.intent in self.names) and nlu.confidence >= self.min_confidence

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if isinstance(value, str | list):
            return cls(tuple(c.strings(value, path)))
        if not isinstance(value, dict):
            c.error(path, "intent takes a name, a list of names, or {name, min_confidence}")
            return cls(())
        c.known_keys(value, path, ("name", "min_confidence"), "intent condition")
        names = tuple(c.strings(value.get("name", []), (*path, "name")))
        conf = value.get("min_confidence", 0.0)
        if not isinstance(conf, int | float) or isinstance(conf, bool) or not 0 <= conf <= 1:
            c.error((*path, "min_confidence"), "min_confidence is a number from 0 to 1")
            conf = 0.0
        return cls(names, float(conf))


@dataclass(frozen=True, slots=True)
class EntityIs(Condition):
    key = "entity"
    needs_nlu = True
    name: str
    value: Comparison | None = None
    min_confidence: float = 0.0

    def test(self, ctx: TurnContext) -> bool:
        if ctx.nlu is None:
            return False
        for e in ctx.nlu.entities:
            if (
                e.name == self.name
                and e.confidence >= self.min_confidence
                and (self.value is None or self.value.holds(True, e.value))
            ):
                return True
        return False

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            c.error(path, "entity takes a name or {name, value, min_confidence}")
            return cls("")
        c.known_keys(value, path, ("name", "value", "min_confidence"), "entity condition")
        comparison = Comparison.parse(c, value["value"], (*path, "value")) if "value" in value else None
        return cls(value["name"], comparison, float(value.get("min_confidence", 0.0)))


@dataclass(frozen=True, slots=True)
class VarIs(Condition):
    """`vars: {order: {exists: true}, tries: {gte: 2}}`; `user.x` names a user-scope variable."""

    key = "vars"
    checks: tuple[tuple[str, Comparison], ...]

    def test(self, ctx: TurnContext) -> bool:
        for name, comparison in self.checks:
            present, value = _lookup(ctx.state.vars, name)
            if not comparison.holds(present, value):
                return False
        return True

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if not isinstance(value, dict) or not value:
            c.error(path, "vars takes a mapping of variable -> value or comparison")
            return cls(())
        for k in value:
            c.note_variable(str(k))
        return cls(tuple((str(k), Comparison.parse(c, v, (*path, k))) for k, v in value.items()))


def _lookup(variables: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    current: Any = variables
    for part in dotted.split("."):
        if not isinstance(current, dict) or part not in current:
            return False, None
        current = current[part]
    return True, current


@dataclass(frozen=True, slots=True)
class PlatformIs(Condition):
    key = "platform"
    names: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        return ctx.message.platform in self.names

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(tuple(c.strings(value, path)))


@dataclass(frozen=True, slots=True)
class ChannelIs(Condition):
    key = "channel"
    names: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        return ctx.message.channel in self.names

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(tuple(c.strings(value, path)))


@dataclass(frozen=True, slots=True)
class SenderIs(Condition):
    """`sender: {vip: true, language: {in: [id, en]}}` on the sender's attributes (and `id`, `name`)."""

    key = "sender"
    checks: tuple[tuple[str, Comparison], ...]

    def test(self, ctx: TurnContext) -> bool:
        s = ctx.message.sender
        attrs: dict[str, Any] = {"id": s.id, "name": s.name, **s.attributes}
        return all(cmp.holds(k in attrs and attrs[k] is not None, attrs.get(k)) for k, cmp in self.checks)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if not isinstance(value, dict) or not value:
            c.error(path, "sender takes a mapping of attribute -> value or comparison")
            return cls(())
        return cls(tuple((str(k), Comparison.parse(c, v, (*path, k))) for k, v in value.items()))


@dataclass(frozen=True, slots=True)
class HoursIs(Condition):
    """`hours: {within: office}` or `hours: {outside: office}`, calendars from the flow's `hours:`."""

    key = "hours"
    calendar: str
    within: bool

    def test(self, ctx: TurnContext) -> bool:
        hours = ctx.flow.hours.get(self.calendar)
        if hours is None:
            return False
        return hours.open_at(ctx.now) == self.within

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("within", "outside"):
            ((mode, name),) = value.items()
            c.note_hours(str(name), (*path, mode))
            return cls(str(name), mode == "within")
        if isinstance(value, dict) and len(value) == 1:
            c.known_keys(value, path, ("within", "outside"), "hours condition")
            return cls("", True)
        c.error(path, "hours takes {within: NAME} or {outside: NAME}")
        return cls("", True)


@dataclass(frozen=True, slots=True)
class OwnerIs(Condition):
    key = "owner"
    owners: tuple[str, ...]

    def test(self, ctx: TurnContext) -> bool:
        return ctx.state.owner.value in self.owners

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        names = c.strings(value, path)
        valid = tuple(o.value for o in Owner)
        for n in names:
            if n not in valid:
                c.unknown(path, n, valid, "owner", key=False)
        return cls(tuple(names))


@dataclass(frozen=True, slots=True)
class FirstMessage(Condition):
    key = "first_message"
    value: bool

    def test(self, ctx: TurnContext) -> bool:
        return ctx.first == self.value

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if not isinstance(value, bool):
            c.error(path, "first_message takes true or false")
        return cls(bool(value))


@dataclass(frozen=True, slots=True)
class CounterIs(Condition):
    """`counter: {misses: {gte: 2}, asked_order: {eq: 0}}`; `misses` counts turns not understood."""

    key = "counter"
    checks: tuple[tuple[str, Comparison], ...]

    def test(self, ctx: TurnContext) -> bool:
        for name, comparison in self.checks:
            value = ctx.state.misses if name == "misses" else ctx.state.counters.get(name, 0)
            if not comparison.holds(True, value):
                return False
        return True

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        if not isinstance(value, dict) or not value:
            c.error(path, "counter takes a mapping of counter -> value or comparison")
            return cls(())
        return cls(tuple((str(k), Comparison.parse(c, v, (*path, k))) for k, v in value.items()))


@dataclass(frozen=True, slots=True)
class AllOf(Condition):
    key = "all"
    parts: tuple[Condition, ...]

    def test(self, ctx: TurnContext) -> bool:
        return all(p.test(ctx) for p in self.parts)

    def children(self) -> tuple[Condition, ...]:
        return self.parts

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(tuple(c.condition_list(value, path)))


@dataclass(frozen=True, slots=True)
class AnyOf(Condition):
    key = "any"
    parts: tuple[Condition, ...]

    def test(self, ctx: TurnContext) -> bool:
        return any(p.test(ctx) for p in self.parts)

    def children(self) -> tuple[Condition, ...]:
        return self.parts

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(tuple(c.condition_list(value, path)))


@dataclass(frozen=True, slots=True)
class Not(Condition):
    key = "not"
    part: Condition

    def test(self, ctx: TurnContext) -> bool:
        return not self.part.test(ctx)

    def children(self) -> tuple[Condition, ...]:
        return (self.part,)

    @classmethod
    def from_yaml(cls, c: Compiler, value: Any, path: PathKey) -> Condition:
        return cls(c.condition(value, path))


CONDITIONS: dict[str, type[Condition]] = {
    cls.key: cls
    for cls in (
        TextIs,
        TypeIs,
        PostbackIs,
        EventIs,
        IntentIs,
        EntityIs,
        VarIs,
        PlatformIs,
        ChannelIs,
        SenderIs,
        HoursIs,
        OwnerIs,
        FirstMessage,
        CounterIs,
        AllOf,
        AnyOf,
        Not,
    )
}


def needs_nlu(condition: Condition | None) -> bool:
    if condition is None:
        return False
    return condition.needs_nlu or any(needs_nlu(c) for c in condition.children())
