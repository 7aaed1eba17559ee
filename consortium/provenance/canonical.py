"""Canonical JSON: the one byte form in which records are signed and hashed.

Keys sorted, no insignificant whitespace, UTF-8, no NaN or infinities, and
floats in Python's shortest round-trip form. A line in the log is valid only if
it is already in this form, so changing any byte of a log is detectable.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
