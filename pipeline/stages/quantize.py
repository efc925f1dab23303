"""quantize: FP32 ONNX + calibration set -> the target's quantized candidate that keeps its accuracy.

The target supplies a backend (how it represents INT8: onnxruntime QDQ, ncnn
INT8, ...); everything else is shared: activation statistics through the
backend's tap, range methods, and the one search of calibration/search.py,
which scores candidates on the selection split against the FP32 reference
measured by the reference stage. The chosen candidate, its report, the
activation statistics and calibration files for other toolchains are the
stage's artifacts; compile turns the candidate into the target's artifact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from edge_deploy.calibration.preprocess import load_tensor
from edge_deploy.calibration.rules import PRECISIONS
from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import AccuracyGateError
from edge_deploy.pipeline.results import ModelInfo, QuantizationReport, ReferenceAccuracy

BATCH = 8
SENSITIVITY_IMAGES = 16


def batched(tensors: list[np.ndarray], size: int = BATCH) -> list[np.ndarray]:
    return [np.concatenate(tensors[i:i + size]) for i in range(0, len(tensors), size)]


def in_layout(images: ImageSet, layout: str) -> ImageSet:
    """The same images, preprocessed for a runtime that takes `layout`."""
    return dataclasses.replace(images, preprocess=dataclasses.replace(images.preprocess, layout=layout))


class QuantizeStage(Stage):
    name = "quantize"
    toolchain = ("onnx", "onnxruntime", "pycocotools", "torch")
    inputs = ("model_info", "onnx", "reference")

    def __init__(self, target, precision: str, calibration: ImageSet, selection: ImageSet, method: str,
                 symmetric: bool, max_map_drop: float, on_budget_exceeded: str, int4_method: str = "gptq",
                 int4_group: int = 0, trt_version: str = "8.6.1"):
        self.target, self.precision = target, precision
        self.calibration, self.selection = in_layout(calibration, target.input_layout), \
            in_layout(selection, target.input_layout)
        self.method, self.symmetric = method, symmetric
        self.max_map_drop, self.on_budget_exceeded = max_map_drop, on_budget_exceeded
        self.int4_method, self.int4_group, self.trt_version = int4_method, int4_group, trt_version
        self.toolchain = tuple(dict.fromkeys(self.toolchain + target.toolchain))

    def settings(self) -> dict:
        # Whether a miss stops the build (on_budget_exceeded) is the gate's business, not the result's.
        return {"target": self.target.name, "precision": self.precision, "method": self.method,
                "symmetric": self.symmetric, "max_map_drop": self.max_map_drop, "trt_version": self.trt_version,
                "int4_method": self.int4_method, "int4_group": self.int4_group}

    def fingerprints(self) -> dict:
        return {"calibration": self.calibration.fingerprint, "selection": self.selection.fingerprint}

    def code_modules(self) -> tuple[str, ...]:
        return (type(self).__module__, type(self.target).__module__)

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from edge_deploy.calibration.formats import write_trt_cache
        from edge_deploy.calibration.ranges import collect_statistics, ranges_for, save_statistics
        from edge_deploy.calibration.search import search
        from edge_deploy.pipeline.evaluate import accuracy, describe_split, drop_points

        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        reference = ReferenceAccuracy.from_json(json.loads(inputs["reference"].path.read_text()))
        spec = PRECISIONS[self.precision]
        rules = self.target.quant_rules
        symmetric = rules.symmetric(self.symmetric)
        tensors = [load_tensor(p, self.calibration.preprocess)[0] for p in self.calibration.files]
        batches = batched(tensors)
        work = out_dir / "work"
        backend = self.target.quant_backend(self.precision, inputs["onnx"].path, info, work / "backend", {
            "symmetric": symmetric, "int4_method": self.int4_method, "int4_group": self.int4_group,
            "calibration_batches": batches, "progress": self.progress})
        outputs: dict[str, Path] = {}
        stats = None
        if spec.activation_bits is not None:
            stats = collect_statistics(backend.tap(), batches)
            save_statistics(stats, out_dir / "activation_stats.npz")
            outputs["activation_stats"] = out_dir / "activation_stats.npz"
            methods = rules.methods if self.method == "auto" else (self.method,)
        else:
            methods = (f"int4-{self.int4_method}",)

        started = time.monotonic()
        # What fidelity's points stand for, per candidate: the FP32 boxes found again and how far they moved.
        found_by_stem: dict[str, str | None] = {}

        def drop(built: Path) -> float:
            # Candidates are named NNN-method-floatK by the search: the name says what is being scored.
            self.progress(f"scoring candidate {built.stem} on {len(self.selection.files)} selection images "
                          f"({time.monotonic() - started:.0f} s)")
            measured = accuracy(self.selection, backend.runtime(built), info,
                                reference.fidelity_reference("selection"))
            scored = drop_points(reference.selection, measured)
            found = found_by_stem[built.stem] = measured.found_text() if measured.kind == "fidelity" else None
            self.progress(f"candidate {built.stem}: drop {float(scored):.2f} points"
                          + (f" ({found} of FP32 boxes found again)" if found else ""))
            return scored

        check = np.concatenate(tensors[:SENSITIVITY_IMAGES])
        outcome = search(backend, stats, methods, symmetric, drop, self.max_map_drop, [check],
                         work / "candidates", fallback=spec.float_fallback and rules.float_fallback)
        best = outcome.best
        float_for_speed = [u for u in backend.fixed_float_units if u not in backend.float_outputs]
        rewritten = backend.rewritten(best.built)
        report = QuantizationReport(
            precision=self.precision, method=best.method,
            choice=self._choice(methods, outcome, float_for_speed, backend.float_outputs, rewritten),
            selection=describe_split(self.selection, "selection"), budget_points=self.max_map_drop,
            drop_points=best.drop_points, within_budget=outcome.within_budget, float_units=best.float_units,
            units=backend.units(), unit_kind=rules.unit_kind, calibration_images=len(tensors),
            trials=[c.describe() for c in outcome.candidates],
            sensitivity=[dataclasses.asdict(s) for s in outcome.sensitivity],
            ranked_by=backend.ranked_by if outcome.sensitivity else None,
            float_for_speed=float_for_speed, float_outputs=list(backend.float_outputs),
            measure=reference.selection.kind, found_again=found_by_stem.get(best.built.stem),
            selection_jitter_floor=reference.selection_jitter_floor, rewritten=rewritten)
        (out_dir / "quantize_report.json").write_text(json.dumps(report.to_json(), indent=1))
        outputs["quantize_report"] = out_dir / "quantize_report.json"
        quantized = out_dir / f"quantized{best.built.suffix}"
        best.built.rename(quantized)
        outputs["quantized"] = quantized
        if stats is not None and "tensorrt-cache" in rules.calibration_files:
            # TensorRT wants symmetric ranges: amax = the larger side of each chosen range.
            chosen = ranges_for(stats, best.method, symmetric=True)
            write_trt_cache(out_dir / "calibration.cache", {n: hi for n, (lo, hi) in chosen.items()},
                            self.trt_version)
            outputs["trt_calibration_cache"] = out_dir / "calibration.cache"
        shutil.rmtree(work)
        return StageOutput(outputs, report.to_json())

    def gate(self, metrics: dict) -> None:
        from edge_deploy.pipeline.evaluate import jitter_floor_text

        report = QuantizationReport.from_json(metrics)
        if report.within_budget or self.on_budget_exceeded != "fail":
            return
        # Without labels, fidelity mAP50-95 can miss a budget on boxes a fraction of a pixel from FP32's; the share
        # found again and their shift let the user judge whether that matters before accepting it.
        found_text = f"; {report.found_again} of FP32 boxes found again" if report.found_again else ""
        # The candidate kept is the simplest within noise of the smallest drop, which may not be the smallest.
        smallest = min(report.trials, key=lambda t: t["drop_points"])
        smallest_text = ("" if smallest["drop_points"] >= report.drop_points else
                         f"; the smallest drop measured, {smallest['drop_points']:.2f} with "
                         f"{len(smallest['float_units'])} {report.unit_kind}s float, is within noise of it")
        raise AccuracyGateError(
            f"quantize: {self.precision.upper()} loses {report.drop_points:.2f} "
            f"{'fidelity ' if report.measure == 'fidelity' else ''}mAP50-95 points on the selection split "
            f"({report.method}, {len(report.float_units)} {report.unit_kind}s float{found_text}{smallest_text}), "
            f"over the {self.max_map_drop:.2f} point budget"
            f"{jitter_floor_text(report.selection_jitter_floor, self.max_map_drop)}; raise --max-map-drop "
            "(quantize.max_map_drop) or pass --accept-drop", stage=self.name, report=report.to_json())

    def _choice(self, methods: tuple[str, ...], outcome, float_for_speed: list[str],
                float_outputs: tuple[str, ...], rewritten: dict[str, str]) -> str:
        best = outcome.best
        if len(methods) > 1:
            text = (f"{outcome.reason} (selection split)" if outcome.reason else
                    f"{best.method}: best mAP50-95 of {len(methods)} methods on the selection split")
        elif PRECISIONS[self.precision].activation_bits is None:
            grouping = "per output channel" if not self.int4_group else f"groups of {self.int4_group} input channels"
            text = f"weights {self.int4_method} INT4 ({grouping}), activations float"
        elif self.method == "auto":
            text = f"{best.method}: the only method {self.target.quant_rules.name} has"
        else:
            text = f"{best.method}: chosen by the user"
        if PRECISIONS[self.precision].activation_bits is not None and PRECISIONS[self.precision].weight_bits == 4:
            text += f"; weights {self.int4_method} INT4"
        if best.float_units and outcome.within_budget and "most sensitive" not in text:
            text += (f"; {len(best.float_units)} most sensitive {self.target.quant_rules.unit_kind}s kept float to "
                     f"meet the {self.max_map_drop} point budget")
        if float_for_speed:
            text += (f"; {len(float_for_speed)} conv(s) on fewer than "
                     f"{self.target.quant_rules.float_convs_below_channels} input channels kept float (slower in "
                     "INT8)")
        if float_outputs:
            text += (f"; {len(float_outputs)} {self.target.quant_rules.unit_kind}s that compute or reshape the outputs "
                     "kept float, so the outputs are not rounded, nor those layers' inputs where the rules say so")
        if rewritten:
            text += f"; {len(rewritten)} {self.target.quant_rules.unit_kind}s rewritten for speed, with the same values"
        return text
