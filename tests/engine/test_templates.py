"""middleware/engine/templates.py: the sandbox's shortcut for `a.b` on a dict answers exactly what
Jinja's own immutable sandbox answers, for keys, dict methods, missing names and unsafe ones."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from middleware.engine.templates import Template, TemplateFailed

STOCK = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)

CONTEXT: dict[str, Any] = {
    "message": {"text": "hi", "items": "a key named like a dict method", "_private": "kept", "payload": {}},
    "vars": {"n": 2, "nested": {"deep": "down"}, "keys": 3},
    "user": {"name": "Ana"},
    "listing": [1, 2],
}

SOURCES = [
    "{{ message.text }}",
    "{{ vars.nested.deep }}-{{ vars.n * 2 }}",
    "{{ message['text'] }}",
    "{{ message._private }}",
    "{{ message.items is callable }}",  # the method wins over the key, as in Jinja
    "{{ vars.keys is callable }}",
    "{{ vars.nested.items() | list }}",
    "{{ message.missing }}",  # StrictUndefined: an error
    "{{ message.missing is defined }}",
    "{{ message.payload.deep.deeper }}",
    "{{ vars.update }}",  # a mutating method: the immutable sandbox refuses it at the call only
    "{{ vars.update({'x': 1}) }}",
    "{{ message.__class__ }}",
    "{{ user.name | upper }}",
    "{{ listing.append }}",
]


def outcome(render: Any) -> tuple[str, str]:
    try:
        return ("ok", str(render()))
    except Exception as exc:  # the kind of failure is what must match
        return ("error", type(exc).__name__)


@pytest.mark.parametrize("source", SOURCES)
def test_dict_attributes_render_as_in_jinjas_own_sandbox(source: str) -> None:
    expected = outcome(lambda: STOCK.from_string(source).render(CONTEXT))
    ours = outcome(lambda: Template(source).render(CONTEXT))
    if expected[0] == "error":
        assert ours[0] == "error"
    else:
        assert ours == expected


def test_an_unknown_name_and_an_unsafe_attribute_fail_the_template() -> None:
    with pytest.raises(TemplateFailed):
        Template("{{ message.missing }}").render(CONTEXT)
    with pytest.raises(TemplateFailed, match="SecurityError"):
        Template("{{ vars.update({'x': 1}) }}").render(CONTEXT)
    assert CONTEXT["vars"] == {"n": 2, "nested": {"deep": "down"}, "keys": 3}
