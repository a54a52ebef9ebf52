"""Templates in replies and variables: Jinja2 in a sandbox.

A template is compiled once when its flow loads; what a user sent reaches it only as data
(`message.text`), never as template source.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: what `getattr(a_dict, name)` finds: a method, or nothing
_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, where `a.b` on a plain dict is answered by its key `b` at once
    when `b` names no dict attribute. Jinja answers the same, but only after `getattr(a, "b")`
    has built and dropped an AttributeError: for every `{{ message.text }}` of every reply, since
    the template context is dicts (~2,000 instructions a lookup)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass  # Jinja's own way, to its undefined
        return super().getattr(obj, attribute)


_env = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


class TemplateFailed(Exception):
    """A template could not be rendered (unknown variable, error in an expression)."""


class Template:
    """A compiled template; plain text without `{{` or `{%` renders without Jinja at all."""

    __slots__ = ("_compiled", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled = _env.from_string(source) if ("{{" in source or "{%" in source) else None
        if self._compiled is not None:
            # a template's globals are a ChainMap over the environment's, which every render walks
            # twice (Jinja's new_context): one plain dict instead (nothing adds globals after start)
            self._compiled.globals = dict(self._compiled.globals)

    def render(self, context: dict[str, Any]) -> str:
        if self._compiled is None:
            return self.source
        try:
            return self._compiled.render(context)
        except (
            TemplateError,
            SecurityError,
            ArithmeticError,
            TypeError,
            ValueError,
            LookupError,
            AttributeError,
        ) as exc:
            raise TemplateFailed(f"{type(exc).__name__}: {exc}") from exc


def template_error(source: str) -> tuple[int, str] | None:
    """(line within the template, message) if `source` does not compile, else None."""
    try:
        _env.compile(source)  # not just parse: unknown filters and tests are found when compiling
    except TemplateSyntaxError as exc:
        message = exc.message or "template syntax error"
        unknown = _UNKNOWN.match(message)
        if unknown is not None:  # "No filter named 'uppercase'." -> add the nearest one the sandbox has
            from middleware.yamlfile import nearest

            known = _env.filters if unknown.group(1) == "filter" else _env.tests
            message = f"{message.rstrip('.')}{nearest(unknown.group(2), known)}"
        return (exc.lineno, message)
    return None


_UNKNOWN = re.compile(r"^No (filter|test) named '([^']+)'")
