"""Activation statistics from a calibration set, and the ranges each INT8 method derives from them.

Statistics are collected once, through an activation tap any runtime can
provide (two passes: extremes, then histograms over those extremes), and every
method reads the same histograms, so trying several methods costs no further
inference. The methods are implemented here rather
than taken from onnxruntime's calibrators so that a near-constant activation
cannot fail a method, and so that the same ranges feed every target's
calibration format (TensorRT cache, ncnn table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

BINS = 2048
# KL search: the quantized histogram has 128 levels on each side, as INT8 has.
KL_TARGET_BINS = 128
KL_STRIDE = 16
PERCENTILE = 99.999


@dataclass
class TensorStats:
    lowest: float
    highest: float
    # Histogram of x over [lowest, highest] and of |x| over [0, max|x|], BINS each.
    hist: np.ndarray
    abs_hist: np.ndarray

    @property
    def absmax(self) -> float:
        return max(abs(self.lowest), abs(self.highest))


ActivationTap = Callable[[np.ndarray], dict[str, np.ndarray]]


def collect_statistics(tap: ActivationTap, batches: Iterable[np.ndarray]) -> dict[str, TensorStats]:
    """Statistics of every tensor `tap` reports, over the calibration batches.

    A tap is whatever a runtime offers to see its intermediate tensors (an
    onnxruntime session with every output exposed, ncnn's extractor, ...): a
    batch in, {tensor name: values} out. Two passes: extremes, then histograms
    over those extremes, so that every range method reads the same data.
    """
    batches = list(batches)
    lowest: dict[str, float] = {}
    highest: dict[str, float] = {}
    for batch in batches:
        for name, value in tap(batch).items():
            if value.size and np.issubdtype(value.dtype, np.floating):
                lowest[name] = min(lowest.get(name, np.inf), float(value.min()))
                highest[name] = max(highest.get(name, -np.inf), float(value.max()))
    hists = {n: np.zeros(BINS, np.int64) for n in lowest}
    abs_hists = {n: np.zeros(BINS, np.int64) for n in lowest}
    for batch in batches:
        for name, value in tap(batch).items():
            if name in hists and value.size:
                lo, hi = lowest[name], highest[name]
                hists[name] += _histogram(value, lo, hi)
                abs_hists[name] += _histogram(np.abs(value), 0.0, max(abs(lo), abs(hi)))
    return {n: TensorStats(lowest[n], highest[n], hists[n], abs_hists[n]) for n in lowest if np.isfinite(lowest[n])}


def sqnr_db(reference: np.ndarray, candidate: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Signal-to-quantization-noise ratio of `candidate` against `reference`, in dB; `weight` (broadcast against
    both) counts some values more than others."""
    scale = 1.0 if weight is None else weight
    noise = float(np.sum(scale * (reference.astype(np.float64) - candidate) ** 2))
    signal = float(np.sum(scale * reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _histogram(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """BINS equal bins over [low, high]; np.histogram's general path is several times slower."""
    flat = values.ravel()
    if high <= low:
        counts = np.zeros(BINS, np.int64)
        counts[0] = flat.size
        return counts
    index = ((flat - low) * (BINS / (high - low))).astype(np.int64)
    return np.bincount(np.clip(index, 0, BINS - 1), minlength=BINS)


def minmax_range(stats: TensorStats) -> tuple[float, float]:
    return stats.lowest, stats.highest


def percentile_range(stats: TensorStats, percentile: float = PERCENTILE) -> tuple[float, float]:
    """Cuts (100 - percentile) % of the values, half on each side; a constant tensor keeps its value."""
    if stats.highest <= stats.lowest:
        return stats.lowest, stats.highest
    cdf = np.cumsum(stats.hist) / max(stats.hist.sum(), 1)
    tail = (100.0 - percentile) / 200.0
    edges = np.linspace(stats.lowest, stats.highest, BINS + 1)
    low = edges[int(np.searchsorted(cdf, tail))]
    high = edges[min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, BINS)]
    return float(max(low, stats.lowest)), float(min(high, stats.highest))


def kl_threshold(abs_hist: np.ndarray, absmax: float, target_bins: int = KL_TARGET_BINS,
                 stride: int = KL_STRIDE) -> float:
    """The |x| clipping threshold whose 128-level quantization loses the least information (KL divergence)."""
    total = abs_hist.sum()
    if absmax <= 0 or total == 0:
        return absmax
    width = absmax / len(abs_hist)
    best_i, best_kl = len(abs_hist), np.inf
    hist = abs_hist.astype(np.float64)
    for i in range(target_bins, len(hist) + 1, stride):
        reference = hist[:i].copy()
        reference[-1] += hist[i:].sum()  # clipped values land in the last bin
        # Merge the i bins into target_bins levels, then spread each level evenly
        # over the bins of its group that held values.
        group = np.arange(i) * target_bins // i
        occupied = hist[:i] > 0
        level_sum = np.bincount(group, weights=hist[:i], minlength=target_bins)
        level_bins = np.bincount(group, weights=occupied, minlength=target_bins)
        candidate = np.where(occupied, level_sum[group] / np.maximum(level_bins[group], 1), 0.0)
        mask = reference > 0
        if np.any(candidate[mask] == 0):
            continue
        p = reference[mask] / reference.sum()
        q = candidate[mask] / candidate.sum()
        kl = float(np.sum(p * np.log(p / q)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return (best_i + 0.5) * width if best_i < len(hist) else absmax


def entropy_range(stats: TensorStats) -> tuple[float, float]:
    threshold = kl_threshold(stats.abs_hist, stats.absmax)
    return max(stats.lowest, -threshold), min(stats.highest, threshold)


# SiLU's minimum, at x = -1.2785: below it SiLU rises back towards zero.
SILU_ARGMIN = -1.2785


def _silu(x: float) -> float:
    return x / (1.0 + np.exp(-x))


def silu_floor(half_step: float) -> float:
    """The input below which SiLU stays within `half_step` of zero: what is lower rounds to the same 8-bit value of
    SiLU's output, so an input range need not reach further down (bisection; SiLU is monotonic there)."""
    low, high = -100.0, SILU_ARGMIN
    if -_silu(low) >= half_step:
        return low
    if -_silu(high) < half_step:
        return high
    for _ in range(60):
        middle = (low + high) / 2
        if -_silu(middle) < half_step:
            low = middle
        else:
            high = middle
    return float(low)


def quantization_step(low: float, high: float, symmetric: bool) -> float:
    """The 8-bit step a range gets: uint8 over [min(low, 0), max(high, 0)], or int8 +-127 around zero."""
    if symmetric:
        return max(abs(low), abs(high)) / 127
    return (max(high, 0.0) - min(low, 0.0)) / 255


def floor_silu_inputs(ranges: dict[str, tuple[float, float]], silu_outputs: dict[str, str],
                      symmetric: bool) -> dict[str, tuple[float, float]]:
    """Ranges in which a tensor read only by a SiLU reaches down no further than its output's grid can tell apart.

    A convolution's output ahead of a SiLU has a long negative tail (min around -10 to -60 on YOLOv8) that the SiLU
    squashes to within a fraction of its output's 8-bit step of zero. Where the range follows the tail, the values
    that matter get a coarser grid. `silu_outputs` maps such an input to the SiLU's output tensor; the input's low
    end is raised to where SiLU comes within half that output's step of zero. Symmetric ranges arrive centred on
    zero, and their grid is set by the larger side, so for them nothing changes. On the real-image YOLOv8s-size
    model (benchmarks/fidelity_floor.py) this lowered INT8's fidelity drop on the selection photos and on the report
    photos, for MinMax and Percentile alike.
    """
    floored = dict(ranges)
    for tensor, output in silu_outputs.items():
        if tensor not in ranges or output not in ranges:
            continue
        low, high = ranges[tensor]
        floored[tensor] = (max(low, silu_floor(quantization_step(*ranges[output], symmetric) / 2)), high)
    return floored


METHODS = {"minmax": minmax_range, "percentile": percentile_range, "entropy": entropy_range}


def ranges_for(stats: dict[str, TensorStats], method: str, symmetric: bool = False) -> dict[str, tuple[float, float]]:
    """Per-tensor (low, high); symmetric ranges are centred on zero, as TensorRT requires."""
    out = {}
    for name, s in stats.items():
        low, high = METHODS[method](s)
        if symmetric:
            bound = max(abs(low), abs(high))
            low, high = -bound, bound
        out[name] = (float(low), float(high))
    return out


def save_statistics(stats: dict[str, TensorStats], path: Path) -> None:
    names = sorted(stats)
    np.savez_compressed(
        path, names=np.array(names), lowest=np.array([stats[n].lowest for n in names]),
        highest=np.array([stats[n].highest for n in names]),
        hist=np.stack([stats[n].hist for n in names]), abs_hist=np.stack([stats[n].abs_hist for n in names]))


def load_statistics(path: Path) -> dict[str, TensorStats]:
    with np.load(path) as data:
        return {str(n): TensorStats(float(lo), float(hi), h, a) for n, lo, hi, h, a in
                zip(data["names"], data["lowest"], data["highest"], data["hist"], data["abs_hist"])}
