"""JSON on the per-message paths: orjson, with the standard library where orjson would differ.

orjson takes about a tenth of json's time on the rows every message writes and the bodies posted to
platforms. It refuses integers past 64 bits (json writes them; a platform's payload may hold one) and
reads such integers as floats: `dumps` falls back to json for the first, `loads` reads text with a
19-digit run with json, so every number comes back exact and of its type.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

#: the shortest digit run that can be an integer orjson would not read exactly: below -2**63 (19
#: digits: -9223372036854775809 comes back a float) or past 2**64 - 1
LONG_DIGITS = re.compile(r"\d{19}")
LONG_DIGITS_BYTES = re.compile(rb"\d{19}")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON (non-string keys written as strings, as json does)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # what orjson refuses: an integer past 64 bits
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(text: str | bytes) -> Any:
    """JSON we wrote (`dumps`); not for input from outside (platforms.base.loads_json checks that)."""
    if (LONG_DIGITS.search(text) if isinstance(text, str) else LONG_DIGITS_BYTES.search(text)) is not None:
        return json.loads(text)
    return orjson.loads(text)
