"""reference: the FP32 ONNX model's mAP in ONNX Runtime on the selection and report splits, once per build.

Every later comparison (method choice, fallback search, the gate, the report)
reads this artifact instead of measuring the FP32 model again.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.results import ModelInfo, ReferenceAccuracy


class ReferenceStage(Stage):
    name = "reference"
    toolchain = ("onnxruntime", "pycocotools")
    inputs = ("model_info", "onnx")

    def __init__(self, selection: ImageSet, report: ImageSet):
        self.selection, self.report = selection, report

    def fingerprints(self) -> dict:
        return {"selection": self.selection.fingerprint, "report": self.report.fingerprint}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from edge_deploy.calibration.onnxrt import ort_infer
        from edge_deploy.pipeline.evaluate import accuracy, describe_split

        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        infer = ort_infer(inputs["onnx"].path)
        result = ReferenceAccuracy(accuracy(self.selection, infer, info), accuracy(self.report, infer, info),
                                   describe_split(self.selection, "selection"), describe_split(self.report, "report"))
        path = out_dir / "reference.json"
        path.write_text(json.dumps(result.to_json(), indent=1))
        return StageOutput({"reference": path}, result.to_json())
