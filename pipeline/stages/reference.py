"""reference: the FP32 ONNX model in ONNX Runtime on the selection and report splits, once per build.

It records the FP32 model's accuracy where the split has labels and, on every
split, its confident detections: the boxes fidelity is measured against. Every
later comparison (method choice, fallback search, the gate, the report) reads
this artifact instead of running the FP32 model again.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.results import ModelInfo, ReferenceAccuracy


class ReferenceStage(Stage):
    name = "reference"
    toolchain = ("onnxruntime", "pycocotools")
    inputs = ("model_info", "onnx")

    # Whether to measure fidelity's jitter floor on the selection split: the quantize and verify gates read it from
    # this build's own reference; the unpruned model's is read for its report split only.
    measures_jitter_floor = True

    def __init__(self, selection: ImageSet, report: ImageSet, fidelity_conf: float = 0.25):
        self.selection, self.report, self.fidelity_conf = selection, report, fidelity_conf

    def settings(self) -> dict:
        return {"fidelity_conf": self.fidelity_conf}

    def fingerprints(self) -> dict:
        return {"selection": self.selection.fingerprint, "report": self.report.fingerprint}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from edge_deploy.calibration.onnxrt import SCORING_THREADS, ort_infer
        from edge_deploy.pipeline.evaluate import (UNSURE_NMS_IOUS, describe_split, fidelity_reference,
                                                    jitter_floor, run_detections, score_split)

        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        infer = ort_infer(inputs["onnx"].path, SCORING_THREADS)
        measured = {}
        for role, split in (("selection", self.selection), ("report", self.report)):
            detections = run_detections(split, infer, info.strides, also_at_iou=UNSURE_NMS_IOUS,
                                        near_ties_from=self.fidelity_conf)
            reference = fidelity_reference(detections, self.fidelity_conf)
            measured[role] = (score_split(split, detections, info, reference), reference)
        selection, report = measured["selection"][1], measured["report"][1]
        if measured["selection"][0].kind == "fidelity":
            self.check_something_to_compare(selection, report)
        # Only where choices are scored by fidelity (no labels): the floor belongs to its reference boxes.
        floor = (jitter_floor(self.selection, infer, info, measured["selection"][0], selection)
                 if self.measures_jitter_floor and measured["selection"][0].kind == "fidelity" else None)
        result = ReferenceAccuracy(measured["selection"][0], measured["report"][0],
                                   describe_split(self.selection, "selection"), describe_split(self.report, "report"),
                                   self.fidelity_conf, selection.boxes, report.boxes, SCORING_THREADS,
                                   selection.unsure, report.unsure, selection.near_ties, report.near_ties, floor)
        path = out_dir / "reference.json"
        # With the bootstrap samples: every later comparison on these images pairs its own with them.
        path.write_text(json.dumps(result.to_json(internal=True)))
        # The boxes are data for later stages, not metrics to show.
        metrics = {k: v for k, v in result.to_json().items() if not k.endswith("_boxes")}
        return StageOutput({"reference": path}, metrics)

    def check_something_to_compare(self, selection, report) -> None:
        """Without labels every choice and the gate compare with the FP32 model's boxes; with none on a split, any
        model would score the same there (a drop of 0.00 that says nothing), so the build stops instead."""
        empty = [split for split, reference in ((self.selection, selection), (self.report, report))
                 if not any(len(boxes) for boxes in reference.boxes)]
        if empty:
            where = " and ".join(f"{split.source}: {len(split.files)} images" for split in empty)
            raise InputError(f"the FP32 model detects nothing at conf >= {self.fidelity_conf:g} on the images held "
                             f"out to measure fidelity ({where}), so fidelity to it would measure nothing: use "
                             "images of what it was trained to detect, or a lower fidelity.conf")


class OriginalReferenceStage(ReferenceStage):
    """The unpruned model's FP32 reference: the gate compares the final artifact with it too."""

    name = "reference-original"
    measures_jitter_floor = False  # an FP32 pass over the selection images that nothing would read
