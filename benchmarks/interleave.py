"""Side-by-side timing for the benchmarks: blocks of runs of each model in turn, so machine noise hits all alike.

A single interleaved timing still moves with what the machine does during it; every benchmark repeats the
whole timing (at least three times) and quotes the median with the spread over repeats.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

MIN_REPEATS = 3


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


def repeated_p50s(runs: dict[str, Callable[[], object]], repeats: int, rounds: int, block: int,
                  warmup: int, minimum: int = MIN_REPEATS) -> dict[str, list[float]]:
    """The p50 ms of each runner in each of `repeats` interleaved timings.

    Each repeat starts the rotation at another runner, so no runner always follows the same neighbour.
    `minimum` is lowered only for development runs whose figures are not quoted.
    """
    if repeats < minimum:
        raise SystemExit(f"--repeats must be at least {MIN_REPEATS}: every ratio is shown with its spread")
    labels = list(runs)
    p50s: dict[str, list[float]] = {label: [] for label in labels}
    for repeat in range(repeats):
        shift = repeat % len(labels)
        order = labels[shift:] + labels[:shift]
        timings = interleaved_timings({label: runs[label] for label in order}, rounds, block, warmup)
        for label, values in timings.items():
            p50s[label].append(statistics.median(values))
    return p50s


def ratios(p50s: dict[str, list[float]], baseline: str, label: str) -> list[float]:
    """Speed of `label` relative to `baseline` in each repeat (baseline ms / label ms: above 1 is faster)."""
    return [b / x for b, x in zip(p50s[baseline], p50s[label])]


def spread(values: list[float], unit: str = "x", digits: int = 2) -> str:
    """`median [min-max]`: the figure to quote and how far repeats moved it."""
    return (f"{statistics.median(values):.{digits}f}{unit} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


def load_average() -> str:
    """The 1/5/15-minute load, printed at a benchmark's start and end as the evidence for 'quiet'."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())
