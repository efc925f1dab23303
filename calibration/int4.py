"""4-bit weights for convolutions: round-to-nearest, and GPTQ-style layer-wise reconstruction.

Weights are stored as INT4 DequantizeLinear inputs (ONNX opset 21), per output
channel or in groups along the input channels. onnxruntime dequantizes them to
compute, so INT4 saves size on disk and in memory, not arithmetic.

GPTQ (Frantar et al., 2022) quantizes a layer's weight columns one at a time
and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse Hessian of the layer's reconstruction error on
calibration inputs, H = X Xᵀ. Scales are fixed from the original weights
before the pass ("static groups"), so the stored grid is the one used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

QMIN, QMAX = -8, 7


@dataclass
class Int4Weight:
    values: np.ndarray  # int8 holding INT4 values, the weight's shape
    scale: np.ndarray  # (Cout,) per channel, or (Cout, Cin/group, kh, kw)
    group: int  # 0 = per output channel

    def dequantized(self) -> np.ndarray:
        return (self.values.astype(np.float32) * self.full_scale()).astype(np.float32)

    def full_scale(self) -> np.ndarray:
        if self.group == 0:
            return self.scale.reshape(-1, *([1] * (self.values.ndim - 1)))
        return np.repeat(self.scale, self.group, axis=1)


def int4_scales(weight: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored scales, scales broadcast to the weight's shape); symmetric, |w|max maps to 7."""
    if group == 0:
        bound = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
        stored = np.where(bound > 0, bound / QMAX, 1.0).astype(np.float32)
        return stored, stored.reshape(-1, *([1] * (weight.ndim - 1)))
    cout, cin = weight.shape[:2]
    blocks = np.abs(weight).reshape(cout, cin // group, group, *weight.shape[2:]).max(axis=2)
    stored = np.where(blocks > 0, blocks / QMAX, 1.0).astype(np.float32)
    return stored, np.repeat(stored, group, axis=1)


def rtn(weight: np.ndarray, group: int) -> Int4Weight:
    stored, full = int4_scales(weight, group)
    return Int4Weight(np.clip(np.round(weight / full), QMIN, QMAX).astype(np.int8), stored, group)


def gptq(weight: np.ndarray, hessian: np.ndarray, group: int, damp: float = 0.01, block: int = 128) -> Int4Weight:
    """GPTQ for a weight of shape (Cout, Cin, kh, kw) whose im2col inputs gave `hessian` (K x K)."""
    import torch

    stored, full = int4_scales(weight, group)
    cout = weight.shape[0]
    w = torch.from_numpy(weight.reshape(cout, -1).astype(np.float64)).clone()
    scale = torch.from_numpy(np.broadcast_to(full, weight.shape).reshape(cout, -1).astype(np.float64))
    h = torch.from_numpy(hessian.astype(np.float64)).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = w_block[:, i]
            s = scale[:, start + i]
            quantized = torch.clamp(torch.round(column / s), QMIN, QMAX)
            q[:, start + i] = quantized
            error = (column - quantized * s) / hinv_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = error
        w[:, end:] -= err_block @ hinv[start:end, end:]
    return Int4Weight(q.numpy().astype(np.int8).reshape(weight.shape), stored, group)


def conv_hessians(model_path: Path, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """H = Σ X Xᵀ / n over each ungrouped Conv's im2col inputs on the calibration batches."""
    import onnx
    import torch

    from edge_deploy.calibration.onnxrt import session_with_all_outputs

    model = onnx.load(str(model_path))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and _attr(n, "group", 1) == 1]
    session, _ = session_with_all_outputs(model_path)
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    sums = {n.name: None for n in convs}
    counts = {n.name: 0 for n in convs}
    for batch in batches:
        values = dict(zip(outputs, session.run(outputs, {input_name: batch})))
        values[input_name] = batch
        for node in convs:
            x = torch.from_numpy(values[node.input[0]]).double()
            kernel = _attr(node, "kernel_shape", None)
            pads = _attr(node, "pads", [0, 0, 0, 0])
            cols = torch.nn.functional.unfold(
                torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2])), kernel_size=tuple(kernel),
                dilation=tuple(_attr(node, "dilations", [1, 1])), stride=tuple(_attr(node, "strides", [1, 1])))
            cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)  # K x (batch * positions)
            gram = (cols @ cols.T).numpy()
            sums[node.name] = gram if sums[node.name] is None else sums[node.name] + gram
            counts[node.name] += cols.shape[1]
    return {name: 2 * sums[name] / counts[name] for name in sums if counts[name]}


def _attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def quantize_weights(model_path: Path, method: str, group: int, batches: list[np.ndarray] | None
                     ) -> dict[str, Int4Weight]:
    """INT4 weights for every Conv whose weight is an initializer, keyed by the weight's initializer name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    initializers = {i.name: i for i in model.graph.initializer}
    hessians = conv_hessians(model_path, batches) if method == "gptq" else {}
    out = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        layer_group = group if group and weight.shape[1] % group == 0 else 0
        if node.name in hessians:
            out[node.input[1]] = gptq(weight, hessians[node.name], layer_group)
        else:
            out[node.input[1]] = rtn(weight, layer_group)
    return out


def _dequantize_node(name: str, weight: Int4Weight, output: str):
    import onnx

    attrs = {"axis": 0} if weight.group == 0 else {"axis": 1, "block_size": weight.group}
    return onnx.helper.make_node("DequantizeLinear", [f"{name}_int4", f"{name}_int4_scale"], [output],
                                 name=f"{name}_DequantizeLinear_int4", **attrs)


def _int4_initializers(name: str, weight: Int4Weight):
    import onnx
    from onnx import numpy_helper

    return [onnx.helper.make_tensor(f"{name}_int4", onnx.TensorProto.INT4, weight.values.shape,
                                    weight.values.flatten().tolist()),
            numpy_helper.from_array(weight.scale.astype(np.float32), f"{name}_int4_scale")]


def _to_opset21(model):
    import onnx

    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if opset.version < 21:
                model = onnx.version_converter.convert_version(model, 21)
            break
    model.ir_version = max(model.ir_version, 10)
    return model


def write_weight_only(model_path: Path, weights: dict[str, Int4Weight], out_path: Path) -> Path:
    """The float model with each quantized Conv weight replaced by INT4 + DequantizeLinear."""
    import onnx

    model = _to_opset21(onnx.load(str(model_path)))
    kept = [i for i in model.graph.initializer if i.name not in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, weight in weights.items():
        model.graph.initializer.extend(_int4_initializers(name, weight))
    # The DequantizeLinear nodes produce the old weight names, so the Convs stay as they are.
    nodes = [_dequantize_node(name, weight, name) for name, weight in weights.items()] + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out_path))
    return out_path


def replace_int8_weights(qdq_path: Path, weights: dict[str, Int4Weight], out_path: Path) -> Path:
    """W4A8: in an INT8 QDQ model, swap each Conv weight's INT8 DequantizeLinear for an INT4 one."""
    import onnx

    model = _to_opset21(onnx.load(str(qdq_path)))
    producers = {o: n for n in model.graph.node for o in n.output}
    replace = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        original = dq.input[0][: -len("_quantized")] if dq.input[0].endswith("_quantized") else None
        if original in weights:
            replace[dq.name] = (original, dq)
    nodes = []
    used = set()
    for node in model.graph.node:
        if node.name in replace:
            original, dq = replace[node.name]
            nodes.append(_dequantize_node(original, weights[original], dq.output[0]))
            used.update(dq.input)
        else:
            nodes.append(node)
    still_used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in still_used or i.name not in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for original, _ in replace.values():
        model.graph.initializer.extend(_int4_initializers(original, weights[original]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out_path))
    return out_path


def with_int4_grid(model_path: Path, weights: dict[str, Int4Weight], out_path: Path) -> Path:
    """The float model with its Conv weights moved onto their INT4 grid (dequantized values)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].dequantized(), init.name))
    onnx.save(model, str(out_path))
    return out_path
