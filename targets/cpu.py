"""Target `cpu`: ONNX Runtime on the host CPU (x86-64 or ARM64), FP32 or static INT8 (QDQ)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import DeployError
from targets.base import Infer, Profile, Target

RUNNER = Path(__file__).parent / "runners" / "ort_probe.py"


def ort_infer(model: Path, threads: int | None = None) -> Infer:
    """One ONNX file in an ONNX Runtime CPU session, as a batch -> (box_dist, cls_logit) callable."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def infer(batch: np.ndarray):
        box_dist, cls_logit = session.run(None, {input_name: batch})
        return box_dist, cls_logit

    return infer


class OnnxRuntimeCpu(Target):
    name = "cpu"
    description = ("ONNX Runtime on a CPU; INT8 via QDQ (VNNI on x86, dot-product on ARM); INT4 weights are "
                   "dequantized to compute")
    toolchain = ("onnxruntime",)
    precisions = ("int8", "fp32", "w4a8", "int4")
    default_precision = "int8"
    calibrated_precisions = frozenset({"int8", "w4a8", "int4"})
    input_layout = "NCHW"
    profiles = (Profile("host", "this machine, the runtime's default thread count"),
                Profile("host-1-thread", "this machine, one thread (a single-core budget)", threads=1))

    def compile(self, model: Path, precision: str, out_dir: Path, calibration=None, method: str = "auto",
                score=None, budget: float | None = None) -> dict[str, Path]:
        # ONNX Runtime consumes the ONNX file as it is. Offline graph
        # optimisation is left to the session: its result depends on the CPU
        # it runs on, and constant folding would turn QDQ weights back to float.
        artifact = out_dir / "model.onnx"
        shutil.copyfile(model, artifact)
        return {"model": artifact}

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        return ort_infer(Path(artifact_dir) / "model.onnx", threads)

    def probe(self, artifact_dir: Path, job: dict, work_dir: Path) -> dict:
        """Runs the self-contained runner in a fresh process, so memory figures are the runtime's alone."""
        job_dir = Path(work_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(artifact_dir) / "model.onnx", job_dir / "model.onnx")
        np.save(job_dir / "input.npy", job.pop("input_tensor"))
        (job_dir / "job.json").write_text(json.dumps({**job, "model": "model.onnx", "input": "input.npy"}))
        done = subprocess.run([sys.executable, str(RUNNER), str(job_dir)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeployError(f"probe runner failed: {last}")
        return json.loads((job_dir / "result.json").read_text())
