"""Target `arm`: ncnn (converted by pnnx) for ARM phones and boards; FP32, FP16 storage or INT8.

The artifact is the `.param`/`.bin` pair that an Android app or a Raspberry Pi
program loads unchanged with stock ncnn. It is verified here in the ncnn
Python runtime on x86, and on PyPI's aarch64 ncnn through the qemu transport;
the same runner script runs on the device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edge_deploy.calibration.rules import NCNN_INT8
from edge_deploy.pipeline.errors import ConversionMismatch, DeployError, InputError, ToolchainMissing
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.base import Converted, Infer, Profile, Target

META = "ncnn.json"  # this target's own description of its artifact; only this module reads it
FILES = ("model.ncnn.param", "model.ncnn.bin")


def ncnn_net(artifact_dir: Path, precision: str, threads: int | None = None):
    from edge_deploy.targets.arm import runner

    job = {"param": FILES[0], "bin": FILES[1], "precision": precision, "threads": threads}
    return runner.open_net(Path(artifact_dir), job)


def _pnnx_binary() -> Path:
    try:
        import pnnx
    except ImportError:
        raise ToolchainMissing("target arm needs pnnx and ncnn: pip install 'edge-deploy[arm]'") from None
    return Path(pnnx.EXEC_PATH)


def pnnx_convert(fp32_onnx: Path, imgsz: int, fp16: bool, out_dir: Path) -> None:
    """ONNX -> ncnn param/bin in out_dir (shape-specialised to imgsz); refuses operators ncnn cannot run."""
    work = out_dir / "pnnx"
    work.mkdir(parents=True)
    shutil.copyfile(fp32_onnx, work / "model.onnx")
    done = subprocess.run(
        [str(_pnnx_binary()), "model.onnx", f"inputshape=[1,3,{imgsz},{imgsz}]", f"fp16={1 if fp16 else 0}"],
        cwd=work, capture_output=True, text=True)
    param, weights = work / FILES[0], work / FILES[1]
    if done.returncode != 0 or not param.exists():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ConversionMismatch(f"compile[arm]: pnnx failed: {last}")
    import ncnn

    # pnnx writes operators it could not map under their own names; ncnn knows no such layer type.
    unconverted = sorted({line.split()[0] for line in param.read_text().splitlines()[2:]
                          if line.split() and ncnn.layer_to_index(line.split()[0]) < 0})
    if unconverted:
        raise ConversionMismatch(f"compile[arm]: ncnn has no layer for {', '.join(unconverted)}")
    param.rename(out_dir / FILES[0])
    weights.rename(out_dir / FILES[1])
    shutil.rmtree(work)


class NcnnArm(Target):
    name = "arm"
    description = ("ncnn for ARM phones and boards (param/bin from pnnx); INT8 written by this project, "
                   "FP16 storage on cores that have it")
    toolchain = ("pnnx", "ncnn")
    runtime_packages = ("ncnn", "numpy")
    precisions = ("int8", "fp16", "fp32")
    default_precision = "int8"
    quant_rules = NCNN_INT8
    input_layout = "NCHW"  # one image at a time: an ncnn Mat of C x H x W
    io_names = {"input": "in0", "box_dist": "out0", "cls_logit": "out1"}
    parity_tolerance = {"fp32": 1e-3, "fp16": 2e-2}
    runner = Path(__file__).parent / "runner.py"
    profiles = (
        Profile("raspberry-pi-5", "Raspberry Pi 5, 4x Cortex-A76 @ 2.4 GHz, FP16 arithmetic", threads=4),
        Profile("arm64-phone", "phone big cores, Cortex-A76 class, FP16 arithmetic", threads=4),
    )

    def quant_backend(self, precision: str, fp32_onnx: Path, info: ModelInfo, work: Path, settings: dict):
        return NcnnInt8Backend(self, fp32_onnx, info, work)

    def convert(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo,
                out_dir: Path) -> Converted:
        if quantized is not None:
            # The quantize stage's chosen candidate is already an ncnn INT8 model written by this target.
            for name in (*FILES, "model.table"):
                shutil.copyfile(Path(quantized) / name, out_dir / name)
            shutil.copyfile(Path(quantized) / META, out_dir / META)
            files = {"param": out_dir / FILES[0], "bin": out_dir / FILES[1], "table": out_dir / "model.table"}
        else:
            pnnx_convert(fp32_onnx, info.imgsz, precision == "fp16", out_dir)
            write_meta(out_dir, precision, info.imgsz, self.io_names)
            files = {"param": out_dir / FILES[0], "bin": out_dir / FILES[1]}
        return Converted(files)

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        from edge_deploy.targets.arm import runner

        meta = json.loads((Path(artifact_dir) / META).read_text())
        net = ncnn_net(Path(artifact_dir), meta["precision"], threads)

        def infer(batch: np.ndarray):
            if batch.shape[-1] != meta["imgsz"] or batch.shape[-2] != meta["imgsz"]:
                raise DeployError(f"the ncnn model was compiled for {meta['imgsz']}x{meta['imgsz']} input, "
                                  f"got {batch.shape[-2]}x{batch.shape[-1]}")
            per_image = [runner.run_once(net, image, meta["outputs"]) for image in batch]
            return tuple(np.stack([outputs[k] for outputs in per_image]) for k in range(len(meta["outputs"])))

        return infer

    def prepare_job(self, artifact_dir: Path, job: dict, input_tensor: np.ndarray, job_dir: Path) -> None:
        for name in FILES:
            shutil.copyfile(Path(artifact_dir) / name, job_dir / name)
        meta = json.loads((Path(artifact_dir) / META).read_text())
        np.save(job_dir / "input.npy", input_tensor)
        (job_dir / "job.json").write_text(json.dumps({
            **job, "param": FILES[0], "bin": FILES[1], "input": "input.npy", "precision": meta["precision"],
            "outputs": meta["outputs"]}))


def write_meta(folder: Path, precision: str, imgsz: int, io_names: dict) -> None:
    # pnnx names the input in0 and the outputs out0, out1 in graph-output order.
    (folder / META).write_text(json.dumps({"input": io_names["input"], "precision": precision, "imgsz": imgsz,
                                           "outputs": [io_names["box_dist"], io_names["cls_logit"]]}))


class NcnnInt8Backend:
    """Candidates as ncnn INT8 models written by this project from per-blob ranges (see ncnn_int8.py).

    ncnn quantizes the input blob of each Convolution with one symmetric scale
    and the weights per output channel; a layer left out runs in FP32. The
    float model is converted once with pnnx and tapped through ncnn's extractor.
    """

    rules = NCNN_INT8

    def __init__(self, target: NcnnArm, fp32_onnx: Path, info: ModelInfo, work: Path):
        from edge_deploy.targets.arm.ncnn_int8 import read_param

        self.target, self.imgsz = target, info.imgsz
        self.fp32_dir = work / "fp32"
        self.fp32_dir.mkdir(parents=True)
        pnnx_convert(fp32_onnx, info.imgsz, False, self.fp32_dir)
        write_meta(self.fp32_dir, "fp32", info.imgsz, target.io_names)
        _, layers = read_param(self.fp32_dir / FILES[0])
        self.convs = [layer for layer in layers if layer.kind == "Convolution"]

    def tap(self):
        from edge_deploy.targets.arm import runner

        net = ncnn_net(self.fp32_dir, "fp32")
        # In graph order: ncnn's extractor frees a blob once its consumers have run (light mode), so a blob
        # asked for after a later one may be gone.
        blobs = list(dict.fromkeys(layer.bottoms[0] for layer in self.convs))

        def tap(batch: np.ndarray) -> dict[str, np.ndarray]:
            per_image = [runner.run_once(net, image, blobs) for image in batch]
            return {blob: np.stack([values[i] for values in per_image]) for i, blob in enumerate(blobs)}

        return tap

    def build(self, ranges, float_units: list[str], out: Path) -> Path:
        from edge_deploy.targets.arm.ncnn_int8 import write_int8

        thresholds = {layer.name: max(abs(v) for v in ranges[layer.bottoms[0]]) for layer in self.convs
                      if layer.name not in float_units}
        zero = sorted(name for name, t in thresholds.items() if not t > 0)
        if zero:
            raise InputError(f"the calibration set gives layer{'s' * (len(zero) > 1)} {', '.join(zero[:5])} an "
                             "all-zero input, so no INT8 scale exists; use calibration images like the real input")
        out.mkdir(parents=True)
        write_int8(self.fp32_dir / FILES[0], self.fp32_dir / FILES[1], out,
                   {name: 127.0 / t for name, t in thresholds.items()}, set(float_units))
        write_meta(out, "int8", self.imgsz, self.target.io_names)
        return out

    def runtime(self, built: Path):
        from edge_deploy.calibration.onnxrt import SCORING_THREADS

        return self.target.runtime(built, threads=SCORING_THREADS)

    def rank_units(self, ranges, batches: list[np.ndarray]):
        from edge_deploy.calibration.ranges import sqnr_db
        from edge_deploy.calibration.search import UnitSensitivity

        check = np.concatenate(batches)
        reference = self.runtime(self.fp32_dir)(check)
        names = [layer.name for layer in self.convs]
        results = []
        for layer in self.convs:
            # Only this layer quantized: how much the model's outputs suffer from it alone.
            single = self.build(ranges, [n for n in names if n != layer.name], self.fp32_dir.parent / "alone")
            produced = self.runtime(single)(check)
            results.append(UnitSensitivity(layer.name, layer.kind,
                                           round(min(sqnr_db(r, p) for r, p in zip(reference, produced)), 2)))
            shutil.rmtree(single)
        return sorted(results, key=lambda r: r.sqnr_db)

    def units(self) -> int:
        return len(self.convs)
