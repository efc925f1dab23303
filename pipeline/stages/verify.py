"""verify: mAP of the FP32 reference and of the target artifact in its own runtime, on the val split."""

from __future__ import annotations

import json
from pathlib import Path

from calibration.sets import ImageSet, sha256_file
from pipeline.artifacts import Artifact
from pipeline.engine import Stage, StageOutput
from pipeline.errors import AccuracyGateError
from pipeline.evaluate import coco_map


def is_reference(artifact_dir: Path, fp32_onnx: Artifact) -> bool:
    """True when the target artifact is the FP32 ONNX itself, run by ONNX Runtime: measure it once."""
    model = Path(artifact_dir) / "model.onnx"
    runtime = json.loads((Path(artifact_dir) / "runtime.json").read_text())
    return runtime["target"] == "cpu" and model.exists() and sha256_file(model) == fp32_onnx.sha256


class VerifyStage(Stage):
    name = "verify"
    version = 3
    toolchain = ("onnxruntime", "pycocotools")
    inputs = ("model_info", "onnx", "artifact")

    def __init__(self, target, precision: str, val: ImageSet, max_map_drop: float, enforce_budget: bool = True):
        self.target, self.precision, self.val, self.max_map_drop = target, precision, val, max_map_drop
        self.enforce_budget = enforce_budget
        self.toolchain = tuple(dict.fromkeys(self.toolchain + target.toolchain))

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision, "max_map_drop": self.max_map_drop,
                "enforce_budget": self.enforce_budget}

    def fingerprints(self) -> dict:
        return {"val": self.val.fingerprint}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from targets.cpu import ort_infer

        info = json.loads(inputs["model_info"].path.read_text())
        evaluate = lambda infer: coco_map(self.val, infer, info["strides"], len(info["names"]))  # noqa: E731
        # The reference is the FP32 ONNX in ONNX Runtime, whatever the target.
        metrics = {"fp32_onnx": evaluate(ort_infer(inputs["onnx"].path))}
        label = "fp32_onnx"
        if not is_reference(inputs["artifact"].path, inputs["onnx"]):
            label = f"{self.precision}_{self.target.name}"
            metrics[label] = evaluate(self.target.runtime(inputs["artifact"].path))
        drop = round((metrics["fp32_onnx"]["map50_95"] - metrics[label]["map50_95"]) * 100, 2)
        metrics["map50_95_drop_points"] = drop
        report = out_dir / "verify.json"
        metrics["within_budget"] = drop <= self.max_map_drop
        if not metrics["within_budget"] and self.enforce_budget:
            raise AccuracyGateError(
                f"verify: {self.precision} on {self.target.name} loses {drop:.2f} mAP50-95 points against FP32 "
                f"({metrics[label]['map50_95']:.4f} vs {metrics['fp32_onnx']['map50_95']:.4f}); "
                f"the budget is {self.max_map_drop:.2f} (quantize.max_map_drop)")
        report.write_text(json.dumps(metrics, indent=1))
        return StageOutput({"verify_report": report}, metrics)

