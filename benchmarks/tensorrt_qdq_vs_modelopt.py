"""Our jetson INT8 artifact against NVIDIA's own route to a TensorRT-ready INT8 ONNX, on the embedded default model
(or a checkpoint and its labelled data: --model, --data).

Both are explicit-quantization QDQ ONNX files for TensorRT. Ours is the jetson
build's quantize stage (Q/DQ placed by TensorRT's fusion rules, range method
and float fallback chosen by the shared search on the held-out selection
split). NVIDIA's is TensorRT Model Optimizer's ONNX PTQ
(`python -m modelopt.onnx.quantization --quantize_mode int8`: entropy
calibration, its own default node selection), fed the very calibration images
the build used, preprocessed the project's way, and calibrated on ONNX
Runtime's CPU execution provider (`--calibration_eps cpu`), so no GPU is
needed. ModelOpt writes FP16 for whatever it leaves unquantized by default
(`--high_precision_dtype fp16`); it is also run with FP32 there, which is
what our artifact keeps, so that the like-for-like row differs in INT8
choices only. Every model is scored by COCO mAP50-95 in the project's ONNX
Runtime on the report split with the same decode and NMS as the build's
verify stage; TensorRT itself is not involved (it needs the device).

ModelOpt pins its own onnx, onnxruntime-gpu, cupy-cuda12x and torch, so it
lives in a virtualenv of its own and runs as a subprocess; it is never
imported here. Set it up once (x86-64 Linux: about 3 minutes from PyPI,
6.5 GB installed):

    python3.11 -m venv .deploy/modelopt-venv
    .deploy/modelopt-venv/bin/pip install "nvidia-modelopt[onnx]"

(nvidia-modelopt 0.47.0 brought onnxruntime-gpu 1.24.4, onnx 1.21.0,
cupy-cuda12x 14.2.0 and torch 2.14.1; on a CPU-only machine the GPU wheels
install and import, and calibration runs on the CPU provider in about 45 s
per run.) Without that venv, or when ModelOpt fails, its rows say why and the
others still print. ModelOpt's files and logs are left in HOME/modelopt-bench.

The Q/DQ column counts QuantizeLinear nodes, with those on constant weights
in brackets: ModelOpt keeps float weights behind a Q/DQ pair (TensorRT folds
it at engine build, hence its larger file); ours stores INT8 weights behind a
DequantizeLinear only. ONNX Runtime's CPU provider computes the FP16 row's
float layers partly in FP32 (it casts around ops it has no FP16 kernel for),
so that row approximates, not reproduces, TensorRT's FP16.

    .venv/bin/python benchmarks/tensorrt_qdq_vs_modelopt.py [--modelopt-python PATH] [--high-precision both]
        [--model CHECKPOINT --data DATA_YAML]

`--target cpu` runs the same comparison against the cpu target's QDQ ONNX
(a dry run where the jetson target is unavailable).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

import edge_deploy
from edge_deploy.calibration.onnxrt import ort_infer
from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.sets import calibration_set, choice_splits
from edge_deploy.pipeline.evaluate import accuracy, drop_points
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.stages.release import MANIFEST
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions

WEIGHTED = ("Conv", "Gemm", "MatMul")
# Distributions whose version is worth naming from ModelOpt's venv, first found of each group.
MODELOPT_DISTS = (("nvidia-modelopt",), ("onnxruntime-gpu", "onnxruntime"), ("onnx",))
MODELOPT_TIMEOUT_S = 30 * 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--modelopt-python", type=Path,
                        help="python of ModelOpt's own venv (default: HOME/modelopt-venv/bin/python)")
    parser.add_argument("--high-precision", choices=("fp16", "fp32", "both"), default="both",
                        help="ModelOpt's --high_precision_dtype for what it leaves unquantized (its default: fp16)")
    parser.add_argument("--target", default="jetson",
                        help="target whose INT8 artifact is a QDQ ONNX (default jetson; cpu for a dry run)")
    parser.add_argument("--model", type=Path, help="a checkpoint (default: the embedded model)")
    parser.add_argument("--data", type=Path, help="its labelled data YAML (default: the embedded shapes set)")
    args = parser.parse_args()
    import onnxruntime as ort

    home = args.home
    modelopt_python = args.modelopt_python or home / "modelopt-venv" / "bin" / "python"
    # A user's checkpoint is given its own labelled data; None leaves the build's defaults.
    choices = {key: str(value) for key, value in (("model", args.model), ("data", args.data)) if value}
    result = edge_deploy.build(target=args.target, precision="int8", output=str(home / "bench-dist"), home=home,
                               **choices)
    records = {r.name: r for r in result.records}
    fp32_path = records["export"].artifacts["onnx"].path
    ours_path = records["quantize"].artifacts["quantized"].path
    info = ModelInfo.from_json(json.loads(records["load"].artifacts["model_info"].path.read_text()))
    quantize = records["quantize"].metrics

    # The build's image sets, chosen again exactly as run_build chooses them, and checked against its records.
    config = result.config
    data_yaml = Path(json.loads(result.record_path.read_text())["data"])
    pre = Preprocess(info.imgsz, layout="NCHW")
    selection, report = choice_splits(data_yaml, pre, config.selection.size, config.selection.seed)
    calibration = calibration_set(config.calibration.source or data_yaml, pre, config.calibration.size,
                                  config.calibration.seed, config.calibration.split,
                                  frames_dir=home / "video-frames",
                                  exclude=frozenset(selection.file_hashes + report.file_hashes))
    built_with = json.loads((result.bundle / MANIFEST).read_text())["calibration"]
    if built_with["fingerprint"] != calibration.fingerprint:
        raise SystemExit(f"the calibration images chosen here ({calibration.fingerprint[:16]}) are not the build's "
                         f"({built_with['fingerprint'][:16]}); calibration/sets.py or the build changed")
    if result.accuracy.split.fingerprint != report.fingerprint:
        raise SystemExit("the report split chosen here is not the one the build's verify stage scored")

    work = home / "modelopt-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    calib_npy = work / "calibration.npy"
    np.save(calib_npy, np.concatenate([load_tensor(p, pre)[0] for p in calibration.files]).astype(np.float32))
    # ModelOpt writes its intermediate models beside its output; it gets its own copy of the FP32 model.
    modelopt_input = work / "model.fp32.onnx"
    shutil.copyfile(fp32_path, modelopt_input)

    versions, missing = modelopt_versions(modelopt_python)
    rows: list[tuple[str, Path | None, str]] = [
        ("FP32 ONNX (export)", fp32_path, ""),
        (f"ours: {args.target} INT8 QDQ ({quantize['method']}, {len(quantize['float_units'])} of "
         f"{quantize['units']} {quantize['unit_kind']}s float)", ours_path, "")]
    dtypes = ("fp16", "fp32") if args.high_precision == "both" else (args.high_precision,)
    for dtype in dtypes:
        label = f"ModelOpt INT8 (entropy, rest {dtype.upper()}{', its default' if dtype == 'fp16' else ''})"
        if missing:
            rows.append((label, None, missing))
            continue
        output = work / f"modelopt-int8-{dtype}.onnx"
        reason = run_modelopt(modelopt_python, modelopt_input, calib_npy, output, dtype, work / f"modelopt-{dtype}.log")
        rows.append((label, None if reason else output, reason))

    scores = {label: accuracy(report, ort_infer(path), info) for label, path, _ in rows if path is not None}
    reference = scores[rows[0][0]]

    modelopt_text = ", ".join(f"{name} {version}" for name, version in versions.items()) if versions else missing
    print(f"host: {cpu_name()} ({vector_extensions()}), {os.cpu_count()} CPUs; project onnxruntime "
          f"{ort.__version__} scores every model; ModelOpt venv: {modelopt_text}; {info.family} imgsz {info.imgsz}; "
          f"calibration {len(calibration.files)} images (the build's, fingerprint {calibration.fingerprint[:12]}); "
          f"our choices on {len(selection.files)} selection images; mAP on {len(report.files)} report images\n")
    print("| model | mAP50-95 | drop vs FP32 (points) | Q/DQ pairs (on weights) | Conv/Gemm/MatMul left float "
          "| size MiB |")
    print("|---|---|---|---|---|---|")
    for label, path, note in rows:
        if path is None:
            print(f"| {label} | could not run here: {note} | | | | |")
            continue
        q, on_weights, floated, weighted = graph_counts(path)
        print(f"| {label} | {scores[label].map50_95:.4f} | {drop_points(reference, scores[label]):.2f} | "
              f"{q} ({on_weights}) | {floated} of {weighted} | {path.stat().st_size / 2**20:.2f} |")
    print()
    print(reading(rows, scores, reference, result.accuracy.drop_points))


def modelopt_versions(python: Path) -> tuple[dict[str, str], str]:
    """({distribution: version} in ModelOpt's venv, ''), or ({}, why it cannot be used)."""
    if not python.exists():
        return {}, f"no ModelOpt venv at {python.parent.parent} (set it up as this script's docstring says)"
    probe = ("import importlib.metadata as m, json\n"
             "found = {}\n"
             f"for group in {MODELOPT_DISTS!r}:\n"
             "    for name in group:\n"
             "        try:\n"
             "            found[name] = m.version(name); break\n"
             "        except m.PackageNotFoundError:\n"
             "            pass\n"
             "print(json.dumps(found))\n")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return {}, f"{python} does not run: {last_line(done.stderr)}"
    found = json.loads(done.stdout)
    if "nvidia-modelopt" not in found:
        return found, f"nvidia-modelopt is not installed in {python.parent.parent}"
    return found, ""


def run_modelopt(python: Path, fp32: Path, calib_npy: Path, output: Path, dtype: str, log: Path) -> str:
    """Runs ModelOpt's ONNX INT8 PTQ in its own interpreter; '' on success, else a one-line reason."""
    command = [str(python), "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32),
               "--quantize_mode", "int8", "--calibration_data_path", str(calib_npy), "--calibration_eps", "cpu",
               "--high_precision_dtype", dtype, "--output_path", str(output)]
    try:
        with log.open("w") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=MODELOPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"ModelOpt did not finish in {MODELOPT_TIMEOUT_S // 60} min (log: {log})"
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        return f"exit {done.returncode}: {last_line(text)} (log: {log})"
    if not output.is_file():
        return f"ModelOpt exited 0 but wrote no {output.name} (log: {log})"
    return ""


def last_line(text: str) -> str:
    """The line that says what went wrong: the last error-looking line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return ((errors or lines or ["no output"])[-1])[:200]


def graph_counts(path: Path) -> tuple[int, int, int, int]:
    """QuantizeLinear nodes, those of them on constant weights, and the Conv/Gemm/MatMul nodes whose input 0 is
    not fed by a DequantizeLinear (those TensorRT runs in float), of how many."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    ops = collections.Counter(node.op_type for node in graph.node)
    on_weights = sum(1 for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] in constants)
    weighted = [node for node in graph.node if node.op_type in WEIGHTED]
    floated = sum(1 for node in weighted
                  if not (node.input[0] in producer and producer[node.input[0]].op_type == "DequantizeLinear"))
    return ops["QuantizeLinear"], on_weights, floated, len(weighted)


def reading(rows, scores, reference, verify_drop: float) -> str:
    ours = drop_points(reference, scores[rows[1][0]])
    text = (f"Reading: ours loses {ours:.2f} mAP50-95 points against FP32 on {reference.images} report images "
            f"(the build's verify stage measured {verify_drop:.2f} on the same split)")
    ran = {label: drop_points(reference, scores[label]) for label, path, _ in rows[2:] if path is not None}
    if not ran:
        reasons = "; ".join(note for _, _, note in rows[2:])
        return text + f"; ModelOpt could not run here ({reasons}), so there is nothing to compare it with."
    like = next((label for label in ran if "FP32" in label), next(iter(ran)))
    gap = ran[like] - ours
    verdict = (f"ours loses {-gap:.2f} points more than ModelOpt" if gap < 0 else
               f"ModelOpt loses {gap:.2f} points more than ours" if gap > 0 else "both lose the same")
    text += (f"; {'; '.join(f'{label}: {drop:.2f}' for label, drop in ran.items())}. "
             f"Like for like ({like}), {verdict}")
    if len(ran) == 2:
        fp16, fp32 = (ran[label] for label in sorted(ran, key=lambda label: "FP32" in label))
        text += (f"; FP16 conversion alone moves ModelOpt's drop by {abs(fp16 - fp32):.2f} points, a yardstick "
                 "for how much of a gap this split can tell apart")
    return (text + ". Ours chose its range method and float fallback on the selection split; ModelOpt calibrates "
            "by entropy without looking at accuracy. TensorRT itself does not run here: every file is scored "
            "with ONNX Runtime's Q/DQ semantics.")


if __name__ == "__main__":
    main()
