"""COCO-style mAP with pycocotools, the evaluator the detection field reports with, and fidelity.

Accuracy scores a model against labels. Fidelity scores it against the FP32
model's own confident detections on the same images: what a user without
labels can measure, and what tells whether a lossy step changed the model's
answers. Both are mAP50-95 by the same evaluator; fidelity also gives the share
of the FP32 model's boxes found again.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.calibration.preprocess import load_tensor, read_image
from edge_deploy.calibration.sets import ImageSet, parse_label_file
from edge_deploy.pipeline.detect import postprocess
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.results import Accuracy, ImageSplit, ModelInfo

# Ultralytics' validation settings, so that numbers compare with `yolo val`: every box down to this confidence,
# NMS at this IoU, at most this many boxes per image (the evaluator counts as many as the decode keeps).
EVAL_CONF = 0.001
EVAL_IOU = 0.7
EVAL_MAX_DET = 300


def read_yolo_labels(path: Path, width: int, height: int) -> list[tuple[int, float, float, float, float]]:
    """(class, x, y, w, h) in pixels, top-left corner; a missing label file means no objects."""
    if not path.exists():
        return []
    return [(c, (x - w / 2) * width, (y - h / 2) * height, w * width, h * height)
            for c, x, y, w, h in parse_label_file(path)]


Boxes = list[tuple[int, float, float, float, float]]  # (class, x, y, w, h) in original pixels, top-left corner


@dataclass
class Detections:
    """What a model found on a split: per image (n, 6) x1, y1, x2, y2, score, class in original pixels."""

    sizes: list[tuple[int, int]]  # (width, height) per image
    per_image: list[np.ndarray]


def run_detections(split: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
                   strides: list[int], detect: Callable[[np.ndarray], np.ndarray] | None = None) -> Detections:
    """Runs `infer` (one preprocessed image -> raw head maps) over the split, decoded as evaluation decodes.

    `detect` replaces infer + the shared decode for models that decode in their own graph (other tools'
    exports): one preprocessed image -> detections (n, 6) in input pixels.
    """
    sizes, per_image = [], []
    for path in split.files:
        bgr = read_image(path)
        if bgr is None:
            raise InputError(f"not a readable image: {path}")
        sizes.append((bgr.shape[1], bgr.shape[0]))
        tensor, lb = load_tensor(path, split.preprocess)
        if detect is not None:
            dets = detect(tensor)
        else:
            box_dist, cls_logit = infer(tensor)
            dets = postprocess(box_dist[0], cls_logit[0], split.preprocess.imgsz, strides, conf=EVAL_CONF,
                               iou=EVAL_IOU, max_det=EVAL_MAX_DET)
        out = dets.astype(np.float32).copy()
        out[:, :4] = lb.to_original(dets[:, :4])
        per_image.append(out)
    return Detections(sizes, per_image)


def split_labels(split: ImageSet, sizes: list[tuple[int, int]]) -> list[Boxes]:
    return [read_yolo_labels(label, w, h) for label, (w, h) in zip(split.labels, sizes)]


def reference_boxes(detections: Detections, conf: float) -> list[Boxes]:
    """The FP32 model's confident detections as the boxes every other artifact must find again."""
    return [[(int(c), float(x1), float(y1), float(x2 - x1), float(y2 - y1))
             for x1, y1, x2, y2, score, c in dets if score >= conf] for dets in detections.per_image]


def map_against(ground_truth: list[Boxes], detections: Detections, num_classes: int) -> tuple[float, float, int]:
    """(mAP50, mAP50-95, objects) of the detections against per-image boxes, by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, found = [], [], []
    for image_id, ((w, h), boxes, dets) in enumerate(zip(detections.sizes, ground_truth, detections.per_image), 1):
        images.append({"id": image_id, "width": w, "height": h})
        for c, x, y, bw, bh in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        for x1, y1, x2, y2, score, cls in dets:
            found.append({"image_id": image_id, "category_id": int(cls),
                          "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    if not annotations:
        return 0.0, 0.0, 0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not found:
            return 0.0, 0.0, len(annotations)
        evaluator = COCOeval(gt, gt.loadRes(found), "bbox")
        # The decode keeps up to EVAL_MAX_DET boxes per image; COCO's default of 100 would drop some on dense scenes.
        evaluator.params.maxDets = [1, 10, EVAL_MAX_DET]
        evaluator.evaluate()
        evaluator.accumulate()
    # COCO's summarize() reads its AP at a fixed 100 detections; the same average is taken here at EVAL_MAX_DET:
    # precision over (IoU thresholds, recall points, classes), all areas, categories without objects left out.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    return _mean_ap(precision[0]), _mean_ap(precision), len(annotations)


def _mean_ap(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return round(float(valid.mean()), 4) if valid.size else 0.0


def matched_share(reference: list[Boxes], detections: Detections, conf: float, iou: float = 0.5) -> float | None:
    """Share of the reference boxes that a detection at `conf` or above finds again (same class, IoU >= iou)."""
    total = matched = 0
    for boxes, dets in zip(reference, detections.per_image):
        kept = dets[dets[:, 4] >= conf]
        used = np.zeros(len(kept), bool)
        for c, x, y, w, h in boxes:
            total += 1
            same = np.flatnonzero((kept[:, 5] == c) & ~used)
            if not same.size:
                continue
            cand = kept[same]
            ix = (np.minimum(cand[:, 2], x + w) - np.maximum(cand[:, 0], x)).clip(0)
            iy = (np.minimum(cand[:, 3], y + h) - np.maximum(cand[:, 1], y)).clip(0)
            inter = ix * iy
            union = w * h + (cand[:, 2] - cand[:, 0]) * (cand[:, 3] - cand[:, 1]) - inter
            overlap = inter / np.maximum(union, 1e-9)
            best = int(np.argmax(overlap))
            if overlap[best] >= iou:
                used[same[best]] = True
                matched += 1
    return round(matched / total, 4) if total else None


def coco_map(val: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
             strides: list[int], num_classes: int,
             detect: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Runs a model over a labelled split and scores it against its labels."""
    detections = run_detections(val, infer, strides, detect)
    labels = split_labels(val, detections.sizes)
    if not any(labels):
        raise InputError(f"validation split {val.source} has no labelled objects; mAP would be meaningless")
    map50, map50_95, objects = map_against(labels, detections, num_classes)
    return {"map50_95": map50_95, "map50": map50, "images": len(val.files), "objects": objects}


def score_split(split: ImageSet, detections: Detections, info: ModelInfo, reference: list[Boxes] | None,
                fidelity_conf: float) -> Accuracy:
    """Accuracy against the split's labels where it has them, else fidelity to the FP32 model's boxes."""
    if split.labels:
        map50, map50_95, objects = map_against(split_labels(split, detections.sizes), detections, len(info.names))
        return Accuracy(map50, map50_95, len(split.files), objects)
    if reference is None:
        raise InputError(f"{split.source} has no labels and no FP32 reference boxes to compare against")
    return fidelity(detections, info, reference, fidelity_conf)


def fidelity(detections: Detections, info: ModelInfo, reference: list[Boxes], conf: float) -> Accuracy:
    """How closely a model reproduces the FP32 model's confident boxes (on any split, labelled or not)."""
    map50, map50_95, objects = map_against(reference, detections, len(info.names))
    return Accuracy(map50, map50_95, len(detections.sizes), objects, "fidelity",
                    matched_share(reference, detections, conf))


def accuracy(split: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
             info: ModelInfo, reference: list[Boxes] | None = None, fidelity_conf: float = 0.25) -> Accuracy:
    return score_split(split, run_detections(split, infer, info.strides), info, reference, fidelity_conf)


def describe_split(images: ImageSet, role: str) -> ImageSplit:
    return ImageSplit(role, images.source, len(images.files), images.fingerprint)


def drop_points(reference: Accuracy, candidate: Accuracy) -> float:
    return round((reference.map50_95 - candidate.map50_95) * 100, 2)
