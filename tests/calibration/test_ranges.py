import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_deploy.calibration.onnxrt import onnx_activation_tap
from edge_deploy.calibration.ranges import (BINS, TensorStats, collect_statistics, entropy_range, kl_threshold,
                                            percentile_range, ranges_for, sqnr_db)


def _stats(values: np.ndarray) -> TensorStats:
    lo, hi = float(values.min()), float(values.max())
    absmax = max(abs(lo), abs(hi))
    hist = np.histogram(values, BINS, range=(lo, hi))[0] if hi > lo else np.r_[values.size, np.zeros(BINS - 1)]
    abs_hist = np.histogram(np.abs(values), BINS, range=(0, absmax))[0]
    return TensorStats(lo, hi, hist, abs_hist)


def test_outliers_are_clipped_by_entropy_and_percentile_but_not_minmax():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 200_000), [60.0, -55.0]]).astype(np.float32)
    s = _stats(values)
    assert ranges_for({"t": s}, "minmax")["t"] == (s.lowest, s.highest)
    low, high = percentile_range(s)
    assert 3 < high < 10 and -10 < low < -3
    low, high = entropy_range(s)
    assert 2 < high < 20 and low == -high


def test_uniform_values_keep_nearly_their_whole_range():
    values = np.random.default_rng(1).uniform(0, 4, 100_000).astype(np.float32)
    s = _stats(values)
    assert kl_threshold(s.abs_hist, s.absmax) > 3.5


def test_constant_tensor_does_not_fail_any_method():
    s = _stats(np.full(1000, 0.25, np.float32))
    for method in ("minmax", "percentile", "entropy"):
        low, high = ranges_for({"t": s}, method)["t"]
        assert low <= 0.25 <= high + 1e-6


def test_symmetric_ranges_are_centred():
    s = _stats(np.linspace(-0.5, 4, 1000).astype(np.float32))
    low, high = ranges_for({"t": s}, "minmax", symmetric=True)["t"]
    assert low == -high == -4.0


def test_collect_statistics_sees_every_intermediate_tensor(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]), helper.make_node("Relu", ["doubled"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    batches = [np.array([[-1, 0, 1, 2]], np.float32), np.array([[3, -4, 0, 0]], np.float32)]
    stats = collect_statistics(onnx_activation_tap(path), batches)
    assert (stats["x"].lowest, stats["x"].highest) == (-4, 3)
    assert (stats["doubled"].lowest, stats["doubled"].highest) == (-8, 6)
    assert (stats["y"].lowest, stats["y"].highest) == (0, 6)
    assert stats["y"].hist.sum() == 8


def test_any_runtime_can_feed_statistics_through_a_tap():
    """The collector only sees name -> values: ncnn's extractor, a device dump or onnxruntime all fit."""
    def tap(batch):
        return {"in": batch, "relu": np.maximum(batch, 0), "index": np.arange(3)}

    stats = collect_statistics(tap, [np.array([-2.0, 1.0], np.float32), np.array([0.5, 3.0], np.float32)])
    assert set(stats) == {"in", "relu"}  # integer tensors are not quantized
    assert (stats["in"].lowest, stats["in"].highest, stats["relu"].lowest) == (-2.0, 3.0, 0.0)
    assert stats["in"].abs_hist.sum() == 4


def test_sqnr():
    signal = np.ones(100)
    assert sqnr_db(signal, signal) == float("inf")
    assert abs(sqnr_db(signal, signal * 1.1) - 20.0) < 1e-9
