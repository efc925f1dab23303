"""50 % structured channel pruning with every criterion, side by side.

For each criterion: one-shot pruning without fine-tuning, and the same followed
by a fixed fine-tuning budget (Ultralytics trainer on the data's train split).
Each pruned model is measured like the original: MACs and parameters
(Torch-Pruning's counter) and COCO mAP50-95 on the val split (no choice is made
on it: the ratio is fixed). Latency: every pruned model and the unpruned one are
exported to ONNX and timed in ONNX Runtime at 1 thread, all interleaved in one
process, the whole timing repeated (median and spread over repeats). The prune
stages are cached builds, so a second run only re-times.

    .venv/bin/python benchmarks/pruning.py [--ratio 0.5 --epochs 12 --repeats 3]
    .venv/bin/python benchmarks/pruning.py --model tests/fixtures/yolov8n-deepforest.pt \
        --data .deploy/data/deepforest-5dc18ea420d909b9/data.yaml   # the real-image fixture: the "data" path
                                                                    # scripts/make_deepforest_fixture.py prints
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from interleave import load_average, ratios, repeated_p50s, spread

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.sets import calibration_set, class_names, labelled_split
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.build import EMBEDDED_MODEL, embedded_data
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.prune import CRITERIA
from edge_deploy.pipeline.stages.export import export_onnx
from edge_deploy.pipeline.stages.load import LoadStage
from edge_deploy.pipeline.stages.prune import PruneStage
from edge_deploy.pipeline.ultra import ultralytics_offline
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def onnx_of(checkpoint: Path, folder: Path) -> Path:
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = saved["model"].float().eval()
    model.model[-1].export = False
    path = folder / f"{Artifact.of(checkpoint).sha256[:16]}.onnx"
    export_onnx(model, saved["info"], path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="a .pt checkpoint (default: embedded)")
    parser.add_argument("--data", type=Path, help="its labelled data YAML (default: the embedded shapes set)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole interleaved timing (>= 3)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=5)
    args = parser.parse_args()
    ultralytics = ultralytics_offline(args.home)
    import onnxruntime as ort

    data = args.data or embedded_data(args.home)
    engine = Engine(args.home / "cache")
    available = {"source": Artifact.of(args.model)}
    load = engine.run(LoadStage(args.home, None, class_names(data)), available)
    available.update(load.artifacts)
    imgsz = load.metrics["imgsz"]
    pre = Preprocess(imgsz)
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
            rows.append((f"{criterion}, {epochs} epochs", criterion, epochs, history[0], history[-1],
                         record.artifacts["checkpoint"].path, record.cache_hit))
    build_minutes = (time.time() - started) / 60

    folder = Path(tempfile.mkdtemp(prefix="pruning-bench-"))
    models = {"unpruned": onnx_of(available["checkpoint"].path, folder)}
    models.update({label: onnx_of(checkpoint, folder) for label, *_, checkpoint, _ in rows})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for label, path in models.items()}
    feed = {"images": load_tensor(val.files[0], pre)[0]}
    load_start = load_average()
    p50s = repeated_p50s({label: (lambda s=session: s.run(None, feed)) for label, session in sessions.items()},
                         args.repeats, args.rounds, args.block, warmup=5)

    cached = sum(1 for *_, hit in rows if hit)
    print(f"host: {cpu_name()} ({vector_extensions()}), onnxruntime {ort.__version__}, 1 thread; "
          f"ultralytics {ultralytics.__version__}; {args.model.name} imgsz {imgsz} on {data}; "
          f"{args.ratio:.0%} of channels pruned (per-layer ranking, round_to 8); fine-tuning {args.epochs} epochs "
          f"(batch 8) on {len(train.files)} train images; mAP on {len(val.files)} val images; pruning and "
          f"fine-tuning took {build_minutes:.1f} min ({cached} of {len(rows)} prune stages from the cache); "
          f"latency: {len(models)} models, {args.repeats} repeats x {args.rounds} rounds x {args.block} runs, "
          f"interleaved; load average {load_start} at the start, {load_average()} at the end\n")
    print(f"unpruned: p50 {statistics.median(p50s['unpruned']):.2f} ms\n")
    print("| criterion | fine-tune epochs | MACs ratio | params ratio | ORT CPU speed vs unpruned, median [min-max] "
          "| mAP50-95 | drop (pts) |")
    print("|---|---|---|---|---|---|---|")
    for label, criterion, epochs, before, after, _, _ in rows:
        print(f"| {criterion} | {epochs} | {before['macs'] / after['macs']:.2f}x "
              f"| {before['params'] / after['params']:.2f}x | {spread(ratios(p50s, 'unpruned', label))} "
              f"| {after['map50_95']:.4f} | {(before['map50_95'] - after['map50_95']) * 100:.2f} |")


if __name__ == "__main__":
    main()
