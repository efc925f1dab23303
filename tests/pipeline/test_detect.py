import numpy as np
import pytest

from edge_deploy.pipeline.detect import decode, make_anchors, nms, postprocess
from tests.conftest import EMBEDDED_MODEL


def test_decode_matches_ultralytics_head(deploy_home):
    """Our numpy decode of the raw maps equals what Ultralytics' own Detect head computes."""
    import torch

    checkpoint = torch.load(EMBEDDED_MODEL, map_location="cpu", weights_only=False)
    model = checkpoint["model"].float().eval()
    head = model.model[-1]
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded, raw = model(x)
    strides = [int(s) for s in head.stride]
    for i in range(2):
        boxes, scores = decode(raw["boxes"][i].numpy(), raw["scores"][i].numpy(), 160, strides)
        xywh = decoded[i, :4].T.numpy()
        theirs = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        assert np.allclose(boxes, theirs, atol=1e-3)
        assert np.allclose(scores, decoded[i, 4:].T.numpy(), atol=1e-5)


def test_anchor_count_must_fit_the_input_size():
    with pytest.raises(ValueError, match="anchors"):
        decode(np.zeros((64, 10)), np.zeros((4, 10)), 160, [8, 16, 32])
    assert make_anchors(64, [8, 16, 32])[0].shape == (64 + 16 + 4, 2)


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.5, 0.9, 0.4], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2]


def test_postprocess_is_per_class_and_multi_label():
    reg_max = 16
    strides = [8, 16, 32]
    anchors = make_anchors(64, strides)[0].shape[0]
    box_dist = np.zeros((4 * reg_max, anchors), np.float32)
    cls_logit = np.full((3, anchors), -20.0, np.float32)
    cls_logit[0, 5] = cls_logit[2, 5] = 5.0  # one anchor, two classes
    cls_logit[1, 6] = 3.0  # the neighbouring anchor overlaps it, but is another class
    dets = postprocess(box_dist, cls_logit, 64, strides, conf=0.25, iou=0.5)
    assert sorted(dets[:, 5].tolist()) == [0.0, 1.0, 2.0]
    assert np.all((dets[:, 4] > 0) & (dets[:, 4] <= 1))


def test_nms_stopped_at_a_limit_keeps_what_a_full_pass_keeps_first():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 600, (3000, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 60, (3000, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 3000).astype(np.float32)
    full = nms(boxes, scores, 0.7)
    assert len(full) > 300
    assert np.array_equal(nms(boxes, scores, 0.7, 300), full[:300])
