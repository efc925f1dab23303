"""quantize: FP32 ONNX + calibration set -> INT8 QDQ ONNX that keeps its accuracy, or a clear failure.

1. Activation statistics are collected once on the calibration set.
2. Each candidate method (MinMax, Entropy, Percentile; all three for `auto`)
   turns them into ranges; the INT8 model of each is scored by mAP on the
   validation split; the best is kept and the reason recorded.
3. When its mAP drop exceeds the budget, nodes are ranked by sensitivity
   (SQNR of a node's output with only that node quantized) and the most
   sensitive are kept float, doubling their number until the budget is met.
4. The result is checked against FP32 (SQNR floor) and its calibration is
   also written as a TensorRT calibration cache for targets that build engines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from calibration.preprocess import load_tensor
from calibration.sets import ImageSet
from pipeline.artifacts import Artifact
from pipeline.engine import Stage, StageOutput
from pipeline.errors import AccuracyGateError, ConversionMismatch
from pipeline.stages.export import INPUT_NAME, OUTPUT_NAMES

METHOD_ORDER = ("minmax", "percentile", "entropy")  # ties go to the simplest
PARITY_IMAGES = 16
BATCH = 8


def batched(tensors: list[np.ndarray], size: int = BATCH) -> list[np.ndarray]:
    return [np.concatenate(tensors[i:i + size]) for i in range(0, len(tensors), size)]


def int8_sqnr(fp32_path: Path, int8_path: Path, batch: np.ndarray) -> dict[str, float]:
    import onnxruntime as ort

    from pipeline.int8 import sqnr_db

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path)]
    reference, candidate = (s.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}) for s in sessions)
    return {name: round(sqnr_db(r, c), 2) for name, r, c in zip(OUTPUT_NAMES, reference, candidate)}


def with_int4_grid(model_path: Path, weights: dict, out_path: Path) -> Path:
    """The float model with its Conv weights moved onto their INT4 grid (dequantized values)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].dequantized(), init.name))
    onnx.save(model, str(out_path))
    return out_path


class QuantizeStage(Stage):
    name = "quantize"
    version = 4
    toolchain = ("onnx", "onnxruntime", "pycocotools", "torch")
    inputs = ("model_info", "onnx")

    def __init__(self, precision: str, calibration: ImageSet, val: ImageSet, method: str, per_channel: bool,
                 symmetric: bool, max_map_drop: float, on_budget_exceeded: str, min_sqnr_db: float,
                 int4_method: str = "gptq", int4_group: int = 0, trt_version: str = "8.6.1"):
        self.precision, self.calibration, self.val = precision, calibration, val
        self.method, self.per_channel, self.symmetric = method, per_channel, symmetric
        self.max_map_drop, self.on_budget_exceeded = max_map_drop, on_budget_exceeded
        self.min_sqnr_db, self.trt_version = min_sqnr_db, trt_version
        self.int4_method, self.int4_group = int4_method, int4_group

    def settings(self) -> dict:
        return {"precision": self.precision, "method": self.method, "per_channel": self.per_channel,
                "symmetric": self.symmetric, "max_map_drop": self.max_map_drop,
                "on_budget_exceeded": self.on_budget_exceeded, "min_sqnr_db": self.min_sqnr_db,
                "trt_version": self.trt_version, "format": "QDQ", "int4_method": self.int4_method,
                "int4_group": self.int4_group}

    def fingerprints(self) -> dict:
        return {"calibration": self.calibration.fingerprint, "val": self.val.fingerprint}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from calibration.formats import write_trt_cache
        from calibration.ranges import collect_statistics, ranges_for, save_statistics
        from pipeline.evaluate import coco_map
        from pipeline.int4 import quantize_weights, replace_int8_weights, write_weight_only
        from pipeline.int8 import keep_sensitive_float, node_sensitivity, prepare, quantize
        from targets.cpu import ort_infer

        info = json.loads(inputs["model_info"].path.read_text())
        score = lambda path: coco_map(self.val, ort_infer(path), info["strides"], len(info["names"]))  # noqa: E731
        tensors = [load_tensor(p, self.calibration.preprocess)[0] for p in self.calibration.files]
        batches = batched(tensors)
        label = self.precision.upper()

        work = out_dir / "work"
        work.mkdir()
        prepared = prepare(inputs["onnx"].path, work / "prepared.onnx")
        reference = score(prepared)["map50_95"]
        outputs: dict[str, Path] = {}

        weights = None
        if self.precision in ("int4", "w4a8"):
            weights = quantize_weights(prepared, self.int4_method, self.int4_group, batches)
        stats = None
        if self.precision in ("int8", "w4a8"):
            # Activation ranges are measured on the model the activations will flow through.
            source = prepared if weights is None else with_int4_grid(prepared, weights, work / "int4grid.onnx")
            stats = collect_statistics(source, batches)
            save_statistics(stats, out_dir / "activation_stats.npz")
            outputs["activation_stats"] = out_dir / "activation_stats.npz"

        def scored(path: Path, method: str, exclude: list[str]) -> dict:
            accuracy = score(path)
            return {"method": method, "float_nodes": list(exclude), "path": path, "map50_95": accuracy["map50_95"],
                    "map50": accuracy["map50"], "drop_points": round((reference - accuracy["map50_95"]) * 100, 2)}

        def trial(method: str, exclude: list[str], name: str) -> dict:
            path = quantize(source, work / f"{name}.onnx", ranges_for(stats, method, self.symmetric),
                            self.per_channel, self.symmetric, exclude)
            if weights is not None:
                path = replace_int8_weights(path, weights, work / f"{name}-w4.onnx")
            return scored(path, method, exclude)

        sensitivity, search = [], []
        if self.precision == "int4":
            trials = [scored(write_weight_only(prepared, weights, work / "int4.onnx"), f"int4-{self.int4_method}", [])]
            best = trials[0]
            choice = f"weights {self.int4_method} INT4 ({self._grouping()}), activations float"
        else:
            methods = METHOD_ORDER if self.method == "auto" else (self.method,)
            trials = [trial(m, [], m) for m in methods]
            best = max(trials, key=lambda t: (t["map50_95"], -METHOD_ORDER.index(t["method"])))
            choice = (f"{best['method']}: best mAP50-95 of {len(trials)} methods on the validation split"
                      if len(trials) > 1 else f"{best['method']}: chosen by the user")
            if weights is not None:
                choice += f"; weights {self.int4_method} INT4 ({self._grouping()})"
        if self.precision == "int8" and best["drop_points"] > self.max_map_drop:
            ranges = ranges_for(stats, best["method"], self.symmetric)
            sensitivity = node_sensitivity(prepared, ranges, batches[:2], self.symmetric, self.per_channel)
            method = best["method"]
            within, search = keep_sensitive_float(
                lambda exclude: trial(method, exclude, f"{method}-float{len(exclude)}"), sensitivity,
                self.max_map_drop)
            best = within or min([best, *search], key=lambda t: t["drop_points"])
            choice += (f"; {len(best['float_nodes'])} most sensitive nodes kept float to meet the "
                       f"{self.max_map_drop} point budget" if within else "")

        report = {
            "precision": self.precision, "reference_map50_95": reference,
            "selection_set": f"val ({len(self.val.files)} images)", "budget_points": self.max_map_drop,
            "choice": choice, "method": best["method"], "drop_points": best["drop_points"],
            "float_nodes": best["float_nodes"],
            "trials": [{k: v for k, v in t.items() if k != "path"} for t in trials + search],
            "sensitivity": [{"node": s.node, "op": s.op_type, "sqnr_db": float(s.sqnr_db)} for s in sensitivity],
        }
        (out_dir / "quantize_report.json").write_text(json.dumps(report, indent=1))
        outputs["quantize_report"] = out_dir / "quantize_report.json"
        if best["drop_points"] > self.max_map_drop and self.on_budget_exceeded == "fail":
            raise AccuracyGateError(
                f"quantize: {label} loses {best['drop_points']:.2f} mAP50-95 points at best ({best['method']}, "
                f"{len(best['float_nodes'])} nodes float), over the {self.max_map_drop:.2f} point budget; raise "
                "quantize.max_map_drop or set quantize.on_budget_exceeded: continue")

        quantized = out_dir / f"model.{self.precision}.onnx"
        best["path"].rename(quantized)
        outputs["onnx_quantized"] = quantized
        sqnr = int8_sqnr(inputs["onnx"].path, quantized, np.concatenate(tensors[:PARITY_IMAGES]))
        worst = min(sqnr.values())
        if worst < self.min_sqnr_db:
            raise ConversionMismatch(f"quantize: {label} output '{min(sqnr, key=sqnr.get)}' has SQNR {worst:.1f} dB "
                                     f"against FP32, below the {self.min_sqnr_db:.1f} dB floor")
        if stats is not None:
            # TensorRT wants symmetric ranges: amax = the larger side of each chosen range.
            chosen = ranges_for(stats, best["method"], symmetric=True)
            write_trt_cache(out_dir / "calibration.cache", {n: hi for n, (lo, hi) in chosen.items()},
                            self.trt_version)
            outputs["trt_calibration_cache"] = out_dir / "calibration.cache"
        shutil.rmtree(work)
        return StageOutput(
            outputs,
            {"precision": self.precision, "method": best["method"], "choice": choice,
             "calibration_images": len(tensors), "sqnr_db": sqnr, "drop_points": best["drop_points"],
             "float_nodes": len(best["float_nodes"]), "size_bytes": quantized.stat().st_size})

    def _grouping(self) -> str:
        return "per output channel" if not self.int4_group else f"groups of {self.int4_group} input channels"
