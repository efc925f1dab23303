"""stm32: what the embedded detector needs on a microcontroller, and whether it fits, per input size and pruning.

Each pruned row is an ordinary `stm32` build (cached stages are reused) for the default chip (stm32h747), with the
accuracy gates turned into reports (quantize.on_budget_exceeded=continue): the cost is printed, not enforced.
FP32 and INT8 (TFLM) mAP50-95 on the report split, the measured arena, RAM = arena + the stated runtime SRAM
overhead, the .tflite size and the fit per chip.

The unpruned model's parameters alone exceed every chip's flash, so its build stops right after load. Its arena
does not depend on flash, so the unpruned rows run the same stages as a build up to quantize (the same cache) and
then measure the INT8 .tflite the way compile and verify do: smallest arena TFLM runs it in, and mAP50-95 in TFLM
with that arena on the report split.

ST's model zoo detector st_yolo_lc_v1 on STM32H747 at 192 px (174 KiB RAM, 330 KiB flash, INT8) is the reference
for the 192 px rows; the goal at 160 px is an arena of at most 256 KiB.

    .venv/bin/python benchmarks/stm32_fit.py [--sizes 192 160 128 96] [--prune 0 0.5] [--goal 0.75/4 ...]
        [--model CHECKPOINT --data DATA_YAML]

`--model` and `--data` measure a user's checkpoint on labelled data (e.g. the real-image fixture) instead of the
embedded model and its shapes set.

A pruning setting is RATIO[/ROUND_TO[/EPOCHS]] (prune.ratio, prune.round_to default 8, prune.epochs default 12);
`--goal` settings run at --goal-size only. Rows at --goal-size run first, then unpruned rows, then pruned ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from edge_deploy.pipeline.build import embedded_data, resolve_inputs, run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.errors import ConfigError, DeployError
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions
from edge_deploy.targets.stm32 import RUNTIME_FLASH_BYTES, RUNTIME_SRAM_BYTES

KIB = 1024
# ST model zoo, st_yolo_lc_v1 on STM32H747 at 192 px, INT8 (the reference).
ST_RAM_BYTES, ST_FLASH_BYTES, ST_IMGSZ = 174 * KIB, 330 * KIB, 192
GOAL_FLASH_BYTES = 1024 * KIB  # the flash goal for a pruned INT8 YOLO at 192 px
GOAL_ARENA_160 = 256 * KIB

HEADER = ("| model | imgsz | FP32 mAP50-95 | INT8 (TFLM) | drop | arena | RAM (arena + 32 KiB stated overhead) | "
          "flash (.tflite) | fits | vs goal | wall |")


def parse_setting(text: str) -> tuple[float, int, int]:
    """RATIO[/ROUND_TO[/EPOCHS]]: prune.ratio, prune.round_to (default 8), prune.epochs (default 12)."""
    ratio, round_to, epochs = (text.split("/") + ["", ""])[:3]
    return float(ratio), int(round_to or 8), int(epochs or 12)


def label(ratio: float, round_to: int, epochs: int) -> str:
    if not ratio:
        return "unpruned"
    extra = [f"round_to {round_to}"] * (round_to != 8) + [f"{epochs} fine-tuning epochs"] * (epochs != 12)
    return f"pruned {ratio:g}" + (f" ({', '.join(extra)})" if extra else "")


def goal_note(imgsz: int, arena: int, flash: int) -> str:
    ram = arena + RUNTIME_SRAM_BYTES
    if imgsz == ST_IMGSZ:
        verdict = "meets" if ram <= ST_RAM_BYTES and flash <= GOAL_FLASH_BYTES else "misses"
        return (f"{verdict} st_yolo_lc_v1 @192 (174 KiB RAM): RAM {ram / KIB:.1f} KiB "
                f"({(ram - ST_RAM_BYTES) / KIB:+.1f}), flash {flash / KIB:.0f} KiB vs 330 KiB")
    if imgsz == 160:
        return f"arena {'≤' if arena <= GOAL_ARENA_160 else '>'} 256 KiB goal"
    return ""


def activation_peak(path: Path) -> dict:
    """Which activations are alive together at the worst operator: a lower bound on any arena for this graph.

    An activation lives from the operator that writes it (the graph input: from the start) to the last operator
    that reads it (a graph output: to the end); constants live in flash. The largest sum over operators is what a
    perfect planner would need for activations alone; TFLM's arena adds its own bookkeeping and scratch buffers.
    """
    from edge_deploy.targets.stm32 import _schema

    schema = _schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(Path(path).read_bytes()), 0))
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    itemsize = {schema.TensorType.INT8: 1, schema.TensorType.UINT8: 1, schema.TensorType.INT16: 2,
                schema.TensorType.INT32: 4, schema.TensorType.FLOAT32: 4, schema.TensorType.INT64: 8}

    def constant(index: int) -> bool:
        buffer = model.buffers[graph.tensors[index].buffer]
        return buffer is not None and buffer.data is not None and len(buffer.data) > 0

    first, last = {}, {}
    for i in graph.inputs:
        first[i], last[i] = -1, -1
    for step, op in enumerate(graph.operators):
        for i in op.inputs if op.inputs is not None else []:
            if i >= 0 and not constant(i):
                last[i] = step
        for i in op.outputs if op.outputs is not None else []:
            first.setdefault(i, step)
            last[i] = max(last.get(i, step), step)
    for i in graph.outputs:
        last[i] = len(graph.operators)

    def size(index: int) -> int:
        t = graph.tensors[index]
        return int(np.prod(t.shape)) * itemsize.get(t.type, 4)

    best = (0, 0, [])
    for step, op in enumerate(graph.operators):
        alive = [i for i in first if first[i] <= step <= last[i]]
        total = sum(size(i) for i in alive)
        if total > best[0]:
            best = (total, step, alive)
    total, step, alive = best
    op = graph.operators[step]
    code = model.operatorCodes[op.opcodeIndex]
    return {"bytes": total, "op": names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?"), "step": step,
            "tensors": sorted(((tuple(int(d) for d in graph.tensors[i].shape), size(i)) for i in alive),
                              key=lambda t: -t[1])}


def fits_text(fits: dict) -> str:
    return ", ".join(name for name, f in fits.items() if f["fits"]) or "none"


def pruned_row(imgsz: int, ratio: float, round_to: int, epochs: int, home: Path, out: Path,
               model: Path | None = None, data: Path | None = None) -> dict:
    settings = {"target": "stm32", "imgsz": imgsz, "output": out, "quantize": {"on_budget_exceeded": "continue"},
                "prune": {"ratio": ratio, "round_to": round_to, "epochs": epochs}, "model": model, "data": data}
    result = run_build(BuildConfig(**settings), home)
    verify, compile_ = result.metrics("verify"), result.metrics("compile")
    notes = compile_["notes"]
    return {"fp32": verify["reference"]["map50_95"], "int8": verify["artifact"]["map50_95"],
            "drop": verify["drop_points"], "arena": notes["arena_bytes"], "flash": notes["flash_model_bytes"],
            "fits": fits_text(notes["fits"]),
            "params": pruned_params(result),
            "tflite": next(r for r in result.records if r.name == "compile").artifacts["artifact"].path
            / "model.tflite"}


def pruned_params(result) -> int:
    record = next(r for r in result.records if r.name == "prune")
    return json.loads(record.artifacts["model_info"].path.read_text())["params"]


def unpruned_row(imgsz: int, home: Path, model: Path | None = None, data: Path | None = None) -> dict:
    """The build's stages up to quantize, then compile's arena measurement and verify's scoring by hand: compile
    would refuse the model for flash (and check_model stops the build before that)."""
    from edge_deploy.calibration.preprocess import Preprocess
    from edge_deploy.calibration.sets import calibration_set, choice_splits, class_names
    from edge_deploy.pipeline.artifacts import Artifact
    from edge_deploy.pipeline.engine import Engine
    from edge_deploy.pipeline.evaluate import drop_points, run_detections, score_split
    from edge_deploy.pipeline.results import ModelInfo, ReferenceAccuracy
    from edge_deploy.pipeline.stages.export import ExportStage
    from edge_deploy.pipeline.stages.load import LoadStage
    from edge_deploy.pipeline.stages.quantize import QuantizeStage, in_layout
    from edge_deploy.pipeline.stages.reference import ReferenceStage
    from edge_deploy.targets.stm32 import describe_tflite, fit, measure_arena, tflm_infer

    config = BuildConfig(target="stm32", imgsz=imgsz, quantize={"on_budget_exceeded": "continue"}, model=model,
                         data=data)
    target, model_path = resolve_inputs(config, home)
    data_yaml = data or embedded_data(home)
    blank = Preprocess(imgsz=0)
    selection, report = choice_splits(data_yaml, blank, config.selection.size, config.selection.seed)
    calibration = calibration_set(data_yaml, blank, config.calibration.size, config.calibration.seed,
                                  config.calibration.split, frames_dir=home / "video-frames",
                                  exclude=frozenset(selection.file_hashes + report.file_hashes))
    engine = Engine(home / "cache", True, lambda stage, event: None)
    available = {"source": Artifact.of(model_path)}

    def run(stage):
        record = engine.run(stage, available)
        available.update(record.artifacts)
        return record

    load = run(LoadStage(home, config.imgsz, class_names(data_yaml)))
    info = json.loads(load.artifacts["model_info"].path.read_text())
    preprocess = Preprocess(imgsz=info["imgsz"], layout="NCHW")
    val, selection = (dataclasses.replace(s, preprocess=preprocess) for s in (report, selection))
    calibration = dataclasses.replace(calibration, preprocess=preprocess)
    e = config.export
    run(ExportStage(home, e.opset, e.simplify, e.tolerance))
    reference_record = run(ReferenceStage(selection, val, config.fidelity.conf))
    q = config.quantize
    quantized = run(QuantizeStage(target, config.precision, calibration, selection, q.method, q.symmetric,
                                  q.budget(config.precision), q.on_budget_exceeded, q.int4_method, q.int4_group))
    path = quantized.artifacts["quantized"].path
    arena = measure_arena(path)["arena_bytes"]
    flash = path.stat().st_size
    meta = {"imgsz": info["imgsz"], "strides": info["strides"], **describe_tflite(path)}
    model_info = ModelInfo.from_json(info)
    reference = ReferenceAccuracy.from_json(json.loads(reference_record.artifacts["reference"].path.read_text()))
    # As verify does: the report split in the layout the TFLM model takes.
    val = in_layout(val, target.input_layout)
    detections = run_detections(val, tflm_infer(path, arena, meta), model_info.strides)
    measured = score_split(val, detections, model_info, reference.fidelity_reference("report"))
    return {"fp32": reference.report.map50_95, "int8": measured.map50_95,
            "drop": drop_points(reference.report, measured), "arena": arena, "flash": flash,
            "fits": fits_text({p.name: fit(p, arena, flash) for p in target.profiles}),
            "params": model_info.params, "tflite": path}


def one(imgsz: int, ratio: float, round_to: int, epochs: int, home: Path, out: Path, peaks: list[str],
        model: Path | None = None, data: Path | None = None) -> str:
    started = time.time()
    name = f"| {label(ratio, round_to, epochs)} | {imgsz} |"
    try:
        row = (pruned_row(imgsz, ratio, round_to, epochs, home, out, model, data) if ratio
               else unpruned_row(imgsz, home, model, data))
    except ConfigError as exc:
        return f"{name} — | — | — | — | — | — | none: {exc} | | {time.time() - started:.0f} s |"
    except DeployError as exc:
        return f"{name} failed: {exc} | | | | | | | | {time.time() - started:.0f} s |"
    if imgsz == ST_IMGSZ:
        peak = activation_peak(row["tflite"])
        alive = ", ".join(f"{'x'.join(map(str, shape))} {size:,} B" for shape, size in peak["tensors"])
        peaks.append(f"- {label(ratio, round_to, epochs)} @{imgsz}: TFLM arena {row['arena']:,} B; activations "
                     f"alive at operator {peak['step']} ({peak['op']}): {peak['bytes']:,} B = {alive}")
    extra = f" ({row['params']:,} params{'' if ratio else ': the build refuses it on flash'})"
    ram = row["arena"] + RUNTIME_SRAM_BYTES
    return (f"{name} {row['fp32']:.4f} | {row['int8']:.4f} | {row['drop']:.2f} | {row['arena']:,} B | "
            f"{ram:,} B ({ram / KIB:.1f} KiB) | {row['flash']:,} B | {row['fits']}{extra} | "
            f"{goal_note(imgsz, row['arena'], row['flash'])} | {time.time() - started:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 160, 128, 96])
    parser.add_argument("--prune", nargs="+", default=["0", "0.5"], help="RATIO[/ROUND_TO[/EPOCHS]]; 0 = unpruned")
    parser.add_argument("--goal", nargs="*", default=["0.75/4"], help="more pruning settings, at --goal-size only")
    parser.add_argument("--goal-size", type=int, default=ST_IMGSZ)
    parser.add_argument("--home", type=Path, default=Path(".deploy"))
    parser.add_argument("--output", type=Path, default=Path(".deploy/bench-stm32"))
    parser.add_argument("--model", type=Path, help="a checkpoint (default: the embedded model)")
    parser.add_argument("--data", type=Path, help="its labelled data YAML (default: the embedded shapes set)")
    args = parser.parse_args()
    # Absolute: the stm32 conversion child runs in its own working folder and is handed paths under the home.
    args.home, args.output = args.home.resolve(), args.output.resolve()
    args.model, args.data = (p.resolve() if p else None for p in (args.model, args.data))
    started = time.time()
    print(f"host: {cpu_name()} ({vector_extensions()}); {time.strftime('%Y-%m-%d %H:%M %Z')}; model "
          f"{args.model or 'embedded'} on {args.data or 'the embedded shapes set'}")
    print(f"stated runtime overhead (not measured): {RUNTIME_FLASH_BYTES // KIB} KiB flash, "
          f"{RUNTIME_SRAM_BYTES // KIB} KiB SRAM; reference: ST st_yolo_lc_v1 @192 on STM32H747 = 174 KiB RAM, "
          "330 KiB flash (INT8)")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    rows = [(s, *parse_setting(p)) for s in args.sizes for p in args.prune]
    rows += [(args.goal_size, *parse_setting(p)) for p in args.goal]
    # The goal size first (the ST comparison), then the unpruned rows (no fine-tuning: minutes), then the pruned ones.
    rows.sort(key=lambda row: (row[0] != args.goal_size, row[1] != 0))
    peaks: list[str] = []
    for imgsz, ratio, round_to, epochs in rows:
        print(one(imgsz, ratio, round_to, epochs, args.home, args.output, peaks, args.model, args.data), flush=True)
    if peaks:
        print(f"\nWhere the arena goes at {ST_IMGSZ} px (int8 tensors; the input alone is "
              f"{ST_IMGSZ * ST_IMGSZ * 3:,} B; the RAM goal leaves {ST_RAM_BYTES - RUNTIME_SRAM_BYTES:,} B of arena):")
        print("\n".join(peaks))
    print(json.dumps({"seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
