"""verify reports every drop with its paired bootstrap interval, flags what the images cannot judge, and scores
with an explicit thread count."""

import json
import shutil
import warnings

import numpy as np
import pytest

from edge_deploy.calibration.sets import choice_splits
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.calibration.onnxrt import SCORING_THREADS
from edge_deploy.pipeline.evaluate import BOOTSTRAP_RESAMPLES
from edge_deploy.pipeline.results import AccuracyReport, ReferenceAccuracy
from edge_deploy.pipeline.stages.reference import ReferenceStage
from edge_deploy.pipeline.stages.verify import VerifyStage
from edge_deploy.targets.cpu import OnnxRuntimeCpu


@pytest.fixture(scope="module")
def referenced(exported, engine, shapes_yaml, preprocess):
    selection, report = choice_splits(shapes_yaml, preprocess, 100, 0)
    # Few report images on purpose: the interval must be wide.
    report = report.head(6)
    available = dict(exported)
    record = engine.run(ReferenceStage(selection.head(8), report), available)
    available.update(record.artifacts)
    return available, report, record


def artifact_folder(onnx_path, folder, noise: float):
    """A cpu artifact folder holding the FP32 graph, its weights scaled by 1 + N(0, noise) when noise > 0."""
    import onnx
    from onnx import numpy_helper

    folder.mkdir()
    if noise == 0:
        shutil.copyfile(onnx_path, folder / "model.onnx")
    else:
        model = onnx.load(str(onnx_path))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            values = numpy_helper.to_array(init)
            if values.dtype == np.float32 and values.size > 64:
                init.CopyFrom(numpy_helper.from_array(
                    (values * (1 + rng.normal(0, noise, values.shape))).astype(np.float32), init.name))
        onnx.save(model, str(folder / "model.onnx"))
    return Artifact.of(folder)


def test_reference_keeps_its_bootstrap_for_later_stages_but_not_in_its_metrics(referenced):
    available, report, record = referenced
    stored = ReferenceAccuracy.from_json(json.loads(available["reference"].path.read_text()))
    assert len(stored.report.bootstrap) == BOOTSTRAP_RESAMPLES and stored.threads == SCORING_THREADS == 1
    low, high = stored.report.map50_95_interval
    assert low <= stored.report.map50_95 <= high
    assert "bootstrap" not in json.dumps(record.metrics) and record.metrics["threads"] == 1


def test_the_reference_itself_as_artifact_has_a_zero_interval_and_no_flag(referenced, engine, tmp_path):
    available, report, _ = referenced
    available = {**available, "artifact": artifact_folder(available["onnx"].path, tmp_path / "same", 0.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = AccuracyReport.from_json(engine.run(VerifyStage(OnnxRuntimeCpu(), "int8", report, 0.5),
                                                     available).metrics)
    assert result.drop_points == 0.0 and result.drop_interval == [0.0, 0.0] and result.flags == []
    assert result.threads == 1 and result.bootstrap["resamples"] == BOOTSTRAP_RESAMPLES


def test_a_drop_on_too_few_images_is_reported_with_its_interval_and_flagged(referenced, engine, tmp_path):
    available, report, _ = referenced
    available = {**available, "artifact": artifact_folder(available["onnx"].path, tmp_path / "noisy", 0.15)}
    with pytest.warns(UserWarning, match="too small or unrepresentative"):
        record = engine.run(VerifyStage(OnnxRuntimeCpu(), "int8", report, 0.1, enforce_budget=False), available)
    result = AccuracyReport.from_json(record.metrics)
    low, high = result.drop_interval
    assert low <= result.drop_points <= high and high - low > 2 * 0.1
    assert "interval-wider-than-budget" in [f["flag"] for f in result.flags]
    # The per-resample samples stay inside the stage; metrics carry the intervals and how they were made.
    assert all("bootstrap" not in record.metrics[k] for k in ("reference", "artifact", "fidelity"))
    assert record.metrics["bootstrap"]["resamples"] == BOOTSTRAP_RESAMPLES
    assert result.fidelity.map50_95_interval is not None


def test_a_missed_budget_fails_naming_the_flags_and_carries_what_it_measured(referenced, engine, tmp_path):
    from edge_deploy.pipeline.errors import AccuracyGateError

    available, report, _ = referenced
    available = {**available, "artifact": artifact_folder(available["onnx"].path, tmp_path / "noisy", 0.15)}
    from edge_deploy.pipeline.engine import Engine

    # A cache of its own: the test above measured this same artifact without the gate.
    engine = Engine(tmp_path / "cache")
    with pytest.warns(UserWarning), pytest.raises(AccuracyGateError, match="raise --max-map-drop .*--accept-drop") \
            as caught:
        engine.run(VerifyStage(OnnxRuntimeCpu(), "int8", report, 0.1), available)
    measured = AccuracyReport.from_json(caught.value.report)
    assert caught.value.stage == "verify" and measured.within_budget is False
    assert measured.drop_points > 0.1 and f"loses {measured.drop_points:.2f}" in str(caught.value)
    # --accept-drop, as the error suggests, takes what was measured instead of scoring the artifact again.
    accepted = engine.run(VerifyStage(OnnxRuntimeCpu(), "int8", report, 0.1, enforce_budget=False), available)
    assert accepted.cache_hit and accepted.metrics == caught.value.report


def test_a_missed_fidelity_budget_says_how_far_the_boxes_moved(exported, engine, shapes_yaml, preprocess, tmp_path):
    """Without labels the gate's line gives what the points stand for, as quantize's does."""
    import dataclasses
    import re

    from edge_deploy.pipeline.errors import AccuracyGateError

    selection, report = choice_splits(shapes_yaml, preprocess, 100, 0)
    selection, report = (dataclasses.replace(split.head(n), labels=()) for split, n in ((selection, 8), (report, 6)))
    available = dict(exported)
    available.update(engine.run(ReferenceStage(selection, report), available).artifacts)
    available["artifact"] = artifact_folder(available["onnx"].path, tmp_path / "noisy", 0.15)
    with pytest.warns(UserWarning), pytest.raises(AccuracyGateError) as caught:
        engine.run(VerifyStage(OnnxRuntimeCpu(), "int8", report, 0.1), available)
    assert AccuracyReport.from_json(caught.value.report).artifact.kind == "fidelity"
    assert re.search(r"fidelity mAP50-95 points .*\d+\.\d% \(\d+\.\d\d px\) of FP32 boxes found again",
                     str(caught.value)), caught.value
