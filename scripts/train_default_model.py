"""Trains the embedded default detector (YOLOv8n on the synthetic shapes set) on the CPU.

Reproduces pipeline/embedded/yolov8n-shapes.pt. Run from the repository root:
    .venv/bin/python scripts/train_default_model.py
The recipe and its measured result are recorded in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from edge_deploy.pipeline.embedded.shapes import ShapesSpec, generate
from edge_deploy.pipeline.ultra import ultralytics_offline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=".deploy", type=Path)
    parser.add_argument("--imgsz", default=160, type=int)
    parser.add_argument("--epochs", default=16, type=int)
    parser.add_argument("--batch", default=8, type=int)
    parser.add_argument("--out", default=Path("pipeline/embedded/yolov8n-shapes.pt"), type=Path)
    args = parser.parse_args()

    ultralytics = ultralytics_offline(args.home)
    data_yaml = generate(args.home / "data", ShapesSpec())
    model = ultralytics.YOLO("yolov8n.yaml")
    started = time.time()
    # nbs equal to the batch: with the default nominal batch of 64 the optimizer
    # steps once every 8 batches, far too rarely for a few CPU epochs.
    model.train(
        data=str(data_yaml), imgsz=args.imgsz, epochs=args.epochs, batch=args.batch, nbs=args.batch,
        device="cpu", workers=2, seed=0, deterministic=True, pretrained=False, amp=False, plots=False,
        project=str((args.home / "train").resolve()), name="yolov8n-shapes", exist_ok=True, verbose=False,
    )
    minutes = (time.time() - started) / 60
    best = Path(model.trainer.best)
    metrics = ultralytics.YOLO(str(best)).val(data=str(data_yaml), imgsz=args.imgsz, batch=16, device="cpu",
                                               plots=False, verbose=False)
    tmp = args.out.with_suffix(".tmp")
    shutil.copyfile(best, tmp)
    os.replace(tmp, args.out)
    print(json.dumps({"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "minutes": round(minutes, 1),
                      "map50": round(float(metrics.box.map50), 4), "map50_95": round(float(metrics.box.map), 4)}))


if __name__ == "__main__":
    main()
