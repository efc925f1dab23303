import json

import numpy as np
import onnx
import pytest

from calibration.formats import read_trt_cache
from calibration.preprocess import load_tensor
from calibration.sets import calibration_set, labelled_split
from pipeline.engine import Engine
from pipeline.errors import AccuracyGateError, ConversionMismatch
from pipeline.int8 import fake_quant_activation, fake_quant_weight, sqnr_db
from pipeline.stages.quantize import QuantizeStage


@pytest.fixture(scope="module")
def sets(shapes_yaml, preprocess):
    calibration = calibration_set(shapes_yaml, preprocess, size=48, seed=0)
    val = labelled_split(shapes_yaml, "val", preprocess)
    return calibration, val


def stage(sets, **overrides):
    settings = dict(method="minmax", per_channel=True, symmetric=False, max_map_drop=0.5,
                    on_budget_exceeded="fail", min_sqnr_db=15.0)
    settings.update(overrides)
    return QuantizeStage(settings.pop("precision", "int8"), *sets, **settings)


def test_int8_keeps_accuracy_and_writes_calibration_files(exported, engine, sets):
    record = engine.run(stage(sets), exported)
    ops = {node.op_type for node in onnx.load(str(record.artifacts["onnx_quantized"].path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert record.metrics["drop_points"] <= 0.5 and record.metrics["float_nodes"] == 0
    assert min(record.metrics["sqnr_db"].values()) >= 15.0
    assert record.metrics["size_bytes"] < exported["onnx"].path.stat().st_size / 2
    header, scales = read_trt_cache(record.artifacts["trt_calibration_cache"].path)
    assert header == "TRT-8601-EntropyCalibration2" and scales["images"] == pytest.approx(1 / 127)
    report = json.loads(record.artifacts["quantize_report"].path.read_text())
    assert report["method"] == "minmax" and report["selection_set"].startswith("val")


def test_calibration_set_is_part_of_the_key(exported, engine, sets, shapes_yaml, preprocess):
    other = calibration_set(shapes_yaml, preprocess, size=48, seed=1)
    assert engine.key(stage(sets), exported) != engine.key(stage((other, sets[1])), exported)


def test_calibration_tensors_are_what_inference_is_fed(sets):
    """The quantizer and every runtime read images through the one preprocessing function."""
    from calibration.preprocess import letterbox, read_image

    calibration, _ = sets
    path = calibration.files[0]
    tensor, lb = load_tensor(path, calibration.preprocess)
    padded, _ = letterbox(read_image(path), calibration.preprocess)
    expected = padded[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255
    assert np.allclose(tensor, expected, atol=1e-7)


def test_budget_nothing_meets_reports_the_best_and_fails(exported, sets, tmp_path):
    with pytest.raises(AccuracyGateError, match="at best"):
        Engine(tmp_path / "cache").run(stage(sets, method="entropy", max_map_drop=0.0), exported)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_sqnr_floor_rejects_the_conversion(exported, sets, tmp_path):
    with pytest.raises(ConversionMismatch, match="SQNR"):
        Engine(tmp_path / "cache").run(stage(sets, min_sqnr_db=90.0), exported)


def test_fake_quant_helpers():
    x = np.linspace(-1, 3, 101).astype(np.float32)
    assert np.abs(fake_quant_activation(x, -1, 3, symmetric=False) - x).max() <= 4 / 255 / 2 + 1e-6
    assert np.abs(fake_quant_activation(x, -1, 3, symmetric=True) - x).max() <= 3 / 127 / 2 + 1e-6
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[1] *= 100  # per-channel scales keep the small channels precise
    q = fake_quant_weight(w)
    assert np.abs(q[0] - w[0]).max() <= np.abs(w[0]).max() / 127 / 2 + 1e-6
    assert sqnr_db(w, q) > 35


def test_sqnr():
    signal = np.ones(100)
    assert sqnr_db(signal, signal) == float("inf")
    assert abs(sqnr_db(signal, signal * 1.1) - 20.0) < 1e-9


def test_int4_gptq_loses_less_than_round_to_nearest(exported, engine, sets):
    results = {}
    for method in ("rtn", "gptq"):
        record = engine.run(stage(sets, precision="int4", int4_method=method, max_map_drop=5.0,
                                  on_budget_exceeded="continue"), exported)
        model = onnx.load(str(record.artifacts["onnx_quantized"].path))
        int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
        assert len(int4) == 63 and model.opset_import[0].version == 21
        results[method] = record.metrics["drop_points"]
        assert record.metrics["size_bytes"] < exported["onnx"].path.stat().st_size / 4
    assert results["gptq"] < results["rtn"]
    assert results["gptq"] <= 2.0


def test_w4a8_quantizes_activations_and_stores_int4_weights(exported, engine, sets):
    record = engine.run(stage(sets, precision="w4a8", max_map_drop=2.0), exported)
    model = onnx.load(str(record.artifacts["onnx_quantized"].path))
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.INT4 in types
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert record.metrics["drop_points"] <= 2.0
