"""Wall-clock milliseconds, the one time source the state backends stamp records with."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
