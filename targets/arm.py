"""Target `arm`: ncnn (converted by pnnx) for ARM phones and boards; FP32 or FP16 storage.

The artifact is the `.param`/`.bin` pair that an Android app or a Raspberry Pi
program loads unchanged with stock ncnn. It is verified here in the ncnn
Python runtime on x86; the same runner script runs on the device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, ConversionMismatch, DeployError, ToolchainMissing
from targets.base import Infer, Profile, Target

RUNNER = Path(__file__).parent / "runners" / "ncnn_probe.py"


def ncnn_net(artifact_dir: Path, precision: str, threads: int | None = None):
    from targets.runners import ncnn_probe

    job = {"param": "model.ncnn.param", "bin": "model.ncnn.bin", "precision": precision, "threads": threads}
    return ncnn_probe.open_net(Path(artifact_dir), job)


def _pnnx_binary() -> Path:
    try:
        import pnnx
    except ImportError:
        raise ToolchainMissing("target arm needs pnnx and ncnn: pip install 'edge-deploy[arm]'") from None
    return Path(pnnx.EXEC_PATH)


class NcnnArm(Target):
    name = "arm"
    description = ("ncnn for ARM phones and boards (param/bin from pnnx); INT8 written by this project, "
                   "FP16 storage on cores that have it")
    toolchain = ("pnnx", "ncnn")
    precisions = ("int8", "fp16", "fp32")
    default_precision = "int8"
    calibrated_precisions = frozenset({"int8"})
    quantizes_itself = frozenset({"int8"})
    input_layout = "NCHW"  # one image at a time: an ncnn Mat of C x H x W
    io_names = {"input": "in0", "box_dist": "out0", "cls_logit": "out1"}
    parity_tolerance = {"fp32": 1e-3, "fp16": 2e-2}
    profiles = (
        Profile("raspberry-pi-5", "Raspberry Pi 5, 4x Cortex-A76 @ 2.4 GHz, FP16 arithmetic", threads=4),
        Profile("arm64-phone", "phone big cores, Cortex-A76 class, FP16 arithmetic", threads=4),
    )

    def compile(self, model: Path, precision: str, out_dir: Path, calibration: list[np.ndarray] | None = None,
                method: str = "auto", score=None, budget: float | None = None) -> dict[str, Path]:
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
        import ncnn

        # pnnx writes operators it could not map under their own names; ncnn knows no such layer type.
        unconverted = sorted({line.split()[0] for line in param.read_text().splitlines()[2:]
                              if line.split() and ncnn.layer_to_index(line.split()[0]) < 0})
        if unconverted:
            raise ConversionMismatch(f"compile[arm]: ncnn has no layer for {', '.join(unconverted)}")
        files = {"param": out_dir / "model.ncnn.param", "bin": out_dir / "model.ncnn.bin"}
        # pnnx names the input in0 and the outputs out0, out1 in graph-output order.
        meta = {"input": self.io_names["input"], "outputs": [self.io_names["box_dist"], self.io_names["cls_logit"]],
                "precision": precision, "imgsz": imgsz}
        if precision == "int8":
            meta["int8"] = self._quantize(param, weights, out_dir, calibration, method, meta, score, budget)
            files["table"] = out_dir / "model.table"
        else:
            param.rename(files["param"])
            weights.rename(files["bin"])
        (out_dir / "ncnn.json").write_text(json.dumps(meta))
        shutil.rmtree(work)
        return files

    def _quantize(self, param: Path, weights: Path, out_dir: Path, calibration, method: str, meta: dict,
                  score=None, budget: float | None = None) -> dict:
        """INT8 with this project's ncnn writer.

        `auto` tries KL and MinMax blob scales. With `score` (artifact folder -> mAP50-95 drop in points on
        the validation split) the best by mAP is kept, and when it misses `budget` the convolutions whose
        output suffers most when quantized alone stay FP32 (1, 2, 4, ... of them) until the budget is met;
        without it, the method whose outputs are closest to FP32 (SQNR) is kept.
        """
        from pipeline.int8 import sqnr_db
        from targets.ncnn_int8 import blob_scales, read_param, write_int8

        if not calibration:
            raise DeployError("ncnn INT8 needs calibration images")
        methods = {"auto": ("minmax", "kl"), "minmax": ("minmax",), "entropy": ("kl",)}.get(method)
        if methods is None:
            raise ConfigError(f"the arm target's INT8 supports quantize.method auto, minmax or entropy, not {method}")
        fp32_dir = out_dir / "fp32"
        fp32_dir.mkdir()
        shutil.copyfile(param, fp32_dir / "model.ncnn.param")
        shutil.copyfile(weights, fp32_dir / "model.ncnn.bin")
        (fp32_dir / "ncnn.json").write_text(json.dumps({**meta, "precision": "fp32"}))
        float_net = ncnn_net(fp32_dir, "fp32")
        _, layers = read_param(param)
        convs = [layer for layer in layers if layer.kind == "Convolution"]
        check = np.stack(calibration[:8])
        reference = self.runtime(fp32_dir)(check)
        trials_dir = out_dir / "trials"
        trials_dir.mkdir()
        counter = iter(range(1_000_000))

        def trial(name: str, scales: dict[str, float], keep_float: list[str], with_score: bool = True) -> dict:
            folder = trials_dir / f"{next(counter):04d}-{name}"
            folder.mkdir()
            write_int8(fp32_dir / "model.ncnn.param", fp32_dir / "model.ncnn.bin", folder, scales, set(keep_float))
            (folder / "ncnn.json").write_text(json.dumps(meta))
            produced = self.runtime(folder)(check)
            result = {"folder": folder, "method": name, "float_layers": keep_float,
                      "sqnr_db": round(min(sqnr_db(r, p) for r, p in zip(reference, produced)), 2)}
            if score is not None and with_score:
                result["drop_points"] = score(folder)
            return result

        scales = {name: blob_scales(float_net.create_extractor, convs, calibration, name) for name in methods}
        trials = [trial(name, scales[name], []) for name in methods]
        rank = (lambda t: -t["drop_points"]) if score is not None else (lambda t: t["sqnr_db"])
        best = max(trials, key=rank)
        search = []
        if score is not None and budget is not None and best["drop_points"] > budget:
            chosen = scales[best["method"]]
            alone_sqnr = {}
            for layer in convs:
                single = trial("alone", {layer.name: chosen[layer.name]}, [], with_score=False)
                alone_sqnr[layer.name] = single["sqnr_db"]
                shutil.rmtree(single["folder"])
            alone = sorted(convs, key=lambda layer: alone_sqnr[layer.name])
            count = 1
            while count < len(alone):
                attempt = trial(best["method"], chosen, [layer.name for layer in alone[:count]])
                search.append(attempt)
                if attempt["drop_points"] <= budget:
                    break
                count *= 2
            best = min([best, *search], key=lambda t: t["drop_points"]) \
                if all(t["drop_points"] > budget for t in search) else search[-1]
        for name in ("model.ncnn.param", "model.ncnn.bin", "model.table"):
            (best["folder"] / name).rename(out_dir / name)
        shutil.rmtree(trials_dir)
        shutil.rmtree(fp32_dir)
        return {"method": best["method"], "float_layers": best["float_layers"], "layers": len(convs),
                "calibration_images": len(calibration),
                "chosen_by": "validation mAP" if score is not None else "output SQNR against FP32",
                "trials": [{k: v for k, v in t.items() if k != "folder"} for t in trials + search]}

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        from targets.runners import ncnn_probe

        meta = json.loads((Path(artifact_dir) / "ncnn.json").read_text())
        net = ncnn_net(Path(artifact_dir), meta["precision"], threads)

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
