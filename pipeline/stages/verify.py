"""verify: mAP of the target artifact in its own runtime on the report split, against the FP32 reference."""

from __future__ import annotations

import json
from pathlib import Path

from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import AccuracyGateError
from edge_deploy.pipeline.results import AccuracyReport, ModelInfo, ReferenceAccuracy
from edge_deploy.pipeline.stages.quantize import in_layout


def artifact_label(target, precision: str) -> str:
    return f"{precision.upper()} on {target.name}"


class VerifyStage(Stage):
    name = "verify"
    toolchain = ("onnxruntime", "pycocotools")
    inputs = ("model_info", "reference", "artifact")

    def __init__(self, target, precision: str, report: ImageSet, max_map_drop: float, enforce_budget: bool = True,
                 total_budget: float | None = None):
        self.target, self.precision, self.max_map_drop = target, precision, max_map_drop
        self.report = in_layout(report, target.input_layout)
        self.enforce_budget, self.total_budget = enforce_budget, total_budget
        self.toolchain = tuple(dict.fromkeys(self.toolchain + target.toolchain))
        if total_budget is not None:
            self.inputs = (*self.inputs, "reference_original")

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision, "max_map_drop": self.max_map_drop,
                "enforce_budget": self.enforce_budget, "total_budget": self.total_budget}

    def fingerprints(self) -> dict:
        return {"report": self.report.fingerprint}

    def code_modules(self) -> tuple[str, ...]:
        return (type(self).__module__, type(self.target).__module__)

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from edge_deploy.pipeline.evaluate import drop_points, fidelity, run_detections, score_split

        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        reference = ReferenceAccuracy.from_json(json.loads(inputs["reference"].path.read_text()))
        measured = agreement = None
        if self.precision not in self.target.reference_precisions:
            detections = run_detections(self.report, self.target.runtime(inputs["artifact"].path), info.strides)
            measured = score_split(self.report, detections, info, reference.report_boxes, reference.fidelity_conf)
            if measured.kind == "accuracy":
                agreement = fidelity(detections, info, reference.report_boxes, reference.fidelity_conf)
        drop = drop_points(reference.report, measured) if measured is not None else 0.0
        label = artifact_label(self.target, self.precision)
        original = total = None
        if self.total_budget is not None:
            original = ReferenceAccuracy.from_json(json.loads(inputs["reference_original"].path.read_text())).report
            total = drop_points(original, measured if measured is not None else reference.report)
        within = drop <= self.max_map_drop and (total is None or total <= self.total_budget)
        result = AccuracyReport(label, reference.report, measured, drop, self.max_map_drop, within,
                                reference.report_split, agreement, original, total, self.total_budget)
        if total is not None and total > self.total_budget and self.enforce_budget:
            raise AccuracyGateError(
                f"verify: pruning and {self.precision.upper()} together lose {total:.2f} mAP50-95 points against "
                f"the original model on the report split ({(measured or reference.report).map50_95:.4f} vs "
                f"{original.map50_95:.4f}); the budget is {self.total_budget:.2f} (prune.max_map_drop + the "
                "precision's budget); fine-tune longer (--prune-epochs), prune less, or pass --accept-drop")
        if drop > self.max_map_drop and self.enforce_budget:
            raise AccuracyGateError(
                f"verify: {label} loses {drop:.2f} {'fidelity ' if measured.kind == 'fidelity' else ''}mAP50-95 "
                f"points against FP32 on the report split ({measured.map50_95:.4f} vs "
                f"{reference.report.map50_95:.4f}); the budget is "
                f"{self.max_map_drop:.2f} (quantize.max_map_drop)")
        path = out_dir / "verify.json"
        path.write_text(json.dumps(result.to_json(), indent=1))
        return StageOutput({"verify_report": path}, result.to_json())
