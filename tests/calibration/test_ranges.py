import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_deploy.calibration.onnxrt import onnx_activation_tap
from edge_deploy.calibration.ranges import (BINS, TensorStats, collect_statistics, entropy_range, kl_threshold,
                                            floor_silu_inputs, percentile_range, quantization_step, ranges_for,
                                            silu_floor, sqnr_db)


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


def test_silu_floor_is_where_silu_comes_within_half_a_step_of_zero():
    for half_step in (0.002, 0.02, 0.1):
        floor = silu_floor(half_step)
        assert floor < -1.27
        assert abs(floor / (1 + np.exp(-floor)) + half_step) < 1e-6
    # Coarser output grids let the input range stop higher up.
    assert silu_floor(0.002) < silu_floor(0.02) < silu_floor(0.1)


def test_a_silu_input_range_stops_where_its_output_grid_cannot_tell_values_apart():
    ranges = {"conv": (-40.0, 10.0), "silu": (-0.28, 10.0), "other": (-40.0, 10.0), "shallow": (-3.0, 10.0)}
    floored = floor_silu_inputs(ranges, {"conv": "silu", "shallow": "silu"}, symmetric=False)
    half_step = quantization_step(-0.28, 10.0, False) / 2
    assert floored["conv"] == (silu_floor(half_step), 10.0)
    assert -8 < floored["conv"][0] < -4
    # Tensors read by anything else keep their range, and a range is never widened.
    assert floored["other"] == ranges["other"] and floored["silu"] == ranges["silu"]
    assert floored["shallow"] == (-3.0, 10.0)
    # Every value the floor cuts rounds, after the SiLU, to the output's zero: the SiLU's output grid is unchanged.
    x = np.linspace(-40.0, floored["conv"][0], 1000)
    assert np.all(np.abs(x / (1 + np.exp(-x))) <= half_step + 1e-9)
