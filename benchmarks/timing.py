"""One timing rule for the benchmark scripts: the best of a few repeats."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_of(call: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
    """Run ``call()`` ``max(1, repeats)`` times; returns ``(its last result, the fastest run's seconds)``."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = call()
        best = min(best, time.perf_counter() - t0)
    return out, best
