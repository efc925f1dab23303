"""Target `cpu`: ONNX Runtime on the host CPU (x86-64 or ARM64), FP32 or static INT8 (QDQ)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge_deploy.calibration.rules import ONNXRUNTIME_QDQ
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.base import Converted, Infer, Profile, Target


class OnnxRuntimeCpu(Target):
    name = "cpu"
    description = ("ONNX Runtime on a CPU; INT8 via QDQ (VNNI on x86, dot-product on ARM); INT4 weights are "
                   "dequantized to compute")
    toolchain = ("onnxruntime",)
    runtime_packages = ("onnxruntime", "numpy")
    precisions = ("int8", "fp32", "w4a8", "int4")
    default_precision = "int8"
    quant_rules = ONNXRUNTIME_QDQ
    input_layout = "NCHW"
    reference_precisions = frozenset({"fp32"})
    times_builds_in_turns = True
    runner = Path(__file__).parent / "runner.py"
    profiles = (Profile("host", "this machine, every core the probe may run on (counted and recorded)"),
                Profile("host-1-thread", "this machine, one thread (a single-core budget)", threads=1))

    def quant_backend(self, precision: str, fp32_onnx: Path, info: ModelInfo, work: Path, settings: dict):
        from edge_deploy.calibration.qdq import OnnxQdqBackend
        from edge_deploy.calibration.rules import PRECISIONS

        spec = PRECISIONS[precision]
        return OnnxQdqBackend(fp32_onnx, work, self.quant_rules, spec.activation_bits, spec.weight_bits,
                              settings["int4_method"], settings["int4_group"], settings["calibration_batches"],
                              settings["symmetric"], settings.get("progress"))

    def convert(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo,
                out_dir: Path) -> Converted:
        # ONNX Runtime consumes the ONNX file as it is. Offline graph
        # optimisation is left to the session: its result depends on the CPU
        # it runs on, and constant folding would turn QDQ weights back to float.
        artifact = out_dir / "model.onnx"
        shutil.copyfile(quantized if quantized is not None else fp32_onnx, artifact)
        return Converted({"model": artifact})

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        from edge_deploy.calibration.onnxrt import ort_infer

        return ort_infer(Path(artifact_dir) / "model.onnx", threads)

    def prepare_job(self, artifact_dir: Path, job: dict, input_tensor: np.ndarray, job_dir: Path,
                    reference_dir: Path | None = None) -> None:
        shutil.copyfile(Path(artifact_dir) / "model.onnx", job_dir / "model.onnx")
        np.save(job_dir / "input.npy", input_tensor)
        job = {**job, "model": "model.onnx", "input": "input.npy"}
        if reference_dir is not None:
            shutil.copyfile(Path(reference_dir) / "model.onnx", job_dir / "reference.onnx")
            job["reference"] = {"model": "reference.onnx"}
        (job_dir / "job.json").write_text(json.dumps(job))
