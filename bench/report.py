"""Summaries of repeats: median (min..max) per figure, ratios to bare, the printed table, the JSON file."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import ratio, spread

#: one repeat: scenario -> its figures, or {"skipped": why} / {"error": what}
Repeat = dict[str, dict[str, Any]]
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("switchboard", "starlette", "uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "httpx-aiohttp")


def figures(repeat: Repeat, scenario: str) -> dict[str, float] | None:
    result = repeat.get(scenario)
    if result is None or "skipped" in result or "error" in result:
        return None
    return {k: float(v) for k, v in result.items()}


def summarize(repeats: Sequence[Repeat], headline: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """scenario -> figure -> {median, min, max, n} (+ "ratio" on the headline figure)."""
    summary: dict[str, dict[str, Any]] = {}
    for scenario in _scenarios(repeats):
        runs = [f for f in (figures(r, scenario) for r in repeats) if f is not None]
        per_figure: dict[str, Any] = {}
        for name in _names(runs):
            s = spread([run.get(name, math.nan) for run in runs])
            if s is not None:
                per_figure[name] = s.to_json()
        key = headline.get(scenario)
        if key in per_figure:
            r = spread([_ratio(rep, scenario, key) for rep in repeats])
            per_figure[key]["ratio"] = r.to_json() if r else None
        summary[scenario] = per_figure
    return summary


def bracket(before: float | None, after: float | None) -> dict[str, float] | None:
    """A scenario's base: the bare req/s measured just before and just after it, and their mean
    (`bare_req_s`, what its ratio divides by); `bare_drift`: after / before, how far the machine's
    speed moved meanwhile."""
    if before is None or after is None or before <= 0 or after <= 0:
        return None
    return {
        "bare_before_req_s": before,
        "bare_after_req_s": after,
        "bare_req_s": (before + after) / 2,
        "bare_drift": after / before,
    }


def _ratio(repeat: Repeat, scenario: str, key: str) -> float:
    mine, base = figures(repeat, scenario), figures(repeat, "bare")
    if mine is None or base is None:
        return math.nan
    # bracketed by bare runs on both sides (bench/__main__.py), else the repeat's first bare
    return ratio(mine.get(key, math.nan), mine.get("bare_req_s", base.get("req_s", math.nan)))


def _scenarios(repeats: Sequence[Repeat]) -> list[str]:
    return list(dict.fromkeys(name for r in repeats for name in r))


def _names(runs: Sequence[dict[str, float]]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run))


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(summary: Mapping[str, Mapping[str, Any]], repeats: Sequence[Repeat]) -> str:
    rows = [("scenario", "figure", "median", "min..max", "ratio vs bare")]
    for scenario, per_figure in summary.items():
        for name, s in per_figure.items():
            r = s.get("ratio")
            rows.append(
                (scenario, name, fmt(s["median"]), f"{fmt(s['min'])}..{fmt(s['max'])}",
                 f"{fmt(r['median'])} ({fmt(r['min'])}..{fmt(r['max'])})" if r else "")
            )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(_line(row, widths) for row in [*rows, *_notes(repeats)])


def _notes(repeats: Sequence[Repeat]) -> list[tuple[str, str, str, str, str]]:
    notes: dict[tuple[str, str], None] = {}
    for repeat in repeats:
        for scenario, result in repeat.items():
            for kind in ("skipped", "error"):
                if kind in result:
                    notes[(scenario, f"{kind}: {str(result[kind]).splitlines()[0]}")] = None
    return [(scenario, note, "", "", "") for scenario, note in notes]


def _line(row: Sequence[str], widths: Sequence[int]) -> str:
    if not any(row[2:]):
        return f"{row[0]:<{widths[0]}}  {row[1]}"
    cells = [f"{row[0]:<{widths[0]}}", f"{row[1]:<{widths[1]}}"]
    cells += [f"{cell:>{w}}" for cell, w in zip(row[2:], widths[2:], strict=True)]
    return "  ".join(cells).rstrip()


def machine(load_tool: str) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
        "load_tool": load_tool,
        "wrk": _wrk_version() if load_tool == "wrk" else None,
        "versions": versions,
    }


def _wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else None


def write_json(document: Mapping[str, Any], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"bench-{stamp}.json"
    path.write_text(json.dumps(clean(document), indent=2, allow_nan=False) + "\n")
    return path


def clean(value: Any) -> Any:
    """NaN/inf -> None, recursively, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value
