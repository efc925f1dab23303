"""Decode and NMS for YOLO raw head outputs, shared by every runtime.

Every exported graph ends at the head's raw maps: box distributions
(batch, 4*reg_max, anchors) and class logits (batch, classes, anchors). Keeping
the decode out of the graph means quantizers never put box coordinates
(0..imgsz) and class scores (0..1) under one 8-bit scale, and all runtimes are
judged by the same post-processing. Only numpy is used: this file ships in
release bundles as the reference post-processing.
"""

from __future__ import annotations

import numpy as np


def make_anchors(imgsz: int, strides: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres (anchors, 2) in grid units and the stride of each anchor, level by level, row-major."""
    points, anchor_strides = [], []
    for stride in strides:
        cells = imgsz // stride
        ys, xs = np.meshgrid(np.arange(cells) + 0.5, np.arange(cells) + 0.5, indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        anchor_strides.append(np.full(cells * cells, stride, dtype=np.float32))
    return np.concatenate(points).astype(np.float32), np.concatenate(anchor_strides)


def decode(box_dist: np.ndarray, cls_logit: np.ndarray, imgsz: int, strides: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw maps -> boxes (anchors, 4) xyxy in input pixels and scores (anchors, classes)."""
    reg_max = box_dist.shape[0] // 4
    anchors, anchor_strides = make_anchors(imgsz, strides)
    if anchors.shape[0] != box_dist.shape[1]:
        raise ValueError(f"model gives {box_dist.shape[1]} anchors; imgsz {imgsz} with strides {strides} "
                         f"implies {anchors.shape[0]}")
    logits = box_dist.reshape(4, reg_max, -1).astype(np.float32)
    logits = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    dist = np.tensordot(np.arange(reg_max, dtype=np.float32), prob, axes=(0, 1))  # (4, anchors)
    lt, rb = dist[:2].T, dist[2:].T
    boxes = np.concatenate([anchors - lt, anchors + rb], axis=1) * anchor_strides[:, None]
    scores = 1.0 / (1.0 + np.exp(-cls_logit.astype(np.float32).T))
    return boxes, scores


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of (n, 4) xyxy boxes (nms keeps its own, with the areas computed once)."""
    ix = (np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])).clip(0)
    iy = (np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])).clip(0)
    inter = ix * iy
    union = ((box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
             - inter)
    return inter / np.maximum(union, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Greedy NMS; returns kept indices, best score first, at most `limit` of them.

    Greedy NMS keeps boxes in score order, so stopping at `limit` keeps exactly the first `limit` a full pass
    would; at the evaluation's confidence of 0.001 a full pass went on through thousands of boxes it would drop.
    """
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep = []
    while order.size and (limit is None or len(keep) < limit):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (xx2 - xx1).clip(0) * (yy2 - yy1).clip(0)
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def select(boxes: np.ndarray, scores: np.ndarray, imgsz: int, conf: float = 0.25, iou: float = 0.7,
           max_det: int = 300, max_candidates: int = 30000) -> np.ndarray:
    """Decoded boxes (anchors, 4) xyxy and scores (anchors, classes) -> detections (n, 6) after NMS.

    Every (anchor, class) pair above `conf` is a candidate (multi-label), as
    evaluators expect; NMS is per class.
    """
    anchor_idx, cls_idx = np.nonzero(scores > conf)
    cand_scores = scores[anchor_idx, cls_idx]
    if cand_scores.size > max_candidates:
        top = np.argpartition(-cand_scores, max_candidates)[:max_candidates]
        anchor_idx, cls_idx, cand_scores = anchor_idx[top], cls_idx[top], cand_scores[top]
    cand_boxes = boxes[anchor_idx]
    # Shifting each class into its own region makes one NMS pass act per class.
    offset = cls_idx[:, None].astype(np.float32) * (float(imgsz) * 4)
    keep = nms(cand_boxes + offset, cand_scores, iou, max_det)
    return np.concatenate(
        [cand_boxes[keep], cand_scores[keep, None], cls_idx[keep, None].astype(np.float32)], axis=1
    ).astype(np.float32)


def postprocess(box_dist: np.ndarray, cls_logit: np.ndarray, imgsz: int, strides: list[int],
                conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
                max_candidates: int = 30000) -> np.ndarray:
    """One image's raw maps -> detections (n, 6): x1, y1, x2, y2, score, class, in input pixels."""
    boxes, scores = decode(box_dist, cls_logit, imgsz, strides)
    return select(boxes, scores, imgsz, conf, iou, max_det, max_candidates)
