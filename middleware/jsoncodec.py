"""JSON on the per-message paths: orjson, with the standard library where orjson would differ.

orjson takes about a tenth of json's time on the rows every message writes and the bodies posted to
platforms. It refuses integers past 64 bits (json writes them; a platform's payload may hold one) and
reads such integers as floats: `dumps` falls back to json for the first, `loads` reads text with a
19-digit run with json, so every number comes back exact and of its type.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

#: the shortest digit run that can be an integer orjson would not read exactly: below -2**63 (19
#: digits: -9223372036854775809 comes back a float) or past 2**64 - 1
LONG_RUN = 19
#: every byte to b"0", ASCII digits to b"1": a digit run becomes a run of b"1"
_DIGITS = bytes(0x31 if 0x30 <= i <= 0x39 else 0x30 for i in range(256))
_RUN = b"1" * LONG_RUN


def long_digit_run(text: str | bytes) -> bool:
    """Whether `text` holds `LONG_RUN` ASCII digits in a row (JSON numbers are ASCII). A translate
    and a substring search, both in C: half the time of the regex `\\d{19}` on a webhook's body,
    which took twice orjson's parse of it. (`find`, not `in`: bytes' `in` first tries its operand
    as an int, and builds and drops a TypeError when it is not one.)"""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return raw.translate(_DIGITS).find(_RUN) >= 0


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON (non-string keys written as strings, as json does)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # what orjson refuses: an integer past 64 bits
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(text: str | bytes) -> Any:
    """JSON we wrote (`dumps`); not for input from outside (platforms.base.loads_json checks that)."""
    if long_digit_run(text):
        return json.loads(text)
    return orjson.loads(text)
