"""compile[target]: the FP32 ONNX (or the quantize stage's candidate) -> the target's artifact folder.

The target converts and writes its own `runtime.json`; this stage then checks
the artifact, run in the target's runtime, against its FP32 parent in ONNX
Runtime on real preprocessed images: float precisions within the target's
tolerance, quantized ones by output SQNR.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_deploy.calibration.preprocess import load_tensor
from edge_deploy.calibration.rules import PRECISIONS
from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import ConversionMismatch
from edge_deploy.pipeline.results import CompileReport, ModelInfo
from edge_deploy.pipeline.stages.export import OUTPUT_NAMES, max_relative_error

CHECK_IMAGES = 8


class CompileStage(Stage):
    name = "compile"

    def __init__(self, target, precision: str, check_images: ImageSet, min_sqnr_db: float = 15.0,
                 profile: str | None = None):
        self.target, self.precision, self.check_images = target, precision, check_images
        self.profile = profile if target.compile_takes_profile else None
        self.min_sqnr_db = min_sqnr_db
        self.toolchain = tuple(dict.fromkeys(("onnxruntime", *target.toolchain)))
        self.quantized = PRECISIONS[precision].calibrated
        self.extras = tuple(target.compile_inputs.get(precision, ()))
        self.inputs = (("model_info", "onnx", "quantized") if self.quantized else ("model_info", "onnx")) + self.extras

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision,
                "min_sqnr_db": self.min_sqnr_db if self.quantized else None,
                **({"profile": self.profile} if self.target.compile_takes_profile else {})}

    def fingerprints(self) -> dict:
        return {"check_images": self.check_images.fingerprint}

    def code_modules(self) -> tuple[str, ...]:
        return (type(self).__module__, type(self.target).__module__)

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        artifact_dir = out_dir / "artifact"
        artifact_dir.mkdir()
        quantized = inputs["quantized"].path if self.quantized else None
        extras = {name: inputs[name].path for name in self.extras}
        converted = self.target.compile(inputs["onnx"].path, quantized, self.precision, info, artifact_dir, extras,
                                        **({"profile": self.profile} if self.target.compile_takes_profile else {}))
        check, value, count = self._check_against_parent(inputs["onnx"].path, artifact_dir)
        report = CompileReport(self.target.name, self.precision, {k: p.name for k, p in converted.files.items()},
                               sum(p.stat().st_size for p in converted.files.values()), check, value, count,
                               converted.notes)
        return StageOutput({"artifact": artifact_dir}, report.to_json())

    def _check_against_parent(self, parent: Path, artifact_dir: Path) -> tuple[str, float, int]:
        from edge_deploy.calibration.onnxrt import SCORING_THREADS, ort_infer

        files = self.check_images.files[:CHECK_IMAGES]
        nchw = np.concatenate([load_tensor(p, self.check_images.preprocess)[0] for p in files])
        target_input = nchw.transpose(0, 2, 3, 1).copy() if self.target.input_layout == "NHWC" else nchw
        # Checks run at the scoring thread count, as verify's do: the count is stated, not the runtime's default
        # (ncnn's and onnxruntime's 'every core' stalled on a shared machine).
        reference = ort_infer(parent, SCORING_THREADS)(nchw)
        infer = self.target.runtime(artifact_dir, threads=SCORING_THREADS)
        produced = [infer(target_input[i:i + 1]) for i in range(len(files))]
        if self.quantized:
            from edge_deploy.calibration.ranges import sqnr_db

            values = {}
            for index, name in enumerate(OUTPUT_NAMES):
                values[name] = sqnr_db(reference[index], np.concatenate([p[index] for p in produced]))
                if not values[name] >= self.min_sqnr_db:
                    raise ConversionMismatch(
                        f"compile[{self.target.name}]: {self.precision} output '{name}' has SQNR "
                        f"{values[name]:.1f} dB against its FP32 parent on {len(files)} real images, below the "
                        f"{self.min_sqnr_db:.1f} dB floor (--min-sqnr, quantize.min_sqnr_db)")
            return "lowest output SQNR vs FP32 parent (dB)", round(min(values.values()), 2), len(files)
        worst = float_parity(f"compile[{self.target.name}]", reference,
                             [np.concatenate([p[index] for p in produced]) for index in range(len(OUTPUT_NAMES))],
                             self.target.parity_tolerance[self.precision])
        return "max relative error vs FP32 parent", round(worst, 8), len(files)


def float_parity(what: str, reference, produced, tolerance: float) -> float:
    """The largest relative difference of a float build's outputs from its ONNX parent's; ConversionMismatch,
    naming `what` and the output, when one is beyond `tolerance`."""
    errors = {}
    for index, name in enumerate(OUTPUT_NAMES):
        errors[name] = max_relative_error(reference[index], produced[index])
        if not errors[name] <= tolerance:
            raise ConversionMismatch(f"{what}: output '{name}' differs from its ONNX parent by {errors[name]:.2e} "
                                     f"(relative), tolerance {tolerance:.0e}")
    return max(errors.values())
