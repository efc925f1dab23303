"""Where ONNX Runtime's INT8 time goes on this CPU: per-operator profiles of FP32 and INT8 at one thread.

Builds (or reuses from cache) a cpu INT8 bundle, then:
1. times seven models side by side at 1 thread, interleaved and repeated: the FP32 ONNX, the build's INT8 model,
   the same INT8 model with the stem conv quantized too (what the build did before the cpu rules kept convs on
   fewer than 8 input channels float), with its outputs rounded to 8 bits (before the rules kept the outputs'
   shape ops float), and with every SiLU left float, all from the build's own activation statistics; the build's
   INT8 model with each quantized SiLU replaced by a 256-entry lookup table made of standard operators (Cast,
   Gather); and the build's INT8 model on onnxruntime's U8U8 kernels (`session.x64quantprecision`, which on x86
   without VNNI avoids the U8S8 kernels' 16-bit saturation); and the build's INT8 model with its nearest
   upsamplings left as Resize (as built before the cpu rules wrote them as channels-last copies), with each one's
   output SQNR against FP32. The variants built here have their upsamplings as copies, as the build has;
2. profiles each with onnxruntime's profiler (in turns, as in step 1) and prints kernel time per operator type, and every conv whose
   INT8 kernel is slower than its FP32 one. The profiler adds a per-node overhead, so its milliseconds are
   higher than the plain timings; compare them within a column, not with step 1.

    .venv/bin/python benchmarks/ort_operators.py [--model M.pt --data D.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from interleave import load_average, ratios, repeated_p50s, spread

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.qdq import (OnnxQdqBackend, feed_float_inputs, quantize, store_float_weights,
                                         tile_nearest_upsamples)
from edge_deploy.calibration.ranges import load_statistics, ranges_for
from edge_deploy.calibration.rules import ONNXRUNTIME_QDQ
from edge_deploy.pipeline.build import run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.results import QuantizationReport
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions

# On x86 without VNNI, onnxruntime's U8S8 kernels add pairs of products in 16 bits, which can saturate; with this
# session setting they are U8U8, which cannot (elsewhere it changes nothing).
U8U8 = {"session.x64quantprecision": "1"}
PROFILED_RUNS = 200
SKIPPED_RUNS = 50  # warm-up runs left out of the profile
PROFILE_BLOCK = 10


def open_session(path: Path, config: dict | None = None, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profiles(models: dict[str, tuple], feed: dict, prefix: str) -> dict[str, dict[str, float]]:
    """Median kernel microseconds of every node of each (path, session config) model, keyed 'op|node'; the models
    are profiled in turn, a block of runs each, so that the machine's drift hits all alike."""
    sessions = {label: open_session(path, config, f"{prefix}-{index}")
                for index, (label, (path, config)) in enumerate(models.items())}
    for _ in range(PROFILED_RUNS // PROFILE_BLOCK):
        for session in sessions.values():
            for _ in range(PROFILE_BLOCK):
                session.run(None, feed)
    result = {}
    for label, session in sessions.items():
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        durations: dict[str, list[int]] = collections.defaultdict(list)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = f"{event['args']['op_name']}|{event['name'][:-len('_kernel_time')]}"
                durations[key].append(event["dur"])
        result[label] = {key: statistics.median(values[SKIPPED_RUNS:]) for key, values in durations.items()}
    return result


def silu_nodes(model_path: Path) -> list[str]:
    """The Sigmoid nodes and the Mul nodes that multiply a tensor by its own sigmoid."""
    import onnx

    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    sigmoids = {n.output[0]: n for n in nodes if n.op_type == "Sigmoid"}
    found = []
    for node in nodes:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for x, gate in (node.input, node.input[::-1]):
            if gate in sigmoids and sigmoids[gate].input[0] == x:
                found += [sigmoids[gate].name, node.name]
                break
    return found


def silu_tables(int8_path: Path, out: Path) -> Path:
    """The INT8 model with each quantized SiLU (Dequantize, Sigmoid, Quantize, Dequantize, Mul, Quantize) replaced
    by a lookup table of the 256 input codes: Cast to int32, then Gather from the table of output codes. One
    rounding instead of two, and no integer SiLU kernel needed."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(int8_path))
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    makers = {out_name: node for node in graph.node for out_name in node.output}
    readers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)

    def only_reader(name: str, op: str):
        found = readers[name]
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    dropped, tables, added = set(), [], {}
    for sigmoid in [n for n in graph.node if n.op_type == "Sigmoid"]:
        dequantize_x = makers.get(sigmoid.input[0])
        quantize_s = only_reader(sigmoid.output[0], "QuantizeLinear")
        dequantize_s = quantize_s and only_reader(quantize_s.output[0], "DequantizeLinear")
        mul = dequantize_s and only_reader(dequantize_s.output[0], "Mul")
        quantize_y = mul and only_reader(mul.output[0], "QuantizeLinear")
        if not (quantize_y and dequantize_x is not None and dequantize_x.op_type == "DequantizeLinear"
                and set(mul.input) == {dequantize_x.output[0], dequantize_s.output[0]}):
            continue
        x_scale, x_zero = constants[dequantize_x.input[1]], constants[dequantize_x.input[2]]
        y_scale, y_zero = constants[quantize_y.input[1]], constants[quantize_y.input[2]]
        codes = (np.arange(256, dtype=np.float32) - x_zero.astype(np.float32)) * x_scale
        silu = codes / (1 + np.exp(-codes))
        table = np.clip(np.rint(silu / y_scale) + y_zero.astype(np.float32), 0, 255).astype(np.uint8)
        tables.append(numpy_helper.from_array(table, f"{sigmoid.name}/silu_table"))
        index = f"{sigmoid.name}/silu_index"
        added[id(quantize_y)] = [
            helper.make_node("Cast", [dequantize_x.input[0]], [index], to=TensorProto.INT32),
            helper.make_node("Gather", [tables[-1].name, index], [quantize_y.output[0]], axis=0)]
        dropped |= {id(sigmoid), id(quantize_s), id(dequantize_s), id(mul)}
        if all(reader in (sigmoid, mul) for reader in readers[dequantize_x.output[0]]):
            dropped.add(id(dequantize_x))
    # The table's two nodes take the place of the last node they replace, so the graph stays in order.
    nodes = [new for node in graph.node if id(node) not in dropped for new in added.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(tables)
    onnx.save(model, str(out))
    return out


def sqnr_db(reference, produced) -> float:
    import numpy as np

    return float(10 * np.log10((reference ** 2).sum() / ((reference - produced) ** 2).sum()))


def by_op(profiled: dict[str, float]) -> dict[str, float]:
    totals: dict[str, float] = collections.defaultdict(float)
    for key, us in profiled.items():
        totals[key.split("|")[0]] += us
    return dict(totals)


def conv_times(profiled: dict[str, float], op: str) -> dict[str, float]:
    # onnxruntime renames fused nodes (…_output_0_nchwc in FP32, …_token_N in INT8); the source node's name is
    # what is left when the suffix goes.
    return {re.sub(r"(_output_0_nchwc|_token_\d+|_output_0)$", "", key.split("|")[1]): us
            for key, us in profiled.items() if key.split("|")[0] == op}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DEPLOY_HOME", ".deploy")))
    parser.add_argument("--model", type=Path, help="a .pt checkpoint (default: the embedded YOLOv8n)")
    parser.add_argument("--data", type=Path, help="its data YAML (default: the embedded shapes set)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args()

    import onnxruntime as ort

    config = BuildConfig(output=args.home / "bench-dist" / (args.model.stem if args.model else ""))
    config.model, config.data = args.model, args.data
    result = run_build(config, args.home)
    records = {r.name: r for r in result.records}
    fp32_path = records["export"].artifacts["onnx"].path
    int8_path = records["quantize"].artifacts["quantized"].path
    report = QuantizationReport.from_json(records["quantize"].metrics)
    symmetric = result.config.quantize.symmetric
    stats = load_statistics(records["quantize"].artifacts["activation_stats"].path)
    info = records["load"].metrics
    data = Path(result.config.data or json.loads(result.record_path.read_text())["data"])
    image = sorted(data.parent.glob("images/val/*"))[0]
    tensor, _ = load_tensor(image, Preprocess(info["imgsz"]))
    feed = {"images": tensor}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Each variant is the build's backend (method, ranges with SiLU inputs floored, float units, passes) with
        # one rule changed, so that each row differs from the build by that change only.
        def backend(name: str, **rule):
            return OnnxQdqBackend(fp32_path, tmp / name, dataclasses.replace(ONNXRUNTIME_QDQ, **rule),
                                  symmetric=symmetric)

        method_ranges = ranges_for(stats, report.method, symmetric)
        # Without the stem rule: every conv quantized, the stem included.
        stem_int8 = backend("stem-int8", float_convs_below_channels=0).build(
            method_ranges, report.float_units, tmp / "stem-int8.onnx")
        # Without the outputs rule: the outputs rounded to 8 bits, as quantize() alone leaves them.
        rounded = backend("outputs-rounded", float_outputs=False).build(
            method_ranges, report.float_units, tmp / "outputs-rounded.onnx")
        # As built before the cpu rules wrote the upsamplings as channels-last copies.
        resize_int8 = backend("with-resize", upsample_as_tile=False).build(
            method_ranges, report.float_units, tmp / "with-resize.onnx")
        # Every SiLU (Sigmoid and the Mul it feeds) left float, behind the pairs quantize() leaves so that the convs
        # keep their integer kernels: what keeping the activation float instead of onnxruntime's two integer
        # kernels costs. Not a rule: the build's float-input pass would take those pairs away, so it runs for the
        # build's own float units only.
        build_backend = backend("silu-float")
        kept = [*build_backend.fixed_float_units, *report.float_units]
        silu_float = quantize(build_backend.prepared, tmp / "silu-float.onnx",
                              build_backend.activation_ranges(method_ranges), True, symmetric,
                              [*kept, *silu_nodes(build_backend.prepared)])
        feed_float_inputs(silu_float, kept)
        tile_nearest_upsamples(silu_float)
        store_float_weights(silu_float)
        models = {"FP32": (fp32_path, None), "INT8 (build)": (int8_path, None),
                  "INT8, stem conv quantized": (stem_int8, None), "INT8, outputs rounded": (rounded, None),
                  "INT8, SiLU float": (silu_float, None),
                  "INT8, SiLU as a lookup table": (silu_tables(int8_path, tmp / "silu-tables.onnx"), None),
                  "INT8, U8U8 kernels": (int8_path, U8U8),
                  "INT8, upsampling as Resize": (resize_int8, None)}
        sessions = {label: open_session(path, config) for label, (path, config) in models.items()}
        outputs = {label: s.run(None, feed) for label, s in sessions.items()}
        sqnr = {label: min(sqnr_db(reference, produced) for reference, produced in zip(outputs["FP32"], out))
                for label, out in outputs.items() if label != "FP32"}
        load_start = load_average()
        p50s = repeated_p50s({label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()},
                             args.repeats, args.rounds, args.block, warmup=20)
        load_end = load_average()
        profiled = profiles(models, feed, str(tmp / "trace"))

    print(f"host: {cpu_name()} ({vector_extensions()}), onnxruntime {ort.__version__}, 1 thread; model "
          f"{info['family']} imgsz {info['imgsz']} ({args.model or 'embedded default'}); {args.repeats} repeats x "
          f"{args.rounds} rounds x {args.block} runs per model, interleaved; load average {load_start} at the "
          f"start, {load_end} at the end\n")
    print("| model | p50 ms | speed vs FP32, median [min-max] | lowest output SQNR vs FP32 (dB, the probe image) |")
    print("|---|---|---|---|")
    for label in models:
        print(f"| {label} | {statistics.median(p50s[label]):.3f} | {spread(ratios(p50s, 'FP32', label))} | "
              f"{'-' if label == 'FP32' else f'{sqnr[label]:.2f}'} |")
    print(f"\nKept float by the cpu rules: {', '.join(report.float_for_speed) or 'none'}; by the search: "
          f"{len(report.float_units)}.\n")
    runs = PROFILED_RUNS - SKIPPED_RUNS
    print(f"Profiler kernel time per operator type, ms per inference (median node time over {runs} runs, "
          "summed):\n")
    totals = {label: by_op(p) for label, p in profiled.items()}
    print("| " + " | ".join(["model", "total"] + ["top operators"]) + " |")
    print("|---|---|---|")
    for label, ops in totals.items():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
        print(f"| {label} | {sum(ops.values()) / 1000:.2f} | "
              + ", ".join(f"{op} {us / 1000:.2f}" for op, us in top) + " |")
    float_convs = conv_times(profiled["FP32"], "Conv")
    int8_convs = conv_times(profiled["INT8, stem conv quantized"], "QLinearConv")
    paired = [(name, float_convs[name], us) for name, us in int8_convs.items() if name in float_convs]
    slower = sorted((row for row in paired if row[2] > row[1]), key=lambda row: row[1] / row[2])
    print(f"\nConvs whose INT8 kernel is slower than FP32 (of {len(paired)} paired, profiler us):\n")
    print("| conv | FP32 us | INT8 us | INT8 speed |")
    print("|---|---|---|---|")
    for name, f, q in slower:
        print(f"| {name} | {f:.0f} | {q:.0f} | {f / q:.2f}x |")
    all_float, all_int8 = sum(r[1] for r in paired), sum(r[2] for r in paired)
    print(f"\nAll paired convs: FP32 {all_float / 1000:.2f} ms, INT8 {all_int8 / 1000:.2f} ms "
          f"({all_float / all_int8:.2f}x).")


if __name__ == "__main__":
    main()
