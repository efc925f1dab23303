"""INT8 vs FP32 in ONNX Runtime on this CPU, for the embedded default model.

Builds (or reuses from cache) the default cpu bundle, then times the FP32 and
INT8 models side by side in one process, alternating blocks so that machine
noise hits both alike, at 1 thread and at every core, the whole timing
repeated (median and spread over repeats). Prints a markdown table with
latency ratios and the mAP50-95 drop measured by the verify stage.

    .venv/bin/python benchmarks/int8_vs_fp32_ort.py [--repeats 3 --rounds 30 --block 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from interleave import load_average, ratios, repeated_p50s, spread

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.pipeline.build import run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.results import AccuracyReport
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole interleaved timing (>= 3)")
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

    load_start = load_average()
    rows = []
    for threads in (1, os.cpu_count()):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for name, path in (("fp32", fp32_path), ("int8", int8_path))}
        p50s = repeated_p50s(
            {name: (lambda s=session: s.run(None, {"images": tensor})) for name, session in sessions.items()},
            args.repeats, args.rounds, args.block, warmup=20)
        rows.append((threads, p50s))

    print(f"host: {cpu_name()} ({vector_extensions()}), {os.cpu_count()} CPUs, "
          f"onnxruntime {ort.__version__}; model {info['family']} imgsz {info['imgsz']}; "
          f"{args.repeats} repeats x {args.rounds} rounds x {args.block} runs per model, interleaved; "
          f"load average {load_start} at the start, {load_average()} at the end\n")
    print("| threads | FP32 p50 ms | INT8 p50 ms | INT8 speed-up (p50), median [min-max] over repeats |")
    print("|---|---|---|---|")
    for threads, p50s in rows:
        print(f"| {threads} | {statistics.median(p50s['fp32']):.3f} | {statistics.median(p50s['int8']):.3f} "
              f"| {spread(ratios(p50s, 'fp32', 'int8'))} |")
    print()
    print("| model | mAP50 | mAP50-95 | size MiB |")
    print("|---|---|---|---|")
    for label, m, path in (("FP32 ONNX", verify.reference, fp32_path),
                           (verify.artifact_label, verify.artifact, int8_path)):
        print(f"| {label} | {m.map50:.4f} | {m.map50_95:.4f} | {path.stat().st_size / 2**20:.2f} |")
    interval = ("" if verify.drop_interval is None else
                f", 95% interval {verify.drop_interval[0]:.2f}..{verify.drop_interval[1]:.2f}")
    print(f"\nINT8 mAP50-95 drop: {verify.drop_points:.2f} points{interval} ({verify.split.images} val images, "
          "pycocotools, paired bootstrap over images; "
          "the build chose its method on the held-out selection split)")


def records_data(result) -> str:
    import json

    return json.loads(result.record_path.read_text())["data"]


if __name__ == "__main__":
    main()
