"""Hypothesis strategies: JSON trees made of the values that break parsers, and mutations of recorded payloads."""

from __future__ import annotations

import copy
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# `ci` (the default): a fixed set of examples per test, so a run is repeatable and bounded in time;
# `explore` (HYPOTHESIS_PROFILE=explore): ten times as many, new ones every run, for hunting.
settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: strings that have broken parsers before: digits Python's int() takes but isdigit() misjudges,
#: numbers past float range, dates that do not exist, NUL, direction overrides, template syntax
NASTY_STRINGS = [
    "",
    " ",
    "0",
    "-1",
    "²",
    "١٢٣",
    "１２３",  # noqa: RUF001
    "9" * 30,
    "9" * 400,
    "1e400",
    "nan",
    "inf",
    "-0",
    "2026-02-30T01:00:00Z",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "2026-11-28 01:00:00 UTC",
    "\x00",
    "a\x00b",
    "\u202eevil",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "e" + "\u0301" * 200,
    "{{ 7*7 }}",
    "{% for x in range(10) %}x{% endfor %}",
    "<script>alert(1)</script>",
    "geo:1,2",
    "m.text",
    "message",
    "text",
    "pending",
    "incoming",
    "post_comment_mobile",
    "event_callback",
    "whatsapp_business_account",
    "messages",
    "block_actions",
    "button",
    "mxc://x/y",
    "http://x/y.png",
]

NASTY_NUMBERS: list[Any] = [
    0,
    1,
    -1,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    10**300,
    -(10**300),
    1e308,
    -1e308,
    0.5,
    1e-320,
]

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.sampled_from(NASTY_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(NASTY_STRINGS),
)


def json_trees(keys: list[str], max_leaves: int = 25) -> st.SearchStrategy[Any]:
    """JSON values whose object keys are mostly the platform's own field names."""
    key = st.sampled_from(keys) | st.text(max_size=8) if keys else st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(key, children, max_size=6),
        max_leaves=max_leaves,
    )


def keys_of(tree: Any, out: set[str] | None = None) -> set[str]:
    out = set() if out is None else out
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.add(k)
            keys_of(v, out)
    elif isinstance(tree, list):
        for v in tree:
            keys_of(v, out)
    return out


def paths_of(tree: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in the tree, the root included."""
    out = [at]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths_of(v, (*at, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths_of(v, (*at, i))
    return out


def put(tree: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    """A copy of `tree` with the value at `path` replaced (or, with `delete`, removed)."""
    if not path:
        return value
    tree = copy.deepcopy(tree)
    parent = tree
    for step in path[:-1]:
        parent = parent[step]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    elif delete:
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return tree


@st.composite
def mutated(draw: st.DrawFn, seed: Any, keys: list[str]) -> Any:
    """A recorded payload with one to three values replaced by random trees, or removed."""
    tree = seed
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(tree)))
        if path and draw(st.integers(0, 4)) == 0:
            tree = put(tree, path, None, delete=True)
        else:
            tree = put(tree, path, draw(json_trees(keys, max_leaves=8)))
    return tree
