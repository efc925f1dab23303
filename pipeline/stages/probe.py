"""probe: latency percentiles, FPS, load time, memory and power of the artifact (and the FP32 reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from calibration.preprocess import Preprocess, load_tensor
from pipeline.artifacts import Artifact
from pipeline.engine import Stage, StageOutput
from pipeline.stages.verify import is_reference


class ProbeStage(Stage):
    name = "probe"
    version = 2
    inputs = ("onnx", "artifact")

    def __init__(self, target, precision: str, image: Path, preprocess: Preprocess, warmup: int, runs: int,
                 threads: int | None):
        self.target, self.precision, self.image, self.preprocess = target, precision, Path(image), preprocess
        self.warmup, self.runs, self.threads = warmup, runs, threads
        self.toolchain = tuple(dict.fromkeys(("onnxruntime", *target.toolchain)))

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision, "warmup": self.warmup,
                "runs": self.runs, "threads": self.threads, "preprocess": self.preprocess.params()}

    def fingerprints(self) -> dict:
        from calibration.sets import sha256_file

        return {"probe_image": sha256_file(self.image)}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        from targets.cpu import OnnxRuntimeCpu

        tensor, _ = load_tensor(self.image, self.preprocess)
        job = {"warmup": self.warmup, "runs": self.runs, "threads": self.threads}
        reference = OnnxRuntimeCpu()
        reference_dir = out_dir / "fp32_reference"
        reference_dir.mkdir()
        reference.compile(inputs["onnx"].path, "fp32", reference_dir)
        results = {"fp32_onnx": reference.probe(reference_dir, {**job, "input_tensor": tensor}, out_dir / "job-fp32")}
        label = f"{self.precision}_{self.target.name}"
        if not is_reference(inputs["artifact"].path, inputs["onnx"]):
            target_tensor = tensor.transpose(0, 2, 3, 1).copy() if self.target.input_layout == "NHWC" else tensor
            results[label] = self.target.probe(inputs["artifact"].path, {**job, "input_tensor": target_tensor},
                                               out_dir / "job-artifact")
        if label in results:
            results["speedup_vs_fp32_p50"] = round(
                results["fp32_onnx"]["latency_ms"]["p50"] / results[label]["latency_ms"]["p50"], 3)
        report = out_dir / "probe.json"
        report.write_text(json.dumps(results, indent=1))
        # Job folders hold copies of the model; only the result is worth keeping.
        for path in out_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
        return StageOutput({"probe_report": report}, results)
