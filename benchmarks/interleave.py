"""Side-by-side timing for the benchmarks: blocks of runs of each model in turn, so machine noise hits all alike."""

from __future__ import annotations

import time
from typing import Callable


def interleaved_timings(runs: dict[str, Callable[[], object]], rounds: int, block: int,
                        warmup: int) -> dict[str, list[float]]:
    """Milliseconds of every timed call of each runner: `rounds` times, `block` calls of each runner in turn."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    timings: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            for _ in range(block):
                t = time.perf_counter()
                run()
                timings[label].append((time.perf_counter() - t) * 1000)
    return timings
