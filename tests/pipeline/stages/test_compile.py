"""compile checks every artifact against its FP32 parent on real images, and says which check it ran."""

import pytest

from edge_deploy.calibration.sets import calibration_set, choice_splits
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.errors import ConversionMismatch
from edge_deploy.pipeline.results import CompileReport
from edge_deploy.pipeline.stages.compile import CompileStage
from edge_deploy.pipeline.stages.quantize import QuantizeStage
from edge_deploy.pipeline.stages.reference import ReferenceStage
from edge_deploy.targets.cpu import OnnxRuntimeCpu


@pytest.fixture(scope="module")
def quantized(exported, engine, shapes_yaml, preprocess) -> tuple[dict, object]:
    selection, report = choice_splits(shapes_yaml, preprocess, 100, 0)
    selection = selection.head(32)
    calibration = calibration_set(shapes_yaml, preprocess, size=32, seed=0, exclude=frozenset(selection.file_hashes))
    available = dict(exported)
    available.update(engine.run(ReferenceStage(selection, report.head(32)), available).artifacts)
    available.update(engine.run(QuantizeStage(OnnxRuntimeCpu(), "int8", calibration, selection, "minmax", False, 5.0,
                                              "continue"), available).artifacts)
    return available, selection


def test_fp32_is_checked_by_relative_error_and_int8_by_sqnr(quantized, engine):
    available, selection = quantized
    fp32 = CompileReport.from_json(engine.run(CompileStage(OnnxRuntimeCpu(), "fp32", selection), available).metrics)
    assert fp32.check.startswith("max relative error") and fp32.check_value == 0.0 and fp32.check_images == 8
    int8 = CompileReport.from_json(engine.run(CompileStage(OnnxRuntimeCpu(), "int8", selection), available).metrics)
    assert int8.check.startswith("lowest output SQNR") and 15.0 <= int8.check_value < 60.0
    assert int8.size_bytes < fp32.size_bytes / 2


def test_sqnr_floor_rejects_the_conversion_and_caches_nothing(quantized, tmp_path):
    available, selection = quantized
    with pytest.raises(ConversionMismatch, match="SQNR .* on 8 real images, below the 90.0 dB floor"):
        Engine(tmp_path / "cache").run(CompileStage(OnnxRuntimeCpu(), "int8", selection, min_sqnr_db=90.0), available)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


class CountingThreads(OnnxRuntimeCpu):
    """The real cpu target, noting the thread count each runtime is opened with."""

    asked: list = []

    def runtime(self, artifact_dir, threads=None):
        CountingThreads.asked.append(threads)
        return super().runtime(artifact_dir, threads)


def test_the_check_states_its_thread_count(quantized, tmp_path):
    from edge_deploy.calibration.onnxrt import SCORING_THREADS

    available, selection = quantized
    CountingThreads.asked = []
    Engine(tmp_path / "cache").run(CompileStage(CountingThreads(), "int8", selection), available)
    assert CountingThreads.asked == [SCORING_THREADS] and SCORING_THREADS is not None
