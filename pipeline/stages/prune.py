"""prune: checkpoint -> a structurally smaller checkpoint, step by step, fine-tuned, with its history.

Each step removes a further share of channels (Torch-Pruning, dependency
graph) and, when a data YAML is given and epochs > 0, fine-tunes with the
Ultralytics trainer. After every step the model is exported to ONNX and
measured: parameters, MACs, ONNX Runtime CPU latency and mAP50-95 on the
split it is given (the build's selection split: choices such as the floor are
never made on the split that is reported). A step whose mAP falls below the floor ends the schedule
and the previous step's model is kept.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from edge_deploy.calibration.preprocess import load_tensor
from edge_deploy.calibration.sets import ImageSet
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.ultra import ultralytics_offline

# Latency: the unpruned and the pruned model alternate in blocks, LATENCY_ROUNDS x LATENCY_BLOCK runs each.
LATENCY_ROUNDS = 8
LATENCY_BLOCK = 5


class PruneStage(Stage):
    name = "prune"
    toolchain = ("torch", "ultralytics", "torch-pruning", "onnx", "onnxslim", "onnxruntime", "pycocotools")
    inputs = ("checkpoint", "model_info")

    def __init__(self, home: Path, selection: ImageSet, data_yaml: Path | None, data_fingerprint: str | None,
                 ratio: float | None, target_params: int | None, target_macs: int | None, criterion: str,
                 global_ranking: bool, round_to: int, steps: int, epochs: int, map_floor: float | None,
                 taylor_images: list[Path], seed: int = 0):
        self.home, self.selection, self.data_yaml, self.data_fingerprint = home, selection, data_yaml, data_fingerprint
        self.ratio, self.target_params, self.target_macs = ratio, target_params, target_macs
        self.criterion, self.global_ranking, self.round_to = criterion, global_ranking, round_to
        self.steps, self.epochs, self.map_floor, self.seed = steps, epochs, map_floor, seed
        self.taylor_images = taylor_images

    def settings(self) -> dict:
        return {"ratio": self.ratio, "target_params": self.target_params, "target_macs": self.target_macs,
                "criterion": self.criterion, "global": self.global_ranking, "round_to": self.round_to,
                "steps": self.steps, "epochs": self.epochs, "map_floor": self.map_floor, "seed": self.seed}

    def fingerprints(self) -> dict:
        from edge_deploy.pipeline.artifacts import sha256_file

        return {"selection": self.selection.fingerprint, "train_data": self.data_fingerprint,
                "taylor_images": [sha256_file(p) for p in self.taylor_images]}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        ultralytics_offline(self.home)
        import torch

        from edge_deploy.pipeline.prune import check_no_empty_layer, check_supported, count_macs_params, make_pruner, \
            split_c2f_blocks

        checkpoint = torch.load(inputs["checkpoint"].path, map_location="cpu", weights_only=False)
        info = checkpoint["info"]
        model = checkpoint["model"].float().eval()
        check_supported(model)
        split_c2f_blocks(model)
        imgsz = info["imgsz"]
        torch.manual_seed(self.seed)

        work = out_dir / "work"
        work.mkdir()
        base_macs, base_params = count_macs_params(model, imgsz)
        ratio, steps = self._schedule()
        pruner = make_pruner(model, imgsz, self.criterion, ratio, steps, self.global_ranking, self.round_to)
        history = [self._measure(model, info, work, 0, base_macs, base_params, tuned=False)]
        kept = copy.deepcopy(model)
        stop_reason = "schedule complete"
        for step in range(1, steps + 1):
            if self.criterion == "taylor":
                self._taylor_gradients(model, checkpoint)
            pruner.step()
            model.zero_grad(set_to_none=True)
            check_no_empty_layer(model, ratio)
            tuned = False
            if self.epochs > 0 and self.data_yaml is not None:
                self._fine_tune(model, imgsz, work / f"train{step}")
                tuned = True
            row = self._measure(model, info, work, step, base_macs, base_params, tuned)
            history.append(row)
            if self.map_floor is not None and row["map50_95"] < self.map_floor:
                stop_reason = f"step {step} fell below the mAP50-95 floor {self.map_floor}; kept step {step - 1}"
                history[-1]["kept"] = False
                break
            kept = copy.deepcopy(model)
            if self._target_met(row):
                stop_reason = f"target reached at step {step}"
                break
        if self.epochs == 0:
            warnings.warn("pruned without fine-tuning (prune.epochs is 0): accuracy is not recovered", stacklevel=2)

        kept.model[-1].export = False
        kept = kept.eval()
        for p in kept.parameters():
            p.requires_grad_(False)
        final = next(r for r in reversed(history) if r.get("kept", True))
        info = {**info, "params": final["params"], "pruned": True}
        out_ckpt = out_dir / "model.pt"
        torch.save({"model": kept, "train_args": checkpoint.get("train_args", {}), "info": info}, out_ckpt)
        (out_dir / "model.json").write_text(json.dumps(info, indent=1))
        (out_dir / "prune_history.json").write_text(json.dumps(
            {"criterion": self.criterion, "stop": stop_reason, "steps": history}, indent=1))
        _plot(history, out_dir / "prune_history.png", self.criterion)
        shutil.rmtree(work)
        return StageOutput(
            {"checkpoint": out_ckpt, "model_info": out_dir / "model.json",
             "prune_history": out_dir / "prune_history.json", "prune_plot": out_dir / "prune_history.png"},
            {"criterion": self.criterion, "stop": stop_reason, "steps": len(history) - 1,
             "macs_ratio": round(base_macs / final["macs"], 3), "params_ratio": round(base_params / final["params"], 3),
             "map50_95": final["map50_95"], "map50_95_before": history[0]["map50_95"],
             "latency_ratio": final["latency_ratio"]})

    def _schedule(self) -> tuple[float, int]:
        if self.ratio is not None:
            return self.ratio, self.steps
        # A parameter or MAC target: prune in small steps up to 90 % until the target is met.
        return 0.9, max(self.steps, 18)

    def _target_met(self, row: dict) -> bool:
        if self.target_params is not None:
            return row["params"] <= self.target_params
        if self.target_macs is not None:
            return row["macs"] <= self.target_macs
        return False

    def _measure(self, model, info: dict, work: Path, step: int, base_macs: int, base_params: int,
                 tuned: bool) -> dict:
        import onnxruntime as ort

        from edge_deploy.pipeline.evaluate import coco_map
        from edge_deploy.pipeline.prune import count_macs_params
        from edge_deploy.pipeline.stages.export import export_onnx
        from edge_deploy.calibration.onnxrt import ort_infer

        macs, params = count_macs_params(model, info["imgsz"])
        path = work / f"step{step}.onnx"
        copy_for_export = copy.deepcopy(model).eval()
        copy_for_export.model[-1].export = False
        export_onnx(copy_for_export, info, path)
        accuracy = coco_map(self.selection, ort_infer(path), info["strides"], len(info["names"]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if step == 0:
            self._unpruned = session
        feed = {"images": load_tensor(self.selection.files[0], self.selection.preprocess)[0]}
        # Warm, and interleaved with the unpruned model in blocks, so that a cold first run or a busy moment
        # of the machine weighs on both alike; the ratio is taken within this one measurement.
        sessions = {"unpruned": self._unpruned, "step": session}
        timings = {name: [] for name in sessions}
        for name, each in sessions.items():
            for _ in range(5):
                each.run(None, feed)
        for _ in range(LATENCY_ROUNDS):
            for name, each in sessions.items():
                for _ in range(LATENCY_BLOCK):
                    t = time.perf_counter()
                    each.run(None, feed)
                    timings[name].append((time.perf_counter() - t) * 1000)
        step_ms, unpruned_ms = statistics.median(timings["step"]), statistics.median(timings["unpruned"])
        return {"step": step, "params": params, "macs": macs, "params_ratio": round(base_params / params, 3),
                "macs_ratio": round(base_macs / macs, 3), "latency_ms": round(step_ms, 3),
                "latency_ratio": round(unpruned_ms / step_ms, 3),
                "map50_95": accuracy["map50_95"], "map50": accuracy["map50"], "fine_tuned": tuned}

    def _taylor_gradients(self, model, checkpoint: dict) -> None:
        """First-order Taylor importance needs gradients of the detection loss on labelled images."""
        from ultralytics.cfg import get_cfg
        from ultralytics.utils import DEFAULT_CFG

        if not self.taylor_images:
            raise InputError("the taylor criterion needs labelled training images (a data YAML)")
        model.args = get_cfg(DEFAULT_CFG, {k: v for k, v in (checkpoint.get("train_args") or {}).items()
                                           if k in ("box", "cls", "dfl")})
        model.criterion = None
        head = model.model[-1]
        head.export = False
        model.zero_grad(set_to_none=True)
        for start in range(0, len(self.taylor_images), 8):
            batch = detection_batch(self.taylor_images[start:start + 8], self.selection.preprocess)
            loss, _ = model.loss(batch)
            loss.sum().backward()
        head.export = True

    def _fine_tune(self, model, imgsz: int, project: Path) -> None:
        """Trains `model` in place; its weights end as the trainer's EMA, which is what Ultralytics ships."""
        from ultralytics.models.yolo.detect import DetectionTrainer

        model.model[-1].export = False
        pruned = model

        class PrunedTrainer(DetectionTrainer):
            # Ultralytics rebuilds the model from its YAML; the pruned architecture exists only as this object.
            def get_model(self, cfg=None, weights=None, verbose=True):
                return pruned

        trainer = PrunedTrainer(overrides={
            "model": "pruned.yaml", "data": str(self.data_yaml), "imgsz": imgsz, "epochs": self.epochs,
            "batch": 8, "nbs": 8, "device": "cpu", "workers": 2, "amp": False, "plots": False, "val": False,
            "project": str(project), "name": "fine-tune", "exist_ok": True, "verbose": False, "seed": self.seed,
            "deterministic": True, "lr0": 0.002, "warmup_epochs": 0, "save": False})
        trainer.train()
        if trainer.ema is not None:
            # The pruner's dependency graph holds this very model object, so the EMA weights are copied in.
            model.load_state_dict(trainer.ema.ema.float().state_dict())
        model.float().eval()
        model.model[-1].export = True


def detection_batch(images: list[Path], preprocess) -> dict:
    """An Ultralytics training batch (letterboxed images, normalised xywh labels) from YOLO-format files."""
    import torch

    from edge_deploy.calibration.sets import label_path
    from edge_deploy.pipeline.evaluate import read_yolo_labels

    tensors, classes, boxes, index = [], [], [], []
    for i, path in enumerate(images):
        tensor, lb = load_tensor(path, preprocess)
        tensors.append(tensor)
        for c, x, y, w, h in read_yolo_labels(label_path(path), lb.width, lb.height):
            cx = (x + w / 2) * lb.ratio + lb.pad_x
            cy = (y + h / 2) * lb.ratio + lb.pad_y
            boxes.append([cx / preprocess.imgsz, cy / preprocess.imgsz, w * lb.ratio / preprocess.imgsz,
                          h * lb.ratio / preprocess.imgsz])
            classes.append([c])
            index.append(i)
    return {"img": torch.from_numpy(np.concatenate(tensors)),
            "cls": torch.tensor(classes, dtype=torch.float32).reshape(-1, 1),
            "bboxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "batch_idx": torch.tensor(index, dtype=torch.float32)}


def _plot(history: list[dict], path: Path, criterion: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=100)
    left.plot(steps, [r["map50_95"] for r in history], "o-", color="tab:blue", label="mAP50-95")
    left.set_xlabel("pruning step")
    left.set_ylabel("mAP50-95", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [r["latency_ms"] for r in history], "s--", color="tab:red", label="ORT CPU p50 ms")
    right.set_ylabel("ONNX Runtime CPU p50 latency (ms, 1 thread)", color="tab:red")
    left.set_title(f"pruning history ({criterion})")
    left.set_xticks(steps)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
