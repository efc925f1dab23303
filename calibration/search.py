"""The one INT8 search every target uses: pick a range method, then keep the most sensitive units float.

A backend (onnxruntime QDQ, ncnn, ...) says how to build a candidate from
per-tensor ranges and a set of units left float, how to run it, and how much
each unit alone hurts the outputs. The search is the same for all of them:

1. each accepted range method builds a candidate; each is scored by its mAP50-95
   drop on the selection split (never the split that is reported);
2. if the chosen method is not within the budget over its whole 95 % interval,
   units are ranked by sensitivity and the 1, 2, 4, ... most sensitive stay
   float until a candidate is;
3. that candidate wins; else the one with the fewest float units within the
   budget by its point estimate (the gate's rule); else the best one.

Step 2 asks for the interval because the gate scores other images, and a
candidate just inside the budget on the selection split can miss it there (the
YOLOv8s-size arm build at 256 px lost 0.38 fidelity points on its selection
photos and 0.57 on its report photos, with a 0.5 point budget).

"Best" allows for noise. A drop scored with a bootstrap (evaluate.Drop) carries
its value on each resample of the selection images, the same resamples for
every candidate, so two candidates' difference has a paired interval. One
candidate beats another only when that 95 % interval excludes zero; candidates
the best does not beat are tied with it, and among the tied:
- method choice takes one within budget over its whole interval if any, then
  one within budget by point estimate (the gate's rule), then the earliest in
  the backend's list (simplest first: minmax, percentile, entropy); when none
  is within budget, the smallest point estimate
  (the float fallback then starts from the smallest gap it has to close, and a
  failed build reports the best drop it saw);
- the fallback's last resort takes the fewest float units (the faster model),
  then the smallest point estimate.
Without a bootstrap (a plain float), the smallest point estimate wins as before.
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
    # of the network's outputs with only this unit quantized (the backend's ranked_by says how): lower hurts more
    sqnr_db: float


class QuantBackend(Protocol):
    rules: QuantRules
    # Units the rules keep float whatever the search decides (quantizing them would slow the model down); they are
    # neither ranked nor counted in units().
    fixed_float_units: tuple[str, ...]
    # Of those, the ones between the last weighted layers and the graph outputs (QuantRules.float_outputs).
    float_outputs: tuple[str, ...]
    # How rank_units scored the units, in words, for reports ("each node quantized alone, ..."; "" where it ranks
    # none); read after rank_units, which may fill in what it ranked on.
    ranked_by: str

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

    def rewritten(self, built: Path) -> dict[str, str]:
        """{unit: how} for the units a candidate this backend built has in another form than the float graph's,
        computing the same values (for speed); empty where none."""


# Two candidates differ beyond noise when the central interval of their paired drop difference, at this level,
# excludes zero: the level every reported interval has.
TIE_LEVEL = 0.95
TAIL_PERCENT = (1 - TIE_LEVEL) / 2 * 100  # each side of the central interval


@dataclass
class Candidate:
    method: str
    float_units: list[str]
    built: Path
    drop_points: float
    # The drop on each bootstrap resample of the selection images (None: scored without a bootstrap).
    samples: np.ndarray | None = field(default=None, repr=False)

    @property
    def interval(self) -> list[float] | None:
        if self.samples is None:
            return None
        return [round(float(v), 2) for v in np.percentile(self.samples, [TAIL_PERCENT, 100 - TAIL_PERCENT])]

    def surely_within(self, budget: float) -> bool:
        """Within `budget` over its whole interval (by its point estimate when scored without a bootstrap)."""
        return self.drop_points <= budget and (
            self.samples is None or float(np.percentile(self.samples, 100 - TAIL_PERCENT)) <= budget)

    def describe(self) -> dict:
        return {"method": self.method, "float_units": list(self.float_units), "drop_points": self.drop_points,
                "drop_interval": self.interval}


def beats(first: Candidate, second: Candidate) -> bool:
    """Whether `first` loses less than `second` beyond noise (paired bootstrap), or by point estimate without one."""
    if first.samples is None or second.samples is None or len(first.samples) != len(second.samples):
        return first.drop_points < second.drop_points
    return float(np.percentile(np.asarray(second.samples) - np.asarray(first.samples), TAIL_PERCENT)) > 0


def tied_with_best(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates the one with the smallest drop does not beat beyond noise (itself included)."""
    best = min(candidates, key=lambda c: c.drop_points)
    return [c for c in candidates if c is best or not beats(best, c)]


@dataclass
class SearchOutcome:
    best: Candidate
    within_budget: bool
    candidates: list[Candidate]
    sensitivity: list[UnitSensitivity] = field(default_factory=list)
    reason: str = ""  # why `best` was taken, in words


def search(backend: QuantBackend, stats: dict[str, TensorStats] | None, methods: tuple[str, ...], symmetric: bool,
           drop: Callable[[Path], float], budget: float, check_batches: list[np.ndarray], work: Path,
           fallback: bool = True) -> SearchOutcome:
    """Runs steps 1-3 above. `drop(built)` scores a candidate in points, a float whose `samples` attribute (the
    drop on each bootstrap resample, as pipeline.evaluate.Drop has) makes choices noise-aware; `stats` is None for
    weight-only precisions."""
    counter = iter(range(1_000_000))

    def candidate(method: str, ranges: Ranges | None, float_units: list[str]) -> Candidate:
        built = backend.build(ranges, float_units, work / f"{next(counter):03d}-{method}-float{len(float_units)}")
        scored = drop(built)
        return Candidate(method, list(float_units), built, float(scored), getattr(scored, "samples", None))

    ranges_of = {m: (ranges_for(stats, m, symmetric) if stats is not None else None) for m in methods}
    tried = [candidate(m, ranges_of[m], []) for m in methods]
    tied = tied_with_best(tried)
    if any(c.drop_points <= budget for c in tied):
        best = min(tied, key=lambda c: (not c.surely_within(budget), c.drop_points > budget,
                                        methods.index(c.method)))
    else:
        best = min(tried, key=lambda c: (c.drop_points, methods.index(c.method)))
    reason = _method_reason(best, tried, tied, budget)
    if best.surely_within(budget) or not fallback or stats is None:
        return SearchOutcome(best, best.drop_points <= budget, tried, reason=reason)
    # Within budget by its point estimate but not over its interval, a candidate can miss the budget on the images
    # the gate scores; keeping units float narrows the interval, at some speed. When none of the float candidates
    # gets there, the point estimate decides, as the gate's does.
    ranges = ranges_of[best.method]
    sensitivity = backend.rank_units(ranges, check_batches)
    count = 1
    # Keeping every unit float would leave no INT8 model, so the search stops short of it.
    while count < len(sensitivity):
        attempt = candidate(best.method, ranges, [s.unit for s in sensitivity[:count]])
        tried.append(attempt)
        if attempt.surely_within(budget):
            if best.drop_points > budget or beats(attempt, best):
                return SearchOutcome(attempt, True, tried, sensitivity,
                                     f"{reason}; {count} most sensitive units float: the fewest whose "
                                     f"{TIE_LEVEL:.0%} interval is within the budget")
            # No better than none beyond noise: its interval came in under the budget by the luck of the images,
            # not by what the float units changed, and units float cost speed for nothing.
            return SearchOutcome(best, True, tried, sensitivity,
                                 f"{reason}; {count} most sensitive units float came within the budget over its "
                                 f"{TIE_LEVEL:.0%} interval but no better than none beyond noise, so none are kept")
        count *= 2
    within = [c for c in tried if c.drop_points <= budget]
    if within:
        # The fewest float units: the method's own candidate when it was within budget.
        first = min(within, key=lambda c: (len(c.float_units), tried.index(c)))
        return SearchOutcome(first, True, tried, sensitivity,
                             f"{reason}; no candidate's {TIE_LEVEL:.0%} interval is within the budget (up to "
                             f"{len(tried[-1].float_units)} most sensitive units float), so {len(first.float_units)} "
                             "units float: the fewest within it by point estimate")
    tied = tied_with_best(tried)
    last = min(tied, key=lambda c: (len(c.float_units), c.drop_points, tried.index(c)))
    return SearchOutcome(last, False, tried, sensitivity,
                         f"no candidate meets the budget; of the {len(tied)} within noise of the smallest drop, the "
                         f"one with the fewest float units ({len(last.float_units)})")


def _method_reason(best: Candidate, tried: list[Candidate], tied: list[Candidate], budget: float) -> str:
    if len(tried) == 1:
        return f"{best.method}: the only method tried"
    smallest = min(tried, key=lambda c: c.drop_points)
    others = [c.method for c in tied if c is not best]
    if best is smallest and others and best.drop_points > budget:
        return (f"{best.method}: the smallest drop of {len(tried)} methods, none within budget "
                f"({', '.join(others)} within noise of it)")
    if best is smallest:
        return f"{best.method}: the smallest drop of {len(tried)} methods" + (
            f" ({', '.join(others)} within noise of it; ties go to a method within budget, then the simplest)"
            if others else ", beyond noise")
    return (f"{best.method}: {best.drop_points:.2f} points against {smallest.method}'s {smallest.drop_points:.2f} "
            "is within noise; ties go to a method within budget, then the simplest")
