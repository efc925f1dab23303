"""Target `arm`: ncnn (converted by pnnx) for ARM phones and boards; FP32, FP16 storage or INT8.

The artifact is the `.param`/`.bin` pair that an Android app or a Raspberry Pi
program loads unchanged with stock ncnn. It is verified here in the ncnn
Python runtime on x86, and on PyPI's aarch64 ncnn through the qemu transport;
the same runner script runs on the device.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.calibration.progress import Progress
from edge_deploy.calibration.rules import NCNN_INT8
from edge_deploy.pipeline.errors import ConversionMismatch, DeployError, InputError, ToolchainMissing
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.arm.workers import (FILES, SAMPLE_PER_IMAGE, NcnnInProcess, NcnnWorkers, ncnn_net,
                                             worker_count)
from edge_deploy.targets.base import Converted, Infer, Profile, Target

META = "ncnn.json"  # this target's own description of its artifact; only this module reads it


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
    times_builds_in_turns = True
    runner = Path(__file__).parent / "runner.py"
    profiles = (
        Profile("raspberry-pi-5", "Raspberry Pi 5, 4x Cortex-A76 @ 2.4 GHz, FP16 arithmetic", threads=4),
        Profile("arm64-phone", "phone big cores, Cortex-A76 class, FP16 arithmetic", threads=4),
    )

    def quant_backend(self, precision: str, fp32_onnx: Path, info: ModelInfo, work: Path, settings: dict):
        batches = settings.get("calibration_batches")
        return NcnnInt8Backend(self, fp32_onnx, info, work,
                               sum(len(b) for b in batches) if batches is not None else None,
                               settings.get("progress"))

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
        """A batch -> outputs callable. At one thread (scoring), a model of MIN_IMGSZ or more spreads the images of
        a batch over worker processes of one thread each, and says how many images it takes at once."""
        from edge_deploy.calibration.onnxrt import SCORING_THREADS

        meta = json.loads((Path(artifact_dir) / META).read_text())
        # Unasked, one thread: this runtime checks and scores (timing is the probe's, with its own count), and on a
        # shared 2-core machine ncnn's two threads took 7-9 s per 160 px INT8 image against 0.02 s with one, which
        # made compile's 8-image check a minute long.
        threads = threads or SCORING_THREADS
        workers = worker_count(meta["imgsz"]) if threads == 1 else 1
        nets = (NcnnWorkers(Path(artifact_dir), meta["precision"], workers) if workers > 1 else
                NcnnInProcess(ncnn_net(Path(artifact_dir), meta["precision"], threads)))

        def infer(batch: np.ndarray):
            if batch.shape[-1] != meta["imgsz"] or batch.shape[-2] != meta["imgsz"]:
                raise DeployError(f"the ncnn model was compiled for {meta['imgsz']}x{meta['imgsz']} input, "
                                  f"got {batch.shape[-2]}x{batch.shape[-1]}")
            per_image = nets.outputs(batch, meta["outputs"])
            return tuple(np.stack([outputs[k] for outputs in per_image]) for k in range(len(meta["outputs"])))

        infer.images_at_once = 4 * nets.workers  # a few per process keeps every process busy between batches
        return infer

    def prepare_job(self, artifact_dir: Path, job: dict, input_tensor: np.ndarray, job_dir: Path,
                    reference_dir: Path | None = None) -> None:
        for name in FILES:
            shutil.copyfile(Path(artifact_dir) / name, job_dir / name)
        meta = json.loads((Path(artifact_dir) / META).read_text())
        np.save(job_dir / "input.npy", input_tensor)
        job = {**job, "param": FILES[0], "bin": FILES[1], "input": "input.npy", "precision": meta["precision"],
               "outputs": meta["outputs"]}
        if reference_dir is not None:
            # Every build of one model comes from one pnnx graph, so the same blob names serve both.
            names = [f"reference.{name}" for name in FILES]
            for name, copied in zip(FILES, names):
                shutil.copyfile(Path(reference_dir) / name, job_dir / copied)
            precision = json.loads((Path(reference_dir) / META).read_text())["precision"]
            job["reference"] = {"param": names[0], "bin": names[1], "precision": precision}
        (job_dir / "job.json").write_text(json.dumps(job))


def write_meta(folder: Path, precision: str, imgsz: int, io_names: dict) -> None:
    # pnnx names the input in0 and the outputs out0, out1 in graph-output order.
    (folder / META).write_text(json.dumps({"input": io_names["input"], "precision": precision, "imgsz": imgsz,
                                           "outputs": [io_names["box_dist"], io_names["cls_logit"]]}))


RANKED_ALONE = "Each layer quantized alone, rounded as ncnn rounds it, in the float ONNX model"


class NcnnInt8Backend:
    """Candidates as ncnn INT8 models written by this project from per-blob ranges (see ncnn_int8.py).

    ncnn quantizes the input blob of each Convolution with one symmetric scale
    and the weights per output channel; a layer left out runs in FP32. The
    float model is converted once with pnnx and tapped through ncnn's extractor.
    """

    rules = NCNN_INT8

    def __init__(self, target: NcnnArm, fp32_onnx: Path, info: ModelInfo, work: Path,
                 calibration_images: int | None = None, say: Callable[[str], None] | None = None):
        from edge_deploy.calibration.qdq import ranked_by_text
        from edge_deploy.targets.arm.ncnn_int8 import output_convs, read_param

        self.target, self.imgsz, self.calibration_images, self.say = target, info.imgsz, calibration_images, say
        self.fp32_onnx = Path(fp32_onnx)
        self.ranked_by = ranked_by_text(RANKED_ALONE)
        self.fp32_dir = work / "fp32"
        self.fp32_dir.mkdir(parents=True)
        pnnx_convert(fp32_onnx, info.imgsz, False, self.fp32_dir)
        write_meta(self.fp32_dir, "fp32", info.imgsz, target.io_names)
        _, layers = read_param(self.fp32_dir / FILES[0])
        self.layers = layers
        # ncnn's INT8 convolutions return float, so the outputs are never rounded; only the output convs' inputs
        # may be (QuantRules.float_output_layers).
        outputs = [target.io_names["box_dist"], target.io_names["cls_logit"]]
        self.float_outputs = tuple(output_convs(layers, outputs)) if self.rules.float_output_layers else ()
        self.fixed_float_units = self.float_outputs
        self.convs = [layer for layer in layers if layer.kind == "Convolution"
                      and layer.name not in self.fixed_float_units]

    def tap(self):
        from edge_deploy.calibration.onnxrt import SCORING_THREADS

        # One thread per net, as scoring: on a shared 2-core machine ncnn's two threads waited on each other so much
        # that an image at 640 px took 5 s instead of 0.55 s, and the values do not depend on the thread count.
        # Large inputs spread the images over worker processes instead.
        workers = worker_count(self.imgsz)
        source = (NcnnWorkers(self.fp32_dir, "fp32", workers) if workers > 1 else
                  NcnnInProcess(ncnn_net(self.fp32_dir, "fp32", threads=SCORING_THREADS)))
        # In graph order: ncnn's extractor frees a blob once its consumers have run (light mode), so a blob
        # asked for after a later one may be gone.
        blobs = list(dict.fromkeys(layer.bottoms[0] for layer in self.convs))
        return SampledTap(source, blobs, Progress("calibrating: image", self.calibration_images, self.say))

    def thresholds(self, ranges, float_units: list[str]) -> dict[str, float]:
        """Per INT8 layer, the bound of its input blob's symmetric range (ncnn's scale is 127 over it)."""
        return {layer.name: max(abs(v) for v in ranges[layer.bottoms[0]]) for layer in self.convs
                if layer.name not in float_units}

    def build(self, ranges, float_units: list[str], out: Path) -> Path:
        from edge_deploy.targets.arm.ncnn_int8 import write_int8

        thresholds = self.thresholds(ranges, float_units)
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
        """Each convolution's harm to the network's outputs with only it in INT8, most harmful first.

        An ncnn INT8 convolution rounds its input blob to one symmetric scale and its weights per output channel,
        and returns float. The FP32 ONNX graph with one Conv's input and weights rounded so computes what ncnn does
        with that layer alone in INT8, up to ties in rounding; so the ranking runs there, with onnxruntime's
        added-error inputs (calibration.qdq.downstream_sensitivity), and not as one ncnn model write and one pass
        per layer, 3x as long at 640 px (benchmarks/arm_ranking.py). Each layer is found in the graph by its weights,
        which pnnx copies as they are. Ranked by their own output error instead, the head convs came first: on the
        YOLOv8s-size model 16 of 57 layers float took Entropy from 5.98 to 5.43 points.
        """
        from edge_deploy.calibration.qdq import downstream_sensitivity, ranked_by_text
        from edge_deploy.calibration.search import UnitSensitivity
        from edge_deploy.targets.arm.ncnn_int8 import onnx_convs

        self.ranked_by = ranked_by_text(RANKED_ALONE, batches)
        node_of = onnx_convs(self.layers, self.fp32_dir / FILES[1], self.fp32_onnx)
        thresholds = self.thresholds(ranges, [])
        node_ranges = {node_of[layer.name].name: {node_of[layer.name].input[0]: (-thresholds[layer.name],
                                                                                 thresholds[layer.name])}
                       for layer in self.convs}
        layer_of = {node.name: name for name, node in node_of.items()}
        # Only the convs given ranges are rounded and ranked: not the fixed float ones, not other operators.
        ranked = downstream_sensitivity(self.fp32_onnx, {}, batches, True, True, ("Conv",), say=self.say,
                                        node_ranges=node_ranges, unit="layer")
        return [UnitSensitivity(layer_of[r.unit], "Convolution", r.sqnr_db) for r in ranked]

    def units(self) -> int:
        return len(self.convs)

    def rewritten(self, built: Path) -> dict[str, str]:
        return {}  # every layer is pnnx's own


class SampledTap:
    """The activation tap the statistics read: per tensor, a seeded random sample of every image's values plus the
    batch's exact extremes, from one inference per image.

    calibration.ranges.collect_statistics asks for each batch twice (extremes first, then histograms over them);
    the second request is answered from what the first computed, so each image runs once. The extremes are exact
    (min/max are taken over the full tensor), so MinMax ranges do not depend on the sample; the histograms behind
    Entropy are built from the sample (see `sample_image`). `source` is a one-thread ncnn net in this process
    (NcnnInProcess), or NcnnWorkers that compute the images of a batch in parallel processes with the same result.
    """

    def __init__(self, source, blobs: list[str], progress: "Progress", per_image: int = SAMPLE_PER_IMAGE):
        self.source, self.blobs, self.progress, self.per_image = source, blobs, progress, per_image
        self._pending: dict[bytes, dict[str, np.ndarray]] = {}

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        key = hashlib.blake2b(batch, digest_size=16).digest()
        if key in self._pending:
            # The second request for a batch is the last one collect_statistics makes: the memory goes with it.
            return self._pending.pop(key)
        values = self._sample(batch)
        self._pending[key] = values
        return values

    def _sample(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        per_image = self.source.samples(batch, self.blobs, self.per_image)
        parts: list[list[np.ndarray]] = [[] for _ in self.blobs]
        lowest = np.full(len(self.blobs), np.inf, np.float32)
        highest = np.full(len(self.blobs), -np.inf, np.float32)
        for low, high, sampled in per_image:
            np.minimum(lowest, low, out=lowest)
            np.maximum(highest, high, out=highest)
            for i, values in enumerate(sampled):
                if values is not None:
                    parts[i].append(values)
            self.progress.step()
        return {blob: np.concatenate([*parts[i], [lowest[i], highest[i]]]).astype(np.float32, copy=False)
                for i, blob in enumerate(self.blobs) if parts[i]}
