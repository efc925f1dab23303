"""Target `jetson`: TensorRT on NVIDIA Jetson (Xavier NX, Orin), engine built on the device.

The artifact is what TensorRT consumes: an explicit-quantization QDQ ONNX for
INT8 (Q/DQ placed the way TensorRT fuses layers; sensitive layers left float by
the shared search), the FP32 ONNX for FP16/FP32, plus a TensorRT 8.x
calibration cache for JetPacks whose TensorRT still takes implicit calibration,
and the engine-build recipe. The engine itself is built where it will run: an
engine is tied to the GPU and the TensorRT version that built it. Here, where
TensorRT cannot be installed, the QDQ ONNX is checked in onnxruntime (the same
Q/DQ semantics); on the device, `runner.py` builds the engine with `trtexec`
and times it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edge_deploy.calibration.rules import TENSORRT_QDQ
from edge_deploy.pipeline.errors import ConversionMismatch
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.base import Converted, Infer, Profile, Target

# Layers TensorRT runs in INT8 when their inputs are quantized.
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Pointwise ops TensorRT fuses into the convolution before them (SiLU is Sigmoid + Mul in an exported YOLO).
FUSED_ACTIVATIONS = ("Sigmoid", "Mul", "Relu", "LeakyRelu", "Clip", "HardSwish", "HardSigmoid", "Tanh")
# Operators the TensorRT ONNX parser has no importer for among those an exported YOLO could carry; a graph with one
# would fail on the device, minutes after upload. (Everything in a YOLOv8/11 raw-head export is supported.)
UNSUPPORTED_BY_TENSORRT = frozenset({"NonMaxSuppression", "StringNormalizer", "Unique", "Loop", "SequenceConstruct",
                                     "SequenceAt", "ConcatFromSequence", "Optional", "OptionalGetElement",
                                     "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
                                     "QLinearMatMul"})


class TensorRtJetson(Target):
    name = "jetson"
    description = ("TensorRT on NVIDIA Jetson: explicit-quantization QDQ ONNX (INT8 with FP16 fallback) or FP16; "
                   "the engine is built on the device")
    # tensorrt: "not installed" here; where it is, its version keys the engine built with it.
    toolchain = ("onnxruntime", "onnx", "tensorrt")
    runtime_packages = ("tensorrt", "numpy")
    precisions = ("int8", "fp16", "fp32")
    default_precision = "int8"
    quant_rules = TENSORRT_QDQ
    input_layout = "NCHW"
    reference_precisions = frozenset({"fp32"})
    # FP16 is judged here by emulation (weights and every activation rounded to FP16 between layers would need
    # TensorRT's kernels; only the weights' rounding is reproduced), so its tolerance is that of FP16 weights.
    parity_tolerance = {"fp32": 1e-4, "fp16": 2e-2}
    compile_runs_on = "device"
    # The probe's job builds the FP32 engine beside the artifact's on the device and times the two in turns.
    times_builds_in_turns = True
    runner = Path(__file__).parent / "runner.py"
    runner_support = (Path(__file__).parent / "trtexec.py", Path(__file__).parent / "tegrastats.py")
    profiles = (
        Profile("jetson-xavier-nx", "Jetson Xavier NX: 384-core Volta GPU (48 tensor cores), 2 NVDLA 1.0 cores, "
                "8 GB LPDDR4x; JetPack 5.1 (L4T r35), TensorRT 8.5; power modes 10/15/20 W",
                facts={"jetpack": "5.1.3", "tensorrt": "8.5.2", "gpu": "Volta sm_72", "dla_cores": 2,
                       "power_modes_w": [10, 15, 20], "memory_gb": 8}),
        Profile("jetson-orin-nano", "Jetson Orin Nano 8GB: 1024-core Ampere GPU (32 tensor cores), no DLA, "
                "8 GB LPDDR5; JetPack 6.2 (L4T r36), TensorRT 10.3; power modes 7/15/25 W",
                facts={"jetpack": "6.2", "tensorrt": "10.3.0", "gpu": "Ampere sm_87", "dla_cores": 0,
                       "power_modes_w": [7, 15, 25], "memory_gb": 8}),
    )
    default_profile = "jetson-xavier-nx"
    # INT8 bundles also carry TensorRT 8.x's calibration cache, written by the quantize stage from the same ranges.
    compile_inputs = {"int8": ("trt_calibration_cache",)}

    def quant_backend(self, precision: str, fp32_onnx: Path, info: ModelInfo, work: Path, settings: dict):
        from edge_deploy.calibration.qdq import OnnxQdqBackend

        return OnnxQdqBackend(fp32_onnx, work, self.quant_rules, 8, 8, settings["int4_method"],
                              settings["int4_group"], settings["calibration_batches"], True, settings.get("progress"))

    def convert(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo,
                out_dir: Path, extras: dict[str, Path] | None = None) -> Converted:
        import onnx

        artifact = out_dir / "model.onnx"
        source = quantized if quantized is not None else fp32_onnx
        model = onnx.load(str(source))
        unsupported = sorted({n.op_type for n in model.graph.node} & UNSUPPORTED_BY_TENSORRT)
        if unsupported:
            raise ConversionMismatch(f"compile[jetson]: the graph has operators TensorRT's ONNX parser cannot "
                                     f"import: {', '.join(unsupported)}")
        notes: dict = {}
        files = {"model": artifact}
        if quantized is not None:
            notes["placement"] = check_tensorrt_placement(model)
        shutil.copyfile(source, artifact)
        cache = (extras or {}).get("trt_calibration_cache")
        if cache is not None:
            # For TensorRT 8.x's implicit INT8: the FP32 graph the cache's tensor names belong to, beside it.
            shutil.copyfile(cache, out_dir / "calibration.cache")
            shutil.copyfile(fp32_onnx, out_dir / "model.fp32.onnx")
            files.update({"calibration_cache": out_dir / "calibration.cache",
                          "fp32_model": out_dir / "model.fp32.onnx"})
            notes["calibration_cache_coverage"] = cache_coverage(out_dir / "calibration.cache", fp32_onnx)
        recipe = engine_recipe(precision, info.imgsz, cache is not None)
        (out_dir / "build_engine.sh").write_text(recipe_script(recipe))
        files["recipe"] = out_dir / "build_engine.sh"
        notes["engine_build"] = recipe
        from edge_deploy.targets.jetson.engine import build_engine, unavailable

        reason = unavailable()
        if reason is None:
            # Where TensorRT and a GPU are at hand the engine is built now, for this GPU and TensorRT only.
            notes["engine"] = build_engine(artifact, out_dir / "model.engine", precision, info.imgsz,
                                           out_dir / "timing.cache")
            files.update({"engine": out_dir / "model.engine", "timing_cache": out_dir / "timing.cache"})
        else:
            notes["engine"] = {"built": False, "reason": f"{reason}: the engine is built on the device"}
        return Converted(files, notes)

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        """The artifact as TensorRT will compute it, as closely as onnxruntime can: the QDQ graph as is (same
        Q/DQ semantics); for FP16, the FP32 graph with its weights rounded to FP16."""
        from edge_deploy.calibration.onnxrt import ort_infer

        description = json.loads((Path(artifact_dir) / "runtime.json").read_text())
        model = Path(artifact_dir) / "model.onnx"
        if description["precision"] != "fp16":
            return ort_infer(model, threads)
        # The session holds the graph once created, so the rounded copy lives only until then (and never in
        # the artifact folder, which may be a cache entry).
        with tempfile.TemporaryDirectory() as folder:
            return ort_infer(fp16_weights(model, Path(folder) / "model.fp16-weights.onnx"), threads)

    def prepare_job(self, artifact_dir: Path, job: dict, input_tensor: np.ndarray, job_dir: Path,
                    reference_dir: Path | None = None) -> None:
        description = json.loads((Path(artifact_dir) / "runtime.json").read_text())
        for name in description["files"].values():
            shutil.copyfile(Path(artifact_dir) / name, job_dir / name)
        np.save(job_dir / "input.npy", input_tensor)
        recipe = description["engine_build"]
        job = {**job, "model": "model.onnx", "input": "input.npy", "engine_build": recipe}
        if reference_dir is not None:
            from edge_deploy.targets.jetson.trtexec import trtexec_command

            shutil.copyfile(Path(reference_dir) / "model.onnx", job_dir / "reference.onnx")
            # The reference's own precision (FP32 in a build's probe; FP16, say, from bench --against), on the
            # GPU whatever core the artifact runs on: DLA has no FP32. Its own timing cache, so that neither build
            # reads tactics the other timed.
            precision = json.loads((Path(reference_dir) / "runtime.json").read_text())["precision"]
            _, _, height, width = recipe["input_shape"]
            job["reference"] = {"model": "reference.onnx", "precision": precision, "build": trtexec_command(
                "reference.onnx", "reference.engine", precision, "reference.timing.cache",
                shapes=f"images:1x3x{height}x{width}")}
        (job_dir / "job.json").write_text(json.dumps(job))

    def runtime_description(self, precision: str, converted: Converted, info: ModelInfo) -> dict:
        description = super().runtime_description(precision, converted, info)
        description["engine_build"] = converted.notes["engine_build"]
        description["device_steps"] = device_steps(converted.notes["engine_build"])
        return description


def check_tensorrt_placement(model) -> dict:
    """Checks a QDQ graph against TensorRT's placement rules; raises ConversionMismatch naming the first breach.

    Every Q/DQ pair is symmetric INT8 (zero point 0); weights are per output channel (axis 0); every activation
    Q/DQ is read by a layer TensorRT runs in INT8, and none sits between a convolution and its activation (that
    would split a fused kernel with a reformat); residual Adds have both inputs quantized or neither, so the add
    can fuse into the convolution before it. Returns counts for the report.
    """
    from onnx import numpy_helper

    from edge_deploy.calibration.qdq import tensor_readers

    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers = tensor_readers(model.graph)

    def breach(message: str):
        raise ConversionMismatch(f"compile[jetson]: the QDQ graph breaks TensorRT's placement rules: {message}")

    pairs = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            breach(f"{node.op_type} {node.name or node.output[0]} is not symmetric INT8 (zero point 0)")
        if node.op_type == "QuantizeLinear":
            pairs += 1
            continue
        if node.input[0] in initializers:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            scale = initializers.get(node.input[1])
            if scale is not None and scale.size > 1 and axis != 0:
                breach(f"weights {node.input[0]} are quantized along axis {axis}, not per output channel (axis 0)")
            continue
        users = consumers.get(node.output[0], [])
        # A Q/DQ pair exists for the INT8 layers reading it; other readers (a Concat beside a Conv) TensorRT
        # commutes it through. One that no INT8 layer reads is a reformat for nothing.
        if not any(user.op_type in (*WEIGHTED, "Add") for user in users):
            breach(f"the Q/DQ on {node.input[0]} feeds only {', '.join(sorted({u.op_type for u in users}))}, "
                   "which TensorRT would not run in INT8")
        quantize = producers.get(node.input[0])
        source = producers.get(quantize.input[0]) if quantize is not None else None
        activations = [u for u in users if u.op_type in FUSED_ACTIVATIONS]
        if source is not None and source.op_type in WEIGHTED and activations:
            breach(f"a Q/DQ sits between {source.op_type} {source.name} and its activation "
                   f"{activations[0].op_type} {activations[0].name}, splitting a fused kernel")

    quantized_layers, float_layers, half_adds = 0, [], []
    for node in model.graph.node:
        if node.op_type in WEIGHTED:
            source = producers.get(node.input[0])
            if source is not None and source.op_type == "DequantizeLinear":
                quantized_layers += 1
            else:
                float_layers.append(node.name)
        elif node.op_type == "Add":
            activations = [i for i in node.input if i not in initializers]
            dq = [producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in activations]
            if len(activations) == 2 and any(dq) and not all(dq):
                half_adds.append(node.name)
    if half_adds:
        breach(f"residual Add {half_adds[0]} has only one input quantized; both or neither fuse")
    return {"qdq_pairs": pairs, "int8_layers": quantized_layers, "float_layers": len(float_layers),
            "float_layer_names": float_layers}


def cache_coverage(cache: Path, fp32_onnx: Path) -> dict:
    """How many of the FP32 graph's tensors the TensorRT 8.x cache has a scale for (TensorRT matches by name)."""
    import onnx

    from edge_deploy.calibration.formats import read_trt_cache

    header, scales = read_trt_cache(cache)
    graph = onnx.load(str(fp32_onnx), load_external_data=False).graph
    tensors = {graph.input[0].name} | {out for node in graph.node for out in node.output}
    return {"header": header, "tensors_with_scale": len(tensors & set(scales)), "graph_tensors": len(tensors)}


def fp16_weights(model_path: Path, out: Path) -> Path:
    """The graph with every float weight rounded to FP16 and back: what FP16 storage does to the weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(array.astype(np.float16).astype(np.float32), init.name))
    onnx.save(model, str(out))
    return out


def engine_recipe(precision: str, imgsz: int, has_cache: bool) -> dict:
    """How the engine is built on the device, as data: the bundle, the job and the model card all read it."""
    from edge_deploy.targets.jetson.trtexec import trtexec_command

    shapes = f"images:1x3x{imgsz}x{imgsz}"
    build = trtexec_command("model.onnx", "model.engine", precision, "timing.cache", shapes=shapes)
    recipe = {
        "precision": precision,
        "mode": {"int8": "INT8 explicit quantization (Q/DQ in the graph) with FP16 fallback per layer",
                 "fp16": "FP16 (TensorRT may keep some layers FP32)", "fp32": "FP32"}[precision],
        "input_shape": [1, 3, imgsz, imgsz],
        "build": build,
        "dla": trtexec_command("model.onnx", "model.dla.engine", precision, "timing.cache", shapes=shapes,
                               dla_core=0),
    }
    if has_cache:
        # TensorRT 8.x (JetPack 5, Xavier NX) can also calibrate implicitly from the FP32 graph and the cache.
        recipe["tensorrt8_implicit"] = trtexec_command("model.fp32.onnx", "model.engine", precision, "timing.cache",
                                                       shapes=shapes, calib_cache="calibration.cache")
    return recipe


def recipe_script(recipe: dict) -> str:
    lines = ["#!/bin/sh", "# Builds the TensorRT engine on the Jetson it will run on (an engine is tied to its GPU",
             "# and TensorRT version). Run in this folder; trtexec ships with JetPack (/usr/src/tensorrt/bin).",
             "set -eu", 'PATH="$PATH:/usr/src/tensorrt/bin"', shlex.join(recipe["build"])]
    if "tensorrt8_implicit" in recipe:
        lines += ["# TensorRT 8.x alternative, implicit INT8 from the calibration cache:",
                  "# " + shlex.join(recipe["tensorrt8_implicit"])]
    lines += ["# On a DLA core (Xavier NX), layers DLA lacks fall back to the GPU:", "# " + shlex.join(recipe["dla"])]
    return "\n".join(lines) + "\n"


def device_steps(recipe: dict) -> list[str]:
    caveat = (["The FP16 accuracy above is onnxruntime with the weights rounded to FP16: TensorRT's FP16 arithmetic "
               "is not emulated here. Check it on the device.", ""] if recipe["precision"] == "fp16" else [])
    return [*caveat,
        "Copy this bundle to the Jetson and build the engine there (engines are tied to the GPU and the TensorRT "
        "version that built them):",
        "", "```", "sh build_engine.sh", "```", "",
        f"which runs `{shlex.join(recipe['build'])}` ({recipe['mode']}). The bundle's device runner does the "
        "same as a device job (`python3 runner.py JOB_DIR` with the job's `job.json`): it builds the engine, times "
        "it with trtexec and reads the power rails (tegrastats / INA3221).",
        "", "Run it with TensorRT's Python API (input `images`, 1x3xHxW float32 RGB 0..1, letterboxed; outputs "
        "`box_dist` and `cls_logit`, decoded by `postprocess.py`), or time it with "
        "`trtexec --loadEngine=model.engine`.",
    ]
