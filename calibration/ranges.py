"""Activation statistics from a calibration set, and the ranges each INT8 method derives from them.

Statistics are collected once (two passes: extremes, then histograms over
those extremes) and every method reads the same histograms, so trying several
methods costs no further inference. The methods are implemented here rather
than taken from onnxruntime's calibrators so that a near-constant activation
cannot fail a method, and so that the same ranges feed every target's
calibration format (TensorRT cache, ncnn table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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


def tensor_types(model) -> dict[str, int]:
    """ONNX element type of every tensor the graph names (inputs, node outputs, initializers)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def session_with_all_outputs(model_path: Path, float_only: bool = True):
    """An onnxruntime session that also returns every intermediate tensor; and those tensors' names."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    types = tensor_types(model)
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    names = list(graph_inputs)
    for node in model.graph.node:
        names += [o for o in node.output if o and o in types and
                  (types[o] == onnx.TensorProto.FLOAT or not float_only)]
    names = list(dict.fromkeys(names))
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing and name not in graph_inputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    # Optimisations would fuse nodes away and hide their outputs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, names


def collect_statistics(model_path: Path, batches: Iterable[np.ndarray] | list[np.ndarray]) -> dict[str, TensorStats]:
    batches = list(batches)
    session, names = session_with_all_outputs(model_path)
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    def run(batch):
        values = dict(zip(outputs, session.run(outputs, {input_name: batch})))
        values[input_name] = batch
        return values

    lowest = {n: np.inf for n in names}
    highest = {n: -np.inf for n in names}
    for batch in batches:
        for name, value in run(batch).items():
            if name in lowest and value.size:
                lowest[name] = min(lowest[name], float(value.min()))
                highest[name] = max(highest[name], float(value.max()))
    hists = {n: np.zeros(BINS, np.int64) for n in names}
    abs_hists = {n: np.zeros(BINS, np.int64) for n in names}
    for batch in batches:
        for name, value in run(batch).items():
            if name in hists and value.size:
                lo, hi = lowest[name], highest[name]
                hists[name] += _histogram(value, lo, hi)
                abs_hists[name] += _histogram(np.abs(value), 0.0, max(abs(lo), abs(hi)))
    return {n: TensorStats(lowest[n], highest[n], hists[n], abs_hists[n]) for n in names if np.isfinite(lowest[n])}


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
