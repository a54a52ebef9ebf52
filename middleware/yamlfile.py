"""YAML with positions: every mistake in a config or flow is reported as `file:line:col: message`."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathKey = tuple[str | int, ...]


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """One or more problems in config or flow files; `str()` lists them one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(slots=True)
class YamlDoc:
    """A parsed YAML document and where each value in it came from (1-based line and column)."""

    file: str
    data: Any
    positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    #: the file's text, and where each scalar that spans lines with folding (plain, quoted, `>`) lies in it
    text: str = ""
    folded: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Sequence[str | int], *, key: bool = False) -> tuple[int, int]:
        """Position of the value at `path`, or of its key; falls back to the nearest parent."""
        p = tuple(path)
        while True:
            if key and p in self.key_positions:
                return self.key_positions[p]
            if p in self.positions:
                return self.positions[p]
            if not p:
                return (1, 1)
            p = p[:-1]

    def problem(self, path: Sequence[str | int], message: str, *, key: bool = False) -> Problem:
        line, col = self.where(path, key=key)
        return Problem(self.file, line, col, message)


def parse_yaml(text: str, file: str) -> YamlDoc:
    """Parse one YAML document, keeping positions; syntax errors become a ConfigError."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"YAML syntax: {exc.problem or exc}"
        if exc.context_mark and exc.problem_mark and exc.problem_mark.index >= len(text.rstrip()):
            # an unclosed quote or bracket is found at the end of the file: point where it was opened
            mark, message = exc.context_mark, f"{message} {exc.context or ''}".rstrip()
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([Problem(file, line, col, message)]) from exc
    except yaml.reader.ReaderError as exc:  # a control character (NUL, ESC...): YAML takes printable text only
        before = text[: exc.position]
        line, col = before.count("\n") + 1, exc.position - before.rfind("\n")
        problem = f"YAML syntax: the character U+{exc.character:04X} is not allowed"
        raise ConfigError([Problem(file, line, col, problem)]) from exc
    doc = YamlDoc(file, None, text=text)
    if node is None:
        return doc
    try:
        doc.data = _build(node, (), doc)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError) as exc:
        # a tag its value does not fit (`!!int abc`, `!custom x`) or a bad merge key: at the node being read
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else next(reversed(doc.positions.values()), (1, 1))
        raise ConfigError([Problem(file, line, col, f"YAML value: {getattr(exc, 'problem', None) or exc}")]) from exc
    finally:  # the shared constructor caches every node it built: keep it from holding every file ever read
        _constructor.constructed_objects.clear()
        _constructor.recursive_objects.clear()
    return doc


def load_yaml(path: Path) -> YamlDoc:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), 1, 1, f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        col = len(exc.object[exc.object.rfind(b"\n", 0, exc.start) + 1 : exc.start].decode(errors="replace")) + 1
        raise ConfigError([Problem(str(path), line, col, f"not UTF-8: {exc.reason}")]) from exc
    return parse_yaml(text, str(path))


_constructor = yaml.SafeLoader(stream="")


#: values one document may expand to; aliases of aliases ("billion laughs") would otherwise take every byte of memory
MAX_VALUES = 200_000


def _build(node: yaml.Node, path: PathKey, doc: YamlDoc) -> Any:
    if len(doc.positions) >= MAX_VALUES:
        raise ValueError(f"the document expands to more than {MAX_VALUES} values (aliases of aliases?)")
    doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">") and node.start_mark.buffer:
        # a block scalar's text starts on the line below its `|` / `>`; templates count their lines from there
        buf, start = node.start_mark.buffer, node.start_mark.buffer.find("\n", node.start_mark.pointer) + 1
        first = buf[start : buf.find("\n", start)]
        if start:
            col = len(first) - len(first.lstrip(" ")) + 1 if first.strip() else node.start_mark.column + 1
            doc.positions[path] = (node.start_mark.line + 2, col)
    if isinstance(node, yaml.ScalarNode) and node.style != "|" and node.end_mark.line > node.start_mark.line:
        # folding joins its lines: a template's error lines are found again in this raw text (loader.py)
        doc.folded[path] = (node.start_mark.index, node.end_mark.index)
    if isinstance(node, yaml.MappingNode):
        _constructor.flatten_mapping(node)  # `<<: *anchor` merge keys: the anchor's keys, then ours over them
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # keys are names, never YAML 1.1 booleans or numbers: `on:` stays "on", `1:` stays "1"
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else _constructor.construct_object(key_node)
            if key == "<<":
                continue
            key_str = str(key)
            child = (*path, key_str)
            doc.key_positions[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key_str] = _build(value_node, child, doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), doc) for i, item in enumerate(node.value)]
    return _constructor.construct_object(node, deep=True)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(doc: YamlDoc, env: dict[str, str] | None = None) -> list[Problem]:
    """Replace `${NAME}` and `${NAME:-default}` in every string of the document, in place."""
    environ = os.environ if env is None else env
    problems: list[Problem] = []

    def sub(value: Any, path: PathKey) -> Any:
        if isinstance(value, str) and "${" in value:

            def one(m: re.Match[str]) -> str:
                name, default = m.group(1), m.group(2)
                if environ.get(name) or (name in environ and default is None):  # `:-` as in sh: empty takes the default
                    return environ[name]
                if default is not None:
                    return default
                problems.append(doc.problem(path, f"environment variable {name} is not set"))
                return ""

            return _ENV.sub(one, value)
        if isinstance(value, dict):
            return {k: sub(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v, (*path, i)) for i, v in enumerate(value)]
        return value

    doc.data = sub(doc.data, ())
    return problems


def nearest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a close valid name exists, else ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def pydantic_problems(
    doc: YamlDoc, base: PathKey, errors: Iterable[Any], known: dict[PathKey, Iterable[str]] | None = None
) -> list[Problem]:
    """Turn pydantic's validation errors into positioned problems.

    `known` maps a path to the valid keys there, so an unknown key gets a 'did you mean'.
    """
    problems = []
    for err in errors:
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        path = (*base, *loc)
        if err["type"] == "extra_forbidden":
            parent, name = path[:-1], str(path[-1])
            hint = ""
            if known is not None and parent in known:
                hint = nearest(name, known[parent])
            problems.append(doc.problem(path, f"unknown key '{name}'{hint}", key=True))
        elif err["type"] == "missing":
            problems.append(doc.problem(path[:-1], f"missing required key '{path[-1]}'"))
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            where = ".".join(str(x) for x in loc) or "value"
            problems.append(doc.problem(path, f"{where}: {msg}"))
    return problems
