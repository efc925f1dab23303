"""Target `arm`: ncnn (converted by pnnx) for ARM phones and boards; FP32 or FP16 storage.

The artifact is the `.param`/`.bin` pair that an Android app or a Raspberry Pi
program loads unchanged with stock ncnn. It is verified here in the ncnn
Python runtime on x86; the same runner script runs on the device.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionMismatch, DeployError, ToolchainMissing
from targets.base import Infer, Profile, Target

RUNNER = Path(__file__).parent / "runners" / "ncnn_probe.py"
# Layer types pnnx leaves behind when it cannot map an operator to ncnn.
_UNCONVERTED = re.compile(r"^(pnnx\.\S+|F\.\S+|torch\.\S+|Tensor\.\S+|aten::\S+|prim::\S+|nn\.\S+)$")


def _pnnx_binary() -> Path:
    try:
        import pnnx
    except ImportError:
        raise ToolchainMissing("target arm needs pnnx and ncnn: pip install 'edge-deploy[arm]'") from None
    return Path(pnnx.EXEC_PATH)


class NcnnArm(Target):
    name = "arm"
    description = "ncnn for ARM phones and boards (param/bin from pnnx); FP16 storage on cores that have it"
    toolchain = ("pnnx", "ncnn")
    precisions = ("fp32", "fp16")
    default_precision = "fp16"
    calibrated_precisions = frozenset()
    input_layout = "NCHW"
    parity_tolerance = {"fp32": 1e-3, "fp16": 2e-2}
    profiles = (
        Profile("raspberry-pi-5", "Raspberry Pi 5, 4x Cortex-A76 @ 2.4 GHz, FP16 arithmetic", threads=4),
        Profile("arm64-phone", "phone big cores, Cortex-A76 class, FP16 arithmetic", threads=4),
    )

    def compile(self, model: Path, precision: str, out_dir: Path) -> dict[str, Path]:
        import onnx

        # ncnn graphs are shape-specialised: the export stage records the input size in the ONNX metadata.
        imgsz = int({m.key: m.value for m in onnx.load(str(model), load_external_data=False).metadata_props}["imgsz"])
        work = out_dir / "pnnx"
        work.mkdir()
        shutil.copyfile(model, work / "model.onnx")
        done = subprocess.run(
            [str(_pnnx_binary()), "model.onnx", f"inputshape=[1,3,{imgsz},{imgsz}]",
             f"fp16={1 if precision == 'fp16' else 0}"], cwd=work, capture_output=True, text=True)
        param, weights = work / "model.ncnn.param", work / "model.ncnn.bin"
        if done.returncode != 0 or not param.exists():
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise ConversionMismatch(f"compile[arm]: pnnx failed: {last}")
        unconverted = sorted({line.split()[0] for line in param.read_text().splitlines()[2:]
                              if line.split() and _UNCONVERTED.match(line.split()[0])})
        if unconverted:
            raise ConversionMismatch(f"compile[arm]: ncnn has no layer for {', '.join(unconverted)}")
        files = {"param": out_dir / "model.ncnn.param", "bin": out_dir / "model.ncnn.bin"}
        param.rename(files["param"])
        weights.rename(files["bin"])
        (out_dir / "ncnn.json").write_text(json.dumps({"input": "in0", "outputs": ["out0", "out1"],
                                                       "precision": precision, "imgsz": imgsz}))
        shutil.rmtree(work)
        return files

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        sys.path.insert(0, str(RUNNER.parent))
        try:
            import ncnn_probe
        finally:
            sys.path.pop(0)
        meta = json.loads((Path(artifact_dir) / "ncnn.json").read_text())
        job = {"param": "model.ncnn.param", "bin": "model.ncnn.bin", "precision": meta["precision"],
               "threads": threads}
        net = ncnn_probe.open_net(Path(artifact_dir), job)

        def infer(batch: np.ndarray):
            if batch.shape[-1] != meta["imgsz"] or batch.shape[-2] != meta["imgsz"]:
                raise DeployError(f"the ncnn model was compiled for {meta['imgsz']}x{meta['imgsz']} input, "
                                  f"got {batch.shape[-2]}x{batch.shape[-1]}")
            per_image = [ncnn_probe.run_once(net, image, meta["outputs"]) for image in batch]
            return tuple(np.stack([outputs[k] for outputs in per_image]) for k in range(len(meta["outputs"])))

        return infer

    def probe(self, artifact_dir: Path, job: dict, work_dir: Path) -> dict:
        job_dir = Path(work_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.ncnn.param", "model.ncnn.bin"):
            shutil.copyfile(Path(artifact_dir) / name, job_dir / name)
        meta = json.loads((Path(artifact_dir) / "ncnn.json").read_text())
        np.save(job_dir / "input.npy", job.pop("input_tensor"))
        (job_dir / "job.json").write_text(json.dumps({
            **job, "param": "model.ncnn.param", "bin": "model.ncnn.bin", "input": "input.npy",
            "precision": meta["precision"], "outputs": meta["outputs"]}))
        done = subprocess.run([sys.executable, str(RUNNER), str(job_dir)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeployError(f"ncnn probe runner failed: {last}")
        return json.loads((job_dir / "result.json").read_text())
