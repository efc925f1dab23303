"""Our CPU artifacts against the exports users pick instead, same model and data, one run on this machine.

Builds our `cpu` INT8, `cpu` pruned 50 % + INT8 and `arm` (ncnn) INT8 bundles
with the cache off, and Ultralytics' own exports of the same checkpoint: ONNX
FP32, ONNX INT8 (`int8=True`, ONNX Runtime static quantization), ncnn FP32,
TFLite INT8 (`format=tflite int8=True`, LiteRT since Ultralytics 8.4.83), and
OpenVINO FP32 and INT8 (`format=openvino int8=True`, quantized by NNCF). Every
INT8 export calibrates on the data's train split, as our builds do; none sees
the evaluated images. Each artifact is scored by our evaluator (pycocotools,
the same NMS: conf 0.001, IoU 0.7, 300 boxes) in its own runtime on the
report split, and all are timed interleaved in one process at one thread,
the whole timing repeated so every ratio shows its spread.

    .venv/bin/python benchmarks/peers.py [--repeats 3 --rounds 10 --block 10] [--data DATA_YAML --model CKPT]

Needs the peers' packages: `bash benchmarks/setup_peers.sh` (the `peers` extra, then litert-torch without deps). `--cache` reuses the build cache
and earlier exports (for development: build times are then not measured and print as "cached").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from interleave import load_average, ratios as speed_ratios, repeated_p50s, spread

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.sets import choice_splits
from edge_deploy.pipeline.build import EMBEDDED_MODEL, embedded_data, run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.detect import select
from edge_deploy.pipeline.evaluate import EVAL_CONF, EVAL_IOU, EVAL_MAX_DET, coco_map
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.ultra import ultralytics_offline
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions

BASELINE = "Ultralytics ONNX FP32"
GOAL_BUDGET = 0.5  # points of mAP50-95 below Ultralytics FP32 that "our best CPU artifact" may give up


@dataclass
class Row:
    label: str
    runtime: str
    files: list[Path] = field(default_factory=list)
    build_s: float | None = None  # None: taken from a cache, not measured
    run: Callable[[np.ndarray], object] | None = None  # one preprocessed image (1, 3, H, W) -> raw outputs
    infer: Callable | None = None  # ours: batch -> (box_dist, cls_logit), decoded by the shared postprocess
    detect: Callable | None = None  # peers: one image -> detections, their graph decodes the boxes
    map50_95: float | None = None
    error: str | None = None

    @property
    def mib(self) -> float:
        return sum(f.stat().st_size for f in self.files) / 2**20


@contextlib.contextmanager
def quiet_stdout():
    """Sends everything written to stdout (native libraries included) to stderr: stdout carries only the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ---- runtimes, each at one explicit thread ----

def ort_run(model: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda tensor: session.run(None, {name: tensor})


def openvino_run(xml: Path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                                         "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(tensor):
        request.infer({0: tensor})
        return [request.get_output_tensor(0).data.copy()]
    return run


def ncnn_run(folder: Path, outputs: list[str], precision: str):
    from edge_deploy.targets.arm import ncnn_net
    from edge_deploy.targets.arm import runner as ncnn_probe

    net = ncnn_net(folder, precision, threads=1)
    return lambda tensor: [o[None] for o in ncnn_probe.run_once(net, tensor[0], outputs)]


def tflite_run(model: Path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model), num_threads=1)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    nhwc = list(inp["shape"][1:]) != [3, *inp["shape"][2:]]

    def run(tensor):
        interpreter.set_tensor(inp["index"], tensor.transpose(0, 2, 3, 1).copy() if nhwc else tensor)
        interpreter.invoke()
        return [interpreter.get_tensor(out["index"]).copy()]
    return run


def ultralytics_detect(run, imgsz: int, coordinate_scale: float = 1.0):
    """Ultralytics' graphs decode in-graph: (1, 4 + classes, anchors), xywh then class probabilities. The same
    candidate selection and NMS as our models follow."""
    def detect(tensor: np.ndarray) -> np.ndarray:
        raw = np.asarray(run(tensor)[0])[0]
        xywh, scores = raw[:4].T * coordinate_scale, raw[4:].T
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        return select(boxes, scores, imgsz, conf=EVAL_CONF, iou=EVAL_IOU, max_det=EVAL_MAX_DET)
    return detect


# ---- building ----

OURS = (  # label, target, precision, prune ratio
    ("ours cpu INT8", "cpu", "int8", None),
    ("ours cpu pruned 50% + INT8", "cpu", "int8", 0.5),
    ("ours arm ncnn INT8 (x86 ncnn)", "arm", "int8", None),
)


def build_ours(label: str, target: str, precision: str, prune: float | None, args) -> tuple[Row, ModelInfo]:
    config = BuildConfig(target=target, precision=precision, output=args.home / "bench-peers" / "ours" /
                         label.split(" (")[0].replace(" ", "_").replace("%", ""))
    config.model = args.model
    config.data = args.data
    config.imgsz = args.imgsz
    config.prune.ratio = prune
    # The table shows what the build ships, also where a budget met on the selection split is missed on the report.
    config.quantize.on_budget_exceeded = "continue"
    started = time.perf_counter()
    result = run_build(config, args.home, use_cache=args.cache)
    build_s = None if args.cache else time.perf_counter() - started
    records = {r.name: r for r in result.records}
    described = records["prune"] if "prune" in records else records["load"]
    info = ModelInfo.from_json(json.loads(described.artifacts["model_info"].path.read_text()))
    artifact = records["compile"].artifacts["artifact"].path
    if target == "cpu":
        model = artifact / "model.onnx"
        run = ort_run(model)
        return Row(label, "onnxruntime", [model], build_s, run, infer=lambda batch: run(batch)), info
    files = [artifact / "model.ncnn.param", artifact / "model.ncnn.bin"]
    run = ncnn_run(artifact, ["out0", "out1"], precision)
    return Row(label, "ncnn", files, build_s, run, infer=run), info


PEERS = (  # label, runtime, format, export arguments beyond format/imgsz
    (BASELINE, "onnxruntime", "onnx", {}),
    ("Ultralytics ONNX INT8 (int8=True)", "onnxruntime", "onnx", {"int8": True}),
    ("Ultralytics ncnn FP32", "ncnn", "ncnn", {}),
    ("Ultralytics TFLite INT8 (LiteRT)", "litert", "tflite", {"int8": True}),
    ("OpenVINO FP32 (Ultralytics export)", "openvino", "openvino", {}),
    ("OpenVINO INT8 (NNCF, Ultralytics export)", "openvino", "openvino", {"int8": True}),
)


def export_peer(label: str, runtime: str, fmt: str, extra: dict, info: ModelInfo, checkpoint: Path,
                data: Path, args) -> Row:
    ultralytics = ultralytics_offline(args.home)
    work = args.home / "bench-peers" / "peers" / "".join(c if c.isalnum() else "_" for c in label)
    kwargs = dict(format=fmt, imgsz=info.imgsz, device="cpu", batch=1, **extra)
    if extra.get("int8"):
        kwargs.update(data=str(data), split="train")  # calibrate on train, never on the evaluated split
    done = work / "export.json"
    if args.cache and done.exists() and json.loads(done.read_text())["kwargs"] == {**kwargs, "data": str(data)}:
        output, build_s = Path(json.loads(done.read_text())["output"]), None
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copyfile(checkpoint, work / "model.pt")
        started = time.perf_counter()
        output = Path(ultralytics.YOLO(str(work / "model.pt")).export(**kwargs))
        build_s = time.perf_counter() - started
        done.write_text(json.dumps({"kwargs": {**kwargs, "data": str(data)}, "output": str(output)}))
    if runtime == "onnxruntime":
        files, run, scale = [output], ort_run(output), 1.0
    elif runtime == "openvino":
        xml = next(output.glob("*.xml"))
        files, run, scale = [xml, xml.with_suffix(".bin")], openvino_run(xml), 1.0
    elif runtime == "ncnn":
        files, run, scale = sorted(output.glob("*.ncnn.*")), ncnn_run(output, ["out0"], "fp32"), 1.0
    else:
        # Ultralytics' LiteRT graph divides box coordinates by the input size (one INT8 scale for boxes and scores).
        files, run, scale = [output], tflite_run(output), float(info.imgsz)
    return Row(label, runtime, files, build_s, run, detect=ultralytics_detect(run, info.imgsz, scale))


# ---- report ----

def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ("onnxruntime", "openvino", "nncf", "ncnn", "ai-edge-litert", "litert-torch", "ai-edge-quantizer",
             "ultralytics", "torch")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--data", type=Path, help="labelled Ultralytics data YAML (default: the embedded set)")
    parser.add_argument("--model", type=Path, help="YOLO checkpoint (default: the embedded YOLOv8n)")
    parser.add_argument("--imgsz", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole interleaved timing (>= 3)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--rows", nargs="*", help="build only rows whose label contains one of these (development)")
    parser.add_argument("--cache", action="store_true",
                        help="reuse the build cache and earlier exports (development: build times not measured)")
    args = parser.parse_args()
    if args.model is not None and args.data is None:
        parser.error("--model needs --data: every artifact is scored against labels")
    if args.repeats < 3 and not args.rows:
        parser.error("--repeats must be at least 3: every ratio is shown with its spread")
    args.home = args.home.resolve()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    checkpoint = (args.model or EMBEDDED_MODEL).resolve()
    data = (args.data or embedded_data(args.home)).resolve()
    wanted = (lambda label: not args.rows or any(w in label for w in args.rows))

    rows: list[Row] = []
    info = None
    with quiet_stdout():
        for label, target, precision, prune in OURS:
            if wanted(label) or info is None:  # the first build also tells the peers the model's input size
                print(f"building {label} ...", file=sys.stderr, flush=True)
                row, row_info = build_ours(label, target, precision, prune, args)
                info = info or (row_info if prune is None else None)
                if wanted(label):
                    rows.append(row)
        if info is None:
            raise SystemExit("an unpruned build is needed for the model's description")
        for label, runtime, fmt, extra in PEERS:
            if not (wanted(label) or label == BASELINE):
                continue
            print(f"exporting {label} ...", file=sys.stderr, flush=True)
            try:
                rows.append(export_peer(label, runtime, fmt, extra, info, checkpoint, data, args))
            except Exception as exc:  # a peer that cannot export here is a row with its error, not a crash
                traceback.print_exc()
                rows.append(Row(label, runtime, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))

    # The report split: the images no build choice has seen (the whole val split when the data has a selection
    # split, as the embedded set does).
    _, val = choice_splits(data, Preprocess(info.imgsz), BuildConfig().selection.size, BuildConfig().selection.seed)
    live = [r for r in rows if r.error is None]
    for row in live:
        print(f"scoring {row.label} ...", file=sys.stderr, flush=True)
        row.map50_95 = coco_map(val, row.infer, info.strides, len(info.names), detect=row.detect)["map50_95"]

    tensor = load_tensor(val.files[0], Preprocess(info.imgsz))[0]
    print(f"timing, {args.repeats} repeats ...", file=sys.stderr, flush=True)
    p50s = repeated_p50s({r.label: (lambda run=r.run: run(tensor)) for r in live}, args.repeats, args.rounds,
                         args.block, warmup=5, minimum=1 if args.rows else 3)
    load_end = load_average()

    base = p50s.get(BASELINE)
    reference = next((r.map50_95 for r in live if r.label == BASELINE), None)
    ratios = {label: speed_ratios(p50s, BASELINE, label) for label in p50s} if base else {}

    print(f"host: {cpu_name()} ({vector_extensions()}), {os.cpu_count()} CPUs; {versions()}")
    print(f"date {started_at:%Y-%m-%d %H:%M} UTC; load average (1/5/15 min) at start {load_start}, at end {load_end}")
    print(f"model {checkpoint.name} imgsz {info.imgsz}; data {data}; scored on {len(val.files)} report images by "
          f"pycocotools, same NMS for all (conf {EVAL_CONF}, IoU {EVAL_IOU}, max {EVAL_MAX_DET}); INT8 peers "
          f"calibrate on the train split; 1 thread in every runtime; {args.repeats} repeats x {args.rounds} rounds "
          f"x {args.block} runs per row, interleaved; build s: wall time "
          + ("(not measured: --cache)" if args.cache else
             "of run_build with the cache off (ours: load to release, verify and probe included) or of "
             "YOLO(...).export(...) (peers)") + "\n")
    print("| model | runtime | build s | MiB | p50 ms | speed vs Ultralytics ONNX FP32, median [min-max] | "
          "mAP50-95 | drop vs Ultralytics FP32 (pts) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.error:
            print(f"| {row.label} | {row.runtime} | failed | | | | | {row.error} |")
            continue
        r = ratios.get(row.label)
        speed = spread(r) if r else "n/a"
        drop = f"{(reference - row.map50_95) * 100:.2f}" if reference is not None else "n/a"
        build = "cached" if row.build_s is None else f"{row.build_s:.0f}"
        print(f"| {row.label} | {row.runtime} | {build} | {row.mib:.2f} | {statistics.median(p50s[row.label]):.2f} "
              f"| {speed} | {row.map50_95:.4f} | {drop} |")

    ov_int8 = next((r for r in live if r.label.startswith("OpenVINO INT8")), None)
    ours = [r for r in live if r.label.startswith("ours") and reference is not None
            and (reference - r.map50_95) * 100 <= GOAL_BUDGET]
    if ov_int8 is None or reference is None:
        return
    print()
    if not ours:
        print(f"goal (our best CPU artifact within {GOAL_BUDGET} points faster than OpenVINO INT8): not met, none "
              f"of ours is within {GOAL_BUDGET} points of Ultralytics FP32")
        return
    best = max(ours, key=lambda r: statistics.median(ratios[r.label]))
    wins = sum(a > b for a, b in zip(ratios[best.label], ratios[ov_int8.label]))
    faster = statistics.median(ratios[best.label]) > statistics.median(ratios[ov_int8.label])
    print(f"goal (our best CPU artifact within {GOAL_BUDGET} points faster than OpenVINO INT8): "
          f"{'met' if faster else 'not met'}: {best.label} {statistics.median(ratios[best.label]):.2f}x vs "
          f"OpenVINO INT8 {statistics.median(ratios[ov_int8.label]):.2f}x (median speed vs Ultralytics ONNX FP32), "
          f"faster in {wins} of {args.repeats} repeats; "
          f"{best.label} is {statistics.median(p50s[ov_int8.label]) / statistics.median(p50s[best.label]):.2f}x "
          f"OpenVINO INT8's speed")


if __name__ == "__main__":
    main()
