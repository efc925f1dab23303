import onnx
import pytest

from calibration.sets import calibration_set
from pipeline.engine import Engine
from pipeline.errors import ConversionMismatch
from pipeline.stages.quantize import QuantizeStage, sqnr_db


def test_int8_qdq_model_is_close_to_fp32(exported, engine, shapes_yaml, preprocess):
    calibration = calibration_set(shapes_yaml, preprocess, size=32, seed=0)
    record = engine.run(QuantizeStage(calibration, "minmax", True, 15.0), exported)
    ops = {node.op_type for node in onnx.load(str(record.artifacts["onnx_int8"].path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert min(record.metrics["sqnr_db"].values()) >= 15.0
    assert record.metrics["size_bytes"] < exported["onnx"].path.stat().st_size / 2

    other = calibration_set(shapes_yaml, preprocess, size=32, seed=1)
    assert engine.key(QuantizeStage(other, "minmax", True, 15.0), exported) != record.key


def test_sqnr_floor_rejects_the_conversion(exported, shapes_yaml, preprocess, tmp_path):
    calibration = calibration_set(shapes_yaml, preprocess, size=8, seed=0)
    with pytest.raises(ConversionMismatch, match="SQNR"):
        Engine(tmp_path / "cache").run(QuantizeStage(calibration, "minmax", True, 90.0), exported)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_sqnr():
    import numpy as np

    signal = np.ones(100)
    assert sqnr_db(signal, signal) == float("inf")
    assert abs(sqnr_db(signal, signal * 1.1) - 20.0) < 1e-9
