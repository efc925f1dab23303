"""load: an Ultralytics checkpoint or model YAML -> a checked detector checkpoint and its description."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.ultra import ultralytics_offline
from edge_deploy.pipeline.userfiles import read_yaml, shown

SUPPORTED_SUFFIXES = (".pt", ".yaml", ".yml")


def check_model_path(path: Path) -> Path:
    """Checks what can be checked without PyTorch, so a wrong path fails before any stage."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model not found: {shown(path)}")
    if path.is_dir():
        raise InputError(f"model path is a folder, expected a .pt checkpoint or a .yaml model: {shown(path)}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise InputError(f"unsupported model file {shown(path.name)}: expected an Ultralytics .pt checkpoint or "
                         ".yaml model")
    if path.suffix.lower() == ".pt":
        if not os.access(path, os.R_OK):
            raise InputError(f"model {shown(path)} cannot be read (permission denied)")
        if path.stat().st_size == 0:
            raise InputError(f"model {shown(path)} is empty (0 bytes)")
    else:
        spec = read_yaml(path, "model YAML")
        if "backbone" not in spec or "head" not in spec:
            raise InputError(f"model YAML {shown(path)} has no 'backbone' and 'head': not an Ultralytics model "
                             "description")
    return path


class LoadStage(Stage):
    name = "load"
    toolchain = ("torch", "ultralytics")
    inputs = ("source",)

    def __init__(self, home: Path, imgsz: int | None, names: list[str] | None = None):
        self.home = home
        self.imgsz = imgsz
        self.names = names  # the data's classes: a model built from YAML gets them; a checkpoint must match

    def settings(self) -> dict:
        return {"imgsz": self.imgsz, "names": self.names}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        ultralytics_offline(self.home)
        import torch

        source = inputs["source"].path
        if source.suffix.lower() == ".pt":
            model, train_args = _read_checkpoint(source)
        else:
            model, train_args = _build_from_yaml(source, self.names)
        task = getattr(model, "task", None) or _guess_task(model)
        if task != "detect":
            raise InputError(f"{source.name} is a {task or 'non-Ultralytics'} model; edge-deploy builds detectors "
                             "(task 'detect')")
        head = model.model[-1]
        model = model.float().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        imgsz = self.imgsz or _train_imgsz(train_args)
        strides = [int(s) for s in head.stride.tolist()]
        if imgsz % max(strides):
            raise InputError(f"imgsz {imgsz} is not a multiple of the model's largest stride {max(strides)}")
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        if self.names is not None and len(names) != len(self.names):
            raise InputError(f"{source.name} detects {len(names)} classes but the data has {len(self.names)} "
                             f"({', '.join(self.names[:5])}{', ...' if len(self.names) > 5 else ''}); "
                             "pass the data YAML the model was trained on with --data")
        info = {
            "source": source.name,
            "family": Path(str(model.yaml.get("yaml_file", "custom"))).stem,
            "task": task,
            "names": [names[i] for i in sorted(names)],
            "imgsz": imgsz,
            "strides": strides,
            "reg_max": int(getattr(head, "reg_max", 16)),
            "params": int(sum(p.numel() for p in model.parameters())),
        }
        checkpoint = out_dir / "model.pt"
        torch.save({"model": model, "train_args": train_args, "info": info}, checkpoint)
        (out_dir / "model.json").write_text(json.dumps(info, indent=1))
        return StageOutput({"checkpoint": checkpoint, "model_info": out_dir / "model.json"},
                           {"params": info["params"], "family": info["family"], "imgsz": imgsz})


def _guess_task(model) -> str | None:
    from ultralytics.nn.tasks import guess_model_task

    try:
        return guess_model_task(model)
    except Exception:  # Ultralytics raises a SyntaxError-like error for models it cannot place
        return None


def _train_imgsz(train_args: dict) -> int:
    imgsz = train_args.get("imgsz", 640)
    return int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)


def _read_checkpoint(path: Path):
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many unrelated types for a non-checkpoint
        raise InputError(f"{shown(path)} is not a PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'})") from None
    if not isinstance(checkpoint, dict) or not (checkpoint.get("ema") or checkpoint.get("model")):
        raise InputError(f"{path} is a PyTorch file but not an Ultralytics checkpoint (no 'model' entry)")
    model = checkpoint.get("ema") or checkpoint["model"]
    if not hasattr(model, "model") or not hasattr(model, "yaml"):
        raise InputError(f"{path}: its 'model' entry is not an Ultralytics model")
    return model, dict(checkpoint.get("train_args") or {})


def _build_from_yaml(path: Path, names: list[str] | None):
    import torch
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    try:
        spec = yaml_model_load(path)
    except Exception as exc:
        raise InputError(f"{path} is not an Ultralytics model YAML ({exc})") from None
    task = guess_model_task(spec)
    if task != "detect":
        raise InputError(f"{path.name} is a {task} model; edge-deploy builds detectors (task 'detect')")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)  # a model built from YAML is random; the seed makes it the same every build
    try:
        model = DetectionModel(spec, nc=len(names) if names else None, verbose=False)
    except Exception as exc:
        raise InputError(f"cannot build a model from {path.name}: {exc}") from None
    model.task = "detect"
    model.yaml["yaml_file"] = str(path.name)
    if names:
        model.names = dict(enumerate(names))
    return model, {}
