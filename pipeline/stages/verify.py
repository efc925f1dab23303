"""verify: mAP of the target artifact in its own runtime on the report split, against the FP32 reference."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import AccuracyGateError
from edge_deploy.pipeline.results import AccuracyReport, ModelInfo, ReferenceAccuracy
from edge_deploy.pipeline.stages.quantize import in_layout


# The gate compares the drop's point estimate with the budget. These say when the images cannot carry that
# judgement, as a warning and a `flags` entry in the report:
# - an interval wider than this many budgets spans both "well within" and "well over", so the split is too small
#   (or too varied) to tell whether the budget holds;
WIDE_INTERVAL_BUDGETS = 2.0
# - rounding weights and activations removes information, so a lossy artifact beats its FP32 parent only by the
#   luck of the images: the embedded model's INT8 lands 0.38 points *below* FP32 (95 % interval [0.0, 0.83]) on
#   its 200 report images. A gain of more than a point (a 320 px INT8 model once came out "25 points better")
#   says the evaluation set is too small or unlike what the model was trained for, not that INT8 helped.
MAX_PLAUSIBLE_GAIN_POINTS = 1.0


def artifact_label(target, precision: str) -> str:
    return f"{precision.upper()} on {target.name}"


def interval_text(interval) -> str:
    return "" if interval is None else f" (95% interval {interval[0]:.2f}..{interval[1]:.2f})"


def judge(drop, budget: float, what: str, lossy: bool) -> list[dict]:
    """Flags for a drop whose interval cannot judge the budget, or that no lossy step can produce."""
    flags = []
    interval = drop.interval
    if interval is not None and interval[1] - interval[0] > WIDE_INTERVAL_BUDGETS * budget:
        flags.append({"flag": "interval-wider-than-budget", "message": (
            f"{what}'s 95% interval {interval[0]:.2f}..{interval[1]:.2f} points is wider than "
            f"{WIDE_INTERVAL_BUDGETS:g}x the {budget:.2f} point budget: the evaluation set is too small or "
            "unrepresentative to tell whether the budget holds; use more (and more typical) images")})
    if lossy and -drop > MAX_PLAUSIBLE_GAIN_POINTS:
        flags.append({"flag": "implausible-gain", "message": (
            f"{what} is {-drop:.2f} points *better* than FP32{interval_text(interval)}: a lossy step does not "
            f"gain more than {MAX_PLAUSIBLE_GAIN_POINTS:g} point beyond chance, so the evaluation set is too small "
            "or unrepresentative; do not trust this comparison")})
    return flags


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
        # Whether a miss stops the build (enforce_budget) is the gate's business, not the result's.
        return {"target": self.target.name, "precision": self.precision, "max_map_drop": self.max_map_drop,
                "total_budget": self.total_budget}

    def fingerprints(self) -> dict:
        return {"report": self.report.fingerprint}

    def code_modules(self) -> tuple[str, ...]:
        return (type(self).__module__, type(self.target).__module__)

    def gate(self, metrics: dict) -> None:
        from edge_deploy.pipeline.evaluate import jitter_floor_text

        if not self.enforce_budget:
            return
        v = AccuracyReport.from_json(metrics)
        final = v.artifact_or_reference
        if v.total_drop_points is not None and v.total_drop_points > v.total_budget_points:
            raise AccuracyGateError(
                f"verify: pruning and {self.precision.upper()} together lose {v.total_drop_points:.2f} mAP50-95 "
                f"points{interval_text(v.total_drop_interval)} against the original model on the report split "
                f"({final.map50_95:.4f} vs {v.original.map50_95:.4f}); the budget is {v.total_budget_points:.2f} "
                "(prune.max_map_drop + the precision's budget); fine-tune longer (--prune-epochs), prune less, or "
                "pass --accept-drop", stage=self.name, report=metrics)
        if v.artifact is not None and v.drop_points > v.budget_points:
            # As quantize's gate does: what fidelity's points stand for, so the user can judge --accept-drop.
            fidelity = v.artifact.kind == "fidelity"
            found = v.artifact.found_text() if fidelity else None
            raise AccuracyGateError(
                f"verify: {v.artifact_label} loses {v.drop_points:.2f} {'fidelity ' if fidelity else ''}mAP50-95 "
                f"points{interval_text(v.drop_interval)} against FP32 on the report split "
                f"({v.artifact.map50_95:.4f} vs {v.reference.map50_95:.4f}"
                f"{f'; {found} of FP32 boxes found again' if found else ''}); the budget is {v.budget_points:.2f}"
                f"{jitter_floor_text(v.selection_jitter_floor, v.budget_points)}; raise --max-map-drop "
                "(quantize.max_map_drop) or pass --accept-drop", stage=self.name, report=metrics)

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from edge_deploy.calibration.onnxrt import SCORING_THREADS
        from edge_deploy.pipeline.evaluate import bootstrap_settings, drop_points, fidelity, run_detections, score_split

        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        reference = ReferenceAccuracy.from_json(json.loads(inputs["reference"].path.read_text()))
        measured = agreement = None
        if self.precision not in self.target.reference_precisions:
            detections = run_detections(self.report, self.target.runtime(inputs["artifact"].path,
                                                                         threads=SCORING_THREADS), info.strides)
            against = reference.fidelity_reference("report")
            measured = score_split(self.report, detections, info, against)
            if measured.kind == "accuracy":
                agreement = fidelity(detections, info, against)
        label = artifact_label(self.target, self.precision)
        if measured is not None:
            drop = drop_points(reference.report, measured)
            interval = drop.interval
        else:
            drop, interval = 0.0, [0.0, 0.0]  # the artifact is the reference itself
        what = f"{label}'s {'fidelity ' if measured is not None and measured.kind == 'fidelity' else ''}" \
               "mAP50-95 drop"
        flags = judge(drop, self.max_map_drop, what, lossy=True) if measured is not None else []
        original = total = None
        if self.total_budget is not None:
            original = ReferenceAccuracy.from_json(json.loads(inputs["reference_original"].path.read_text())).report
            total = drop_points(original, measured if measured is not None else reference.report)
            # Fine-tuning after pruning may truly gain, so only the interval's width is judged here.
            flags += judge(total, self.total_budget, "the loss against the unpruned model", lossy=False)
        within = drop <= self.max_map_drop and (total is None or total <= self.total_budget)
        result = AccuracyReport(label, reference.report, measured, float(drop), self.max_map_drop, within,
                                reference.report_split, agreement, original,
                                None if total is None else float(total), self.total_budget, interval,
                                None if total is None else total.interval, bootstrap_settings(reference.report), flags,
                                SCORING_THREADS, reference.selection_jitter_floor)
        for flag in flags:
            warnings.warn(f"verify: {flag['message']}", stacklevel=2)
        path = out_dir / "verify.json"
        path.write_text(json.dumps(result.to_json(), indent=1))
        return StageOutput({"verify_report": path}, result.to_json())
