"""Structured channel pruning of Ultralytics detectors with Torch-Pruning.

Torch-Pruning follows channel dependencies through the traced graph, but
`Tensor.chunk` in C2f (and C3k2, its YOLO11 subclass) hides which channels go
where. Such blocks are rebuilt as `C2fSplit`, whose first convolution is two
convolutions with the same weights and BatchNorm statistics, so outputs are
unchanged and every channel has a traceable path. The Detect head's final
convolutions and its DFL stay intact: their channel counts are the output
format. Attention blocks (YOLO11's PSA) are left unpruned: their head layout
is tied to channel counts Torch-Pruning does not see.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edge_deploy.pipeline.errors import InputError

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "fpgm", "lamp", "random")
SUPPORTED = "YOLOv8, YOLO11 and YOLOv5u detectors (Detect head; C2f, C3k2, C3, SPPF blocks)"


class C2fSplit(nn.Module):
    """C2f with its first 1x1 convolution split in two, computing the same function without `chunk`."""

    def __init__(self, block: nn.Module):
        super().__init__()
        half = block.c
        self.c = half
        self.cv0 = _conv_slice(block.cv1, 0, half)
        self.cv1 = _conv_slice(block.cv1, half, 2 * half)
        self.cv2 = block.cv2
        self.m = block.m
        for attribute in ("f", "i", "type", "np"):  # Ultralytics' routing and bookkeeping
            if hasattr(block, attribute):
                setattr(self, attribute, getattr(block, attribute))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _conv_slice(conv_module: nn.Module, start: int, end: int) -> nn.Module:
    """An Ultralytics Conv (conv + BN + act) keeping output channels [start, end)."""
    part = copy.deepcopy(conv_module)
    conv, bn = part.conv, part.bn
    conv.weight = nn.Parameter(conv.weight.data[start:end].clone())
    conv.out_channels = end - start
    bn.weight = nn.Parameter(bn.weight.data[start:end].clone())
    bn.bias = nn.Parameter(bn.bias.data[start:end].clone())
    bn.running_mean = bn.running_mean[start:end].clone()
    bn.running_var = bn.running_var[start:end].clone()
    bn.num_features = end - start
    return part


def split_c2f_blocks(model: nn.Module) -> int:
    """Replaces every C2f-like block in place; returns how many were replaced."""
    from ultralytics.nn.modules.block import C2f

    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, C2f) and hasattr(child, "cv1") and hasattr(child.cv1, "conv"):
                setattr(parent, name, C2fSplit(child))
                replaced += 1
    return replaced


def check_supported(model: nn.Module) -> None:
    from ultralytics.nn.modules.head import Detect

    head = model.model[-1]
    if type(head) is not Detect:
        raise InputError(f"pruning supports {SUPPORTED}; this model's head is {type(head).__name__}")
    unsupported = {type(m).__name__ for m in model.modules()} & {"AIFI", "HGBlock", "RepC3", "ResNetLayer",
                                                                  "TorchVision", "A2C2f"}
    if unsupported:
        raise InputError(f"pruning supports {SUPPORTED}; this model has {', '.join(sorted(unsupported))}")


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must not change: the head's last convolutions, DFL, attention."""
    head = model.model[-1]
    ignored: list[nn.Module] = [head.dfl]
    for branch in list(head.cv2) + list(head.cv3):
        ignored.append(branch[-1])
    for module in model.modules():
        if type(module).__name__ in ("Attention", "PSABlock", "C2PSA", "PSA"):
            ignored.append(module)
    return ignored


def importance(criterion: str):
    import torch_pruning as tp

    table = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }
    if criterion not in table:
        raise InputError(f"unknown pruning criterion '{criterion}'; choose from {', '.join(CRITERIA)}")
    return table[criterion]()


def count_macs_params(model: nn.Module, imgsz: int) -> tuple[int, int]:
    import torch_pruning as tp

    head = model.model[-1]
    previous = head.export
    head.export = True
    try:
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, imgsz, imgsz))
    finally:
        head.export = previous
    return int(macs), int(params)


def make_pruner(model: nn.Module, imgsz: int, criterion: str, ratio: float, steps: int, global_ranking: bool,
                round_to: int):
    """A Torch-Pruning pruner whose `step()` removes `ratio / steps` of the channels each time."""
    import torch_pruning as tp

    head = model.model[-1]
    head.export = True  # one output tensor for tracing
    for p in model.parameters():
        p.requires_grad_(True)
    return tp.pruner.MetaPruner(
        model, torch.zeros(1, 3, imgsz, imgsz), importance=importance(criterion), pruning_ratio=ratio,
        iterative_steps=steps, global_pruning=global_ranking, round_to=round_to,
        ignored_layers=ignored_layers(model))


def check_no_empty_layer(model: nn.Module, ratio: float) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and (module.out_channels == 0 or module.in_channels == 0):
            raise InputError(f"pruning ratio {ratio} removes every channel of layer {name}; use a smaller ratio")
