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

    def __init__(self, target, precision: str, report: ImageSet, max_map_drop: float, enforce_budget: bool = True):
        self.target, self.precision, self.max_map_drop = target, precision, max_map_drop
        self.report = in_layout(report, target.input_layout)
        self.enforce_budget = enforce_budget
        self.toolchain = tuple(dict.fromkeys(self.toolchain + target.toolchain))

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision, "max_map_drop": self.max_map_drop,
                "enforce_budget": self.enforce_budget}

    def fingerprints(self) -> dict:
        return {"report": self.report.fingerprint}

    def code_modules(self) -> tuple[str, ...]:
        return (type(self).__module__, type(self.target).__module__)

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from edge_deploy.pipeline.evaluate import accuracy, drop_points

        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        reference = ReferenceAccuracy.from_json(json.loads(inputs["reference"].path.read_text()))
        measured = None
        if self.precision not in self.target.reference_precisions:
            measured = accuracy(self.report, self.target.runtime(inputs["artifact"].path), info)
        drop = drop_points(reference.report, measured) if measured is not None else 0.0
        label = artifact_label(self.target, self.precision)
        result = AccuracyReport(label, reference.report, measured, drop, self.max_map_drop,
                                drop <= self.max_map_drop, reference.report_split)
        if not result.within_budget and self.enforce_budget:
            raise AccuracyGateError(
                f"verify: {label} loses {drop:.2f} mAP50-95 points against FP32 on the report split "
                f"({measured.map50_95:.4f} vs {reference.report.map50_95:.4f}); the budget is "
                f"{self.max_map_drop:.2f} (quantize.max_map_drop)")
        path = out_dir / "verify.json"
        path.write_text(json.dumps(result.to_json(), indent=1))
        return StageOutput({"verify_report": path}, result.to_json())
