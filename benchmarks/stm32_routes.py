"""stm32: the two routes to a full-integer INT8 TFLite for TensorFlow Lite Micro, measured on the same model.

- onnx2tf + TFLite converter: what the `stm32` target does (ONNX -> NHWC TensorFlow -> INT8 .tflite). Its numbers
  come from an ordinary build (pruned 0.5 at 192 px by default; cached stages are reused).
- litert-torch (formerly ai-edge-torch; no TensorFlow): the PyTorch module of the same build's pruned checkpoint,
  captured with torch.export, quantized with PT2E (litert-torch's PT2EQuantizer, static per-channel INT8
  weights and INT8 activations calibrated on the build's own calibration images) and converted with
  litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...)), as litert-torch's docs describe.

Both files are measured the same way: the smallest arena TFLM's Python runtime runs the model in (16-byte search,
as targets/stm32 does), the .tflite size, and mAP50-95 in TFLM with that arena on the build's report split.

litert-torch lives in its own virtualenv, outside the repository, because it brings JAX, transformers, torchao and
its own ai-edge-litert pins:

    python3.11 -m venv /work/scratch/litert-venv
    /work/scratch/litert-venv/bin/pip install litert-torch
    .venv/bin/python benchmarks/stm32_routes.py [--imgsz 192] [--prune 0.5] \
        [--litert-python /work/scratch/litert-venv/bin/python]

The conversion runs in a child process of that venv (this file with --child); everything else runs in the
project's venv. The module crosses over as a torch.export program (.pt2): both venvs must have the same torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

KIB = 1024


def child(job_path: str) -> None:
    """In the litert-torch venv: .pt2 program + calibration images -> full-integer INT8 .tflite."""
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e

    job = json.loads(Path(job_path).read_text())
    program = torch.export.load(job["program"])
    images = np.load(job["calibration"])
    sample = (torch.from_numpy(images[:1]),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    started = time.perf_counter()
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for image in images:
            prepared(torch.from_numpy(image[None]))
    quantized = convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    edge.export(job["out"])
    Path(job["out"] + ".json").write_text(json.dumps({
        "seconds": round(time.perf_counter() - started, 1),
        "litert_torch": getattr(litert_torch, "__version__", "?"), "torch": torch.__version__}))


def smallest_arena(path: Path) -> int:
    """The smallest arena TFLM sets the model up in and runs it with (the search targets/stm32 uses; this route's
    models may lack the allocation report measure_arena starts from, so the search starts at 256 KiB)."""
    from edge_deploy.targets.stm32 import ArenaTooSmall, smallest_arena as search, tflm_interpreter

    def runs(size: int) -> bool:
        try:
            tflm_interpreter(path, size)
        except ArenaTooSmall:
            return False
        return True

    found = search(runs, 256 * KIB, 256 * 1024 * KIB)
    if found is None:
        raise RuntimeError(f"TFLM runs {path.name} in no arena up to 256 MiB")
    return found


def tflite_io(path: Path) -> dict:
    """Input and outputs of any .tflite (dtype, shape, scale, zero point) and its operator names."""
    from edge_deploy.targets.stm32 import _schema

    schema = _schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(path.read_bytes()), 0))
    graph = model.subgraphs[0]
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def tensor(index: int) -> dict:
        t, q = graph.tensors[index], graph.tensors[index].quantization
        scale = list(q.scale) if q is not None and q.scale is not None else []
        zero = list(q.zeroPoint) if q is not None and q.zeroPoint is not None else []
        return {"dtype": types.get(t.type), "shape": [int(d) for d in t.shape],
                "scale": float(scale[0]) if len(scale) == 1 else None, "zero": int(zero[0]) if len(zero) == 1 else 0}

    ops: dict[str, int] = {}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        label = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
        ops[label] = ops.get(label, 0) + 1
    return {"input": tensor(graph.inputs[0]), "outputs": [tensor(i) for i in graph.outputs], "ops": ops}


def tflm_raw_infer(path: Path, arena: int, io: dict, channels: tuple[int, int]):
    """NCHW float image -> (box_dist, cls_logit) as the ONNX export gives them, through TFLM with `arena`."""
    from edge_deploy.targets.stm32 import tflm_interpreter

    interpreter = tflm_interpreter(path, arena)
    shape = io["input"]["shape"]
    nhwc = shape[-1] == 3

    def infer(batch: np.ndarray):
        x = batch.transpose(0, 2, 3, 1) if nhwc else batch
        if list(x.shape) != shape:
            raise RuntimeError(f"input {x.shape} does not match the model's {shape}")
        if io["input"]["dtype"] == "int8":
            q = io["input"]
            x = np.clip(np.round(x / q["scale"]) + q["zero"], -128, 127).astype(np.int8)
        interpreter.set_input(x.astype(np.float32) if io["input"]["dtype"] == "float32" else x, 0)
        interpreter.invoke()
        found = {}
        for position, meta in enumerate(io["outputs"]):
            out = interpreter.get_output(position)
            if meta["dtype"] == "int8":
                out = (out.astype(np.float32) - meta["zero"]) * meta["scale"]
            # (1, C, N) as exported, or (1, N, C) if a route moved the channels last
            if out.shape[1] not in channels:
                out = out.transpose(0, 2, 1)
            found[out.shape[1]] = out.astype(np.float32)
        return found[channels[0]], found[channels[1]]

    return infer


def measure(path: Path, val, info, reference, channels: tuple[int, int]) -> dict:
    from edge_deploy.pipeline.evaluate import run_detections, score_split

    io = tflite_io(path)
    arena = smallest_arena(path)
    detections = run_detections(val, tflm_raw_infer(path, arena, io, channels), info.strides)
    accuracy = score_split(val, detections, info, reference.fidelity_reference("report"))
    return {"arena": arena, "flash": path.stat().st_size, "map50_95": accuracy.map50_95,
            "input": f"{io['input']['dtype']} {io['input']['shape']}", "ops": io["ops"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--imgsz", type=int, default=192)
    parser.add_argument("--prune", type=float, default=0.5)
    parser.add_argument("--litert-python", type=Path, default=Path("/work/scratch/litert-venv/bin/python"))
    parser.add_argument("--home", type=Path, default=Path(".deploy"))
    parser.add_argument("--output", type=Path, default=Path(".deploy/bench-stm32"))
    args = parser.parse_args()
    # Absolute: the stm32 conversion child runs in its own working folder and is handed paths under the home.
    args.home, args.output = args.home.resolve(), args.output.resolve()
    if args.child:
        child(args.child)
        return

    import dataclasses

    import torch

    from edge_deploy.calibration.preprocess import Preprocess, load_tensor
    from edge_deploy.calibration.sets import calibration_set, choice_splits
    from edge_deploy.pipeline.build import embedded_data, run_build
    from edge_deploy.pipeline.config import BuildConfig
    from edge_deploy.pipeline.results import ModelInfo, ReferenceAccuracy
    from edge_deploy.pipeline.stages.export import parity_inputs, raw_head_model
    from edge_deploy.pipeline.ultra import ultralytics_offline
    from edge_deploy.targets.runners.measure import cpu_name, vector_extensions

    started = time.time()
    print(f"host: {cpu_name()} ({vector_extensions()}); {time.strftime('%Y-%m-%d %H:%M %Z')}")
    settings = {"target": "stm32", "imgsz": args.imgsz, "output": args.output,
                "quantize": {"on_budget_exceeded": "continue"}}
    if args.prune:
        settings["prune"] = {"ratio": args.prune}
    result = run_build(BuildConfig(**settings), args.home)
    records = {r.name: r for r in result.records}
    source = records["prune" if args.prune else "load"]
    info_json = json.loads(source.artifacts["model_info"].path.read_text())
    info = ModelInfo.from_json(info_json)
    reference = ReferenceAccuracy.from_json(json.loads(records["reference"].artifacts["reference"].path.read_text()))
    notes, verify = result.metrics("compile")["notes"], result.metrics("verify")
    onnx2tf = {"arena": notes["arena_bytes"], "flash": notes["flash_model_bytes"],
               "map50_95": verify["artifact"]["map50_95"], "fp32": verify["reference"]["map50_95"]}

    work = args.output / f"routes-{args.imgsz}-{args.prune:g}"
    work.mkdir(parents=True, exist_ok=True)
    # The module the build exported, captured for the other venv: no Ultralytics or project code is needed there.
    ultralytics_offline(args.home)
    checkpoint = torch.load(source.artifacts["checkpoint"].path, map_location="cpu", weights_only=False)
    module = raw_head_model(checkpoint["model"].float().fuse(verbose=False)).eval()
    example = torch.from_numpy(parity_inputs(args.imgsz)[:1])
    program = torch.export.export(module, (example,))
    torch.export.save(program, str(work / "model.pt2"))
    with torch.no_grad():
        box, cls = module(example)
    channels = (int(box.shape[1]), int(cls.shape[1]))

    # The build's own calibration images (same sample, same preprocessing), NCHW float as the module takes them.
    config = result.config
    data_yaml = embedded_data(args.home)
    blank = Preprocess(imgsz=0)
    selection, report = choice_splits(data_yaml, blank, config.selection.size, config.selection.seed)
    calibration = calibration_set(data_yaml, blank, config.calibration.size, config.calibration.seed,
                                  config.calibration.split, frames_dir=args.home / "video-frames",
                                  exclude=frozenset(selection.file_hashes + report.file_hashes))
    pre = Preprocess(imgsz=args.imgsz, layout="NCHW")
    images = np.concatenate([load_tensor(p, pre)[0] for p in calibration.files]).astype(np.float32)
    np.save(work / "calibration.npy", images)
    out = work / "litert_torch_int8.tflite"
    out.unlink(missing_ok=True)
    job = {"program": str((work / "model.pt2").resolve()), "calibration": str((work / "calibration.npy").resolve()),
           "out": str(out.resolve())}
    (work / "job.json").write_text(json.dumps(job))
    convert_started = time.time()
    done = subprocess.run([str(args.litert_python), str(Path(__file__).resolve()), "--child",
                           str((work / "job.json").resolve())], capture_output=True, text=True)
    (work / "litert.log").write_text(done.stdout + done.stderr)
    val = dataclasses.replace(report, preprocess=pre)
    print(f"model: {'pruned ' + format(args.prune, 'g') if args.prune else 'unpruned'} YOLOv8n (shapes), "
          f"{info.params:,} params, {args.imgsz} px; FP32 mAP50-95 {onnx2tf['fp32']:.4f} (report split)")
    print("| route | input | arena | RAM (arena + 32 KiB stated) | .tflite | INT8 mAP50-95 (TFLM) | convert |")
    print("|---|---|---|---|---|---|---|")
    print(f"| onnx2tf + TF converter (the stm32 target) | int8 NHWC | {onnx2tf['arena']:,} B | "
          f"{(onnx2tf['arena'] + 32 * KIB) / KIB:.1f} KiB | {onnx2tf['flash']:,} B | {onnx2tf['map50_95']:.4f} | "
          "in the build's quantize stage |")
    if done.returncode != 0 or not out.is_file():
        tail = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()][-12:]
        print("| litert-torch PT2E | — | — | — | — | — | failed: see below |")
        print("litert-torch conversion failed (exit %d); last lines:\n%s" % (done.returncode, "\n".join(tail)))
    else:
        child_meta = json.loads(Path(str(out) + ".json").read_text())
        litert = measure(out, val, info, reference, channels)
        print(f"| litert-torch {child_meta['litert_torch']} PT2E | {litert['input']} | {litert['arena']:,} B | "
              f"{(litert['arena'] + 32 * KIB) / KIB:.1f} KiB | {litert['flash']:,} B | {litert['map50_95']:.4f} | "
              f"{child_meta['seconds']} s |")
        print(f"arena ratio litert-torch / onnx2tf: {litert['arena'] / onnx2tf['arena']:.2f}x; "
              f"litert-torch operators: {json.dumps(litert['ops'], sort_keys=True)}")
    print(json.dumps({"seconds": round(time.time() - started, 1),
                      "litert_seconds": round(time.time() - convert_started, 1)}))


if __name__ == "__main__":
    main()
