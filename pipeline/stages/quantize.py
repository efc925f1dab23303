"""quantize: FP32 ONNX + calibration set -> static INT8 QDQ ONNX (onnxruntime), checked against FP32."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from calibration.preprocess import load_tensor
from calibration.sets import ImageSet
from pipeline.artifacts import Artifact
from pipeline.engine import Stage, StageOutput
from pipeline.errors import ConversionMismatch, DeployError
from pipeline.stages.export import INPUT_NAME, OUTPUT_NAMES

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Images used to compare INT8 against FP32 after quantizing; the calibration
# set's first ones, so that the check is as reproducible as the set.
PARITY_IMAGES = 16


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


class QuantizeStage(Stage):
    name = "quantize"
    version = 1
    toolchain = ("onnx", "onnxruntime")
    inputs = ("onnx",)

    def __init__(self, calibration: ImageSet, method: str, per_channel: bool, min_sqnr_db: float):
        self.calibration = calibration
        self.method, self.per_channel, self.min_sqnr_db = method, per_channel, min_sqnr_db

    def settings(self) -> dict:
        return {"method": self.method, "per_channel": self.per_channel, "min_sqnr_db": self.min_sqnr_db,
                "format": "QDQ", "activations": "uint8", "weights": "int8"}

    def fingerprints(self) -> dict:
        return {"calibration": self.calibration.fingerprint}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        calibration = self.calibration
        tensors = [load_tensor(p, calibration.preprocess)[0] for p in calibration.files]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._items = iter(tensors)

            def get_next(self):
                item = next(self._items, None)
                return None if item is None else {INPUT_NAME: item}

        prepared = out_dir / "prepared.onnx"
        quantized = out_dir / "model.int8.onnx"
        with _quiet_onnxruntime_tools():
            quant_pre_process(str(inputs["onnx"].path), str(prepared), skip_symbolic_shape=True)
            try:
                quantize_static(
                    str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=self.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, METHODS[self.method]),
                )
            except (ValueError, RuntimeError) as exc:
                raise DeployError(f"quantize ({self.method}): onnxruntime failed: {str(exc).splitlines()[0]}") from None
        prepared.unlink()

        sqnr = int8_sqnr(inputs["onnx"].path, quantized, tensors[:PARITY_IMAGES])
        worst = min(sqnr.values())
        if worst < self.min_sqnr_db:
            raise ConversionMismatch(f"quantize: INT8 output '{min(sqnr, key=sqnr.get)}' has SQNR {worst:.1f} dB "
                                     f"against FP32, below the {self.min_sqnr_db:.1f} dB floor")
        return StageOutput({"onnx_int8": quantized},
                           {"method": self.method, "calibration_images": len(tensors),
                            "sqnr_db": {k: round(v, 2) for k, v in sqnr.items()},
                            "size_bytes": quantized.stat().st_size})


def int8_sqnr(fp32_path: Path, int8_path: Path, tensors: list[np.ndarray]) -> dict[str, float]:
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path)]
    batch = np.concatenate(tensors)
    reference, candidate = (s.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}) for s in sessions)
    return {name: sqnr_db(r, c) for name, r, c in zip(OUTPUT_NAMES, reference, candidate)}


@contextlib.contextmanager
def _quiet_onnxruntime_tools():
    # The quantization tools log per-node chatter and print progress to stdout.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
