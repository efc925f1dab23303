import pytest
import torch

from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.stages.load import LoadStage, check_model_path


def _load(engine, home, path):
    return engine.run(LoadStage(home, None), {"source": Artifact.of(path)})


def test_embedded_checkpoint_describes_itself(model_info):
    assert model_info["task"] == "detect"
    assert model_info["names"] == ["circle", "rectangle", "triangle", "cross"]
    assert model_info["imgsz"] == 160 and model_info["strides"] == [8, 16, 32]


def test_missing_folder_and_unsupported_paths(tmp_path):
    with pytest.raises(InputError, match="model not found"):
        check_model_path(tmp_path / "nope.pt")
    with pytest.raises(InputError, match="folder"):
        check_model_path(tmp_path)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported model file"):
        check_model_path(other)


def test_text_file_is_not_a_checkpoint(engine, deploy_home, tmp_path):
    fake = tmp_path / "weights.pt"
    fake.write_text("definitely not a checkpoint")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        _load(engine, deploy_home, fake)


def test_plain_tensor_file_is_not_an_ultralytics_checkpoint(engine, deploy_home, tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(InputError, match="not an Ultralytics checkpoint"):
        _load(engine, deploy_home, path)


def test_classifier_is_refused_from_yaml_and_checkpoint(engine, deploy_home, tmp_path):
    import ultralytics

    cls_yaml = next(p for p in (tmp_path.__class__(ultralytics.__file__).parent / "cfg" / "models").rglob(
        "yolov8-cls.yaml"))
    local_yaml = tmp_path / "yolov8n-cls.yaml"
    local_yaml.write_text(cls_yaml.read_text())
    with pytest.raises(InputError, match="is a classify model"):
        _load(engine, deploy_home, local_yaml)

    from ultralytics.nn.tasks import ClassificationModel

    checkpoint = tmp_path / "classifier.pt"
    torch.save({"model": ClassificationModel(str(local_yaml), nc=3, verbose=False)}, checkpoint)
    with pytest.raises(InputError, match="is a classify model"):
        _load(engine, deploy_home, checkpoint)


def test_detector_from_yaml_builds_the_same_model_every_time(engine, deploy_home, tmp_path):
    import ultralytics

    source = next((tmp_path.__class__(ultralytics.__file__).parent / "cfg" / "models").rglob("yolov8.yaml"))
    local_yaml = tmp_path / "yolov8n.yaml"
    local_yaml.write_text(source.read_text())
    first = _load(engine, deploy_home, local_yaml)
    assert first.metrics["family"] == "yolov8n" and first.metrics["imgsz"] == 640
    from edge_deploy.pipeline.engine import Engine

    fresh = Engine(tmp_path / "cache2").run(LoadStage(deploy_home, None), {"source": Artifact.of(local_yaml)})
    a = torch.load(first.artifacts["checkpoint"].path, weights_only=False)["model"].state_dict()
    b = torch.load(fresh.artifacts["checkpoint"].path, weights_only=False)["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
