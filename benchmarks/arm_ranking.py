"""The arm INT8 fallback's layer ranking as the build does it (each layer alone rounded in the FP32 ONNX graph, as
ncnn rounds it) against the same done in ncnn itself, timed in one process on the same images and scored alike.

    DEPLOY_HOME=/tmp/h .venv/bin/python benchmarks/arm_ranking.py --imgsz 640 --old-layers 4
    .venv/bin/python benchmarks/arm_ranking.py --imgsz 160            # every layer both ways: rankings compared

In ncnn, per layer, an INT8 model with only that layer quantized is written and run on the ranking images, and the
layer scores the worst SQNR of the model's outputs against ncnn FP32's, each anchor weighted by FP32's score there,
as the build's ranking scores them. With --old-layers K that runs for the first K layers only and its total is
extrapolated (printed as an estimate). When both rank every layer, the script prints how far the two agree:
Spearman's rank correlation, the overlap of the 1, 2, 4, 8, 16 most harmful layers (the fallback's candidates),
and the largest difference in a layer's score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from embedded import calibration_tensors, exported_embedded

from edge_deploy.calibration.onnxrt import SCORING_THREADS
from edge_deploy.calibration.qdq import DOWNSTREAM_IMAGES, anchor_weights, weighted_sqnr_db
from edge_deploy.calibration.ranges import collect_statistics, ranges_for
from edge_deploy.pipeline.stages.quantize import batched
from edge_deploy.targets.arm import NcnnArm
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def ncnn_ranking(backend, ranges, check: np.ndarray, layers) -> dict[str, float]:
    """One ncnn model per layer with only that layer INT8, scored end to end as the build's ranking scores."""
    reference = backend.runtime(backend.fp32_dir)(check)
    weights = anchor_weights({"cls_logit": reference[1]})
    names = [layer.name for layer in backend.convs]
    scores = {}
    for layer in layers:
        single = backend.build(ranges, [n for n in names if n != layer.name], backend.fp32_dir.parent / "alone")
        produced = backend.runtime(single)(check)
        scores[layer.name] = min(weighted_sqnr_db(r, p, weights) for r, p in zip(reference, produced))
        shutil.rmtree(single)
    return scores


def spearman(first: list[str], second: list[str]) -> float:
    position = {name: i for i, name in enumerate(second)}
    d = np.array([i - position[name] for i, name in enumerate(first)], dtype=float)
    n = len(first)
    return float(1 - 6 * np.sum(d ** 2) / (n * (n ** 2 - 1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--images", type=int, default=DOWNSTREAM_IMAGES, help="ranking images (the build's count)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration images for the ranges")
    parser.add_argument("--old-layers", type=int, help="time the ranking in ncnn on the first K layers only")
    args = parser.parse_args()
    home = Path(os.environ.get("DEPLOY_HOME", ".deploy"))
    onnx_path, info, data = exported_embedded(home, args.imgsz)
    tensors = calibration_tensors(data, info.imgsz, args.calibration)
    check = np.concatenate(tensors[:args.images])
    work = Path(tempfile.mkdtemp(prefix=f"arm-ranking-{os.getpid()}-"))
    try:
        backend = NcnnArm().quant_backend("int8", onnx_path, info, work / "backend", {})
        ranges = ranges_for(collect_statistics(backend.tap(), batched(tensors)), "minmax", True)
        layers = backend.convs[:args.old_layers] if args.old_layers else backend.convs
        load_start = os.getloadavg()[0]
        started = time.perf_counter()
        new = backend.rank_units(ranges, [check])
        new_seconds = time.perf_counter() - started
        started = time.perf_counter()
        old = ncnn_ranking(backend, ranges, check, layers)
        old_seconds = time.perf_counter() - started
        load_end = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    every = len(layers) == len(backend.convs)
    old_total = old_seconds if every else old_seconds / len(layers) * len(backend.convs)
    print(f"host: {cpu_name()} ({vector_extensions()}), {os.cpu_count()} CPUs; yolov8n (embedded) imgsz "
          f"{info.imgsz}; {len(check)} ranking images, ncnn at {SCORING_THREADS} thread; load average "
          f"{load_start:.2f} at the start, {load_end:.2f} at the end\n")
    print("| ranking | layers timed | seconds for all {0} layers |".format(len(backend.convs)))
    print("|---|---|---|")
    print(f"| in ncnn: a model per layer, through the whole network | {len(layers)} | "
          f"{old_total:.0f}{'' if every else ' (estimate: measured per layer x ' + str(len(backend.convs)) + ')'} |")
    print(f"| simulated in the ONNX graph (the build's) | {len(backend.convs)} | {new_seconds:.1f} |")
    print(f"\nspeed-up: {old_total / new_seconds:.0f}x{'' if every else ' (from the estimate)'}")
    if every:
        old_order = sorted(old, key=old.get)
        new_order = [r.unit for r in new]
        overlaps = ", ".join(f"{k}: {len(set(old_order[:k]) & set(new_order[:k]))}/{k}" for k in (1, 2, 4, 8, 16))
        print(f"\nagreement: Spearman {spearman(new_order, old_order):.2f}; most harmful layers in common: "
              f"{overlaps}; ncnn's 8 most harmful are at places "
              f"{[new_order.index(name) + 1 for name in old_order[:8]]} of the build's order; largest difference "
              f"in a layer's score {max(abs(old[r.unit] - r.sqnr_db) for r in new):.2f} dB")


if __name__ == "__main__":
    main()
