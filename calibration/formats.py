"""Calibration files that target toolchains read: TensorRT's calibration cache and ncnn's table.

Both are written from the same per-tensor ranges the onnxruntime INT8 model
was built with, so every target starts from one calibration.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from edge_deploy.pipeline.artifacts import atomic_write_text
from edge_deploy.pipeline.errors import InputError

TRT_ALGORITHM = "EntropyCalibration2"


def trt_version_number(version: str) -> int:
    """'8.6.1' -> 8601 (TensorRT 8's NV_TENSORRT_VERSION); TensorRT 10 and later use MAJOR*10000."""
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def write_trt_cache(path: Path, amax: dict[str, float], trt_version: str = "8.6.1") -> None:
    """One `name: hex` line per tensor; hex is the big-endian float32 of the scale amax/127.

    The input tensor comes first, as TensorRT writes it; every line ends with a newline.
    """
    lines = [f"TRT-{trt_version_number(trt_version)}-{TRT_ALGORITHM}"]
    for name, value in amax.items():
        if "\n" in name:
            raise InputError(f"tensor name {name!r} cannot be written to a calibration cache")
        scale = float(value) / 127.0
        if not math.isfinite(scale) or scale < 0:
            raise InputError(f"tensor {name!r} has no usable range ({value})")
        lines.append(f"{name}: {struct.unpack('>I', struct.pack('>f', scale))[0]:08x}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_trt_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}). Names may contain spaces and colons: the value follows the last colon."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise InputError(f"{path}: not a TensorRT calibration cache (no TRT- header)")
    scales = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or len(value) != 8:
            raise InputError(f"{path}:{number}: expected 'name: <8 hex digits>', got {line!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return lines[0], scales


def write_ncnn_table(path: Path, weight_scales: dict[str, list[float]], activation_scales: dict[str, float]) -> None:
    """ncnn2int8's table: `<layer>_param_0 s0 s1 ...` weight lines, then `<layer> s` activation lines.

    Scales are ncnn's (127 / absmax), keyed by ncnn layer name. A layer left out
    of the activation lines stays float in ncnn2int8-style conversion.
    """
    if any(" " in name for name in [*weight_scales, *activation_scales]):
        raise InputError("ncnn layer names cannot contain spaces")
    lines = []
    for layer, scales in weight_scales.items():
        lines.append(f"{layer}_param_0 " + " ".join(f"{s:f}" for s in scales))
    for layer, scale in activation_scales.items():
        lines.append(f"{layer} {scale:f}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_ncnn_table(path: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    weights, activations = {}, {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise InputError(f"{path}:{number}: scales must be numbers: {line!r}") from None
        if fields[0].endswith("_param_0"):
            weights[fields[0][: -len("_param_0")]] = values
        elif len(values) == 1:
            activations[fields[0]] = values[0]
        else:
            raise InputError(f"{path}:{number}: an activation line has one scale, got {len(values)}")
    return weights, activations
