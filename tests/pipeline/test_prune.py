import copy

import pytest
import torch

from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.prune import CRITERIA, check_no_empty_layer, check_supported, count_macs_params, make_pruner, \
    split_c2f_blocks
from tests.conftest import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def yolov8n(deploy_home):
    model = torch.load(EMBEDDED_MODEL, map_location="cpu", weights_only=False)["model"].float().eval()
    split_c2f_blocks(model)
    return model


def _yaml_model(base_yaml: str):
    """The 'n' scale of a model YAML that Ultralytics ships, freshly initialised, with 4 classes."""
    from pathlib import Path

    import ultralytics
    import yaml
    from ultralytics.nn.tasks import DetectionModel

    source = next((Path(ultralytics.__file__).parent / "cfg" / "models").rglob(base_yaml))
    torch.manual_seed(0)
    return DetectionModel({**yaml.safe_load(source.read_text()), "scale": "n"}, nc=4, verbose=False).eval()


def test_split_c2f_computes_the_same_function(deploy_home):
    model = torch.load(EMBEDDED_MODEL, map_location="cpu", weights_only=False)["model"].float().eval()
    model.model[-1].export = True
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        assert split_c2f_blocks(model) == 8
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c != "taylor"])
def test_every_criterion_removes_real_channels(yolov8n, criterion):
    model = copy.deepcopy(yolov8n)
    macs, params = count_macs_params(model, 64)
    make_pruner(model, 64, criterion, 0.5, 1, False, 8).step()
    new_macs, new_params = count_macs_params(model, 64)
    assert macs / new_macs > 3.5 and params / new_params > 3.5
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    head = model.model[-1]
    assert [b[-1].out_channels for b in head.cv2] == [64, 64, 64]  # box outputs untouched
    assert [b[-1].out_channels for b in head.cv3] == [4, 4, 4]  # class outputs untouched
    assert all(c.out_channels % 8 == 0 for c in convs if c not in [b[-1] for b in list(head.cv2) + list(head.cv3)]
               and c is not head.dfl.conv and c.groups == 1)
    model.model[-1].export = True
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 8, 84)


@pytest.mark.parametrize("base_yaml", ["yolo11.yaml", "yolov5.yaml"])  # YOLO11n and YOLOv5nu
def test_yolo11_and_yolov5u_prune(deploy_home, base_yaml):
    model = _yaml_model(base_yaml)
    check_supported(model)
    split_c2f_blocks(model)
    model.model[-1].export = True
    macs, _ = count_macs_params(model, 64)
    make_pruner(model, 64, "l2", 0.5, 1, False, 8).step()
    assert macs / count_macs_params(model, 64)[0] > 2.5
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 8, 84)


def test_unsupported_family_is_named(deploy_home):
    import ultralytics
    from pathlib import Path
    from ultralytics.nn.tasks import RTDETRDetectionModel

    source = next((Path(ultralytics.__file__).parent / "cfg" / "models").rglob("rtdetr-l.yaml"))
    model = RTDETRDetectionModel(str(source), nc=4, verbose=False)
    with pytest.raises(InputError, match="pruning supports YOLOv8, YOLO11 and YOLOv5u"):
        check_supported(model)


def test_removing_every_channel_is_refused():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 0, 1))
    with pytest.raises(InputError, match="removes every channel of layer 0"):
        check_no_empty_layer(conv, 0.99)
