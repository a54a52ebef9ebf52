"""Durations in flows and config: `500ms`, `1.5s`, `10m`, `2h`, `1d` or a number of seconds."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from `1.5s`, `500ms`, `10m`, `2h`, `1d` or a bare number of seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _DURATION.match(value)
    if m is None:
        return None
    return float(m.group(1)) * UNIT[m.group(2)]
