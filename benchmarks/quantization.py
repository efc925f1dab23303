"""Every quantization option on the embedded default model, side by side in one run.

For each INT8 range method: plain, and with sensitivity-ranked mixed precision
under a tight budget; INT4 weights by round-to-nearest and by GPTQ, weight-only
and W4A8. Every choice (how many nodes stay float) is made by the project's
one search on the held-out selection split; every model is then scored by COCO
mAP on the 200-image val split, which no choice has seen, and timed in ONNX
Runtime on this CPU, interleaved with the FP32 model so machine noise hits all
alike, the whole timing repeated (median and spread over repeats).

With --keep DIR the quantized models and their scores are kept and reused by a
later run with the same model, data, budget and quantization code, so that the
quantization can run while the machine is busy and the timing when it is quiet.

    .venv/bin/python benchmarks/quantization.py [--budget 0.1 --repeats 3 --rounds 15 --block 10 --keep DIR]
    .venv/bin/python benchmarks/quantization.py --model tests/fixtures/yolov8n-deepforest.pt \
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

from edge_deploy.calibration.onnxrt import ort_infer
from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.qdq import OnnxQdqBackend
from edge_deploy.calibration.ranges import collect_statistics
from edge_deploy.calibration.rules import RANGE_METHODS
from edge_deploy.calibration.search import search
from edge_deploy.calibration.sets import calibration_set, choice_splits
from edge_deploy.pipeline.artifacts import Artifact, atomic_write_text, hash_json
from edge_deploy.pipeline.build import EMBEDDED_MODEL, embedded_data
from edge_deploy.pipeline.codehash import source_hash
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.evaluate import accuracy, drop_points
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.stages.export import ExportStage
from edge_deploy.pipeline.stages.load import LoadStage
from edge_deploy.pipeline.stages.quantize import batched
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--budget", type=float, default=0.1, help="mAP50-95 points for the mixed-precision rows")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole interleaved timing (>= 3)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="a .pt checkpoint (default: embedded)")
    parser.add_argument("--data", type=Path, help="its labelled data YAML (default: the embedded shapes set)")
    parser.add_argument("--keep", type=Path, help="keep the quantized models and scores here, reuse them if valid")
    args = parser.parse_args()
    import onnxruntime as ort

    config = BuildConfig()
    engine = Engine(args.home / "cache")
    available = {"source": Artifact.of(args.model)}
    available.update(engine.run(LoadStage(args.home, None), available).artifacts)
    available.update(engine.run(ExportStage(args.home, 17, True, 1e-4), available).artifacts)
    info = ModelInfo.from_json(json.loads(available["model_info"].path.read_text()))
    data = args.data or embedded_data(args.home)
    pre = Preprocess(info.imgsz)
    selection, val = choice_splits(data, pre, config.selection.size, config.selection.seed)
    calibration = calibration_set(data, pre, config.calibration.size, config.calibration.seed,
                                  exclude=frozenset(selection.file_hashes))
    batches = batched([load_tensor(p, pre)[0] for p in calibration.files])
    check = batches[:2]
    fp32 = available["onnx"].path
    reference_selection = accuracy(selection, ort_infer(fp32), info)

    def selection_drop(backend):
        return lambda built: drop_points(reference_selection, accuracy(selection, backend.runtime(built), info))

    key = hash_json({"model": Artifact.of(args.model).sha256, "data": [selection.fingerprint, val.fingerprint,
                                                                      calibration.fingerprint],
                     "budget": args.budget, "code": source_hash(QUANT_CODE), "onnxruntime": ort.__version__})
    kept = load_kept(args.keep, key)
    if kept is not None:
        rows, build_minutes = kept
    else:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        rows, build_minutes = quantize_all(args, fp32, batches, check, selection_drop,
                                           Path(tempfile.mkdtemp(prefix="models-", dir=args.keep)))
        if args.keep:
            save_kept(args.keep, key, rows, build_minutes)
    reported = [accuracy(val, ort_infer(path), info) for _, path, _ in rows]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    feed = batches[0][:1]
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for _, path, _ in rows]
    name = sessions[0].get_inputs()[0].name
    load_start = load_average()
    p50s = repeated_p50s(
        {label: (lambda s=session: s.run(None, {name: feed})) for (label, _, _), session in zip(rows, sessions)},
        args.repeats, args.rounds, args.block, warmup=10)

    print(f"host: {cpu_name()} ({vector_extensions()}), onnxruntime {ort.__version__}, 1 thread; "
          f"{args.model.name} ({info.family}) imgsz {info.imgsz} on {data}; calibration {len(calibration.files)} images; choices on {len(selection.files)} selection "
          f"images, reported on {len(val.files)} val images; mixed-precision budget {args.budget} pts; "
          f"quantization took {build_minutes:.1f} min{' (an earlier run, kept)' if kept else ''}; "
          f"{args.repeats} repeats x {args.rounds} rounds x {args.block} runs per model, interleaved; "
          f"load average {load_start} at the start, {load_average()} at the end\n")
    print("| model | mAP50-95 (val) | drop (pts) | drop 95% interval | p50 ms | speed vs FP32, median [min-max] | "
          "size MiB | note |")
    print("|---|---|---|---|---|---|---|---|")
    first = rows[0][0]
    for (label, path, note), score in zip(rows, reported):
        drop = drop_points(reported[0], score)
        interval = "-" if drop.interval is None else f"{drop.interval[0]:.2f}..{drop.interval[1]:.2f}"
        print(f"| {label} | {score.map50_95:.4f} | {drop:.2f} | {interval} | {statistics.median(p50s[label]):.2f} | "
              f"{spread(ratios(p50s, first, label))} | {path.stat().st_size / 2**20:.2f} | {note} |")
    print(f"\ndrop intervals: paired bootstrap over the {len(val.files)} val images "
          "(the same resamples for every model)")


def quantize_all(args, fp32: Path, batches, check, selection_drop, work: Path) -> tuple[list, float]:
    rows: list[tuple[str, Path, str]] = [("FP32", fp32, "")]
    started = time.time()
    backend = OnnxQdqBackend(fp32, work / "int8")
    stats = collect_statistics(backend.tap(), batches)
    for method in RANGE_METHODS:
        plain = search(backend, stats, (method,), False, selection_drop(backend), 100.0, check, work / method)
        rows.append((f"INT8 {method}", plain.best.built, ""))
        mixed = search(backend, stats, (method,), False, selection_drop(backend), args.budget, check,
                       work / f"{method}-mixed")
        floated = len(mixed.best.float_units)
        note = (f"already within {args.budget} pts on the selection split: no node float" if not floated else
                f"{floated} of {backend.units()} nodes float" + ("" if mixed.within_budget else ", budget missed"))
        rows.append((f"INT8 {method} + mixed", mixed.best.built, note))
    for int4_method in ("rtn", "gptq"):
        weight_only = OnnxQdqBackend(fp32, work / f"int4-{int4_method}", activation_bits=None, weight_bits=4,
                                     int4_method=int4_method, calibration_batches=batches)
        rows.append((f"INT4 weights {int4_method}", weight_only.build(None, [], work / f"i4{int4_method}"),
                     "activations float"))
        w4a8 = OnnxQdqBackend(fp32, work / f"w4a8-{int4_method}", weight_bits=4, int4_method=int4_method,
                              calibration_batches=batches)
        w4a8_stats = collect_statistics(w4a8.tap(), batches)
        chosen = search(w4a8, w4a8_stats, ("minmax",), False, selection_drop(w4a8), 100.0, check,
                        work / f"w4a8{int4_method}")
        rows.append((f"W4A8 {int4_method}", chosen.best.built, "activations INT8 minmax"))
    return rows, (time.time() - started) / 60


# The modules whose code decides the quantized models; a kept run from other code is not reused.
QUANT_CODE = ("edge_deploy.calibration.qdq", "edge_deploy.calibration.search", "edge_deploy.calibration.ranges",
              "edge_deploy.calibration.int4", "edge_deploy.pipeline.evaluate")


def load_kept(folder: Path | None, key: str):
    index = folder / "kept.json" if folder else None
    if index is None or not index.exists():
        return None
    kept = json.loads(index.read_text())
    if kept["key"] != key or not all(Path(path).exists() for _, path, _ in kept["rows"]):
        return None
    return [(label, Path(path), note) for label, path, note in kept["rows"]], kept["build_minutes"]


def save_kept(folder: Path, key: str, rows, build_minutes: float) -> None:
    atomic_write_text(folder / "kept.json", json.dumps(
        {"key": key, "rows": [(label, str(path), note) for label, path, note in rows],
         "build_minutes": build_minutes}))


if __name__ == "__main__":
    main()
