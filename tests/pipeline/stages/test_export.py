import onnx
import pytest

from edge_deploy.pipeline.errors import ConversionMismatch
from edge_deploy.pipeline.stages.export import ExportStage, OUTPUT_NAMES


def test_onnx_ends_at_raw_maps_and_matches_pytorch(exported, engine, model_info):
    model = onnx.load(str(exported["onnx"].path))
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert {p.key for p in model.metadata_props} >= {"names", "imgsz", "strides"}
    assert model.opset_import[0].version == 17
    record = engine.run(ExportStage(engine.cache_dir.parent, 17, True, 1e-4), exported)
    assert record.cache_hit and record.metrics["max_rel_error"] < 1e-4


def test_drift_beyond_tolerance_is_a_typed_error(exported, deploy_home, tmp_path):
    from edge_deploy.pipeline.engine import Engine

    with pytest.raises(ConversionMismatch, match="differs from its parent"):
        Engine(tmp_path / "cache").run(ExportStage(deploy_home, 17, True, 1e-12), exported)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
