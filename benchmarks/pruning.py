"""50 % structured channel pruning of the embedded default model with every criterion, side by side.

For each criterion: one-shot pruning without fine-tuning, and the same followed
by a fixed fine-tuning budget (Ultralytics trainer on the embedded data). Each
pruned model is exported to ONNX and measured like the original: MACs and
parameters (Torch-Pruning's counter), ONNX Runtime CPU p50 latency at 1 thread
(the original and the pruned model timed in the same process) and COCO
mAP50-95 on the 200-image validation split.

    .venv/bin/python benchmarks/pruning.py [--ratio 0.5 --epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from edge_deploy.calibration.preprocess import Preprocess
from edge_deploy.calibration.sets import calibration_set, class_names, labelled_split
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.build import EMBEDDED_MODEL, embedded_data
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.prune import CRITERIA
from edge_deploy.pipeline.stages.load import LoadStage
from edge_deploy.pipeline.stages.prune import PruneStage
from edge_deploy.pipeline.ultra import ultralytics_offline
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    args = parser.parse_args()
    ultralytics_offline(args.home)

    data = embedded_data(args.home)
    engine = Engine(args.home / "cache")
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(args.home, None, class_names(data)), available).artifacts)
    pre = Preprocess(160)
    val = labelled_split(data, "val", pre)
    train = labelled_split(data, "train", pre)
    taylor_images = list(calibration_set(data, pre, 32, 0, "train", min_recommended=1).files)

    rows = []
    started = time.time()
    for criterion in args.criteria.split(","):
        for epochs in (0, args.epochs):
            stage = PruneStage(args.home, val, data, train.fingerprint, args.ratio, None, None, criterion, False, 8,
                               1, epochs, None, taylor_images if criterion == "taylor" else [])
            record = engine.run(stage, available)
            history = json.loads(record.artifacts["prune_history"].path.read_text())["steps"]
            before, after = history[0], history[-1]
            rows.append((criterion, epochs, before, after))
    minutes = (time.time() - started) / 60

    print(f"host: {cpu_name()} ({vector_extensions()}); yolov8n imgsz 160 on the embedded shapes set; {args.ratio:.0%} of channels pruned "
          f"(per-layer ranking, round_to 8); fine-tuning {args.epochs} epochs (batch 8) on 1000 train images; "
          f"val 200 images; {minutes:.1f} min in all\n")
    print("| criterion | fine-tune epochs | MACs ratio | params ratio | ORT CPU latency ratio | mAP50-95 | drop (pts) |")
    print("|---|---|---|---|---|---|---|")
    for criterion, epochs, before, after in rows:
        print(f"| {criterion} | {epochs} | {before['macs'] / after['macs']:.2f}x | {before['params'] / after['params']:.2f}x "
              f"| {after['latency_ratio']:.2f}x | {after['map50_95']:.4f} "
              f"| {(before['map50_95'] - after['map50_95']) * 100:.2f} |")


if __name__ == "__main__":
    main()
