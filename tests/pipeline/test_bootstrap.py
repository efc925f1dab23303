"""The bootstrap over images: the re-weighted mAP is pycocotools' own, and its intervals behave."""

import contextlib
import io

import numpy as np
import pytest

from edge_deploy.pipeline import evaluate
from edge_deploy.pipeline.evaluate import (Detections, bootstrap_weights, drop_points, measured, resampled_map,
                                           score_images)
from edge_deploy.pipeline.stages.verify import MAX_PLAUSIBLE_GAIN_POINTS, WIDE_INTERVAL_BUDGETS, judge

CLASSES = 4


def scene(seed: int, images: int, miss: float = 0.1, jitter: float = 3.0, false_per_image: int = 6,
          digits: int | None = 2):
    """Labels and a detector's answers on `images` images: most objects found with jittered boxes, some missed,
    a few false boxes, scores that partly agree with quality (rounded to `digits`: exact ties, which the ranking
    must order as pycocotools does)."""
    def rounded(value: float) -> float:
        return round(value, digits) if digits is not None else value

    rng = np.random.default_rng(seed)
    labels, per_image, sizes = [], [], []
    for i in range(images):
        w, h = 320, 240
        sizes.append((w, h))
        boxes, dets = [], []
        # Class 3 never appears in the labels: pycocotools leaves such a category out of the mean.
        for _ in range(rng.integers(0, 6)):
            c = int(rng.integers(0, CLASSES - 1))
            bw, bh = rng.uniform(10, 80, 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes.append((c, x, y, bw, bh))
            if rng.random() > miss:
                dx, dy, dw, dh = rng.normal(0, jitter, 4)
                score = rounded(float(np.clip(rng.uniform(0.3, 1.0) - abs(dx) / 50, 0.01, 1)))
                dets.append([x + dx, y + dy, x + dx + bw + dw, y + dy + bh + dh, score, c])
        for _ in range(rng.integers(0, false_per_image + 1)):
            x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            dets.append([x, y, x + 20, y + 20, rounded(float(rng.uniform(0.001, 0.6))), int(rng.integers(0, CLASSES))])
        labels.append(boxes)
        per_image.append(np.array(dets, np.float32).reshape(-1, 6))
    return labels, Detections(sizes, per_image)


def plain_pycocotools(labels, detections, ignored=None) -> tuple[float, float]:
    """COCOeval as anyone would call it (every area range, maxDets 1/10/300), read at all areas, 300 boxes;
    `ignored` boxes go in as crowd regions."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, found = [], [], []
    for image_id, ((w, h), dets) in enumerate(zip(detections.sizes, detections.per_image), 1):
        images.append({"id": image_id, "width": w, "height": h})
        for crowd, boxes in ((0, labels[image_id - 1]), (1, ignored[image_id - 1] if ignored else ())):
            for c, x, y, bw, bh in boxes:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                    "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": crowd})
        for x1, y1, x2, y2, score, c in dets:
            found.append({"image_id": image_id, "category_id": int(c), "score": float(score),
                          "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        run = COCOeval(gt, gt.loadRes(found), "bbox")
        run.params.maxDets = [1, 10, 300]
        run.evaluate()
        run.accumulate()
    precision = run.eval["precision"][:, :, :, 0, -1]
    return float(precision[0][precision[0] > -1].mean()), float(precision[precision > -1].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reweighting_reproduces_pycocotools_on_the_full_set(seed):
    labels, detections = scene(seed, 40)
    expected = plain_pycocotools(labels, detections)
    scores = score_images(labels, detections, CLASSES)
    map50, map50_95 = resampled_map(scores, np.ones((1, 40)))
    assert map50[0] == pytest.approx(expected[0], abs=1e-12) and map50_95[0] == pytest.approx(expected[1], abs=1e-12)
    assert (scores.map50, scores.map50_95) == (round(expected[0], 4), round(expected[1], 4))


def test_a_resample_scores_as_pycocotools_scores_the_images_repeated():
    # Untied scores: with two equal scores in one image, pycocotools' order of the copies depends on where the
    # repeated images sit, an arbitrary choice; a model's float scores rarely tie.
    labels, detections = scene(3, 30, digits=None)
    scores = score_images(labels, detections, CLASSES)
    weights = bootstrap_weights(30)
    for row in weights[:4]:
        drawn = np.repeat(np.arange(30), row)  # each image as often as the resample draws it, in order
        repeated = Detections([detections.sizes[i] for i in drawn], [detections.per_image[i] for i in drawn])
        expected = plain_pycocotools([labels[i] for i in drawn], repeated)
        map50, map50_95 = resampled_map(scores, row[None, :])
        assert map50[0] == pytest.approx(expected[0], abs=1e-12)
        assert map50_95[0] == pytest.approx(expected[1], abs=1e-12)


def test_interval_contains_the_point_estimate_and_is_reproducible():
    labels, detections = scene(4, 60)
    first = measured(score_images(labels, detections, CLASSES))
    again = measured(score_images(labels, detections, CLASSES))
    low, high = first.map50_95_interval
    assert low < first.map50_95 < high
    assert first.bootstrap == again.bootstrap and first.map50_95_interval == again.map50_95_interval
    assert len(first.bootstrap) == evaluate.BOOTSTRAP_RESAMPLES
    assert np.array_equal(bootstrap_weights(60), bootstrap_weights(60))
    assert not np.array_equal(bootstrap_weights(60), bootstrap_weights(60, seed=evaluate.BOOTSTRAP_SEED + 1))
    assert (bootstrap_weights(60).sum(axis=1) == 60).all()


def test_drop_interval_is_paired_and_contains_the_drop():
    labels, reference = scene(5, 80)
    _, worse = scene(5, 80, jitter=6.0)  # the same scenes found with looser boxes
    ref = measured(score_images(labels, reference, CLASSES))
    cand = measured(score_images(labels, worse, CLASSES))
    drop = drop_points(ref, cand)
    low, high = drop.interval
    assert low <= drop <= high and drop > 0
    # Pairing: the drop's interval is narrower than either model's own, since both see the same resamples.
    assert high - low < (ref.map50_95_interval[1] - ref.map50_95_interval[0]) * 100


def test_identical_models_give_a_zero_interval_and_no_flag():
    labels, detections = scene(6, 20)
    one = measured(score_images(labels, detections, CLASSES))
    other = measured(score_images(labels, Detections(detections.sizes, [d.copy() for d in detections.per_image]),
                                  CLASSES))
    drop = drop_points(one, other)
    assert drop == 0.0 and drop.interval == [0.0, 0.0]
    assert judge(drop, 0.5, "INT8", lossy=True) == []


def test_resamples_that_draw_no_object_are_left_out_for_every_model_alike():
    """Two of ten images hold every object: about one resample in nine draws neither, and its mAP is undefined."""
    labels, detections = scene(8, 10)
    kept = [i for i, boxes in enumerate(labels) if boxes][:2]
    labels = [boxes if i in kept else [] for i, boxes in enumerate(labels)]
    itself = [np.array([[x, y, x + w, y + h, 0.9, c] for c, x, y, w, h in boxes], np.float32).reshape(-1, 6)
              for boxes in labels]
    perfect = measured(score_images(labels, Detections(detections.sizes, itself), CLASSES))
    assert perfect.map50_95 == 1.0 and perfect.map50_95_interval == [1.0, 1.0]
    draws_one = int((bootstrap_weights(10)[:, kept].sum(axis=1) > 0).sum())
    assert 850 < draws_one < evaluate.BOOTSTRAP_RESAMPLES and len(perfect.bootstrap) == draws_one
    other = measured(score_images(labels, detections, CLASSES))
    assert len(other.bootstrap) == draws_one and drop_points(perfect, other).interval is not None
    # The model card and the report say how many resamples counted.
    assert evaluate.bootstrap_settings(perfect)["drawing_an_object"] == draws_one
    most_images = measured(score_images(*scene(8, 10), CLASSES))
    assert len(most_images.bootstrap) == evaluate.BOOTSTRAP_RESAMPLES
    assert "drawing_an_object" not in evaluate.bootstrap_settings(most_images)


def test_a_small_noisy_set_is_flagged_and_so_is_an_implausible_gain():
    labels, reference = scene(7, 8, jitter=2.0)
    _, noisy = scene(7, 8, jitter=8.0, miss=0.4)
    ref = measured(score_images(labels, reference, CLASSES))
    cand = measured(score_images(labels, noisy, CLASSES))
    too_wide = judge(drop_points(ref, cand), 0.5, "INT8's mAP50-95 drop", lossy=True)
    assert [f["flag"] for f in too_wide] == ["interval-wider-than-budget"]
    assert f"{WIDE_INTERVAL_BUDGETS:g}x the 0.50 point budget" in too_wide[0]["message"]
    # The other way round, the lossy model would be far better than its parent: not something INT8 does.
    better = drop_points(cand, ref)
    assert -better > MAX_PLAUSIBLE_GAIN_POINTS
    assert "implausible-gain" in [f["flag"] for f in judge(better, 100.0, "INT8's mAP50-95 drop", lossy=True)]
    # A gain is allowed where it can be real (fine-tuning after pruning).
    assert judge(better, 100.0, "the loss against the unpruned model", lossy=False) == []


def test_bootstrap_is_quick_on_a_realistic_split():
    """200 images with ~60 boxes each, as the embedded model's report split; 1000 resamples."""
    import time

    labels, detections = scene(8, 200, false_per_image=60)
    scores = score_images(labels, detections, CLASSES)
    start = time.perf_counter()
    measured(scores)
    assert time.perf_counter() - start < 20  # about 1-2 s on an idle core; generous for a shared CI machine


def test_reweighting_with_ignored_regions_reproduces_pycocotools():
    labels, detections = scene(8, 40, digits=None)
    rng = np.random.default_rng(8)
    required = [[b for b in boxes if rng.random() < 0.7] for boxes in labels]
    ignored = [[b for b in boxes if b not in kept] for boxes, kept in zip(labels, required)]
    scores = score_images(required, detections, CLASSES, ignored)
    _, map50_95 = resampled_map(scores, np.ones((1, 40)))
    assert map50_95[0] == pytest.approx(plain_pycocotools(required, detections, ignored)[1], abs=1e-12)
    # Ignoring is not dropping: detections of the ignored boxes would be false positives without the regions.
    assert scores.map50_95 > score_images(required, detections, CLASSES).map50_95


def test_fidelity_ignores_scores_crossing_the_threshold_inside_the_unsure_band():
    """Two boxes of the FP32 model sit just above and just below the confidence; a candidate that only swaps their
    scores has changed nothing the band does not allow, and one that loses a confident box has."""
    from edge_deploy.pipeline.evaluate import UNSURE_FRACTION, fidelity, fidelity_reference
    from edge_deploy.pipeline.results import FidelityReference, ModelInfo

    conf = 0.25
    assert conf * UNSURE_FRACTION < 0.2
    info = ModelInfo("test", "yolov8n", "detect", ["a", "b", "c", "d"], 160, [8, 16, 32], 16, 0)
    fp32 = Detections([(160, 160)] * 2, [
        np.array([[10, 10, 40, 40, 0.90, 0], [60, 60, 90, 90, 0.26, 1], [100, 100, 130, 130, 0.24, 1],
                  [5, 100, 25, 120, 0.05, 2]], np.float32),
        np.array([[20, 20, 60, 60, 0.80, 3], [70, 20, 100, 50, 0.30, 0]], np.float32)])
    reference = fidelity_reference(fp32, conf)
    assert [len(b) for b in reference.boxes] == [2, 2] and [len(b) for b in reference.unsure] == [1, 0]
    assert fidelity(fp32, info, reference).map50_95 == 1.0

    swapped = Detections(fp32.sizes, [d.copy() for d in fp32.per_image])
    swapped.per_image[0][1, 4], swapped.per_image[0][2, 4] = 0.24, 0.26
    banded = fidelity(swapped, info, reference)
    without_band = fidelity(swapped, info, FidelityReference(reference.boxes, [[], []], conf))
    assert banded.map50_95 == 1.0 and without_band.map50_95 < 1.0
    # The matched share stays strict: the box now under the threshold is not found at it.
    assert banded.matched_boxes == 0.75

    lost = Detections(fp32.sizes, [fp32.per_image[0], fp32.per_image[1][1:]])
    assert fidelity(lost, info, reference).map50_95 < 1.0


def _kept_by_nms(boxes: np.ndarray, scores: np.ndarray, ious=(0.7, *evaluate.UNSURE_NMS_IOUS)) -> Detections:
    """One 300-px image's boxes through the decode's own NMS at evaluation's IoU and the band's."""
    from edge_deploy.pipeline.detect import select

    kept = {iou: select(boxes, scores[:, None], 300, evaluate.EVAL_CONF, iou) for iou in ious}
    return Detections([(300, 300)], [kept[evaluate.EVAL_IOU]], {iou: [kept[iou]] for iou in ious[1:]})


def test_fidelity_ignores_boxes_whose_nms_fate_hangs_on_a_neighbour():
    """B overlaps A at IoU 0.68: NMS at 0.7 keeps it, at 0.65 it would not. C overlaps A at 0.72: dropped at 0.7, kept
    at 0.75. Neither is required, so a candidate whose B moved to overlap A at 0.71 (NMS now drops it) or whose C
    survives has changed nothing the band does not allow; one that loses D, alone and confident, has."""
    from edge_deploy.pipeline.evaluate import fidelity, fidelity_reference
    from edge_deploy.pipeline.results import FidelityReference, ModelInfo

    info = ModelInfo("test", "yolov8n", "detect", ["a"], 160, [8, 16, 32], 16, 0)
    a, b, c, d = [0, 0, 100, 100], [19, 0, 119, 100], [0, 16, 100, 116], [200, 200, 250, 250]
    scores = np.array([0.9, 0.6, 0.5, 0.8], np.float32)
    fp32 = _kept_by_nms(np.array([a, b, c, d], np.float32), scores)
    assert len(fp32.per_image[0]) == 3
    reference = fidelity_reference(fp32, 0.25)
    required = {tuple(round(v) for v in box[1:3]) for box in reference.boxes[0]}
    assert required == {(0, 0), (200, 200)}
    assert {tuple(round(v) for v in box[1:3]) for box in reference.unsure[0]} == {(19, 0), (0, 16)}
    assert fidelity(fp32, info, reference).map50_95 == 1.0

    b_moved = [17, 0, 117, 100]  # IoU with A 83/117 = 0.709
    flipped = _kept_by_nms(np.array([a, b_moved, c, d], np.float32), scores)
    assert len(flipped.per_image[0]) == 2
    assert fidelity(flipped, info, reference).map50_95 == 1.0
    score_band_only = FidelityReference([[*reference.boxes[0], (0, 19.0, 0.0, 100.0, 100.0)]], [[]], 0.25)
    assert fidelity(flipped, info, score_band_only).map50_95 < 1.0

    c_moved = [0, 14, 100, 114]  # IoU with A 86/114 = 0.754: kept
    assert fidelity(_kept_by_nms(np.array([a, b, c_moved, d], np.float32), scores), info, reference).map50_95 == 1.0

    lost = _kept_by_nms(np.array([a, b, c], np.float32), scores[:3])
    assert fidelity(lost, info, reference).map50_95 < 1.0
    # Without the detections at the band's IoUs (a model that decodes in its own graph), the band is the score's.
    assert fidelity_reference(Detections(fp32.sizes, fp32.per_image), 0.25).unsure == [[]]


def _with_near_ties(boxes: np.ndarray, scores: np.ndarray) -> Detections:
    """_kept_by_nms with each kept box's near-ties, as run_detections gives them for the FP32 reference."""
    kept = _kept_by_nms(boxes, scores)
    kept.near_ties.append(evaluate.suppressed_near_ties(kept.per_image[0], boxes, scores[:, None], 0.25))
    return kept


def test_fidelity_takes_a_near_tie_for_the_box_it_tied_with():
    """NMS kept A over B (IoU 0.90), which FP32 scored 0.005 lower: a candidate that keeps B instead has made the
    choice FP32 itself could not, and is scored as if it kept A. C (IoU 0.79 with A, 0.72 with B) scored 0.10 lower:
    keeping it instead is a changed answer. The boxes found again and their shift still count B where it is."""
    from edge_deploy.pipeline.evaluate import fidelity, fidelity_reference
    from edge_deploy.pipeline.results import (NEAR_TIE_SCORE, Accuracy, FidelityReference, ImageSplit, ModelInfo,
                                              ReferenceAccuracy)

    info = ModelInfo("test", "yolov8n", "detect", ["a"], 160, [8, 16, 32], 16, 0)
    a, b, c, d = [0, 0, 100, 100], [5, 0, 105, 100], [0, 12, 100, 112], [200, 200, 250, 250]
    boxes = np.array([a, b, c, d], np.float32)
    fp32_scores = np.array([0.80, 0.795, 0.70, 0.90], np.float32)
    assert 0.80 - 0.795 < NEAR_TIE_SCORE < 0.80 - 0.70
    fp32 = _with_near_ties(boxes, fp32_scores)
    reference = fidelity_reference(fp32, 0.25)
    ties = {tuple(round(v) for v in box[1:3]): t for box, t in zip(reference.boxes[0], reference.near_ties[0])}
    assert ties == {(0, 0): [(5.0, 0.0, 100.0, 100.0)], (200, 200): []}
    assert fidelity(fp32, info, reference).map50_95 == 1.0

    b_won = _kept_by_nms(boxes, np.array([0.80, 0.81, 0.70, 0.90], np.float32))
    scored = fidelity(b_won, info, reference)
    assert scored.map50_95 == 1.0 and scored.near_tie_boxes == 1
    assert scored.matched_boxes == 1.0 and scored.box_shift_px == pytest.approx((5 + 0 + 5 + 0) / 8)
    assert "1 scored as the FP32 box they are a near-tie of" in scored.describe()
    untied = fidelity(b_won, info, FidelityReference(reference.boxes, reference.unsure, reference.conf))
    assert untied.map50_95 < 1.0 and untied.near_tie_boxes is None

    # A candidate that keeps A and, besides it, a box where B is has found A: the other box is an extra, not moved.
    extra = Detections(fp32.sizes, [np.concatenate([fp32.per_image[0], [[*b, 0.3, 0]]]).astype(np.float32)])
    assert fidelity(extra, info, reference).near_tie_boxes == 0

    c_won = _kept_by_nms(boxes, np.array([0.80, 0.795, 0.85, 0.90], np.float32))
    changed = fidelity(c_won, info, reference)
    assert changed.map50_95 < 1.0 and changed.near_tie_boxes == 0

    # The reference stage's JSON carries the near-ties to the stages that score against it.
    split = ImageSplit("selection", "photos", 1, "f")
    stored = ReferenceAccuracy(scored, scored, split, split, 0.25, reference.boxes, reference.boxes, 1,
                               reference.unsure, reference.unsure, reference.near_ties, reference.near_ties)
    again = ReferenceAccuracy.from_json(stored.to_json(internal=True)).fidelity_reference("report")
    assert again.near_ties == reference.near_ties and again.boxes == reference.boxes
    assert Accuracy.from_json(scored.to_json()).near_tie_boxes == 1


def test_fidelity_says_how_far_found_boxes_moved_in_pixels():
    """The shift is the mean distance of the found boxes' sides from the FP32 boxes'; boxes not found again do not
    enter it, and FP32 against itself is 0."""
    from edge_deploy.pipeline.evaluate import fidelity, fidelity_reference
    from edge_deploy.pipeline.results import Accuracy, ModelInfo

    info = ModelInfo("test", "yolov8n", "detect", ["a", "b"], 160, [8, 16, 32], 16, 0)
    fp32 = Detections([(160, 160)], [np.array([[10, 10, 40, 40, 0.9, 0], [60, 60, 100, 100, 0.8, 1],
                                               [120, 10, 150, 40, 0.7, 0]], np.float32)])
    reference = fidelity_reference(fp32, 0.25)
    assert fidelity(fp32, info, reference).box_shift_px == 0.0
    # First box: x1 and x2 move 1 px, y1 and y2 stay; second: every side 0.5 px; third: lost.
    moved = Detections(fp32.sizes, [np.array([[11, 10, 41, 40, 0.9, 0], [60.5, 59.5, 100.5, 99.5, 0.8, 1]],
                                             np.float32)])
    scored = fidelity(moved, info, reference)
    assert scored.matched_boxes == pytest.approx(2 / 3, abs=1e-4)
    assert scored.box_shift_px == pytest.approx((1 + 0 + 1 + 0 + 4 * 0.5) / 8)
    assert "0.50 px off on average" in scored.describe()
    # It survives the JSON round trip a cached stage makes; a figure that is not a distance is refused.
    assert Accuracy.from_json(scored.to_json()).box_shift_px == scored.box_shift_px
    with pytest.raises(Exception, match="not a measurement"):
        Accuracy(0.5, 0.4, 1, 1, "fidelity", 1.0, box_shift_px=float("nan"))
