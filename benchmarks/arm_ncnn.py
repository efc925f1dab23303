"""Our ncnn models against Ultralytics' own `format=ncnn` export of the same detector, side by side.

Builds the arm target at FP32, FP16 and INT8 (and pruned + INT8, reusing the
pruning benchmark's cached model when present), exports the same checkpoint
with Ultralytics (FP32 and its `half` FP16), scores every model with the same
pycocotools evaluation and NMS on the 200-image validation split, and times all
of them in the ncnn runtime of this machine, interleaved, at 1 thread. This is
x86 ncnn: an ARM device's ratios will differ, and its numbers are measured by
running the probe there. The whole timing is repeated (median and spread over
repeats); the builds are cached, so a second run only scores and times.

    .venv/bin/python benchmarks/arm_ncnn.py [--repeats 3 --rounds 20 --block 10]
    .venv/bin/python benchmarks/arm_ncnn.py --model tests/fixtures/yolov8n-deepforest.pt \
        --data .deploy/data/deepforest-5dc18ea420d909b9/data.yaml   # the real-image fixture: the "data" path
                                                                    # scripts/make_deepforest_fixture.py prints
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from interleave import load_average, ratios, repeated_p50s, spread

from edge_deploy.calibration.preprocess import Preprocess
from edge_deploy.calibration.sets import labelled_split
from edge_deploy.pipeline.build import EMBEDDED_MODEL, embedded_data, run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.detect import select
from edge_deploy.pipeline.evaluate import EVAL_CONF, EVAL_IOU, coco_map
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.ultra import ultralytics_offline
from edge_deploy.targets.arm import ncnn_net
from edge_deploy.targets.arm import runner as ncnn_probe
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def ultralytics_export(home: Path, model: Path, imgsz: int, half: bool) -> Path:
    """Ultralytics' NCNN export (its graph decodes boxes itself: one (4 + classes, anchors) output)."""
    ultralytics = ultralytics_offline(home)
    work = Path(tempfile.mkdtemp(prefix="ultra-ncnn-"))
    checkpoint = work / "model.pt"
    checkpoint.write_bytes(model.read_bytes())
    return Path(ultralytics.YOLO(str(checkpoint)).export(format="ncnn", imgsz=imgsz, half=half))


def ultralytics_detect(net, imgsz: int):
    def detect(tensor: np.ndarray) -> np.ndarray:
        (raw,) = ncnn_probe.run_once(net, tensor[0], ["out0"])
        xywh, scores = raw[:4].T, raw[4:].T
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        return select(boxes, scores, imgsz, conf=EVAL_CONF, iou=EVAL_IOU)
    return detect


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--model", type=Path, help="a .pt checkpoint (default: the embedded YOLOv8n)")
    parser.add_argument("--data", type=Path, help="its labelled data YAML (default: the embedded shapes set)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole interleaved timing (>= 3)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=10)
    args = parser.parse_args()
    if args.model is not None and args.data is None:
        parser.error("--model needs --data: every model is scored against labels")
    checkpoint = args.model or EMBEDDED_MODEL

    out = args.home / "bench-arm" / (checkpoint.stem if args.model else "")
    ours = {}
    info = None
    for label, precision, prune, budget in (
            ("ours FP32", "fp32", None, None), ("ours FP16", "fp16", None, None), ("ours INT8", "int8", None, None),
            ("ours pruned 50% + INT8", "int8", 0.5, None),
            ("ours pruned 50% + INT8, 0.1-pt INT8 budget", "int8", 0.5, 0.1)):
        config = BuildConfig(target="arm", precision=precision, output=out / label.replace(" ", "_"))
        config.model, config.data = args.model, args.data
        config.prune.ratio = prune
        config.quantize.max_map_drop = budget
        # A tight budget met on the selection split can be missed on the report split; the benchmark shows the
        # model such a build ships with --accept-drop instead of stopping.
        config.quantize.on_budget_exceeded = "continue"
        result = run_build(config, args.home)
        ours[label] = (result.bundle, precision)
        if info is None:
            records = {r.name: r for r in result.records}
            info = ModelInfo.from_json(json.loads(records["load"].artifacts["model_info"].path.read_text()))

    data = args.data or embedded_data(args.home)
    val = labelled_split(data, "val", Preprocess(info.imgsz))
    models = {}  # label -> (net, detect or None)
    for label, (bundle, precision) in ours.items():
        models[label] = (ncnn_net(bundle, precision, threads=1), None, ["out0", "out1"])
    for label, half in (("Ultralytics FP32", False), ("Ultralytics FP16 (half)", True)):
        folder = ultralytics_export(args.home, checkpoint, info.imgsz, half)
        net = ncnn_net(folder, "fp16" if half else "fp32", threads=1)
        models[label] = (net, ultralytics_detect(net, info.imgsz), ["out0"])

    accuracy = {}
    for label, (net, detect, outputs) in models.items():
        def raw_maps(tensor, net=net, outputs=outputs):
            return tuple(o[None] for o in ncnn_probe.run_once(net, tensor[0], outputs))
        infer = raw_maps if detect is None else None
        accuracy[label] = coco_map(val, infer, info.strides, len(info.names), detect=detect)["map50_95"]

    from edge_deploy.calibration.preprocess import load_tensor

    tensor = load_tensor(val.files[0], Preprocess(info.imgsz))[0][0]
    load_start = load_average()
    p50s = repeated_p50s(
        {label: (lambda net=net, outputs=outputs: ncnn_probe.run_once(net, tensor, outputs))
         for label, (net, _, outputs) in models.items()}, args.repeats, args.rounds, args.block, warmup=5)
    baseline = "Ultralytics FP16 (half)"
    reference = accuracy["Ultralytics FP32"]

    import ncnn

    print(f"host: {cpu_name()} ({vector_extensions()}; x86: ARM numbers come from the probe on a device); "
          f"ncnn {ncnn.__version__}, 1 thread; {checkpoint.name} ({info.family}) imgsz {info.imgsz} on {data}; "
          f"{args.repeats} repeats x {args.rounds} rounds x {args.block} runs per model, interleaved; "
          f"val {len(val.files)} images, pycocotools, same NMS for all; "
          f"load average {load_start} at the start, {load_average()} at the end\n")
    print("| model | mAP50-95 | drop vs Ultralytics FP32 (pts) | p50 ms | speed vs Ultralytics FP16, median [min-max] |")
    print("|---|---|---|---|---|")
    for label in models:
        print(f"| {label} | {accuracy[label]:.4f} | {(reference - accuracy[label]) * 100:.2f} "
              f"| {statistics.median(p50s[label]):.2f} | {spread(ratios(p50s, baseline, label))} |")


if __name__ == "__main__":
    main()
