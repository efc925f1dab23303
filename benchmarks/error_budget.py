"""Where a cpu INT8 bundle's output error comes from: its rounded weights, or its rounded activations.

Given an FP32 and an INT8 `cpu` bundle of the same model, runs three models on real images and prints each one's
output SQNR against FP32 (error power summed over the images):
- the FP32 model with the INT8 bundle's weights and biases (the values its Dequantize nodes compute): only the
  weights rounded;
- the INT8 model with each weight and bias Dequantize replaced by the FP32 values: only the activations rounded;
- the INT8 model as built.
The second row is what exact weights would leave: how the weights are rounded matters only as far as it differs
from the third. (A rounding chosen to offset the activations' error too, as AdaRound does when it reconstructs
with quantized inputs, is not bounded by it; it has one code step per weight to work with.)

    .venv/bin/python benchmarks/error_budget.py FP32_BUNDLE INT8_BUNDLE --images DIR [--count 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.qdq import dequantized_constants, drop_unread_quantization
from edge_deploy.calibration.sets import IMAGE_SUFFIXES


def with_int8_weights(fp32_path: Path, int8_path: Path, out: Path) -> tuple[Path, int]:
    """The FP32 model with the INT8 model's dequantized weights and biases, matched by node name."""
    import onnx
    from onnx import numpy_helper

    values = {(node.name, k): value for node, k, value in dequantized_constants(onnx.load(str(int8_path)).graph)}
    model = onnx.load(str(fp32_path))
    initializers = {i.name: i for i in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            value = values.get((node.name, k))
            if value is not None and name in initializers and tuple(initializers[name].dims) == value.shape:
                initializers[name].CopyFrom(numpy_helper.from_array(value, name))
                replaced += 1
    onnx.save(model, str(out))
    return out, replaced


def with_float_weights(fp32_path: Path, int8_path: Path, out: Path) -> tuple[Path, int]:
    """The INT8 model with each weight and bias its nodes read through a DequantizeLinear taken from the FP32
    model instead (matched by node name), so that only the activations are rounded."""
    import onnx
    from onnx import numpy_helper

    fp32_graph = onnx.load(str(fp32_path)).graph
    fp32_constants = {i.name: numpy_helper.to_array(i) for i in fp32_graph.initializer}
    fp32_nodes = {node.name: node for node in fp32_graph.node}
    model = onnx.load(str(int8_path))
    graph = model.graph
    replaced = 0
    for node, k, _ in dequantized_constants(graph):
        original = fp32_nodes.get(node.name)
        if original is None or k >= len(original.input) or original.input[k] not in fp32_constants:
            continue
        name = f"{node.name}/float_input_{k}"
        graph.initializer.append(numpy_helper.from_array(fp32_constants[original.input[k]], name))
        node.input[k] = name
        replaced += 1
    drop_unread_quantization(graph)
    onnx.save(model, str(out))
    return out, replaced


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fp32_bundle", type=Path)
    parser.add_argument("int8_bundle", type=Path)
    parser.add_argument("--images", type=Path, required=True, help="a folder of real images of the model's scenes")
    parser.add_argument("--count", type=int, default=32, help="how many of them (sorted by name, from the end)")
    args = parser.parse_args()

    import tempfile

    import onnxruntime as ort

    fp32_path, int8_path = args.fp32_bundle / "model.onnx", args.int8_bundle / "model.onnx"
    imgsz = json.loads((args.int8_bundle / "runtime.json").read_text())["input"]["imgsz"]
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[-args.count:]
    tensors = [load_tensor(path, Preprocess(imgsz))[0] for path in images]

    def session(path: Path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory() as tmp:
        weights_only, weights_replaced = with_int8_weights(fp32_path, int8_path, Path(tmp) / "weights-only.onnx")
        activations_only, activations_replaced = with_float_weights(fp32_path, int8_path,
                                                                    Path(tmp) / "activations-only.onnx")
        reference = session(fp32_path)
        names = [o.name for o in reference.get_outputs()]
        expected = [reference.run(None, {"images": x}) for x in tensors]
        models = {f"weights rounded only ({weights_replaced} tensors from the INT8 bundle)": weights_only,
                  f"activations rounded only ({activations_replaced} tensors from FP32)": activations_only,
                  "INT8 as built": int8_path}
        errors = {}
        for label, path in models.items():
            run = session(path)
            power = np.zeros(len(names))
            for x, wanted in zip(tensors, expected):
                power += [float(((a - b) ** 2).sum()) for a, b in zip(wanted, run.run(None, {"images": x}))]
            errors[label] = power
    signal = np.zeros(len(names))
    for wanted in expected:
        signal += [float((a ** 2).sum()) for a in wanted]
    whole = errors["INT8 as built"]

    print(f"{args.int8_bundle.name} against {args.fp32_bundle.name}, imgsz {imgsz}; {len(images)} images of "
          f"{args.images} (the last {len(images)} by name), onnxruntime {ort.__version__}\n")
    print("| model | " + " | ".join(f"{n} SQNR dB" for n in names) + " | "
          + " | ".join(f"{n} share of INT8's error power" for n in names) + " |")
    print("|---|" + "---|" * (2 * len(names)))
    for label, power in errors.items():
        sqnr = [f"{10 * np.log10(s / e):.2f}" if e > 0 else "inf" for s, e in zip(signal, power)]
        share = [f"{e / w:.1%}" for e, w in zip(power, whole)]
        print(f"| {label} | " + " | ".join(sqnr) + " | " + " | ".join(share) + " |")


if __name__ == "__main__":
    main()
