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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.calibration.preprocess import load_tensor, read_image
from edge_deploy.calibration.sets import ImageSet, parse_label_file
from edge_deploy.pipeline.detect import box_iou, decode, select
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.results import (NEAR_TIE_IOU, NEAR_TIE_SCORE, UNSURE_FRACTION, UNSURE_NMS_MARGIN, Accuracy,
                                          FidelityReference, ImageSplit, ModelInfo)

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
    # The same decode kept by NMS at other IoU thresholds, when asked for (run_detections' `also_at_iou`).
    at_iou: dict[float, list[np.ndarray]] = field(default_factory=dict)
    # Per image and per kept box, the boxes (m, 4) xyxy in original pixels of the anchors NMS suppressed for it
    # with a score within NEAR_TIE_SCORE, when asked for (run_detections' `near_ties_from`); empty otherwise.
    near_ties: list[list[np.ndarray]] = field(default_factory=list)


def run_detections(split: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
                   strides: list[int], detect: Callable[[np.ndarray], np.ndarray] | None = None,
                   also_at_iou: tuple[float, ...] = (), near_ties_from: float | None = None) -> Detections:
    """Runs `infer` (one preprocessed image -> raw head maps) over the split, decoded as evaluation decodes.

    `detect` replaces infer + the shared decode for models that decode in their own graph (other tools'
    exports): one preprocessed image -> detections (n, 6) in input pixels. An `infer` whose `images_at_once`
    attribute is above 1 (a runtime that spreads a batch over processes or threads) is given that many images per
    call. `also_at_iou`: NMS IoU thresholds to keep the same decode at as well (Detections.at_iou; with `infer`).
    `near_ties_from`: for each kept box scored at least this, the anchors it nearly tied with (Detections.near_ties;
    with `infer`).
    """
    sizes, per_image = [], []
    at_iou: dict[float, list[np.ndarray]] = {iou: [] for iou in also_at_iou}
    near_ties: list[list[np.ndarray]] = []
    at_once = 1 if detect is not None else max(1, int(getattr(infer, "images_at_once", 1)))
    files = list(split.files)
    for start in range(0, len(files), at_once):
        tensors = []
        for path in files[start:start + at_once]:
            bgr = read_image(path)
            if bgr is None:
                raise InputError(f"not a readable image: {path}")
            sizes.append((bgr.shape[1], bgr.shape[0]))
            tensors.append(load_tensor(path, split.preprocess))
        if detect is not None:
            found = [{EVAL_IOU: detect(tensor)} for tensor, _ in tensors]
        else:
            box_dist, cls_logit = infer(np.concatenate([tensor for tensor, _ in tensors]))
            found = []
            for k in range(len(tensors)):
                boxes, scores = decode(box_dist[k], cls_logit[k], split.preprocess.imgsz, strides)
                found.append({iou: select(boxes, scores, split.preprocess.imgsz, EVAL_CONF, iou, EVAL_MAX_DET)
                              for iou in (EVAL_IOU, *also_at_iou)})
                if near_ties_from is not None:
                    ties = suppressed_near_ties(found[-1][EVAL_IOU], boxes, scores, near_ties_from)
                    near_ties.append([tensors[k][1].to_original(t) for t in ties])
        for kept, (_, lb) in zip(found, tensors):
            for iou, dets in kept.items():
                out = dets.astype(np.float32).copy()
                out[:, :4] = lb.to_original(dets[:, :4])
                (per_image if iou == EVAL_IOU else at_iou[iou]).append(out)
    return Detections(sizes, per_image, at_iou, near_ties)


def suppressed_near_ties(kept: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                         from_score: float) -> list[np.ndarray]:
    """Per kept detection (n, 6) scored at least `from_score`, the decoded boxes (m, 4) of the other anchors of its
    class that NMS suppressed for it (IoU at least EVAL_IOU) with a score within NEAR_TIE_SCORE of it; an empty
    (0, 4) array for every other detection."""
    ties = []
    for row in kept:
        if row[4] < from_score:
            ties.append(np.zeros((0, 4), np.float32))
            continue
        close = scores[:, int(row[5])] >= row[4] - NEAR_TIE_SCORE
        close &= box_iou(row[:4], boxes) >= EVAL_IOU
        close &= ~np.all(boxes == row[:4], axis=1)  # the kept anchor itself
        ties.append(boxes[close].astype(np.float32))
    return ties


def split_labels(split: ImageSet, sizes: list[tuple[int, int]]) -> list[Boxes]:
    return [read_yolo_labels(label, w, h) for label, (w, h) in zip(split.labels, sizes)]


# NMS's side of fidelity's unsure band (results.UNSURE_FRACTION is the score's): the IoU thresholds a reference box
# must survive NMS at, and may survive it at, to be required.
UNSURE_NMS_IOUS = (round(EVAL_IOU - UNSURE_NMS_MARGIN, 4), round(EVAL_IOU + UNSURE_NMS_MARGIN, 4))


def fidelity_reference(detections: Detections, conf: float) -> FidelityReference:
    """The FP32 model's detections as fidelity's reference: required at `conf` and above, ignored in the band.

    With the FP32 detections also kept at UNSURE_NMS_IOUS (run_detections' `also_at_iou`), the band takes in the
    boxes NMS is unsure of as well: required only if NMS keeps them at the stricter IoU, ignored if it keeps them at
    the looser one and not the stricter.
    """
    strict, loose = (detections.at_iou.get(iou) for iou in UNSURE_NMS_IOUS)
    required, unsure, near_ties = [], [], []
    for k, dets in enumerate(detections.per_image):
        kept_strictly = None if strict is None else {row.tobytes() for row in strict[k]}
        sure_rows = [j for j, row in enumerate(dets)
                     if row[4] >= conf and (kept_strictly is None or row.tobytes() in kept_strictly)]
        sure = [dets[j] for j in sure_rows]
        if detections.near_ties:
            near_ties.append([[(float(x1), float(y1), float(x2 - x1), float(y2 - y1))
                               for x1, y1, x2, y2 in detections.near_ties[k][j]] for j in sure_rows])
        candidates = dets if loose is None else np.concatenate([dets, loose[k]])
        unsure_rows, seen = [], {row.tobytes() for row in sure}
        for row in candidates:
            if row[4] >= conf * UNSURE_FRACTION and row.tobytes() not in seen:
                seen.add(row.tobytes())
                unsure_rows.append(row)
        required.append(_as_boxes(sure))
        unsure.append(_as_boxes(unsure_rows))
    return FidelityReference(required, unsure, conf, near_ties)


def _as_boxes(rows) -> Boxes:
    return [(int(c), float(x1), float(y1), float(x2 - x1), float(y2 - y1)) for x1, y1, x2, y2, _, c in rows]


def map_against(ground_truth: list[Boxes], detections: Detections, num_classes: int) -> tuple[float, float, int]:
    """(mAP50, mAP50-95, objects) of the detections against per-image boxes, by pycocotools."""
    scored = score_images(ground_truth, detections, num_classes)
    return scored.map50, scored.map50_95, scored.objects


@dataclass(frozen=True)
class FalsePositives:
    """One category at one IoU threshold, in pycocotools' ranking: the image of each true positive, and the false
    positives ranked above some true positive as (image, count) entries ordered by the first true positive they
    rank above; `upto[j]` entries rank above true positive j."""

    tp_images: np.ndarray
    fp_images: np.ndarray
    fp_counts: np.ndarray
    upto: np.ndarray

    @classmethod
    def none(cls) -> "FalsePositives":
        return cls(np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.zeros(0, int))


@dataclass
class ImageScores:
    """pycocotools' mAP of a model on a split, and what re-weighting its images needs (see `resampled_map`).

    For each category and IoU threshold: the image of each true positive, in pycocotools' score order, and per
    true positive how many false positives of each image rank above it. Precision at a true positive is all
    pycocotools' interpolated AP reads (a false positive only lowers precision until the next true positive), so
    these tables give the AP of any multiset of the images, in matrix products instead of one COCOeval each.
    """

    map50: float
    map50_95: float
    objects: int
    images: int
    gt_counts: np.ndarray  # (categories, images): objects pycocotools does not ignore
    tables: list  # per category, per IoU threshold: FalsePositives


def score_images(ground_truth: list[Boxes], detections: Detections, num_classes: int,
                 ignored: list[Boxes] | None = None) -> ImageScores:
    """pycocotools' evaluation of the detections against per-image boxes, kept per image for resampling.

    `ignored` boxes are COCO crowd regions: a detection inside one is neither a true nor a false positive.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval, Params

    n_images = len(detections.sizes)
    images, annotations, found = [], [], []
    for image_id, ((w, h), boxes, dets) in enumerate(zip(detections.sizes, ground_truth, detections.per_image), 1):
        images.append({"id": image_id, "width": w, "height": h})
        for c, x, y, bw, bh in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        for c, x, y, bw, bh in (ignored[image_id - 1] if ignored else ()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 1})
        for x1, y1, x2, y2, score, cls in dets:
            found.append({"image_id": image_id, "category_id": int(cls),
                          "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    gt_counts = np.zeros((num_classes, n_images))
    for image_id, boxes in enumerate(ground_truth):
        for c, *_ in boxes:
            gt_counts[int(c), image_id] += 1
    empty = [[FalsePositives.none()] * len(Params(iouType="bbox").iouThrs)] * num_classes
    if not annotations:
        return ImageScores(0.0, 0.0, 0, n_images, gt_counts, empty)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not found:
            return ImageScores(0.0, 0.0, len(annotations), n_images, gt_counts, empty)
        evaluator = COCOeval(gt, gt.loadRes(found), "bbox")
        # The decode keeps up to EVAL_MAX_DET boxes per image; COCO's default of 100 would drop some on dense scenes.
        # Only the figure reported is evaluated: all object sizes (COCO's first area range), EVAL_MAX_DET boxes.
        evaluator.params.maxDets = [EVAL_MAX_DET]
        evaluator.params.areaRng, evaluator.params.areaRngLbl = evaluator.params.areaRng[:1], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    # COCO's summarize() reads its AP at a fixed 100 detections; the same average is taken here at EVAL_MAX_DET:
    # precision over (IoU thresholds, recall points, classes), all areas, categories without objects left out.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    return ImageScores(_mean_ap(precision[0]), _mean_ap(precision), len(annotations), n_images,
                       _counted_gt(evaluator, num_classes, n_images), _match_tables(evaluator, n_images))


def _mean_ap(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return round(float(valid.mean()), 4) if valid.size else 0.0


def _counted_gt(evaluator, num_classes: int, n_images: int) -> np.ndarray:
    """Objects per (category, image) that pycocotools counts (none ignored: no crowd boxes, every size)."""
    counts = np.zeros((num_classes, n_images))
    for k in range(num_classes):
        for i, e in enumerate(evaluator.evalImgs[k * n_images:(k + 1) * n_images]):
            if e is not None:
                counts[k, i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
    return counts


def _match_tables(evaluator, n_images: int) -> list:
    """Per category and IoU threshold, the true positives' images and the false positives ranked above each."""
    tables = []
    for k in range(len(evaluator.params.catIds)):
        per_image = [(i, e) for i, e in enumerate(evaluator.evalImgs[k * n_images:(k + 1) * n_images])
                     if e is not None]
        thresholds = len(evaluator.params.iouThrs)
        if not per_image:
            tables.append([FalsePositives.none()] * thresholds)
            continue
        # Concatenated in image order and sorted stably by score, exactly as COCOeval.accumulate does, so that
        # ties rank the same.
        scores = np.concatenate([e["dtScores"][:EVAL_MAX_DET] for _, e in per_image])
        owner = np.concatenate([np.full(len(e["dtScores"][:EVAL_MAX_DET]), i) for i, e in per_image])
        order = np.argsort(-scores, kind="mergesort")
        owner = owner[order]
        matched = np.concatenate([e["dtMatches"][:, :EVAL_MAX_DET] for _, e in per_image], axis=1)[:, order] > 0
        ignored = np.concatenate([e["dtIgnore"][:, :EVAL_MAX_DET] for _, e in per_image], axis=1)[:, order] > 0
        rows = []
        for t in range(thresholds):
            tp = matched[t] & ~ignored[t]
            fp = ~matched[t] & ~ignored[t]
            tp_before = np.cumsum(tp)  # true positives ranked at or above each detection
            n_tp = int(tp_before[-1]) if tp.size else 0
            # A false positive with j true positives above it ranks above true positives j, j+1, ... (0-based);
            # those below the last true positive never lower a precision that counts. Counted per (j, image).
            keys = tp_before[fp] * n_images + owner[fp]
            keys, counts = np.unique(keys[tp_before[fp] < n_tp], return_counts=True)
            segment, image = np.divmod(keys, n_images)
            rows.append(FalsePositives(owner[tp], image, counts.astype(float),
                                       np.searchsorted(segment, np.arange(n_tp), side="right")))
        tables.append(rows)
    return tables


def resampled_map(scores: ImageScores, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mAP50, mAP50-95) per row of `weights` (rows, images): how many times each image is counted.

    A row of ones gives pycocotools' own figure; a bootstrap row (counts summing to the number of images) the
    mAP of that resample, as if the images had been repeated that often and scored by COCOeval (exactly, but for
    the order of equal scores within one repeated image, which pycocotools leaves to where the copies sit).
    """
    from pycocotools.cocoeval import Params

    recall_points = Params(iouType="bbox").recThrs
    weights = np.asarray(weights, dtype=float)
    rows = weights.shape[0]
    total = np.zeros((rows, len(scores.tables[0]) if scores.tables else 0))
    counted = np.zeros(rows)
    for k, per_threshold in enumerate(scores.tables):
        objects = weights @ scores.gt_counts[k]
        present = objects > 0
        counted += present
        for t, table in enumerate(per_threshold):
            n_tp = len(table.tp_images)
            if not n_tp:
                continue
            tp = np.cumsum(weights[:, table.tp_images], axis=1)
            above = np.cumsum(weights[:, table.fp_images] * table.fp_counts, axis=1)
            fp = np.concatenate([np.zeros((rows, 1)), above], axis=1)[:, table.upto]
            with np.errstate(divide="ignore", invalid="ignore"):
                recall = tp / objects[:, None]
            precision = tp / (fp + tp + np.spacing(1))
            # pycocotools' interpolated precision at recall point r is the best precision at any true positive
            # whose recall reaches r: the best from the first such true positive on (recall only grows along the
            # ranking). A true positive of an image drawn 0 times repeats its predecessor's recall with no better
            # precision, so it changes nothing.
            best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            reached = _points_reached(recall_points, np.where(present[:, None], recall, -1.0))
            # Per row, the first true positive reaching point r comes after those that reach no further than r:
            # counted for every row at once from row-offset integer keys.
            stride = len(recall_points) + 1
            keys = (reached + stride * np.arange(rows)[:, None]).ravel()
            first = np.cumsum(np.bincount(keys, minlength=rows * stride).reshape(rows, stride), axis=1)[:, :-1]
            interpolated = np.where(first < n_tp,
                                    np.take_along_axis(best_after, np.minimum(first, n_tp - 1), axis=1),
                                    0.0)
            total[:, t] += interpolated.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_threshold = total / (counted[:, None] * len(recall_points))
    per_threshold = np.where(counted[:, None] > 0, per_threshold, 0.0)
    return per_threshold[:, 0], per_threshold.mean(axis=1)


def _points_reached(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many of the evenly spaced `points` (0..1) are <= each value: searchsorted(side="right"), computed
    arithmetically and corrected by one step where rounding put it off, so it compares exactly."""
    last = len(points) - 1
    count = np.clip(np.floor(values * last).astype(int) + 1, 0, len(points))
    count -= (count > 0) & (points[np.clip(count - 1, 0, last)] > values)
    count += (count <= last) & (points[np.clip(count, 0, last)] <= values)
    return count


def found_again(reference: list[Boxes], detections: Detections, conf: float,
                iou: float = 0.5) -> tuple[float | None, float | None]:
    """(share, shift): the share of the reference boxes that a detection at `conf` or above finds again (same class,
    IoU >= iou), and how far the found boxes' sides are from the reference's, on average, in image pixels.

    The shift says in pixels what fidelity mAP50-95 says in points: on the real-image YOLOv8s-size model, INT8's
    found boxes sat 0.11-0.14 px from FP32's on 43 px boxes on average (benchmarks/fidelity_floor.py). That alone
    keeps IoU near 0.99; the points INT8 loses came from the few boxes a neighbouring anchor replaced, 2-10 px off
    (a one-off check).
    """
    total = matched = 0
    shifts = []
    for boxes, dets in zip(reference, detections.per_image):
        kept = dets[dets[:, 4] >= conf]
        used = np.zeros(len(kept), bool)
        for c, x, y, w, h in boxes:
            total += 1
            same = np.flatnonzero((kept[:, 5] == c) & ~used)
            if not same.size:
                continue
            cand = kept[same]
            box = np.array((x, y, x + w, y + h))
            overlap = box_iou(box, cand[:, :4])
            best = int(np.argmax(overlap))
            if overlap[best] >= iou:
                used[same[best]] = True
                matched += 1
                shifts.append(np.abs(cand[best, :4] - box))
    share = round(matched / total, 4) if total else None
    return share, (round(float(np.mean(shifts)), 4) if shifts else None)


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


def score_split(split: ImageSet, detections: Detections, info: ModelInfo,
                reference: FidelityReference | None) -> Accuracy:
    """Accuracy against the split's labels where it has them, else fidelity to the FP32 model's boxes."""
    if split.labels:
        return measured(score_images(split_labels(split, detections.sizes), detections, len(info.names)))
    if reference is None:
        raise InputError(f"{split.source} has no labels and no FP32 reference boxes to compare against")
    return fidelity(detections, info, reference)


def fidelity(detections: Detections, info: ModelInfo, reference: FidelityReference) -> Accuracy:
    """How closely a model reproduces the FP32 model's confident boxes (on any split, labelled or not). The boxes
    found again and their shift are counted as detected; mAP counts a near-tie as the box it nearly tied with."""
    scored, near_tie_count = resolve_near_ties(detections, reference)
    return measured(score_images(reference.boxes, scored, len(info.names), reference.unsure), "fidelity",
                    *found_again(reference.boxes, detections, reference.conf),
                    near_tie_boxes=near_tie_count if reference.near_ties else None)


def resolve_near_ties(detections: Detections, reference: FidelityReference) -> tuple[Detections, int]:
    """The detections with each one that is a missing required box's near-tie (IoU at least NEAR_TIE_IOU with one of
    its near-tie boxes, and more than with the box itself) moved onto that box; and how many were moved. A required
    box some detection already is (IoU at least NEAR_TIE_IOU, and no less than with any of its near-ties) takes
    none: a second box there is an extra one, not FP32's other choice."""
    if not reference.near_ties:
        return detections, 0
    moved_count, per_image = 0, []
    # strict: a reference for other images must fail loudly, not score a prefix of them.
    for dets, boxes, ties in zip(detections.per_image, reference.boxes, reference.near_ties, strict=True):
        owners = [j for j, alternatives in enumerate(ties) for _ in alternatives]
        if not owners:
            per_image.append(dets)
            continue
        owner = np.asarray(owners)
        alternatives = np.array([(x, y, x + w, y + h) for image_ties in ties for x, y, w, h in image_ties],
                                np.float32)
        required = np.array([(x, y, x + w, y + h) for _, x, y, w, h in boxes], np.float32)
        classes = np.array([c for c, *_ in boxes])
        present = set()
        for j in set(owners):
            same = dets[dets[:, 5] == classes[j]]
            if not len(same):
                continue
            on_box = box_iou(required[j], same[:, :4])
            on_ties = np.max([box_iou(tie, same[:, :4]) for tie in alternatives[owner == j]], axis=0)
            if np.any((on_box >= NEAR_TIE_IOU) & (on_box >= on_ties)):
                present.add(j)
        dets = dets.copy()
        for row in dets:  # best score first, as NMS keeps them
            overlap = np.where((classes[owner] == int(row[5])) & ~np.isin(owner, list(present)),
                               box_iou(row[:4], alternatives), 0.0)
            best = int(np.argmax(overlap))
            target = owner[best]
            if overlap[best] >= NEAR_TIE_IOU and overlap[best] > box_iou(row[:4], required[target][None])[0]:
                row[:4] = required[target]
                present.add(int(target))
                moved_count += 1
        per_image.append(dets)
    return Detections(detections.sizes, per_image, detections.at_iou), moved_count


def accuracy(split: ImageSet, infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
             info: ModelInfo, reference: FidelityReference | None = None) -> Accuracy:
    return score_split(split, run_detections(split, infer, info.strides), info, reference)


# Uncertainty: how far a figure would move if the split were drawn again from the same kind of images. Images,
# not boxes, are resampled: boxes of one image share its scene and are not independent. With 1000 resamples the
# 2.5 % and 97.5 % percentiles moved by about a twentieth of the interval's width from one seed to another (the
# embedded model's INT8 drop on its 200 report images: [0.01, 0.76], [0.01, 0.79], [0.02, 0.78]). The seed makes
# every build's intervals reproducible, and the resamples depend only on the number of images, so every model
# scored on one split sees the same ones and their difference is a paired bootstrap.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20240611
INTERVAL_LEVEL = 0.95



def bootstrap_weights(images: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, images): how often each image is drawn in each resample (with replacement, `images` draws)."""
    drawn = np.random.default_rng(seed).integers(0, images, size=(resamples, images))
    flat = (drawn + images * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * images).reshape(resamples, images)


def bootstrap_settings(scored: Accuracy | None = None) -> dict:
    """What the bootstrap was; given an Accuracy, also how many resamples drew an object when some did not."""
    settings = {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": INTERVAL_LEVEL, "over": "images"}
    if scored is not None and scored.bootstrap is not None and len(scored.bootstrap) < BOOTSTRAP_RESAMPLES:
        settings["drawing_an_object"] = len(scored.bootstrap)
    return settings


def percentile_interval(samples: np.ndarray, digits: int) -> list[float]:
    tail = (1 - INTERVAL_LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [round(float(low), digits), round(float(high), digits)]


def measured(scores: ImageScores, kind: str = "accuracy", matched_boxes: float | None = None,
             box_shift_px: float | None = None, near_tie_boxes: int | None = None) -> Accuracy:
    """An Accuracy with its bootstrap: the interval of mAP50-95 and the per-resample values.

    A resample that draws no object has no mAP (pycocotools' -1, which the point estimate shows as 0), so it is left
    out: counted as 0, it dragged the interval of a model against its own boxes down to 0 where most images have
    none. Which resamples draw an object depends on the split's objects alone, so every model scored on the split
    leaves out the same ones and drops stay paired.
    """
    weights = bootstrap_weights(scores.images)
    draws_an_object = weights @ scores.gt_counts.sum(axis=0) > 0
    _, samples = resampled_map(scores, weights[draws_an_object] if draws_an_object.any() else weights)
    # Six decimals: far below the 0.01-point resolution drops are shown with, and a third of the JSON.
    samples = np.round(samples, 6)
    return Accuracy(scores.map50, scores.map50_95, scores.images, scores.objects, kind, matched_boxes,
                    percentile_interval(samples, 4), samples.tolist(), box_shift_px, near_tie_boxes)


class Drop(float):
    """A drop in mAP50-95 points (reference minus candidate) that carries its paired bootstrap.

    It is a float so that everything that wants only the point estimate (comparing with a budget, formatting,
    JSON) keeps working; `samples` is the drop on each bootstrap resample of the images, the same resamples for
    both models, or None when either figure came without a bootstrap.
    """

    samples: np.ndarray | None

    def __new__(cls, points: float, samples: np.ndarray | None = None):
        drop = super().__new__(cls, points)
        drop.samples = samples
        return drop

    @property
    def interval(self) -> list[float] | None:
        return None if self.samples is None else percentile_interval(self.samples, 2)


def drop_points(reference: Accuracy, candidate: Accuracy) -> Drop:
    samples = None
    # Paired only on the same images scored against the same boxes (labels or FP32's), which keeps the same
    # resamples for both.
    if reference.bootstrap is not None and candidate.bootstrap is not None and reference.kind == candidate.kind \
            and len(reference.bootstrap) == len(candidate.bootstrap) and reference.images == candidate.images:
        samples = (np.asarray(reference.bootstrap) - np.asarray(candidate.bootstrap)) * 100
    return Drop(round((reference.map50_95 - candidate.map50_95) * 100, 2), samples)


# The jitter floor's noise on the class logits: under a third of an 8-bit model's own class-logit error on the
# real-image models measured (root mean square where FP32 scores above 0.05: onnxruntime INT8 0.035 and ncnn INT8
# 0.062 on the YOLOv8s-size model, 0.042 and 0.051 on the fixture YOLOv8n; benchmarks/fidelity_floor.py): each of
# those INT8 models moved the logits three to six times as much as this does.
JITTER_SIGMA = 0.01
JITTER_SEED = 0


def with_logit_jitter(infer: Callable, sigma: float = JITTER_SIGMA, seed: int = JITTER_SEED) -> Callable:
    """`infer` with seeded Gaussian noise added to its class logits (a new generator per call of this function, so
    the same split in the same batches gets the same noise)."""
    rng = np.random.default_rng(seed)

    def jittered(batch: np.ndarray):
        box_dist, cls_logit = infer(batch)
        return box_dist, cls_logit + rng.normal(0, sigma, cls_logit.shape).astype(cls_logit.dtype)

    jittered.images_at_once = getattr(infer, "images_at_once", 1)
    return jittered


def jitter_floor(split: ImageSet, infer: Callable, info: ModelInfo, scored: Accuracy,
                 reference: FidelityReference) -> dict:
    """What the FP32 model `infer` loses in fidelity on `split` (against its own detections, `scored`) when its class
    logits get JITTER_SIGMA of noise: where near-tied boxes trade places at NMS, fidelity cannot tell a change of an
    8-bit model's size from chance, and a budget under this is finer than it resolves on these images."""
    drop = drop_points(scored, accuracy(split, with_logit_jitter(infer), info, reference))
    return {"sigma": JITTER_SIGMA, "drop_points": float(drop), "drop_interval": drop.interval}


def jitter_floor_text(floor: dict | None, budget: float) -> str:
    """The floor for a gate's message, '' without one."""
    if floor is None:
        return ""
    interval = floor["drop_interval"]
    interval_text = f" [{interval[0]:.2f}..{interval[1]:.2f}]" if interval else ""
    text = (f"; FP32 itself, its class logits jittered by N(0, {floor['sigma']:g}) (a third or less of the INT8 "
            f"error measured on real models), loses {floor['drop_points']:.2f}{interval_text} on the selection photos")
    if floor["drop_points"] >= budget:
        text += ", so this budget is finer than fidelity resolves on these photos"
    return text


def describe_split(images: ImageSet, role: str) -> ImageSplit:
    return ImageSplit(role, images.source, len(images.files), images.fingerprint)
