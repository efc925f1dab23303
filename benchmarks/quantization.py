"""Every quantization option on the embedded default model, side by side in one run.

For each INT8 calibration method: plain, and with sensitivity-ranked mixed
precision under a tight budget; INT4 weights by round-to-nearest and by GPTQ,
weight-only and W4A8. Each model is scored by COCO mAP on the 200-image
validation split and timed in ONNX Runtime on this CPU, interleaved with the
FP32 model so machine noise hits all alike.

    .venv/bin/python benchmarks/quantization.py [--budget 0.1 --rounds 15 --block 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


from interleave import interleaved_timings

from calibration.preprocess import Preprocess, load_tensor
from calibration.ranges import collect_statistics, ranges_for
from calibration.sets import calibration_set, labelled_split
from pipeline.build import embedded_data
from pipeline.config import BuildConfig
from pipeline.engine import Engine
from pipeline.evaluate import coco_map
from pipeline.int4 import quantize_weights, replace_int8_weights, write_weight_only
from pipeline.int8 import keep_sensitive_float, node_sensitivity, prepare, quantize
from pipeline.stages.export import ExportStage
from pipeline.stages.load import LoadStage
from pipeline.stages.quantize import METHOD_ORDER, with_int4_grid, batched
from pipeline.artifacts import Artifact
from pipeline.build import EMBEDDED_MODEL
from targets.cpu import ort_infer
from targets.runners.measure import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--budget", type=float, default=0.1, help="mAP50-95 points for the mixed-precision rows")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=10)
    args = parser.parse_args()
    import onnxruntime as ort

    config = BuildConfig()
    engine = Engine(args.home / "cache")
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(args.home, None), available).artifacts)
    available.update(engine.run(ExportStage(args.home, 17, True, 1e-4), available).artifacts)
    data = embedded_data(args.home)
    pre = Preprocess(160)
    calibration = calibration_set(data, pre, config.calibration.size, config.calibration.seed)
    val = labelled_split(data, "val", pre)
    batches = batched([load_tensor(p, pre)[0] for p in calibration.files])
    score = lambda path: coco_map(val, ort_infer(path), [8, 16, 32], 4)["map50_95"]  # noqa: E731

    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    prepared = prepare(available["onnx"].path, work / "prepared.onnx")
    reference = score(prepared)
    stats = collect_statistics(prepared, batches)
    rows: list[tuple[str, Path, str]] = [("FP32", prepared, "")]
    started = time.time()
    for method in METHOD_ORDER:
        ranges = ranges_for(stats, method)
        plain = quantize(prepared, work / f"{method}.onnx", ranges, True, False)
        rows.append((f"INT8 {method}", plain, ""))
        drop = (reference - score(plain)) * 100
        if drop <= args.budget:
            rows.append((f"INT8 {method} + mixed", plain, f"already within {args.budget} pts: no node float"))
            continue
        sensitivity = node_sensitivity(prepared, ranges, batches[:2], False)

        def trial(exclude, method=method, ranges=ranges):
            path = quantize(prepared, work / f"{method}-f{len(exclude)}.onnx", ranges, True, False, exclude)
            return {"path": path, "float_nodes": exclude, "drop_points": (reference - score(path)) * 100}

        within, attempts = keep_sensitive_float(trial, sensitivity, args.budget)
        best = within or min(attempts, key=lambda a: a["drop_points"])
        note = f"{len(best['float_nodes'])} of {len(sensitivity)} nodes float" + ("" if within else ", budget missed")
        rows.append((f"INT8 {method} + mixed", best["path"], note))
    for int4_method in ("rtn", "gptq"):
        weights = quantize_weights(prepared, int4_method, 0, batches)
        rows.append((f"INT4 weights {int4_method}", write_weight_only(prepared, weights, work / f"i4{int4_method}.onnx"),
                     "activations float"))
        grid = with_int4_grid(prepared, weights, work / f"grid-{int4_method}.onnx")
        w4a8_stats = collect_statistics(grid, batches)
        w8 = quantize(grid, work / f"w8-{int4_method}.onnx", ranges_for(w4a8_stats, "minmax"), True, False)
        rows.append((f"W4A8 {int4_method}", replace_int8_weights(w8, weights, work / f"w4a8{int4_method}.onnx"),
                     "activations INT8 minmax"))
    build_minutes = (time.time() - started) / 60

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    feed = batches[0][:1]
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for _, path, _ in rows]
    name = sessions[0].get_inputs()[0].name
    timings = interleaved_timings(
        {label: (lambda s=session: s.run(None, {name: feed})) for (label, _, _), session in zip(rows, sessions)},
        args.rounds, args.block, warmup=10)
    p50 = [statistics.median(timings[label]) for label, _, _ in rows]

    print(f"host: {cpu_name()}, onnxruntime {ort.__version__}, 1 thread; yolov8n imgsz 160; "
          f"calibration {len(calibration.files)} images, val {len(val.files)} images; "
          f"mixed-precision budget {args.budget} pts; quantization took {build_minutes:.1f} min\n")
    print("| model | mAP50-95 | drop (pts) | p50 ms | speed vs FP32 | size MiB | note |")
    print("|---|---|---|---|---|---|---|")
    for (label, path, note), latency in zip(rows, p50):
        accuracy = score(path)
        print(f"| {label} | {accuracy:.4f} | {(reference - accuracy) * 100:.2f} | {latency:.2f} | "
              f"{p50[0] / latency:.2f}x | {path.stat().st_size / 2**20:.2f} | {note} |")


if __name__ == "__main__":
    main()
