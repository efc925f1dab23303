"""The search's choices under noise: a better candidate must be better beyond its paired bootstrap interval.

The backend here builds nothing but a marker file: what is tested is the choice the search makes from the drops it
is given (real drops, with real bootstrap samples, are tested in tests/pipeline/test_bootstrap.py).
"""

from pathlib import Path

import numpy as np

from edge_deploy.calibration.search import UnitSensitivity, beats, search
from edge_deploy.pipeline.evaluate import Drop

RESAMPLES = 1000


class MarkerBackend:
    """Candidates as files named after how they were built; units u0..u7, most harmful first."""

    ranked_by = "by name: u0 hurts most"

    def __init__(self):
        self.built: list[tuple[str, list[str]]] = []

    def build(self, ranges, float_units, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(",".join(float_units))
        self.built.append((out.name, list(float_units)))
        return out

    def rank_units(self, ranges, batches):
        return [UnitSensitivity(f"u{i}", "Conv", float(i)) for i in range(8)]

    def units(self) -> int:
        return 8


def noisy(points: float, spread: float, seed: int, shared: np.ndarray | None = None) -> Drop:
    """A drop whose resamples scatter by `spread` points; `shared` is the part both candidates see alike (paired)."""
    rng = np.random.default_rng(seed)
    common = shared if shared is not None else np.zeros(RESAMPLES)
    samples = points + common + rng.normal(0, spread, RESAMPLES)
    return Drop(points, samples - samples.mean() + points)


def drops_by_method(table: dict):
    def drop(built: Path):
        method = built.name.split("-")[1]
        units = len(built.read_text().split(",")) if built.read_text() else 0
        return table[(method, units)]
    return drop


def _run(table, methods, budget, tmp_path, monkeypatch):
    import edge_deploy.calibration.search as module

    # Ranges are the backend's business; this backend takes any.
    monkeypatch.setattr(module, "ranges_for", lambda stats, method, symmetric: {"x": (-1.0, 1.0)})
    return search(MarkerBackend(), {"x": None}, methods, False, drops_by_method(table), budget, [], tmp_path)


def test_a_difference_within_noise_keeps_the_simpler_method(tmp_path, monkeypatch):
    shared = np.random.default_rng(0).normal(0, 1.0, RESAMPLES)  # image-to-image variation both candidates share
    table = {("minmax", 0): noisy(0.40, 0.3, 1, shared), ("percentile", 0): noisy(0.30, 0.3, 2, shared),
             ("entropy", 0): noisy(0.35, 0.3, 3, shared)}
    # A budget every interval is within: the choice between methods is what is tested.
    outcome = _run(table, ("minmax", "percentile", "entropy"), 3.0, tmp_path, monkeypatch)
    assert outcome.best.method == "minmax" and outcome.within_budget
    assert "within noise" in outcome.reason and "percentile" in outcome.reason
    assert outcome.candidates[0].describe()["drop_interval"] is not None


def test_a_difference_beyond_noise_takes_the_better_method(tmp_path, monkeypatch):
    shared = np.random.default_rng(0).normal(0, 1.0, RESAMPLES)
    table = {("minmax", 0): noisy(2.0, 0.05, 1, shared), ("percentile", 0): noisy(0.3, 0.05, 2, shared),
             ("entropy", 0): noisy(1.9, 0.05, 3, shared)}
    outcome = _run(table, ("minmax", "percentile", "entropy"), 3.0, tmp_path, monkeypatch)
    assert outcome.best.method == "percentile" and "beyond noise" in outcome.reason
    # Paired: the shared image variation (spread 1 point) cancels, so 1.7 points apart is far beyond noise.
    assert beats(outcome.candidates[1], outcome.candidates[0])


def test_among_tied_methods_one_within_budget_wins(tmp_path, monkeypatch):
    shared = np.random.default_rng(0).normal(0, 1.0, RESAMPLES)
    table = {("minmax", 0): noisy(0.6, 0.4, 1, shared), ("percentile", 0): noisy(0.45, 0.4, 2, shared)}
    # Its interval reaches past the budget, so the fallback looks for one that does not; keeping units float
    # helps nothing here, and the method's own candidate, within budget by its point estimate, is kept.
    table.update({("percentile", units): noisy(0.48, 0.4, 10 + units, shared) for units in (1, 2, 4)})
    outcome = _run(table, ("minmax", "percentile"), 0.5, tmp_path, monkeypatch)
    assert outcome.best.method == "percentile" and outcome.within_budget and outcome.best.float_units == []
    assert [len(c.float_units) for c in outcome.candidates] == [0, 0, 1, 2, 4]
    assert "by point estimate" in outcome.reason


def test_a_budget_met_only_by_the_point_estimate_keeps_units_float_until_the_interval_is_within_it(
        tmp_path, monkeypatch):
    # Paired, as candidates scored on the same images are: the image-to-image variation is shared.
    shared = np.random.default_rng(0).normal(0, 0.1, RESAMPLES)
    table = {("minmax", 0): noisy(0.38, 0.1, 1, shared), ("minmax", 1): noisy(0.36, 0.1, 2, shared),
             ("minmax", 2): noisy(0.12, 0.03, 3, shared), ("minmax", 4): noisy(0.05, 0.02, 4, shared)}
    outcome = _run(table, ("minmax",), 0.5, tmp_path, monkeypatch)
    assert not outcome.candidates[0].surely_within(0.5) and outcome.candidates[2].surely_within(0.5)
    assert outcome.within_budget and len(outcome.best.float_units) == 2
    assert [len(c.float_units) for c in outcome.candidates] == [0, 1, 2]
    assert "2 most sensitive units float: the fewest whose 95% interval is within the budget" in outcome.reason


def test_float_units_that_come_within_the_budget_by_noise_alone_are_not_kept(tmp_path, monkeypatch):
    """A method within budget by its point estimate only; 2 units float bring the interval under the budget but
    are no better than none beyond noise (the units change nothing that matters): none are kept."""
    shared = np.random.default_rng(0).normal(0, 0.2, RESAMPLES)
    table = {("minmax", 0): noisy(0.34, 0.1, 1, shared), ("minmax", 1): noisy(0.36, 0.1, 2, shared),
             ("minmax", 2): noisy(0.17, 0.05, 3, shared)}
    table[("minmax", 2)] = Drop(0.17, np.asarray(table[("minmax", 2)].samples) * 0.5 + 0.085)
    outcome = _run(table, ("minmax",), 0.5, tmp_path, monkeypatch)
    assert outcome.candidates[2].surely_within(0.5) and not outcome.candidates[0].surely_within(0.5)
    assert not beats(outcome.candidates[2], outcome.candidates[0])
    assert outcome.within_budget and outcome.best.float_units == []
    assert [len(c.float_units) for c in outcome.candidates] == [0, 1, 2]
    assert "no better than none beyond noise, so none are kept" in outcome.reason


def test_a_method_within_budget_over_its_interval_wins_over_a_simpler_one_only_by_point_estimate(
        tmp_path, monkeypatch):
    shared = np.random.default_rng(0).normal(0, 0.1, RESAMPLES)
    table = {("minmax", 0): noisy(0.45, 0.2, 1, shared), ("percentile", 0): noisy(0.35, 0.02, 2, shared)}
    outcome = _run(table, ("minmax", "percentile"), 0.7, tmp_path, monkeypatch)
    assert not beats(outcome.candidates[1], outcome.candidates[0])  # tied
    assert outcome.best.method == "percentile" and outcome.best.float_units == []


def test_without_a_bootstrap_the_smallest_point_estimate_wins(tmp_path, monkeypatch):
    table = {("minmax", 0): 0.40, ("percentile", 0): 0.30}
    outcome = _run(table, ("minmax", "percentile"), 0.5, tmp_path, monkeypatch)
    assert outcome.best.method == "percentile" and outcome.best.describe()["drop_interval"] is None


def test_fallback_last_resort_prefers_fewer_float_units_within_noise(tmp_path, monkeypatch):
    shared = np.random.default_rng(0).normal(0, 1.0, RESAMPLES)
    table = {("minmax", 0): noisy(3.0, 0.05, 1, shared)}
    # Keeping units float helps a little, then noise: 1, 2, 4 units give 2.0, 1.9, 2.05 points, none in budget.
    table.update({("minmax", 1): noisy(2.0, 0.5, 2, shared), ("minmax", 2): noisy(1.9, 0.5, 3, shared),
                  ("minmax", 4): noisy(2.05, 0.5, 4, shared)})
    outcome = _run(table, ("minmax",), 0.5, tmp_path, monkeypatch)
    assert not outcome.within_budget
    assert [len(c.float_units) for c in outcome.candidates] == [0, 1, 2, 4]
    assert len(outcome.best.float_units) == 1 and "fewest float units" in outcome.reason


def test_when_no_method_is_within_budget_the_smallest_drop_starts_the_fallback(tmp_path, monkeypatch):
    """Tied methods over budget: the simplest is no safer a start than the one with the smaller gap to close, and a
    failed build should report the best drop it saw."""
    shared = np.random.default_rng(0).normal(0, 1.0, RESAMPLES)
    table = {("minmax", 0): noisy(1.4, 0.5, 1, shared), ("percentile", 0): noisy(0.8, 0.5, 2, shared)}
    table.update({("percentile", units): noisy(0.8, 0.5, 10 + units, shared) for units in (1, 2, 4)})
    outcome = _run(table, ("minmax", "percentile"), 0.5, tmp_path, monkeypatch)
    assert not beats(outcome.candidates[1], outcome.candidates[0])  # within noise of each other
    assert [c.method for c in outcome.candidates[2:]] == ["percentile"] * 3
    assert not outcome.within_budget
    assert outcome.best.method == "percentile" and outcome.best.float_units == []
    assert "fewest float units" in outcome.reason
