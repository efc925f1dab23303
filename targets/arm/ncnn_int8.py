"""INT8 ncnn models written by this project (ncnn's own ncnn2table/ncnn2int8 ship in no reachable package).

The FP32 `.param`/`.bin` from pnnx is read layer by layer; every Convolution
gets per-output-channel weight scales (127 / |w|max) and a scale for its input
blob (127 / threshold, the threshold from the shared range methods over the
calibration set). The layer is then written as ncnn2int8 would:
`8=2` (int8_scale_term) in the param line, and in the bin the INT8 weights
behind the 0x000D4B38 tag, the bias, the weight scales and the input scale.
Layers named in `keep_float` are copied unchanged and run in FP32.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_deploy.calibration.formats import write_ncnn_table
from edge_deploy.pipeline.errors import ConversionMismatch, InputError

TAG_FP32, TAG_FP16, TAG_INT8 = 0, 0x01306B47, 0x000D4B38


@dataclass
class Layer:
    kind: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: list[str] = field(default_factory=list)

    def param(self, key: str, default: str | None = None) -> str | None:
        for item in self.params:
            k, _, v = item.partition("=")
            if k == key:
                return v
        return default

    def line(self) -> str:
        return " ".join([f"{self.kind:<24}", f"{self.name:<24}", str(len(self.bottoms)), str(len(self.tops)),
                         *self.bottoms, *self.tops, *self.params])


def read_param(path: Path) -> tuple[str, list[Layer]]:
    lines = Path(path).read_text().splitlines()
    layers = []
    for line in lines[2:]:
        fields = line.split()
        if not fields:
            continue
        n_in, n_out = int(fields[2]), int(fields[3])
        layers.append(Layer(fields[0], fields[1], fields[4:4 + n_in], fields[4 + n_in:4 + n_in + n_out],
                            fields[4 + n_in + n_out:]))
    return lines[0], layers


# Layers that only move values between the last convolutions and the net's outputs.
SHAPE_LAYERS = ("Reshape", "Concat", "Permute", "Flatten", "Squeeze", "ExpandDims")


def output_convs(layers: list[Layer], outputs: list[str]) -> list[str]:
    """The Convolutions whose tops reach `outputs` through shape layers only, in graph order."""
    producer = {top: layer for layer in layers for top in layer.tops}
    found, seen, pending = set(), set(), list(outputs)
    while pending:
        layer = producer.get(pending.pop())
        if layer is None or layer.name in seen:
            continue
        seen.add(layer.name)
        if layer.kind in SHAPE_LAYERS:
            pending += layer.bottoms
        elif layer.kind == "Convolution":
            found.add(layer.name)
    return [layer.name for layer in layers if layer.name in found]


@dataclass
class ConvWeights:
    weight: np.ndarray  # (num_output, rest) float32
    bias: np.ndarray | None
    raw: bytes  # the layer's bytes as they are in the FP32 bin


def read_conv_weights(layers: list[Layer], bin_path: Path) -> dict[str, ConvWeights]:
    data = Path(bin_path).read_bytes()
    offset, out = 0, {}
    for layer in layers:
        if layer.kind not in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
            continue
        start = offset
        num_output, size = int(layer.param("0")), int(layer.param("6"))
        tag = struct.unpack_from("<I", data, offset)[0]
        offset += 4
        if tag == TAG_FP32:
            weight = np.frombuffer(data, np.float32, size, offset)
            offset += size * 4
        elif tag == TAG_FP16:
            weight = np.frombuffer(data, np.float16, size, offset).astype(np.float32)
            offset += (size * 2 + 3) // 4 * 4
        else:
            raise InputError(f"ncnn layer {layer.name}: weight tag {tag:#x} is not FP32 or FP16")
        bias = None
        if layer.param("5", "0") == "1":
            bias = np.frombuffer(data, np.float32, num_output, offset)
            offset += num_output * 4
        out[layer.name] = ConvWeights(weight.reshape(num_output, -1).copy(), bias, data[start:offset])
    if offset != len(data):
        raise InputError(f"{bin_path}: layers account for {offset} of {len(data)} bytes; not a pnnx FP32/FP16 bin")
    return out


def onnx_convs(layers: list[Layer], bin_path: Path, onnx_path: Path) -> dict:
    """Each ncnn Convolution's node in the ONNX graph pnnx converted, found by its weights (pnnx copies them as they
    are; layer names are its own). Convs with equal weights pair up in graph order."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {i.name: i for i in graph.initializer}
    by_weights: dict[bytes, list] = {}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
            by_weights.setdefault(weight.reshape(weight.shape[0], -1).tobytes(), []).append(node)
    weights = read_conv_weights(layers, bin_path)
    found = {}
    for layer in layers:
        if layer.kind != "Convolution":
            continue
        candidates = by_weights.get(weights[layer.name].weight.tobytes())
        if not candidates:
            raise ConversionMismatch(f"ncnn layer {layer.name}: no Conv of {Path(onnx_path).name} with the same "
                                     "weights as an initializer, so the fallback's ranking cannot score it there")
        found[layer.name] = candidates.pop(0)
    return found


def weight_scales(weight: np.ndarray) -> np.ndarray:
    bound = np.abs(weight).max(axis=1)
    # An all-zero channel quantizes to zeros whatever its scale; 1 keeps the runtime's dequantization finite.
    return np.where(bound > 0, 127.0 / np.maximum(bound, 1e-30), 1.0).astype(np.float32)


def write_int8(src_param: Path, src_bin: Path, out_dir: Path, activation: dict[str, float],
               keep_float: set[str] = frozenset()) -> dict[str, Path]:
    magic, layers = read_param(src_param)
    weights = read_conv_weights(layers, src_bin)
    header = Path(src_param).read_text().splitlines()[1]
    table_weights, param_lines, chunks = {}, [], []
    for layer in layers:
        conv = weights.get(layer.name)
        if conv is not None and layer.kind == "Convolution" and layer.name in activation \
                and layer.name not in keep_float:
            scales = weight_scales(conv.weight)
            q = np.clip(np.round(conv.weight * scales[:, None]), -127, 127).astype(np.int8).ravel()
            padded = q.tobytes() + b"\0" * ((-q.size) % 4)
            chunk = struct.pack("<I", TAG_INT8) + padded
            if conv.bias is not None:
                chunk += conv.bias.astype("<f4").tobytes()
            chunk += scales.astype("<f4").tobytes() + np.float32(activation[layer.name]).astype("<f4").tobytes()
            chunks.append(chunk)
            layer = Layer(layer.kind, layer.name, layer.bottoms, layer.tops,
                          [p for p in layer.params if not p.startswith("8=")] + ["8=2"])
            table_weights[layer.name] = scales.tolist()
        elif conv is not None:
            chunks.append(conv.raw)
        param_lines.append(layer.line())
    files = {"param": out_dir / "model.ncnn.param", "bin": out_dir / "model.ncnn.bin",
             "table": out_dir / "model.table"}
    files["param"].write_text("\n".join([magic, header, *param_lines]) + "\n")
    files["bin"].write_bytes(b"".join(chunks))
    write_ncnn_table(files["table"], table_weights, {k: v for k, v in activation.items() if k in table_weights})
    return files
