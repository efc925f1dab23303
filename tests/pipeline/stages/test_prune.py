import json

import pytest

from edge_deploy.calibration.preprocess import Preprocess
from edge_deploy.calibration.sets import calibration_set, labelled_split
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.stages.load import LoadStage
from edge_deploy.pipeline.stages.prune import PruneStage, detection_batch
from tests.conftest import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def small(deploy_home, small_shapes_yaml, tmp_path_factory):
    engine = Engine(tmp_path_factory.mktemp("prune-cache"))
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(deploy_home, None), available).artifacts)
    pre = Preprocess(160)
    val = labelled_split(small_shapes_yaml, "val", pre)
    train = labelled_split(small_shapes_yaml, "train", pre)
    return engine, available, val, train


def _stage(deploy_home, small_shapes_yaml, small, **overrides):
    _, _, val, train = small
    settings = dict(ratio=0.5, target_params=None, target_macs=None, criterion="l1", global_ranking=False,
                    round_to=8, steps=1, epochs=0, map_floor=None, taylor_images=[])
    settings.update(overrides)
    return PruneStage(deploy_home, val, small_shapes_yaml, train.fingerprint, **settings)


def test_fine_tuned_steps_are_measured_and_recorded(deploy_home, small_shapes_yaml, small):
    engine, available, _, _ = small
    record = engine.run(_stage(deploy_home, small_shapes_yaml, small, steps=2, epochs=1), available)
    history = json.loads(record.artifacts["prune_history"].path.read_text())
    assert [row["step"] for row in history["steps"]] == [0, 1, 2]
    assert [row["fine_tuned"] for row in history["steps"]] == [False, True, True]
    assert history["steps"][2]["macs_ratio"] > 3.5
    assert record.metrics["latency_ratio"] > 1.0  # fewer MACs, measured faster in ONNX Runtime
    assert record.artifacts["prune_plot"].path.read_bytes()[:4] == b"\x89PNG"
    info = json.loads(record.artifacts["model_info"].path.read_text())
    assert info["pruned"] and info["params"] == history["steps"][2]["params"]


def test_mac_target_stops_when_reached(deploy_home, small_shapes_yaml, small):
    engine, available, _, _ = small
    record = engine.run(_stage(deploy_home, small_shapes_yaml, small, ratio=None, target_macs=150_000_000), available)
    final = json.loads(record.artifacts["prune_history"].path.read_text())["steps"][-1]
    assert final["macs"] <= 150_000_000 and record.metrics["stop"].startswith("target reached")


def test_floor_keeps_the_last_good_step(deploy_home, small_shapes_yaml, small):
    engine, available, _, _ = small
    record = engine.run(_stage(deploy_home, small_shapes_yaml, small, map_floor=0.99), available)
    history = json.loads(record.artifacts["prune_history"].path.read_text())
    assert history["steps"][-1]["kept"] is False and "floor" in history["stop"]
    assert record.metrics["params_ratio"] == 1.0


def test_taylor_uses_detection_loss_gradients(deploy_home, small_shapes_yaml, small):
    engine, available, _, _ = small
    images = list(calibration_set(small_shapes_yaml, Preprocess(160), 8, 0, min_recommended=1).files)
    batch = detection_batch(images, Preprocess(160))
    assert batch["img"].shape == (8, 3, 160, 160) and batch["bboxes"].shape[1] == 4
    assert float(batch["bboxes"].max()) <= 1.0 and len(batch["cls"]) == len(batch["batch_idx"]) > 0
    record = engine.run(_stage(deploy_home, small_shapes_yaml, small, criterion="taylor", taylor_images=images),
                        available)
    assert record.metrics["macs_ratio"] > 3.5
