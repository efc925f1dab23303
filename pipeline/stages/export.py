"""export: checkpoint -> ONNX ending at the head's raw maps, simplified and checked against PyTorch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import ConversionMismatch, DeployError
from edge_deploy.pipeline.ultra import ultralytics_offline

INPUT_NAME = "images"
OUTPUT_NAMES = ("box_dist", "cls_logit")


def max_relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest reference magnitude."""
    scale = max(float(np.abs(reference).max()), 1e-6)
    return float(np.abs(reference.astype(np.float64) - candidate).max() / scale)


def parity_inputs(imgsz: int, count: int = 4) -> np.ndarray:
    """Fixed inputs for parity checks: smooth random fields, closer to images than white noise."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, size=(count, 3, 8, 8)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, imgsz // 8 + 1, axis=2), imgsz // 8 + 1, axis=3)[:, :, :imgsz, :imgsz]
    return np.clip(fine + rng.normal(0, 0.05, size=fine.shape), 0, 1).astype(np.float32)


class ExportStage(Stage):
    name = "export"
    toolchain = ("torch", "ultralytics", "onnx", "onnxslim", "onnxruntime")
    inputs = ("checkpoint",)

    def __init__(self, home: Path, opset: int, simplify: bool, tolerance: float):
        self.home, self.opset, self.simplify, self.tolerance = home, opset, simplify, tolerance

    def settings(self) -> dict:
        return {"opset": self.opset, "simplify": self.simplify, "tolerance": self.tolerance}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        ultralytics_offline(self.home)
        import torch

        checkpoint = torch.load(inputs["checkpoint"].path, map_location="cpu", weights_only=False)
        out_path = out_dir / "model.onnx"
        example, reference, nodes = export_onnx(checkpoint["model"], checkpoint["info"], out_path, self.opset,
                                                self.simplify)
        errors = check_against(out_path, example, reference, self.tolerance, "export")
        return StageOutput({"onnx": out_path},
                           {"opset": self.opset, "nodes": nodes,
                            "max_rel_error": max(errors.values()), "size_bytes": out_path.stat().st_size})


def export_onnx(model, info: dict, out_path: Path, opset: int = 17, simplify: bool = True):
    """Writes the detector as ONNX ending at its raw head maps; returns the parity inputs, PyTorch's outputs
    for them, and the node count."""
    import onnx
    import torch

    wrapper = raw_head_model(model.fuse(verbose=False))
    example = torch.from_numpy(parity_inputs(info["imgsz"]))
    raw_path = out_path.with_suffix(".raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in Ultralytics' modules
        torch.onnx.export(
            wrapper, example[:1], str(raw_path), opset_version=opset, dynamo=False,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )
        reference = [t.numpy() for t in wrapper(example)]
    exported = onnx.load(str(raw_path))
    raw_path.unlink()
    if simplify:
        import onnxslim

        exported = onnxslim.slim(exported)
    onnx.checker.check_model(exported)
    meta = {"names": json.dumps(info["names"]), "imgsz": str(info["imgsz"]),
            "strides": json.dumps(info["strides"]), "producer": "edge-deploy"}
    for key, value in meta.items():
        entry = exported.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(exported, str(out_path))
    return example.numpy(), reference, len(exported.graph.node)


def check_against(onnx_path: Path, example: np.ndarray, reference: list[np.ndarray], tolerance: float,
                  step: str) -> dict[str, float]:
    """Runs the ONNX file in onnxruntime and raises ConversionMismatch when it drifts from the reference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    produced = session.run(list(OUTPUT_NAMES), {INPUT_NAME: example})
    errors = {}
    for name, ref, got in zip(OUTPUT_NAMES, reference, produced):
        if ref.shape != got.shape:
            raise ConversionMismatch(f"{step}: output '{name}' has shape {got.shape}, parent has {ref.shape}")
        errors[name] = max_relative_error(ref, got)
        if not errors[name] <= tolerance:
            raise ConversionMismatch(f"{step}: output '{name}' differs from its parent by {errors[name]:.2e} "
                                     f"(relative), tolerance {tolerance:.0e}")
    return errors


def raw_head_model(model):
    """Wraps an Ultralytics detector so that its forward returns the head's raw maps.

    The Detect head returns its raw maps when its own `training` flag is set;
    its children (BatchNorms included) stay in eval mode. The flag is set in
    forward because the ONNX exporter puts the whole module in eval mode first.
    Torch is imported here, not at module level, so a cached build never loads it.
    """
    import torch

    class RawHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.eval()
            self.head = inner.model[-1]
            if not hasattr(self.head, "forward_head"):
                raise DeployError(f"unsupported detection head {type(self.head).__name__}")

        def forward(self, x):
            self.head.training = True
            preds = self.inner(x)
            if "one2many" in preds:  # end-to-end heads: export the one-to-many branch, NMS'd like the rest
                preds = preds["one2many"]
            return preds["boxes"], preds["scores"]

    return RawHead(model)


class OriginalExportStage(ExportStage):
    """The model as it was before pruning, exported the same way, so the final artifact can be judged against it."""

    name = "export-original"
