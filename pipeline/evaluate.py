"""COCO-style mAP with pycocotools, the evaluator the detection field reports with."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.calibration.preprocess import load_tensor, read_image
from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.detect import postprocess
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.results import Accuracy, ImageSplit, ModelInfo

# Ultralytics' validation settings, so that numbers compare with `yolo val`.
EVAL_CONF = 0.001
EVAL_IOU = 0.7


def read_yolo_labels(path: Path, width: int, height: int) -> list[tuple[int, float, float, float, float]]:
    """(class, x, y, w, h) in pixels, top-left corner."""
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 5:
            raise InputError(f"{path}:{number}: expected 'class x y w h', got {line.strip()!r}")
        c, x, y, w, h = int(fields[0]), *map(float, fields[1:])
        out.append((c, (x - w / 2) * width, (y - h / 2) * height, w * width, h * height))
    return out


def coco_map(val: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
             strides: list[int], num_classes: int,
             detect: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Runs `infer` (one preprocessed image -> raw head maps) over the split and scores it.

    `detect` replaces infer + the shared decode for models that decode in their own graph (other tools'
    exports): one preprocessed image -> detections (n, 6) in input pixels.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for image_id, (path, label) in enumerate(zip(val.files, val.labels), 1):
        bgr = read_image(path)
        if bgr is None:
            raise InputError(f"not a readable image: {path}")
        h, w = bgr.shape[:2]
        images.append({"id": image_id, "width": w, "height": h})
        for c, x, y, bw, bh in read_yolo_labels(label, w, h):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        tensor, lb = load_tensor(path, val.preprocess)
        if detect is not None:
            dets = detect(tensor)
        else:
            box_dist, cls_logit = infer(tensor)
            dets = postprocess(box_dist[0], cls_logit[0], val.preprocess.imgsz, strides,
                               conf=EVAL_CONF, iou=EVAL_IOU)
        boxes = lb.to_original(dets[:, :4])
        for (x1, y1, x2, y2), score, cls in zip(boxes, dets[:, 4], dets[:, 5]):
            detections.append({"image_id": image_id, "category_id": int(cls),
                               "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                               "score": float(score)})
    if not annotations:
        raise InputError(f"validation split {val.source} has no labelled objects; mAP would be meaningless")
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i} for i in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections:
            return {"map50": 0.0, "map50_95": 0.0, "images": len(images), "objects": len(annotations)}
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map50_95": round(float(evaluator.stats[0]), 4), "map50": round(float(evaluator.stats[1]), 4),
            "images": len(images), "objects": len(annotations)}


def accuracy(split: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
             info: ModelInfo) -> Accuracy:
    result = coco_map(split, infer, info.strides, len(info.names))
    return Accuracy(result["map50"], result["map50_95"], result["images"], result["objects"])


def describe_split(images: ImageSet, role: str) -> ImageSplit:
    return ImageSplit(role, images.source, len(images.files), images.fingerprint)


def drop_points(reference: Accuracy, candidate: Accuracy) -> float:
    return round((reference.map50_95 - candidate.map50_95) * 100, 2)
