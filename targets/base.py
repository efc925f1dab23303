"""What every target declares as data, and the interface the stages call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    threads: int | None = None
    # Input size builds for this device default to; None keeps the checkpoint's training size, since a
    # detector is most accurate at the scale it was trained at. --imgsz overrides either.
    imgsz: int | None = None


Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class Target:
    name: ClassVar[str]
    description: ClassVar[str]
    toolchain: ClassVar[tuple[str, ...]]
    precisions: ClassVar[tuple[str, ...]]
    default_precision: ClassVar[str]
    # Precisions whose artifact needs a calibration set.
    calibrated_precisions: ClassVar[frozenset[str]] = frozenset()
    # Calibrated precisions the target's own toolchain quantizes from the FP32 model (instead of
    # starting from onnxruntime's QDQ model); compile then receives the calibration images.
    quantizes_itself: ClassVar[frozenset[str]] = frozenset()
    input_layout: ClassVar[str] = "NCHW"
    # Names of the artifact's input and of its two outputs, as the target's runtime knows them.
    io_names: ClassVar[dict[str, str]] = {"input": "images", "box_dist": "box_dist", "cls_logit": "cls_logit"}
    # Largest relative difference from the parent ONNX that compile accepts, per precision.
    parity_tolerance: ClassVar[dict[str, float]] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2, "w4a8": 5e-2,
                                                    "int4": 5e-2}
    profiles: ClassVar[tuple[Profile, ...]] = ()

    def compile(self, model: Path, precision: str, out_dir: Path, calibration: list[np.ndarray] | None = None,
                method: str = "auto", score=None, budget: float | None = None) -> dict[str, Path]:
        """Turns the precision's ONNX into the target's artifact folder; returns the files written.

        Targets that quantize themselves get the calibration images, the method, and `score` (an artifact
        folder -> its mAP50-95 drop in points on the validation split) with the budget it must meet.
        """
        raise NotImplementedError

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        """A callable running one preprocessed batch in the target's own runtime on this machine."""
        raise NotImplementedError

    def probe(self, artifact_dir: Path, job: dict, work_dir: Path) -> dict:
        """Measures the artifact (latency, load time, memory, power) and returns the result JSON."""
        raise NotImplementedError
