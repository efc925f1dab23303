"""The one INT8 search every target uses: pick a range method, then keep the most sensitive units float.

A backend (onnxruntime QDQ, ncnn, ...) says how to build a candidate from
per-tensor ranges and a set of units left float, how to run it, and how much
each unit alone hurts the outputs. The search is the same for all of them:

1. each accepted range method builds a candidate; each is scored by its mAP50-95
   drop on the selection split (never the split that is reported);
2. if the best misses the budget, units are ranked by sensitivity and the 1, 2,
   4, ... most sensitive stay float until a candidate meets the budget;
3. the first candidate within budget wins, else the one with the smallest drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edge_deploy.calibration.ranges import TensorStats, ranges_for
from edge_deploy.calibration.rules import QuantRules

Ranges = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class UnitSensitivity:
    unit: str
    kind: str  # op or layer type
    sqnr_db: float  # of the outputs with only this unit quantized: lower hurts more


class QuantBackend(Protocol):
    rules: QuantRules

    def tap(self) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """Intermediate tensors of the float model for a batch, for statistics."""

    def build(self, ranges: Ranges | None, float_units: list[str], out: Path) -> Path:
        """A candidate artifact (file or folder) at `out`; `ranges` is None for weight-only precisions."""

    def runtime(self, built: Path):
        """The candidate as a batch -> (box_dist, cls_logit) callable."""

    def rank_units(self, ranges: Ranges, batches: list[np.ndarray]) -> list[UnitSensitivity]:
        """Every quantized unit, most harmful first."""

    def units(self) -> int:
        """How many units are quantized when none is kept float."""


@dataclass
class Candidate:
    method: str
    float_units: list[str]
    built: Path
    drop_points: float

    def describe(self) -> dict:
        return {"method": self.method, "float_units": list(self.float_units), "drop_points": self.drop_points}


@dataclass
class SearchOutcome:
    best: Candidate
    within_budget: bool
    candidates: list[Candidate]
    sensitivity: list[UnitSensitivity] = field(default_factory=list)


def search(backend: QuantBackend, stats: dict[str, TensorStats] | None, methods: tuple[str, ...], symmetric: bool,
           drop: Callable[[Path], float], budget: float, check_batches: list[np.ndarray], work: Path,
           fallback: bool = True) -> SearchOutcome:
    """Runs steps 1-3 above. `drop(built)` scores a candidate in points; `stats` is None for weight-only."""
    counter = iter(range(1_000_000))

    def candidate(method: str, ranges: Ranges | None, float_units: list[str]) -> Candidate:
        built = backend.build(ranges, float_units, work / f"{next(counter):03d}-{method}-float{len(float_units)}")
        return Candidate(method, list(float_units), built, drop(built))

    ranges_of = {m: (ranges_for(stats, m, symmetric) if stats is not None else None) for m in methods}
    tried = [candidate(m, ranges_of[m], []) for m in methods]
    best = min(tried, key=lambda c: (c.drop_points, methods.index(c.method)))
    if best.drop_points <= budget or not fallback or stats is None:
        return SearchOutcome(best, best.drop_points <= budget, tried)
    ranges = ranges_of[best.method]
    sensitivity = backend.rank_units(ranges, check_batches)
    count = 1
    # Keeping every unit float would leave no INT8 model, so the search stops short of it.
    while count < len(sensitivity):
        attempt = candidate(best.method, ranges, [s.unit for s in sensitivity[:count]])
        tried.append(attempt)
        if attempt.drop_points <= budget:
            return SearchOutcome(attempt, True, tried, sensitivity)
        count *= 2
    return SearchOutcome(min(tried, key=lambda c: c.drop_points), False, tried, sensitivity)
