import numpy as np

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.sets import labelled_split
from edge_deploy.pipeline.detect import make_anchors
from edge_deploy.pipeline.evaluate import coco_map, jitter_floor_text, read_yolo_labels, with_logit_jitter


def _oracle(val, shift_px: float = 0.0):
    """An 'inference' that emits the ground truth as raw maps: one anchor per object, exact box."""
    strides, imgsz, reg_max = [8, 16, 32], val.preprocess.imgsz, 16
    anchors, anchor_strides = make_anchors(imgsz, strides)
    by_tensor = {}
    for path, label in zip(val.files, val.labels):
        tensor, lb = load_tensor(path, val.preprocess)
        box_dist = np.full((4, reg_max, len(anchors)), -50.0, np.float32)
        cls_logit = np.full((4, len(anchors)), -50.0, np.float32)
        used = set()
        for c, x, y, w, h in read_yolo_labels(label, lb.width, lb.height):
            x0, y0 = x * lb.ratio + lb.pad_x + shift_px, y * lb.ratio + lb.pad_y
            x1, y1 = x0 + w * lb.ratio, y0 + h * lb.ratio
            # the first free anchor inside the box whose distances fit in reg_max bins
            for anchor in range(len(anchors)):
                if anchor in used:
                    continue
                ax, ay = anchors[anchor] * anchor_strides[anchor]
                s = anchor_strides[anchor]
                d = np.array([ax - x0, ay - y0, x1 - ax, y1 - ay]) / s
                if np.all(d >= 0) and np.all(d <= reg_max - 1):
                    break
            else:
                continue
            used.add(anchor)
            # Two adjacent bins with weights that average to d exactly.
            for side in range(4):
                low = int(np.floor(d[side]))
                high = min(low + 1, reg_max - 1)
                frac = d[side] - low

                box_dist[side, low, anchor] = np.log(max(1 - frac, 1e-9))
                box_dist[side, high, anchor] = np.log(max(frac, 1e-9)) if high != low else 0
            cls_logit[c, anchor] = 10.0
        by_tensor[tensor.tobytes()] = (box_dist.reshape(1, 4 * reg_max, -1), cls_logit[None])
    return lambda tensor: by_tensor[tensor.tobytes()]


def test_ground_truth_scores_one_and_shifted_boxes_score_less(small_shapes_yaml):
    val = labelled_split(small_shapes_yaml, "val", Preprocess(160))
    perfect = coco_map(val, _oracle(val), [8, 16, 32], 4)
    assert perfect["map50"] > 0.97 and perfect["map50_95"] > 0.95
    shifted = coco_map(val, _oracle(val, shift_px=3.0), [8, 16, 32], 4)
    assert shifted["map50_95"] < perfect["map50_95"] - 0.05


def test_scoring_several_images_at_once_gives_what_one_at_a_time_gives(exported, shapes_yaml, preprocess, model_info):
    """At one thread, onnxruntime scoring runs the images of a batch on a few threads at once (same numbers)."""
    from edge_deploy.calibration.onnxrt import ort_infer
    from edge_deploy.pipeline.evaluate import run_detections

    val = labelled_split(shapes_yaml, "val", preprocess).head(10)
    lanes = ort_infer(exported["onnx"].path, 1)
    assert lanes.images_at_once > 1 and lanes.lanes is not None
    assert ort_infer(exported["onnx"].path, 2).images_at_once == 1  # not scoring: one image per call
    one_by_one = ort_infer(exported["onnx"].path, 1)
    one_by_one.images_at_once = 1
    together = run_detections(val, lanes, model_info["strides"])
    alone = run_detections(val, one_by_one, model_info["strides"])
    assert all(np.array_equal(a, b) for a, b in zip(together.per_image, alone.per_image))


def test_logit_jitter_is_seeded_and_leaves_the_boxes_alone():
    def infer(batch):
        return np.ones((1, 64, 5000), np.float32), np.zeros((1, 2, 5000), np.float32)

    image = np.zeros((1, 3, 32, 32), np.float32)
    (boxes, first), (_, again) = with_logit_jitter(infer)(image), with_logit_jitter(infer)(image)
    assert np.array_equal(first, again) and np.array_equal(boxes, infer(image)[0])
    assert 0.009 < float(first.std()) < 0.011


def test_the_jitter_floor_says_when_a_budget_is_under_it():
    floor = {"sigma": 0.01, "drop_points": 0.59, "drop_interval": [0.0, 1.06]}
    under = jitter_floor_text(floor, 0.5)
    assert "jittered by N(0, 0.01)" in under and "loses 0.59 [0.00..1.06] on the selection photos" in under
    assert under.endswith("so this budget is finer than fidelity resolves on these photos")
    assert "finer" not in jitter_floor_text(floor, 1.0) and jitter_floor_text(None, 0.5) == ""
