"""What fidelity measures on a model and a folder of unlabelled photos: the floor a lossless change sets.

A label-free build scores every artifact by its fidelity to the FP32 model (pipeline/evaluate.py). This script
scores, on the held-out selection images a label-free build would choose on and on the report images no choice is
made on (same seed and sizes as the build):
- the FP32 model itself (100 by construction),
- the FP32 model with its weights rounded to FP16 and back: a change no one would call lossy, so its drop is the
  least a metric this strict can show on these images,
- the INT8 models the cpu target builds with MinMax and with Percentile ranges and no node kept float for
  accuracy (its calibration images are the build's; the outputs' shape ops and the layers that compute them
  float, as the cpu rules keep them),
- both as the cpu target built them before those layers read float inputs (QuantRules.float_output_layers), and
  before that, when SiLU inputs' ranges did not yet stop at their output's grid (ranges.floor_silu_inputs), and
  the MinMax one before that with its outputs rounded to 8 bits too,
- the FP32 model with seeded Gaussian noise added to its class logits (`--logit-noise`, standard deviations): how
  much output error the metric itself turns into points, beside the INT8 MinMax model's own class-logit error
  (root mean square over the anchors where FP32 scores any class above 0.05, on the report photos),
each with fidelity's unsure band (score and NMS), with its score side only (the metric before the NMS side) and
without it (the metric before the band), and prints mAP50, mAP50-95, the
share of the FP32 model's confident boxes found again, and how far the found boxes' sides moved (mean, pixels;
fidelity reports both).
Scoring is in ONNX Runtime at one thread.

With `--target arm`, the INT8 models are the arm target's ncnn ones instead (MinMax and Entropy, its methods, from
its sampled statistics of the same calibration photos), with the layers that compute the outputs reading float
inputs as the arm rules keep them, and as they were built before (those layers' inputs rounded too); ncnn runs them
at one thread. The FP32 and FP16 rows stay onnxruntime's. The ncnn models (FP32 too) are then timed side by side at
one thread on one report photo, the timing repeated (`--repeats`, `--rounds`, `--block`).

    .venv/bin/python benchmarks/fidelity_floor.py --model .deploy/models/yolov8s-deepforest.pt --photos photos/
    .venv/bin/python benchmarks/fidelity_floor.py --model ... --photos photos/ --target arm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from edge_deploy.calibration.onnxrt import ort_infer
from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.qdq import OnnxQdqBackend, quantize
from edge_deploy.calibration.ranges import collect_statistics, ranges_for
from edge_deploy.calibration.rules import ONNXRUNTIME_QDQ
from edge_deploy.calibration.sets import unlabelled_splits
from edge_deploy.pipeline.build import run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.evaluate import (UNSURE_NMS_IOUS, Detections, drop_points, fidelity, fidelity_reference,
                                           run_detections, with_logit_jitter)
from edge_deploy.pipeline.results import FidelityReference, ModelInfo
# The jetson target's own FP16 weight rounding: what FP16 storage does to the weights.
from edge_deploy.targets.jetson import fp16_weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--imgsz", type=int, help="default: the checkpoint's training size")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--target", choices=("cpu", "arm"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--logit-noise", default="0.01,0.02",
                        help="standard deviations of the noise added to FP32's class logits, one row each")
    args = parser.parse_args()
    sigmas = [float(v) for v in args.logit_noise.split(",") if v]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The FP32 ONNX and the model's facts come from an FP32 label-free build of the checkpoint (cached after
        # the first run); the splits are the ones that build, and an INT8 build, use.
        config = BuildConfig(output=tmp / "dist", precision="fp32", model=args.model, imgsz=args.imgsz)
        config.calibration.source = args.photos
        result = run_build(config, args.home)
        records = {r.name: r for r in result.records}
        fp32 = records["export"].artifacts["onnx"].path
        info = ModelInfo.from_json(json.loads(records["load"].artifacts["model_info"].path.read_text()))
        pre = Preprocess(info.imgsz)
        calibration, selection, report = unlabelled_splits(
            args.photos, pre, config.calibration.size, config.selection.size, config.fidelity.report_size,
            config.calibration.seed)
        conf = config.fidelity.conf
        onnx_model = lambda path: lambda: ort_infer(path, 1)  # noqa: E731
        models = {
            "FP32": onnx_model(fp32),
            "FP32, weights rounded to FP16": onnx_model(fp16_weights(fp32, tmp / "fp16w.onnx")),
        }
        for sigma in sigmas:
            models[f"FP32, class logits + N(0, {sigma:g}) noise"] = with_logit_noise(onnx_model(fp32), sigma)
        if args.target == "arm":
            folders = add_arm_models(models, fp32, info, [load_tensor(path, pre)[0] for path in calibration.files],
                                     tmp)
            import ncnn

            print(f"model {args.model} imgsz {info.imgsz}; {len(calibration.files)} calibration photos of "
                  f"{args.photos}; INT8 rows: ncnn {ncnn.__version__}")
            for role, split in (("held-out selection", selection), ("report", report)):
                score_split_table(role, split, models, info, conf)
            print_logit_error("ncnn INT8 MinMax, output layers' inputs float", models, report, pre)
            time_ncnn(folders, load_tensor(report.files[0], pre)[0], args)
            return
        backend = OnnxQdqBackend(fp32, tmp / "work", ONNXRUNTIME_QDQ)
        stats = collect_statistics(backend.tap(), [load_tensor(path, pre)[0] for path in calibration.files])
        ranges = ranges_for(stats, "minmax")
        percentile = ranges_for(stats, "percentile")
        # The previous method: every quantized tensor's pair left in place, the outputs rounded.
        rounded = quantize(backend.prepared, tmp / "int8-rounded.onnx", ranges, True, False,
                           list(backend.thin_convs))
        models["INT8 MinMax (nothing float for accuracy)"] = onnx_model(backend.build(ranges, [], tmp / "int8"))
        models["INT8 Percentile (nothing float for accuracy)"] = onnx_model(
            backend.build(percentile, [], tmp / "int8-percentile"))
        # The same models before the output layers read float inputs: the rules without it.
        before = OnnxQdqBackend(fp32, tmp / "work-before",
                                dataclasses.replace(ONNXRUNTIME_QDQ, float_output_layers=False))
        models["INT8 MinMax, output layers' inputs rounded (before)"] = onnx_model(
            before.build(ranges, [], tmp / "int8-in"))
        models["INT8 Percentile, output layers' inputs rounded (before)"] = onnx_model(
            before.build(percentile, [], tmp / "int8-percentile-in"))
        # And before SiLU inputs' ranges were floored: that backend given no SiLUs to floor.
        before.silu = {}
        models["INT8 MinMax, inputs rounded, SiLU inputs' whole range (before)"] = onnx_model(
            before.build(ranges, [], tmp / "int8-whole"))
        models["INT8 Percentile, inputs rounded, SiLU inputs' whole range (before)"] = onnx_model(
            before.build(percentile, [], tmp / "int8-percentile-whole"))
        models["INT8 MinMax, whole range and outputs rounded to 8 bits (before)"] = onnx_model(rounded)
        print(f"model {args.model} imgsz {info.imgsz}; {len(calibration.files)} calibration photos of {args.photos}")
        # The selection photos are the ones a build chooses on; the report photos, which no choice is made on, say
        # whether a gain there holds elsewhere.
        for role, split in (("held-out selection", selection), ("report", report)):
            score_split_table(role, split, models, info, conf)
        print_logit_error("INT8 MinMax (nothing float for accuracy)", models, report, pre)


def with_logit_noise(make, sigma: float, seed: int = 0):
    """A runtime maker like `make`, its class logits given seeded Gaussian noise (the same noise on each split's
    first call, so a row is reproducible): the noise the build's jitter floor adds (evaluate.with_logit_jitter)."""
    return lambda: with_logit_jitter(make(), sigma, seed)


def print_logit_error(label: str, models: dict, split, pre: Preprocess) -> None:
    """The class-logit error of model `label` against FP32, where FP32 scores any class above 0.05: the part of the
    outputs that decides which boxes NMS keeps."""
    fp32, other = models["FP32"](), models[label]()
    errors = []
    for path in split.files:
        image = load_tensor(path, pre)[0]
        (_, reference), (_, produced) = fp32(image), other(image)
        scored = 1 / (1 + np.exp(-reference.max(axis=1))) > 0.05  # (images, anchors)
        errors.append((produced - reference).transpose(0, 2, 1)[scored].ravel())
    errors = np.concatenate(errors)
    print(f"\n{label}: class-logit error against FP32, root mean square over the anchors where FP32 scores a class "
          f"above 0.05 on the {len(split.files)} report photos: {np.sqrt(np.mean(errors ** 2)):.4f} "
          f"({errors.size} logits)")


def add_arm_models(models: dict, fp32: Path, info: ModelInfo, calibration: list, tmp: Path) -> dict:
    """Adds the arm target's ncnn INT8 models, MinMax and Entropy, as it builds them and as it built them before the
    output layers read float inputs; returns every ncnn model's folder and precision, for timing."""
    from edge_deploy.pipeline.stages.quantize import batched
    from edge_deploy.targets.arm import NcnnArm, NcnnInt8Backend

    class Before(NcnnInt8Backend):
        rules = dataclasses.replace(NcnnInt8Backend.rules, float_output_layers=False)

    backend = NcnnInt8Backend(NcnnArm(), fp32, info, tmp / "arm")
    before = Before(NcnnArm(), fp32, info, tmp / "arm-before")
    # Both backends tap the same FP32 ncnn model; the one quantizing more inputs taps a superset.
    stats = collect_statistics(before.tap(), batched(calibration))
    folders = {"ncnn FP32": (backend.fp32_dir, "fp32")}
    for method in ("minmax", "entropy"):
        ranges = ranges_for(stats, method)
        name = {"minmax": "MinMax", "entropy": "Entropy"}[method]
        for label, which in ((f"ncnn INT8 {name}, output layers' inputs float", backend),
                             (f"ncnn INT8 {name}, output layers' inputs rounded (before)", before)):
            built = which.build(ranges, [], tmp / f"ncnn-{method}-{len(folders)}")
            models[label] = lambda built=built, which=which: which.runtime(built)
            folders[label] = (built, "int8")
    return folders


def time_ncnn(folders: dict, image, args) -> None:
    """p50 of each ncnn model at one thread, interleaved and repeated; speed against ncnn FP32."""
    from interleave import load_average, ratios, repeated_p50s, spread

    from edge_deploy.targets.arm import NcnnArm, ncnn_net, runner

    nets = {label: ncnn_net(folder, precision, threads=1) for label, (folder, precision) in folders.items()}
    outputs = [NcnnArm.io_names["box_dist"], NcnnArm.io_names["cls_logit"]]
    runs = {label: (lambda net=net: runner.run_once(net, image, outputs)) for label, net in nets.items()}
    started = load_average()
    p50s = repeated_p50s(runs, args.repeats, args.rounds, args.block, warmup=3)
    print(f"\nncnn at 1 thread on one report photo; {args.repeats} repeats x {args.rounds} rounds x {args.block} "
          f"runs per model, interleaved; load average {started} at the start, {load_average()} at the end\n")
    print("| model | p50 ms | speed vs ncnn FP32, median [min-max] |")
    print("|---|---|---|")
    for label in folders:
        print(f"| {label} | {statistics.median(p50s[label]):.2f} | "
              f"{spread(ratios(p50s, 'ncnn FP32', label))} |")


def score_split_table(role: str, split, models: dict, info: ModelInfo, conf: float) -> None:
    reference_detections = run_detections(split, models["FP32"](), info.strides, also_at_iou=UNSURE_NMS_IOUS,
                                          near_ties_from=conf)
    banded = fidelity_reference(reference_detections, conf)
    # The band without its anchor side (near-ties), as the build scored before it.
    without_ties = FidelityReference(banded.boxes, banded.unsure, conf)
    # The band's score side alone: the reference as the decode at evaluation's NMS alone gives it.
    score_banded = fidelity_reference(Detections(reference_detections.sizes, reference_detections.per_image), conf)
    unbanded = FidelityReference(score_banded.boxes, [[] for _ in score_banded.boxes], conf)
    references = (banded, without_ties, score_banded, unbanded)
    print(f"\n{len(split.files)} {role} photos; {sum(len(b) for b in banded.boxes)} FP32 boxes required "
          f"(conf >= {conf}, NMS keeps them at IoU {UNSURE_NMS_IOUS[0]:g} too), "
          f"{sum(len(b) for b in banded.unsure)} in the unsure band, "
          f"{sum(1 for image in banded.near_ties for ties in image if ties)} with a near-tie; with the band's score "
          f"side only {sum(len(b) for b in score_banded.boxes)} and {sum(len(b) for b in score_banded.unsure)}\n")
    print("| model | fidelity mAP50 | fidelity mAP50-95 | drop, points [95% interval] | boxes taken as their near-tie | "
          "without near-ties: drop | score band only: drop | no band: drop | FP32 boxes found again | "
          "box sides moved, mean px |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    # Every drop is against the FP32 model's own score, 100 by construction, under each reference.
    bases = [fidelity(reference_detections, info, r) for r in references]
    for label, runtime in models.items():
        detections = (reference_detections if label == "FP32"
                      else run_detections(split, runtime(), info.strides))
        scored = [fidelity(detections, info, r) for r in references]
        drop, untied_drop, score_side_drop, unbanded_drop = (drop_points(b, s) for b, s in zip(bases, scored))
        low, high = drop.interval or (0.0, 0.0)
        print(f"| {label} | {scored[0].map50 * 100:.2f} | {scored[0].map50_95 * 100:.2f} | {float(drop):.2f} "
              f"[{low:.2f}..{high:.2f}] | {scored[0].near_tie_boxes} | {float(untied_drop):.2f} | "
              f"{float(score_side_drop):.2f} | {float(unbanded_drop):.2f} | "
              f"{scored[0].matched_boxes:.1%} | {scored[0].box_shift_px:.3f} |", flush=True)


if __name__ == "__main__":
    main()
