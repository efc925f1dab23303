"""The QDQ graph passes on small hand-built graphs: what each rewrites and what it leaves alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_deploy.calibration.qdq import tile_nearest_upsamples


def upsampling_graph(path, scales, mode="nearest", coordinates="asymmetric", quantized=True, per_channel=False):
    """x -> [Dequantize] -> Resize -> [Quantize -> Dequantize] -> Add y: a quantized upsampling between two
    convolutions' tensors, as onnxruntime's quantizer leaves it, or a float one."""
    channels, size = 8, 5
    out = [int(size * s) for s in scales[2:]]
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8 if quantized else TensorProto.FLOAT,
                                            [None, channels, size, size]),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, channels, *out])]
    initializers = [numpy_helper.from_array(np.array(scales, np.float32), "scales"),
                    numpy_helper.from_array(np.array(0.05, np.float32), "in_scale"),
                    numpy_helper.from_array(np.array(3, np.uint8), "in_zero"),
                    numpy_helper.from_array(np.full(channels, 0.04, np.float32) if per_channel
                                            else np.array(0.04, np.float32), "out_scale"),
                    numpy_helper.from_array(np.full(channels, 7, np.uint8) if per_channel
                                            else np.array(7, np.uint8), "out_zero")]
    nodes = []
    source = "x"
    if quantized:
        nodes.append(helper.make_node("DequantizeLinear", ["x", "in_scale", "in_zero"], ["x_dq"], name="dq_in"))
        source = "x_dq"
    nodes.append(helper.make_node("Resize", [source, "", "scales"], ["up"], name="up", mode=mode,
                                  coordinate_transformation_mode=coordinates, nearest_mode="floor"))
    added = "up"
    if quantized:
        nodes += [helper.make_node("QuantizeLinear", ["up", "out_scale", "out_zero"], ["up_q"], name="q_out"),
                  helper.make_node("DequantizeLinear", ["up_q", "out_scale", "out_zero"], ["up_dq"], name="dq_out")]
        added = "up_dq"
    nodes.append(helper.make_node("Add", [added, "y"], ["sum"], name="add"))
    graph = helper.make_graph(nodes, "upsampling", inputs, [helper.make_tensor_value_info("sum", TensorProto.FLOAT,
                                                                                        None)], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def run(path, scales, quantized=True):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 5, 5)).astype(np.uint8 if quantized else np.float32)
    y = rng.standard_normal((2, 8, *[int(5 * s) for s in scales[2:]])).astype(np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x, "y": y})[0]


@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 3, 2]])
def test_a_quantized_whole_factor_upsampling_becomes_tiles_with_the_same_values(tmp_path, scales):
    path = upsampling_graph(tmp_path / "m.onnx", scales)
    before = run(path, scales)
    assert tile_nearest_upsamples(path) == ["up"]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Resize" not in ops and ops.count("Tile") == 1
    np.testing.assert_array_equal(run(path, scales), before)
    assert "scales" not in {i.name for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("scales, mode, coordinates, quantized, per_channel", [
    ([1, 1, 2, 2], "linear", "asymmetric", True, False),  # interpolates: not copies
    ([1, 1, 2, 2], "nearest", "half_pixel", True, False),  # another pixel mapping
    ([1, 1, 1.6, 1.6], "nearest", "asymmetric", True, False),  # no whole factor
    ([1, 2, 2, 2], "nearest", "asymmetric", True, False),  # repeats channels
    ([1, 1, 2, 2], "nearest", "asymmetric", False, False),  # a float upsampling: onnxruntime's float Resize is fast
    ([1, 1, 2, 2], "nearest", "asymmetric", True, True),  # a scale per channel would not follow the channels last
])
def test_other_resizes_are_left_alone(tmp_path, scales, mode, coordinates, quantized, per_channel):
    path = upsampling_graph(tmp_path / "m.onnx", scales, mode, coordinates, quantized, per_channel)
    before = path.read_bytes()
    assert tile_nearest_upsamples(path) == []
    assert path.read_bytes() == before
