"""What every target declares as data, and the interface the stages call.

A target is one folder under targets/ and one line in the registry. It
declares its capabilities as class data (precisions, how it consumes INT8,
input layout and dtypes, where its compile step runs, its device runner); the
planner checks a build against them before any stage runs, and stages ask them
instead of testing a target's name. Its private files (ncnn's metadata, ...)
are read only by its own code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from edge_deploy.calibration.rules import QuantRules
from edge_deploy.pipeline.results import ModelInfo

# A batch -> (box_dist, cls_logit) callable. One that can spread a batch over processes says how many images it
# wants per call in an `images_at_once` attribute (see pipeline.evaluate.run_detections); without it, one at a time.
Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    # Threads the probe runs the runtime with; None: every core the device runner may use, which the runner counts,
    # sets explicitly and reports (never the runtime's own default).
    threads: int | None = None
    # Input size builds for this device default to; None keeps the checkpoint's training size, since a
    # detector is most accurate at the scale it was trained at. --imgsz overrides either.
    imgsz: int | None = None
    # What the hardware is, as data (toolchain versions, accelerators, memory): shown by `deploy targets`, and
    # read where a version matters (a TensorRT calibration cache's header names the TensorRT that reads it).
    facts: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Converted:
    """What a target's conversion wrote: role -> file in the artifact folder, and notes for the report."""

    files: dict[str, Path]
    notes: dict = field(default_factory=dict)


class Target:
    name: ClassVar[str]
    description: ClassVar[str]
    toolchain: ClassVar[tuple[str, ...]]  # host packages the compile step runs
    runtime_packages: ClassVar[tuple[str, ...]]  # what the device runner imports; versions come from the device
    precisions: ClassVar[tuple[str, ...]]
    default_precision: ClassVar[str]
    # How the target consumes INT8 (None: it takes no calibrated precision).
    quant_rules: ClassVar[QuantRules | None] = None
    input_layout: ClassVar[str] = "NCHW"
    input_dtype: ClassVar[str] = "float32"
    output_dtypes: ClassVar[dict[str, str]] = {"box_dist": "float32", "cls_logit": "float32"}
    # Names of the artifact's input and of its two outputs, as the target's runtime knows them.
    io_names: ClassVar[dict[str, str]] = {"input": "images", "box_dist": "box_dist", "cls_logit": "cls_logit"}
    # Largest relative difference from the FP32 parent that compile accepts for float precisions;
    # quantized ones are judged by output SQNR.
    parity_tolerance: ClassVar[dict[str, float]] = {"fp32": 1e-4, "fp16": 1e-2}
    # Precisions whose artifact is the FP32 ONNX itself run by ONNX Runtime: the reference, measured once.
    reference_precisions: ClassVar[frozenset[str]] = frozenset()
    # Whether the runner can time another build of this target beside the artifact, in turns in one job
    # (`prepare_job`'s `reference_dir`: the probe's FP32 build, or the bundle `deploy bench --against` names): a
    # speed-up is then the same runtime's, taken in the same moment. Targets that cannot (a microcontroller that
    # holds one model, a phone running a vendor benchmark tool) are timed against the FP32 ONNX in ONNX Runtime in
    # a job of its own.
    times_builds_in_turns: ClassVar[bool] = False
    compile_runs_on: ClassVar[str] = "host"  # or "device": the engine is built where it will run
    runner: ClassVar[Path]  # the self-contained device-side probe script
    runner_support: ClassVar[tuple[Path, ...]] = ()  # standalone modules the runner imports, sent beside it
    profiles: ClassVar[tuple[Profile, ...]] = ()
    default_profile: ClassVar[str | None] = None  # the profile a build gets when none is named
    # Artifacts of earlier stages that compile needs besides the model, per precision (e.g. a calibration cache).
    compile_inputs: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Whether compile checks the artifact against the build's profile (a microcontroller's flash and SRAM): then
    # the compile stage passes `profile=NAME` and the profile is part of its cache key.
    compile_takes_profile: ClassVar[bool] = False

    @classmethod
    def capabilities(cls) -> dict:
        rules = cls.quant_rules
        return {
            "precisions": list(cls.precisions), "default_precision": cls.default_precision,
            "int8": None if rules is None else {
                "backend": rules.name, "methods": list(rules.methods),
                "symmetric_activations": {True: "always", False: "never", None: "optional"}[
                    rules.symmetric_activations],
                "per_channel_weights": rules.per_channel_weights, "quantized": rules.quantized_inputs},
            "input": {"layout": cls.input_layout, "dtype": cls.input_dtype},
            "outputs": dict(cls.output_dtypes), "compile_runs_on": cls.compile_runs_on,
            "default_profile": cls.default_profile,
        }

    def check_model(self, info: ModelInfo, profile: Profile | None) -> None:
        """Called once the model is known (after load, and after pruning), before quantizing: a target refuses
        here what it can already tell will not work, instead of minutes later in compile."""

    def quant_backend(self, precision: str, fp32_onnx: Path, info: ModelInfo, work: Path, settings: dict):
        """The backend the shared INT8 search builds this target's candidates with (calibration.search)."""
        raise NotImplementedError(f"target {self.name} has no quantization backend")

    def convert(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo,
                out_dir: Path) -> Converted:
        """Writes the artifact into out_dir from the FP32 ONNX, or from the quantize stage's chosen candidate."""
        raise NotImplementedError

    def compile(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo,
                out_dir: Path, extras: dict[str, Path] | None = None) -> Converted:
        """`extras` holds the artifacts named in compile_inputs for this precision; only a target that declares
        some receives them in convert, so one that consumes nothing keeps the plain signature."""
        converted = self.convert(fp32_onnx, quantized, precision, info, out_dir,
                                 **({"extras": extras} if extras else {}))
        (out_dir / "runtime.json").write_text(json.dumps(self.runtime_description(precision, converted, info),
                                                         indent=1))
        return converted

    def runtime_description(self, precision: str, converted: Converted, info: ModelInfo) -> dict:
        return {
            "target": self.name, "precision": precision,
            "files": {k: p.name for k, p in converted.files.items()},
            "input": {"name": self.io_names["input"], "layout": self.input_layout, "imgsz": info.imgsz,
                      "dtype": self.input_dtype, "scale": "1/255", "colour": "RGB", "letterbox_pad": 114},
            "outputs": {
                self.io_names["box_dist"]: f"box_dist: (batch, 4*{info.reg_max}, anchors) DFL logits, "
                                           f"{self.output_dtypes['box_dist']}",
                self.io_names["cls_logit"]: f"cls_logit: (batch, {len(info.names)}, anchors) class logits "
                                            f"(apply sigmoid), {self.output_dtypes['cls_logit']}"},
            "strides": info.strides, "reg_max": info.reg_max, "names": info.names,
        }

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        """A callable running one preprocessed batch (in the target's layout) in its runtime on this machine, on
        `threads` threads (scoring passes calibration.onnxrt.SCORING_THREADS; a single-threaded runtime such as TFLM ignores
        it)."""
        raise NotImplementedError

    def prepare_job(self, artifact_dir: Path, job: dict, input_tensor: np.ndarray, job_dir: Path,
                    reference_dir: Path | None = None) -> None:
        """Fills a device job folder: the artifact files, input.npy and job.json for `runner`; with `reference_dir`
        (targets that declare `times_builds_in_turns`), also that build of this target, of the precision its
        runtime.json names, in job.json's `reference`."""
        raise NotImplementedError
