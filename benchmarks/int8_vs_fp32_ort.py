"""INT8 vs FP32 in ONNX Runtime on this CPU, for the embedded default model.

Builds (or reuses from cache) the default cpu bundle, then times the FP32 and
INT8 models side by side in one process, alternating blocks so that machine
noise hits both alike, at 1 thread and at every core. Prints a markdown table
with latency ratios and the mAP50-95 drop measured by the verify stage.

    .venv/bin/python benchmarks/int8_vs_fp32_ort.py [--rounds 30 --block 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from interleave import interleaved_timings

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.pipeline.build import run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.results import AccuracyReport
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args()

    import onnxruntime as ort

    result = run_build(BuildConfig(output=args.home / "bench-dist"), args.home)
    verify = AccuracyReport.from_json(result.metrics("verify"))
    records = {r.name: r for r in result.records}
    fp32_path = records["export"].artifacts["onnx"].path
    int8_path = records["quantize"].artifacts["quantized"].path
    info = records["load"].metrics
    val_image = sorted(Path(result.config.data or records_data(result)).parent.glob("images/val/*"))[0]
    tensor, _ = load_tensor(val_image, Preprocess(info["imgsz"]))

    print(f"host: {cpu_name()} ({vector_extensions()}), {os.cpu_count()} CPUs, "
          f"onnxruntime {ort.__version__}; model {info['family']} imgsz {info['imgsz']}; "
          f"{args.rounds} rounds x {args.block} runs per model, interleaved\n")
    print("| threads | FP32 p50 ms | INT8 p50 ms | FP32 p90 ms | INT8 p90 ms | INT8 speed-up (p50) |")
    print("|---|---|---|---|---|---|")
    for threads in (1, os.cpu_count()):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for name, path in (("fp32", fp32_path), ("int8", int8_path))}
        timings = interleaved_timings(
            {name: (lambda s=session: s.run(None, {"images": tensor})) for name, session in sessions.items()},
            args.rounds, args.block, warmup=20)
        p50 = {k: statistics.median(v) for k, v in timings.items()}
        p90 = {k: float(np.percentile(v, 90)) for k, v in timings.items()}
        print(f"| {threads} | {p50['fp32']:.3f} | {p50['int8']:.3f} | {p90['fp32']:.3f} | {p90['int8']:.3f} "
              f"| {p50['fp32'] / p50['int8']:.2f}x |")
    print()
    print("| model | mAP50 | mAP50-95 | size MiB |")
    print("|---|---|---|---|")
    for label, m, path in (("FP32 ONNX", verify.reference, fp32_path),
                           (verify.artifact_label, verify.artifact, int8_path)):
        print(f"| {label} | {m.map50:.4f} | {m.map50_95:.4f} | {path.stat().st_size / 2**20:.2f} |")
    print(f"\nINT8 mAP50-95 drop: {verify.drop_points:.2f} points ({verify.split.images} val images, pycocotools; "
          "the build chose its method on the held-out selection split)")


def records_data(result) -> str:
    import json

    return json.loads(result.record_path.read_text())["data"]


if __name__ == "__main__":
    main()
