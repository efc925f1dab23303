"""compile[target]: the precision's ONNX -> the target's artifact folder, with its runtime description."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.engine import Stage, StageOutput
from pipeline.errors import ConversionMismatch
from pipeline.int8 import sqnr_db
from pipeline.stages.export import OUTPUT_NAMES, max_relative_error, parity_inputs

# Precisions whose parent is the quantize stage's QDQ model rather than the FP32 export.
QUANTIZED = ("int8", "w4a8", "int4")


class CompileStage(Stage):
    name = "compile"
    version = 7

    def __init__(self, target, precision: str, calibration=None, method: str = "auto", val=None,
                 budget: float | None = None, min_sqnr_db: float = 15.0):
        self.target, self.precision = target, precision
        self.toolchain = target.toolchain
        self.quantizes_itself = precision in target.quantizes_itself
        self.calibration = calibration if self.quantizes_itself else None
        self.method = method if self.quantizes_itself else None
        self.val = val if self.quantizes_itself else None
        self.budget = budget if self.quantizes_itself else None
        self.min_sqnr_db = min_sqnr_db
        parent = "onnx_quantized" if precision in QUANTIZED and not self.quantizes_itself else "onnx"
        self.inputs = ("model_info", parent)

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision, "method": self.method,
                "budget": self.budget, "min_sqnr_db": self.min_sqnr_db if self.quantizes_itself else None}

    def fingerprints(self) -> dict:
        if self.calibration is None:
            return {}
        return {"calibration": self.calibration.fingerprint,
                "val": self.val.fingerprint if self.val is not None else None}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        parent = inputs[self.inputs[1]].path
        info = json.loads(inputs["model_info"].path.read_text())
        artifact_dir = out_dir / "artifact"
        artifact_dir.mkdir()
        tensors = None
        if self.calibration is not None:
            from calibration.preprocess import load_tensor

            tensors = [load_tensor(p, self.calibration.preprocess)[0][0] for p in self.calibration.files]
        score = None
        if self.val is not None:
            from pipeline.evaluate import coco_map
            from targets.cpu import ort_infer

            def evaluate(infer):
                return coco_map(self.val, infer, info["strides"], len(info["names"]))["map50_95"]

            reference = evaluate(ort_infer(parent))

            def score(folder: Path) -> float:
                return round((reference - evaluate(self.target.runtime(folder))) * 100, 2)

        files = self.target.compile(parent, self.precision, artifact_dir, tensors, self.method or "auto", score,
                                    self.budget)
        runtime = {
            "target": self.target.name, "precision": self.precision, "files": {k: p.name for k, p in files.items()},
            "input": {"name": self.target.io_names["input"], "layout": self.target.input_layout,
                      "imgsz": info["imgsz"], "dtype": "float32", "scale": "1/255", "colour": "RGB",
                      "letterbox_pad": 114},
            "outputs": {self.target.io_names["box_dist"]: f"box_dist: (batch, 4*{info['reg_max']}, anchors) DFL logits",
                        self.target.io_names["cls_logit"]: f"cls_logit: (batch, {len(info['names'])}, anchors) class "
                                                           "logits (apply sigmoid)"},
            "strides": info["strides"], "reg_max": info["reg_max"], "names": info["names"],
        }
        (artifact_dir / "runtime.json").write_text(json.dumps(runtime, indent=1))

        errors = self._check_against_parent(parent, artifact_dir, info["imgsz"])
        details = json.loads((artifact_dir / "ncnn.json").read_text()).get("int8") \
            if (artifact_dir / "ncnn.json").exists() else None
        return StageOutput({"artifact": artifact_dir},
                           {"target": self.target.name, "precision": self.precision, "quantization": details,
                            "max_rel_error_vs_parent": round(max(errors.values()), 6),
                            "size_bytes": sum(p.stat().st_size for p in files.values())})

    def _check_against_parent(self, parent: Path, artifact_dir: Path, imgsz: int) -> dict[str, float]:
        import onnxruntime as ort

        example = parity_inputs(imgsz)
        if self.target.input_layout == "NHWC":
            target_input = example.transpose(0, 2, 3, 1).copy()
        else:
            target_input = example
        session = ort.InferenceSession(str(parent), providers=["CPUExecutionProvider"])
        reference = session.run(list(OUTPUT_NAMES), {"images": example})
        infer = self.target.runtime(artifact_dir)
        produced = [infer(target_input[i:i + 1]) for i in range(len(example))]
        errors = {}
        for index, name in enumerate(OUTPUT_NAMES):
            got = np.concatenate([p[index] for p in produced])
            errors[name] = max_relative_error(reference[index], got)
            if self.quantizes_itself:
                # Quantized from the FP32 parent: a single worst element says little, the noise power does.
                sqnr = sqnr_db(reference[index], got)
                if not sqnr >= self.min_sqnr_db:
                    raise ConversionMismatch(f"compile[{self.target.name}]: {self.precision} output '{name}' has "
                                             f"SQNR {sqnr:.1f} dB against its FP32 parent, below the "
                                             f"{self.min_sqnr_db:.1f} dB floor")
                continue
            tolerance = self.target.parity_tolerance[self.precision]
            if not errors[name] <= tolerance:
                raise ConversionMismatch(f"compile[{self.target.name}]: output '{name}' differs from its ONNX "
                                         f"parent by {errors[name]:.2e} (relative), tolerance {tolerance:.0e}")
        return errors
