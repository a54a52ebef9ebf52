"""Business hours: weekly windows in a timezone, with holidays."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True, slots=True)
class Hours:
    name: str
    zone: ZoneInfo
    #: per weekday (0 = Monday): list of (start, end) times
    windows: tuple[tuple[tuple[time, time], ...], ...]
    holidays: frozenset[date]

    def open_at(self, when: datetime) -> bool:
        local = when.astimezone(self.zone)
        if local.date() in self.holidays:
            return False
        now = local.time()
        return any(start <= now < end for start, end in self.windows[local.weekday()])


def parse_hours(name: str, raw: dict[str, object]) -> tuple[Hours | None, list[tuple[str, str]]]:
    """Build `Hours` from `{timezone, mon-fri: "09:00-17:00", sat: [...], holidays: [...]}`.

    Returns (hours or None, [(where, problem)]); `where` is the key, or `key.N` for the N-th item of a list.
    """
    problems: list[tuple[str, str]] = []
    tz_name = raw.get("timezone", "UTC")
    try:
        zone = ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(("timezone", f"unknown timezone {tz_name!r}{_nearest_zone(str(tz_name))}"))
        zone = ZoneInfo("UTC")
    days: list[list[tuple[time, time]]] = [[] for _ in DAYS]
    holidays: set[date] = set()
    for key, value in raw.items():
        if key == "timezone":
            continue
        if key == "holidays":
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                try:
                    holidays.add(item if isinstance(item, date) else date.fromisoformat(str(item)))
                except ValueError:
                    at = f"holidays.{i}" if isinstance(value, list) else "holidays"
                    problems.append((at, f"holiday {item!r} is not a date (YYYY-MM-DD)"))
            continue
        span = _day_span(key)
        if span is None:
            problems.append((key, f"unknown key {key!r}: use timezone, holidays, or days like mon, mon-fri, sat"))
            continue
        windows = value if isinstance(value, list) else [value]
        for i, w in enumerate(windows):
            at = f"{key}.{i}" if isinstance(value, list) else key
            m = _WINDOW.match(str(w))
            if m is None:
                problems.append((at, f"bad window {w!r}: use HH:MM-HH:MM"))
                continue
            h1, m1, h2, m2 = (int(g) for g in m.groups())
            if not (h1 <= 23 and m1 <= 59 and (h2 <= 23 or (h2 == 24 and m2 == 0)) and m2 <= 59):
                problems.append((at, f"bad window {w!r}: hours 00-24, minutes 00-59"))
                continue
            start, end = time(h1, m1), time.max if h2 == 24 else time(h2, m2)
            if end <= start:
                problems.append((at, f"window {w!r} ends before it starts"))
                continue
            for d in span:
                days[d].append((start, end))
    if problems:
        return None, problems
    return Hours(name, zone, tuple(tuple(d) for d in days), frozenset(holidays)), []


def _nearest_zone(name: str) -> str:
    from middleware.yamlfile import nearest

    return nearest(name, available_timezones())


def _day_span(key: str) -> list[int] | None:
    parts = key.lower().split("-")
    if len(parts) == 1 and parts[0] in DAYS:
        return [DAYS.index(parts[0])]
    if len(parts) == 2 and parts[0] in DAYS and parts[1] in DAYS:
        a, b = DAYS.index(parts[0]), DAYS.index(parts[1])
        return list(range(a, b + 1)) if a <= b else [*range(a, 7), *range(0, b + 1)]
    return None
