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


class QuantizeStage(Stage):
    name = "quantize"
    version = 3
    toolchain = ("onnx", "onnxruntime", "pycocotools")
    inputs = ("model_info", "onnx")

    def __init__(self, calibration: ImageSet, val: ImageSet, method: str, per_channel: bool, symmetric: bool,
                 max_map_drop: float, on_budget_exceeded: str, min_sqnr_db: float, trt_version: str = "8.6.1"):
        self.calibration, self.val = calibration, val
        self.method, self.per_channel, self.symmetric = method, per_channel, symmetric
        self.max_map_drop, self.on_budget_exceeded = max_map_drop, on_budget_exceeded
        self.min_sqnr_db, self.trt_version = min_sqnr_db, trt_version

    def settings(self) -> dict:
        return {"method": self.method, "per_channel": self.per_channel, "symmetric": self.symmetric,
                "max_map_drop": self.max_map_drop, "on_budget_exceeded": self.on_budget_exceeded,
                "min_sqnr_db": self.min_sqnr_db, "trt_version": self.trt_version, "format": "QDQ",
                "weights": "int8"}

    def fingerprints(self) -> dict:
        return {"calibration": self.calibration.fingerprint, "val": self.val.fingerprint}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from calibration.formats import write_trt_cache
        from calibration.ranges import collect_statistics, ranges_for, save_statistics
        from pipeline.evaluate import coco_map
        from pipeline.int8 import node_sensitivity, prepare, quantize
        from targets.cpu import ort_infer

        info = json.loads(inputs["model_info"].path.read_text())
        score = lambda path: coco_map(self.val, ort_infer(path), info["strides"], len(info["names"]))  # noqa: E731
        tensors = [load_tensor(p, self.calibration.preprocess)[0] for p in self.calibration.files]
        batches = batched(tensors)

        work = out_dir / "work"
        work.mkdir()
        prepared = prepare(inputs["onnx"].path, work / "prepared.onnx")
        stats = collect_statistics(prepared, batches)
        save_statistics(stats, out_dir / "activation_stats.npz")
        reference = score(prepared)["map50_95"]

        def trial(method: str, exclude: list[str], name: str) -> dict:
            path = quantize(prepared, work / f"{name}.onnx", ranges_for(stats, method, self.symmetric),
                            self.per_channel, self.symmetric, exclude)
            accuracy = score(path)
            return {"method": method, "float_nodes": list(exclude), "path": path, "map50_95": accuracy["map50_95"],
                    "map50": accuracy["map50"], "drop_points": round((reference - accuracy["map50_95"]) * 100, 2)}

        methods = METHOD_ORDER if self.method == "auto" else (self.method,)
        trials = [trial(m, [], m) for m in methods]
        best = max(trials, key=lambda t: (t["map50_95"], -METHOD_ORDER.index(t["method"])))
        choice = (f"{best['method']}: best mAP50-95 of {len(trials)} methods on the validation split"
                  if len(trials) > 1 else f"{best['method']}: chosen by the user")

        sensitivity, search = [], []
        if best["drop_points"] > self.max_map_drop:
            ranges = ranges_for(stats, best["method"], self.symmetric)
            sensitivity = node_sensitivity(prepared, ranges, batches[:2], self.symmetric, self.per_channel)
            count = 1
            while count <= len(sensitivity):
                exclude = [s.node for s in sensitivity[:count]]
                attempt = trial(best["method"], exclude, f"{best['method']}-float{count}")
                search.append(attempt)
                if attempt["drop_points"] <= self.max_map_drop:
                    break
                count *= 2
            within = [t for t in search if t["drop_points"] <= self.max_map_drop]
            best = within[0] if within else min([best, *search], key=lambda t: t["drop_points"])
            choice += (f"; {len(best['float_nodes'])} most sensitive nodes kept float to meet the "
                       f"{self.max_map_drop} point budget" if within else "")

        report = {
            "reference_map50_95": reference, "selection_set": f"val ({len(self.val.files)} images)",
            "budget_points": self.max_map_drop, "choice": choice, "method": best["method"],
            "drop_points": best["drop_points"], "float_nodes": best["float_nodes"],
            "trials": [{k: v for k, v in t.items() if k != "path"} for t in trials + search],
            "sensitivity": [{"node": s.node, "op": s.op_type, "sqnr_db": float(s.sqnr_db)} for s in sensitivity],
        }
        (out_dir / "quantize_report.json").write_text(json.dumps(report, indent=1))
        if best["drop_points"] > self.max_map_drop and self.on_budget_exceeded == "fail":
            raise AccuracyGateError(
                f"quantize: INT8 loses {best['drop_points']:.2f} mAP50-95 points at best ({best['method']}, "
                f"{len(best['float_nodes'])} nodes float), over the {self.max_map_drop:.2f} point budget; raise "
                "quantize.max_map_drop or set quantize.on_budget_exceeded: continue")

        quantized = out_dir / "model.int8.onnx"
        best["path"].rename(quantized)
        sqnr = int8_sqnr(inputs["onnx"].path, quantized, np.concatenate(tensors[:PARITY_IMAGES]))
        worst = min(sqnr.values())
        if worst < self.min_sqnr_db:
            raise ConversionMismatch(f"quantize: INT8 output '{min(sqnr, key=sqnr.get)}' has SQNR {worst:.1f} dB "
                                     f"against FP32, below the {self.min_sqnr_db:.1f} dB floor")
        # TensorRT wants symmetric ranges: amax = the larger side of each chosen range.
        chosen = ranges_for(stats, best["method"], symmetric=True)
        write_trt_cache(out_dir / "calibration.cache", {n: hi for n, (lo, hi) in chosen.items()}, self.trt_version)
        shutil.rmtree(work)
        return StageOutput(
            {"onnx_int8": quantized, "quantize_report": out_dir / "quantize_report.json",
             "activation_stats": out_dir / "activation_stats.npz", "trt_calibration_cache": out_dir / "calibration.cache"},
            {"method": best["method"], "choice": choice, "calibration_images": len(tensors), "sqnr_db": sqnr,
             "drop_points": best["drop_points"], "float_nodes": len(best["float_nodes"]),
             "size_bytes": quantized.stat().st_size})
