"""Target `stm32`: TensorFlow Lite Micro on STM32 microcontrollers; full-integer INT8 only.

The artifact is the full-integer `.tflite` a firmware engineer builds into an
STM32CubeIDE project (INT8 weights, activations, input and outputs), with the
tensor arena it needs measured in TFLM, its flash size, and the fit of model +
arena + a stated runtime overhead on every chip profile; `firmware_inputs()`
gives the C-source generator (csource.py) what it needs from it. The detector
ends at its raw head (`box_dist`, `cls_logit`): decoding and NMS run outside the
graph, so box coordinates and class scores never share one INT8 scale.

Route: onnx2tf turns the exported ONNX into an NHWC TensorFlow graph, and the
TFLite converter quantizes it with our calibration images. It starts from the
same ONNX every target starts from and keeps the network NHWC end to end, which
is what gives TFLM its smallest arena. litert-torch (no TensorFlow) would need
the PyTorch module, which compile does not receive, keeps NCHW behind
transposes (about 3x the arena, as measured for issue #15; not repeated here)
and brings JAX, transformers and torchao with it.
Both TensorFlow steps run in a child interpreter: onnx2tf reads its sample data
from the working folder (we write ours there, so it never downloads any), and
TensorFlow stays out of the build's process.

The model is run here in TensorFlow Lite Micro itself (PyPI `tflite-micro`,
reference kernels) with the arena the firmware will get, and cross-checked in
LiteRT. Latency is only measured by a board (the serial transport): nothing
here times a microcontroller.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.calibration.rules import TFLITE_FULL_INT8
from edge_deploy.pipeline.errors import ConfigError, ConversionMismatch, DeployError, InputError, ToolchainMissing
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.base import Converted, Infer, Profile, Target

MODEL_FILE = "model.tflite"
META = "tflm.json"  # this target's own description of its artifact; only this module reads it
KIB = 1024
# Input sizes that suit a microcontroller's SRAM and a detector's accuracy; others are allowed with a warning.
MCU_IMGSZ = (96, 192)
# What the firmware needs besides the model and the arena, stated rather than measured (no firmware is built
# here): TFLM's interpreter with the INT8 kernels of one detector (CMSIS-NN), HAL, startup code and the UART
# protocol in flash; stack, heap, interpreter objects, HAL state and UART buffers in SRAM.
RUNTIME_FLASH_BYTES = 128 * KIB
RUNTIME_SRAM_BYTES = 32 * KIB
# The firmware's detection settings: postprocess.py's deployment defaults, with fewer boxes kept, since a
# microcontroller's caller rarely wants hundreds.
FIRMWARE_CONF, FIRMWARE_IOU, FIRMWARE_MAX_DET = 0.25, 0.7, 100
ARENA_SEARCH_STEP = 16  # TFLM aligns its allocations to 16 bytes; a finer search learns nothing
# The TFLM Python runtime allocates the arena with malloc: plenty for any model a microcontroller can hold.
HOST_ARENA_BYTES = 64 * 1024 * KIB
CONVERT_TIMEOUT_S = 1800
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # the name onnx2tf looks for in its cwd

# Builtin operators TensorFlow Lite Micro has a kernel for (the op resolver of the tflite-micro package).
TFLM_BUILTINS = frozenset("""
ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND BROADCAST_ARGS
BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION CONV_2D COS CUMSUM DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE
DETECTION_POSTPROCESS DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS FILL FLOOR FLOOR_DIV
FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL HARD_SWISH IF L2_NORMALIZATION L2_POOL_2D
LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC LOG_SOFTMAX MAXIMUM MAX_POOL_2D MEAN
MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK PAD PADV2 PRELU QUANTIZE READ_VARIABLE REDUCE_ALL REDUCE_MAX REDUCE_MIN
RELU RELU6 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR REVERSE_V2 ROUND RSQRT SELECT_V2 SHAPE SIN SLICE SOFTMAX
SPACE_TO_BATCH_ND SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM SVDF
TANH TRANSPOSE TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK VAR_HANDLE WHILE ZEROS_LIKE
""".split())

# ONNX operators -> the TFLite builtins onnx2tf lowers them to (static shapes, batch 1). An operator missing here,
# or lowered to a builtin TFLM lacks, is refused before any conversion work; the converted model is checked again.
ONNX_TO_TFLITE: dict[str, tuple[str, ...]] = {
    "Conv": ("CONV_2D", "DEPTHWISE_CONV_2D"), "ConvTranspose": ("TRANSPOSE_CONV",),
    "Gemm": ("FULLY_CONNECTED",), "MatMul": ("FULLY_CONNECTED", "BATCH_MATMUL"),
    "BatchNormalization": ("MUL", "ADD"),
    "Relu": ("RELU",), "LeakyRelu": ("LEAKY_RELU",), "PRelu": ("PRELU",), "Sigmoid": ("LOGISTIC",),
    "HardSwish": ("HARD_SWISH",), "HardSigmoid": ("MUL", "ADD", "RELU6"), "Tanh": ("TANH",), "Elu": ("ELU",),
    "Clip": ("RELU6", "MINIMUM", "MAXIMUM"), "Softmax": ("SOFTMAX",), "LogSoftmax": ("LOG_SOFTMAX",),
    "Add": ("ADD",), "Sub": ("SUB",), "Mul": ("MUL",), "Div": ("DIV", "MUL"), "Neg": ("NEG",), "Abs": ("ABS",),
    "Sqrt": ("SQRT",), "Exp": ("EXP",), "Log": ("LOG",), "Max": ("MAXIMUM",), "Min": ("MINIMUM",),
    "Concat": ("CONCATENATION",), "Split": ("SPLIT", "SPLIT_V", "STRIDED_SLICE"), "Slice": ("STRIDED_SLICE",),
    "Gather": ("GATHER",), "Reshape": ("RESHAPE",), "Flatten": ("RESHAPE",), "Squeeze": ("RESHAPE",),
    "Unsqueeze": ("RESHAPE",), "Transpose": ("TRANSPOSE",), "Identity": (), "Constant": (), "Shape": (),
    "MaxPool": ("MAX_POOL_2D",), "AveragePool": ("AVERAGE_POOL_2D",), "GlobalAveragePool": ("MEAN",),
    "GlobalMaxPool": ("REDUCE_MAX",), "ReduceMean": ("MEAN",), "ReduceMax": ("REDUCE_MAX",), "ReduceSum": ("SUM",),
    "Resize": ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"), "Upsample": ("RESIZE_NEAREST_NEIGHBOR",),
    "Pad": ("PAD", "PADV2"), "DepthToSpace": ("DEPTH_TO_SPACE",), "SpaceToDepth": ("SPACE_TO_DEPTH",),
    "ArgMax": ("ARG_MAX",), "Where": ("SELECT_V2",),
    # Lowered to builtins TFLM has no kernel for: named so the message can say what they become.
    "TopK": ("TOPK_V2",), "NonMaxSuppression": ("NON_MAX_SUPPRESSION_V4",), "Tile": ("TILE",), "Range": ("RANGE",),
    "ScatterND": ("SCATTER_ND",), "NonZero": ("WHERE",), "Pow": ("POW",), "Expand": ("BROADCAST_TO", "TILE"),
}


class TfliteMicroStm32(Target):
    name = "stm32"
    description = ("TensorFlow Lite Micro on STM32 microcontrollers: full-integer INT8 .tflite (INT8 input and "
                   "outputs); arena and flash measured and checked against the chip")
    toolchain = ("onnx2tf", "tensorflow-cpu", "tf-keras", "tflite-micro", "ai-edge-litert")
    # The board runs firmware, not Python: what it reports over the serial line names its runtime.
    runtime_packages = ("tflite-micro",)
    precisions = ("int8",)
    default_precision = "int8"
    quant_rules = TFLITE_FULL_INT8
    input_layout = "NHWC"
    input_dtype = "int8"
    output_dtypes = {"box_dist": "int8", "cls_logit": "int8"}
    # The model is compiled into firmware in the board's own project, and only the board can time it; a number
    # taken on this machine (TFLM's reference kernels on x86) would describe another device.
    compile_runs_on = "device"
    runner = Path(__file__).parent / "runner.py"
    profiles = (
        # The arena must sit in one contiguous SRAM region: the facts name the largest one.
        Profile("stm32h747", "STM32H747 (Cortex-M7 @ 480 MHz, double-precision FPU, plus a Cortex-M4 core): 2 MB "
                "flash, 1 MB SRAM of which 512 KB contiguous AXI SRAM", imgsz=160,
                facts={"flash_bytes": 2048 * KIB, "sram_bytes": 1024 * KIB, "arena_region_bytes": 512 * KIB,
                       "core": "Cortex-M7", "clock_mhz": 480}),
        Profile("stm32f746", "STM32F746 (Cortex-M7 @ 216 MHz): 1 MB flash, 320 KB SRAM (DTCM, SRAM1 and SRAM2 "
                "contiguous)", imgsz=96,
                facts={"flash_bytes": 1024 * KIB, "sram_bytes": 320 * KIB, "arena_region_bytes": 320 * KIB,
                       "core": "Cortex-M7", "clock_mhz": 216}),
        Profile("stm32l4r9", "STM32L4R9 (Cortex-M4 @ 120 MHz): 2 MB flash, 640 KB SRAM (SRAM1, SRAM2 and SRAM3 "
                "contiguous)", imgsz=128,
                facts={"flash_bytes": 2048 * KIB, "sram_bytes": 640 * KIB, "arena_region_bytes": 640 * KIB,
                       "core": "Cortex-M4", "clock_mhz": 120}),
    )
    default_profile = "stm32h747"
    # compile(profile=NAME) refuses a model that does not fit that chip; the build passes its profile.
    compile_takes_profile = True

    def check_model(self, info: ModelInfo, profile: Profile | None) -> None:
        check_input_size(info.imgsz, info.strides)
        if profile is None:
            return
        # An INT8 model holds at least one byte per parameter: a lower bound of its flash, known before quantizing.
        least = info.params + RUNTIME_FLASH_BYTES
        if least > profile.facts["flash_bytes"]:
            share = 1 - (profile.facts["flash_bytes"] - RUNTIME_FLASH_BYTES) / info.params
            raise ConfigError(f"stm32: the model cannot fit {profile.name}: {info.params:,} parameters take at least "
                              f"{_kib(info.params)} of flash as INT8, + {_kib(RUNTIME_FLASH_BYTES)} runtime > "
                              f"{_kib(profile.facts['flash_bytes'])}; it needs at least {math.ceil(share * 100)} % "
                              "fewer weights (--prune, or a smaller model)")

    def quant_backend(self, precision: str, fp32_onnx: Path, info: ModelInfo, work: Path, settings: dict):
        if precision != "int8":
            raise ConfigError(f"target stm32 runs full-integer INT8 only, not {precision}")
        return TfliteInt8Backend(self, fp32_onnx, info, work, settings["calibration_batches"])

    def convert(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo, out_dir: Path,
                profile: str | None = None) -> Converted:
        """`profile`: the build's chip; the artifact is checked against it and refused when it does not fit.
        Without one, the fit for every profile is only recorded in the notes."""
        check_input_size(info.imgsz, info.strides)
        if precision != "int8" or quantized is None:
            raise InputError(f"target stm32 takes a full-integer INT8 model; {precision} would need float "
                             "kernels a TFLM firmware does not have")
        description = describe_tflite(Path(quantized))
        check_integer_model(description, Path(quantized).name)
        check_tflite_ops(description)
        arena = measure_arena(Path(quantized))
        flash = Path(quantized).stat().st_size
        fits = {p.name: fit(p, arena["arena_bytes"], flash) for p in self.profiles}
        if profile is not None:
            chosen = {p.name: p for p in self.profiles}.get(profile)
            if chosen is None:
                raise ConfigError(f"target stm32 has no profile '{profile}'; its profiles: "
                                  f"{', '.join(p.name for p in self.profiles)}")
            require_fit(chosen, arena["arena_bytes"], flash, info.imgsz)
        # Checked before anything is written: a refused model leaves nothing in the artifact folder.
        model = out_dir / MODEL_FILE
        shutil.copyfile(quantized, model)
        meta = {"imgsz": info.imgsz, "strides": info.strides, "arena_bytes": arena["arena_bytes"], **description}
        (out_dir / META).write_text(json.dumps(meta, indent=1))
        from edge_deploy.targets.stm32.csource import write_c_sources

        # What a firmware engineer drops into the STM32CubeIDE project: the model array, the arena size, and
        # preprocessing, decoding and NMS in C (the same detections as postprocess.py).
        firmware = write_c_sources(model, out_dir / "firmware", imgsz=info.imgsz, strides=info.strides,
                                   reg_max=info.reg_max, names=info.names, conf=FIRMWARE_CONF, iou=FIRMWARE_IOU,
                                   max_det=FIRMWARE_MAX_DET, **firmware_inputs(meta))
        notes = {
            "route": "onnx2tf (ONNX -> NHWC TensorFlow) + TFLite converter full-integer INT8",
            "route_why": ("NHWC end to end gives TFLM the smallest arena; it starts from the exported ONNX every "
                          "target uses; litert-torch keeps NCHW behind transposes (about 3x the arena in issue "
                          "#15's measurement) and needs the PyTorch module"),
            "arena_bytes": arena["arena_bytes"], "arena_reported_bytes": arena["reported_bytes"],
            "arena_how": ("smallest arena TFLM's Python runtime (reference kernels, 64-bit host) runs the model in; "
                          "TFLM's own RecordingMicroAllocator total is arena_reported_bytes. A 32-bit core needs "
                          "slightly less for TFLM's bookkeeping; CMSIS-NN kernels may ask for scratch buffers the "
                          "reference kernels do not"),
            "flash_model_bytes": flash,
            "runtime_overhead": {"flash_bytes": RUNTIME_FLASH_BYTES, "sram_bytes": RUNTIME_SRAM_BYTES,
                                 "what": "stated, not measured: TFLM with CMSIS-NN INT8 kernels, HAL, startup, "
                                         "UART protocol (flash); stack, heap, interpreter objects, buffers (SRAM)"},
            "fits": fits, "profile": profile,
            "operators": description["operators"],
            "quantization": {k: description[k]["quantization"] for k in ("input", "box_dist", "cls_logit")},
            "latency": "not measured here: only the board can time it (deploy bench BUNDLE --device <serial board>)",
        }
        notes["firmware"] = {"files": sorted(p.name for p in firmware.values()), "conf": FIRMWARE_CONF,
                             "iou": FIRMWARE_IOU, "max_det": FIRMWARE_MAX_DET}
        return Converted({"model": model}, notes)

    def compile(self, fp32_onnx: Path, quantized: Path | None, precision: str, info: ModelInfo, out_dir: Path,
                extras: dict[str, Path] | None = None, profile: str | None = None) -> Converted:
        converted = self.convert(fp32_onnx, quantized, precision, info, out_dir, profile=profile)
        (out_dir / "runtime.json").write_text(json.dumps(self.runtime_description(precision, converted, info),
                                                         indent=1))
        return converted

    def runtime_description(self, precision: str, converted: Converted, info: ModelInfo) -> dict:
        described = super().runtime_description(precision, converted, info)
        # INT8 in and out: whoever feeds the model or decodes its outputs needs the scales and zero points.
        described["input"]["quantization"] = converted.notes["quantization"]["input"]
        described["quantization"] = converted.notes["quantization"]
        described["arena_bytes"] = converted.notes["arena_bytes"]
        return described

    def runtime(self, artifact_dir: Path, threads: int | None = None) -> Infer:
        meta = json.loads((Path(artifact_dir) / META).read_text())
        # The arena the firmware gets: a model that needs more fails here, not on the board.
        return tflm_infer(Path(artifact_dir) / MODEL_FILE, meta["arena_bytes"], meta)

    def prepare_job(self, artifact_dir: Path, job: dict, input_tensor: np.ndarray, job_dir: Path) -> None:
        # The board has the model in its firmware; the serial transport sends the job line with this file's
        # sha256 so a board flashed with another model is refused. No input travels: the firmware has its own.
        meta = json.loads((Path(artifact_dir) / META).read_text())
        shutil.copyfile(Path(artifact_dir) / MODEL_FILE, job_dir / MODEL_FILE)
        (job_dir / "job.json").write_text(json.dumps({**job, "model": MODEL_FILE, "arena_bytes": meta["arena_bytes"],
                                                      "imgsz": meta["imgsz"]}))


# --- checks -------------------------------------------------------------------------------------------------


def check_input_size(imgsz: int, strides: list[int]) -> None:
    """The input must tile into the coarsest feature map; outside 96..192 a microcontroller build is unusual."""
    stride = max(strides) if strides else 32
    if imgsz <= 0 or imgsz % stride:
        below, above = max(stride, imgsz // stride * stride), (imgsz // stride + 1) * stride
        raise ConfigError(f"stm32: input size {imgsz} is not a multiple of the model's largest stride {stride}; "
                          f"use {below} or {above} (--imgsz)")
    if not MCU_IMGSZ[0] <= imgsz <= MCU_IMGSZ[1]:
        warnings.warn(f"stm32: input size {imgsz} is outside {MCU_IMGSZ[0]}..{MCU_IMGSZ[1]}, the range that suits a "
                      "microcontroller's memory; the fit check decides", stacklevel=2)


def check_onnx_ops(onnx_path: Path) -> None:
    """Refuses an ONNX graph with an operator TFLM cannot run, naming it and its layer, before any conversion."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    for node in graph.node:
        lowered = ONNX_TO_TFLITE.get(node.op_type)
        layer = node.name or (node.output[0] if node.output else "?")
        if lowered is None:
            raise InputError(f"stm32: layer '{layer}' is an ONNX {node.op_type}, which has no TensorFlow Lite Micro "
                             "kernel; take it out of the graph (decoding and NMS run after the model)")
        # Alternatives onnx2tf picks between by the node's attributes: refused when none has a TFLM kernel.
        if lowered and all(op not in TFLM_BUILTINS for op in lowered):
            raise InputError(f"stm32: layer '{layer}' (ONNX {node.op_type}) becomes TFLite {lowered[0]}, which "
                             "TensorFlow Lite Micro has no kernel for; take it out of the graph")


def check_tflite_ops(description: dict) -> None:
    """The converted model's own operators against TFLM's, naming the first layer that uses one it lacks."""
    for op, layer in description["operator_layers"].items():
        if op not in TFLM_BUILTINS:
            raise InputError(f"stm32: the converted model uses {op} (layer '{layer}'), which TensorFlow Lite Micro "
                             "has no kernel for")


def check_integer_model(description: dict, name: str) -> None:
    for role in ("input", "box_dist", "cls_logit"):
        dtype = description[role]["dtype"]
        if dtype != "int8":
            raise InputError(f"stm32: {name} has a {dtype} {role.replace('input', 'input tensor')}; the target runs "
                             "full-integer INT8 models only (INT8 input and outputs)")


def fit(profile: Profile, arena_bytes: int, flash_model_bytes: int) -> dict:
    """Model + arena + the stated runtime overhead against the chip's flash, SRAM and largest SRAM region."""
    facts = profile.facts
    flash_needed = flash_model_bytes + RUNTIME_FLASH_BYTES
    sram_needed = arena_bytes + RUNTIME_SRAM_BYTES
    region = facts.get("arena_region_bytes", facts["sram_bytes"])
    return {"fits": flash_needed <= facts["flash_bytes"] and sram_needed <= facts["sram_bytes"]
            and arena_bytes <= region,
            "flash_needed": flash_needed, "flash_bytes": facts["flash_bytes"],
            "sram_needed": sram_needed, "sram_bytes": facts["sram_bytes"],
            "arena_bytes": arena_bytes, "arena_region_bytes": region}


def require_fit(profile: Profile, arena_bytes: int, flash_model_bytes: int, imgsz: int) -> None:
    """One line with the numbers and what would make it fit, when the model does not fit the profile's chip."""
    result = fit(profile, arena_bytes, flash_model_bytes)
    if result["fits"]:
        return
    problems, remedies = [], []
    if result["flash_needed"] > result["flash_bytes"]:
        problems.append(f"flash {_kib(flash_model_bytes)} model + {_kib(RUNTIME_FLASH_BYTES)} runtime = "
                        f"{_kib(result['flash_needed'])} > {_kib(result['flash_bytes'])}")
        # Weights do not depend on the input size: only fewer weights help.
        share = 1 - (result["flash_bytes"] - RUNTIME_FLASH_BYTES) / flash_model_bytes
        remedies.append(f"at least {math.ceil(share * 100)} % fewer weights (--prune, or a smaller model)"
                        if share < 1 else "a chip with more flash")
    limit = min(result["sram_bytes"] - RUNTIME_SRAM_BYTES, result["arena_region_bytes"])
    if arena_bytes > limit:
        problems.append(f"arena {_kib(arena_bytes)} > {_kib(max(limit, 0))} available "
                        f"({_kib(result['sram_bytes'])} SRAM - {_kib(RUNTIME_SRAM_BYTES)} runtime, largest region "
                        f"{_kib(result['arena_region_bytes'])})")
        if limit <= 0:
            remedies.append("a chip with more SRAM")
        else:
            # Activations scale with the input's area; the size named is where that scaling lands, to be measured.
            smaller = int(imgsz * math.sqrt(limit / arena_bytes)) // 32 * 32
            remedies.append((f"a smaller input (try --imgsz {smaller})" if smaller >= 32 else "a smaller input")
                            + " or more pruning (--prune)")
    raise ConfigError(f"stm32: the model does not fit {profile.name}: {'; '.join(problems)}; it needs "
                      f"{' and '.join(remedies)}")


def _kib(n: int) -> str:
    return f"{n / KIB:.1f} KiB"


# --- the .tflite itself ---------------------------------------------------------------------------------------


def _schema():
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
    except ImportError:
        raise ToolchainMissing("target stm32 needs tflite-micro: pip install 'edge-deploy[stm32]'") from None
    return schema


def describe_tflite(path: Path) -> dict:
    """Input and outputs (dtype, shape, scale, zero point, which ONNX output each is), and the operators used."""
    schema = _schema()
    data = bytearray(Path(path).read_bytes())
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    except Exception as exc:  # a flatbuffer that is not a model fails anywhere in the generated parser
        raise InputError(f"stm32: {Path(path).name} is not a TFLite model ({type(exc).__name__})") from None
    if len(model.subgraphs) != 1:
        raise InputError(f"stm32: {Path(path).name} has {len(model.subgraphs)} subgraphs; a detector has one")
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def tensor(index: int) -> dict:
        t = graph.tensors[index]
        q = t.quantization
        scale = [float(s) for s in q.scale] if q is not None and q.scale is not None else []
        zero = [int(z) for z in q.zeroPoint] if q is not None and q.zeroPoint is not None else []
        return {"index": int(index), "name": t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                "dtype": types.get(t.type, str(t.type)), "shape": [int(d) for d in t.shape],
                "quantization": {"scale": scale[0] if len(scale) == 1 else None,
                                 "zero_point": zero[0] if len(zero) == 1 else None}}

    layers: dict[str, str] = {}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        label = names.get(builtin, str(builtin))
        if label == "CUSTOM":
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            label = f"custom operator {custom}"
        out = tensor(op.outputs[0])["name"] if op.outputs is not None and len(op.outputs) else "?"
        layers.setdefault(label, out)
    if len(graph.inputs) != 1 or len(graph.outputs) != 2:
        raise InputError(f"stm32: {Path(path).name} has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
                         "a raw-head detector has one input and two outputs (box_dist, cls_logit)")
    outputs = [{**tensor(i), "output_index": position} for position, i in enumerate(graph.outputs)]
    return {"input": tensor(graph.inputs[0]), **_match_outputs(model, outputs),
            "operators": sorted(layers), "operator_layers": layers}


def _match_outputs(model, outputs: list[dict]) -> dict:
    """Which output is box_dist and which cls_logit: by the signature's names, else by channel count."""
    order = {}
    for signature in model.signatureDefs or []:
        for item in signature.outputs or []:
            key = item.name.decode() if isinstance(item.name, bytes) else str(item.name)
            order[int(item.tensorIndex)] = key
    named = {order.get(o["index"]): o for o in outputs}
    if {"box_dist", "cls_logit"} <= named.keys():
        found = {"box_dist": named["box_dist"], "cls_logit": named["cls_logit"]}
    else:
        # The DFL map has 4*reg_max channels (64 in every Ultralytics detector); the class map has nc.
        by_width = sorted(outputs, key=lambda o: -min(o["shape"][1:]))
        found = {"box_dist": by_width[0], "cls_logit": by_width[1]}
    return {k: {**v, "role": k} for k, v in found.items()}


def to_onnx_layout(values: np.ndarray, channels_last: bool) -> np.ndarray:
    """(batch, anchors, channels) -> (batch, channels, anchors), the exported ONNX's layout."""
    return np.ascontiguousarray(values.transpose(0, 2, 1)) if channels_last else values


def _channels_last(meta: dict, role: str, anchors: int) -> bool:
    shape = meta[role]["shape"]
    return len(shape) == 3 and shape[1] == anchors and shape[2] != anchors


def _anchors(imgsz: int, strides: list[int] | None = None) -> int:
    return sum((imgsz // s) ** 2 for s in (strides or (8, 16, 32)))


def _quantize(batch: np.ndarray, q: dict) -> np.ndarray:
    return np.clip(np.round(batch / q["scale"]) + q["zero_point"], -128, 127).astype(np.int8)


def _dequantize(values: np.ndarray, q: dict) -> np.ndarray:
    return ((values.astype(np.float32) - q["zero_point"]) * q["scale"]).astype(np.float32)


def _runner(meta: dict, run_one) -> Infer:
    """A batch -> (box_dist, cls_logit) callable around one-image INT8 inference `run_one(int8 image)`."""
    anchors = _anchors(meta["imgsz"], meta.get("strides"))
    layout = {role: _channels_last(meta, role, anchors) for role in ("box_dist", "cls_logit")}

    def infer(batch: np.ndarray):
        expected = (meta["imgsz"], meta["imgsz"], 3)
        if tuple(batch.shape[1:]) != expected:
            raise DeployError(f"the stm32 model takes NHWC input of {expected}, got {tuple(batch.shape[1:])}")
        outputs = {"box_dist": [], "cls_logit": []}
        for image in batch:
            raw = run_one(_quantize(image[None], meta["input"]["quantization"]))
            for role in outputs:
                outputs[role].append(_dequantize(raw[role], meta[role]["quantization"]))
        return tuple(to_onnx_layout(np.concatenate(outputs[role]), layout[role]) for role in ("box_dist", "cls_logit"))

    return infer


# --- TensorFlow Lite Micro and LiteRT ----------------------------------------------------------------------------


def _tflm_runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise ToolchainMissing("target stm32 needs tflite-micro: pip install 'edge-deploy[stm32]'") from None
    return runtime


@contextmanager
def captured_stderr():
    """TFLM prints from C++ to file descriptor 2: its allocation report and its errors are read from there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        text: list[str] = []
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def tflm_interpreter(path: Path, arena_bytes: int):
    """A TFLM interpreter with exactly `arena_bytes` of arena; one line naming TFLM's complaint if it cannot."""
    runtime = _tflm_runtime()
    with captured_stderr() as said:
        try:
            return runtime.Interpreter.from_file(str(path), arena_size=int(arena_bytes))
        except (RuntimeError, ValueError) as exc:
            error = exc
    lines = [line.strip() for line in said[0].splitlines() if line.strip()]
    missing = next((line for line in lines if "find op" in line.lower() or "not supported" in line.lower()), None)
    raise ArenaTooSmall(arena_bytes, missing or (lines[-1] if lines else str(error)))


class ArenaTooSmall(DeployError):
    """TFLM could not set the model up: the arena is too small, or (`reason`) an operator it cannot run."""

    def __init__(self, arena_bytes: int, reason: str):
        self.arena_bytes, self.reason = arena_bytes, reason
        super().__init__(f"stm32: TensorFlow Lite Micro cannot run the model in a {arena_bytes}-byte arena: {reason}")


def tflm_infer(path: Path, arena_bytes: int, meta: dict) -> Infer:
    """The model in TensorFlow Lite Micro with the given arena, as a float batch -> ONNX-layout outputs callable."""
    interpreter = tflm_interpreter(path, arena_bytes)

    def run_one(image: np.ndarray) -> dict:
        interpreter.set_input(image, 0)
        interpreter.invoke()
        # TFLM numbers outputs in the order of the subgraph's output list.
        return {role: interpreter.get_output(meta[role]["output_index"]) for role in ("box_dist", "cls_logit")}

    return _runner(meta, run_one)


def litert_infer(path: Path, meta: dict, kernels: str = "reference") -> Infer:
    """The same model in LiteRT: the cross-check of the TFLM outputs.

    `reference`: LiteRT's reference kernels, the arithmetic TFLM's kernels (and
    CMSIS-NN's, which are tested bit-exact against them) implement, so outputs
    must be identical. `optimized`: LiteRT's default (XNNPACK), whose INT8
    requantization rounds differently: close, not identical.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        raise ToolchainMissing("the LiteRT cross-check needs ai-edge-litert: pip install 'edge-deploy[stm32]'") \
            from None
    resolver = {"reference": OpResolverType.BUILTIN_REF, "optimized": OpResolverType.AUTO}[kernels]
    interpreter = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]

    def run_one(image: np.ndarray) -> dict:
        interpreter.set_tensor(input_index, image)
        interpreter.invoke()
        return {role: interpreter.get_tensor(meta[role]["index"]) for role in ("box_dist", "cls_logit")}

    return _runner(meta, run_one)


ALLOCATION_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")


def measure_arena(path: Path) -> dict:
    """The arena the model needs: TFLM's own report, and the smallest arena that really runs it (searched).

    The report comes from the RecordingMicroAllocator after one inference; the
    search constructs interpreters (TFLM plans and allocates every tensor and
    scratch buffer when it is set up) and confirms the smallest with an
    inference, so the figure is one TFLM accepted, not one we computed.
    """
    meta = describe_tflite(path)
    image = np.zeros(meta["input"]["shape"], np.int8)
    interpreter = tflm_interpreter(path, HOST_ARENA_BYTES)
    interpreter.set_input(image, 0)
    interpreter.invoke()
    with captured_stderr() as said:
        interpreter.print_allocations()
    found = ALLOCATION_TOTAL.search(said[0])
    if found is None:
        raise ConversionMismatch("stm32: TensorFlow Lite Micro printed no arena allocation total")
    reported = int(found[1])
    del interpreter

    def runs(size: int) -> bool:
        try:
            tflm_interpreter(path, size)
        except ArenaTooSmall as exc:
            if "find op" in exc.reason.lower() or "not supported" in exc.reason.lower():
                raise InputError(f"stm32: TensorFlow Lite Micro cannot run the model: {exc.reason}") from None
            return False
        return True

    # The wrapper's own alignment may want a little more than the report.
    high = smallest_arena(runs, reported + 4 * KIB, HOST_ARENA_BYTES)
    if high is None:
        raise ConversionMismatch("stm32: TensorFlow Lite Micro runs the model in no arena near its own report")
    interpreter = tflm_interpreter(path, high)
    interpreter.set_input(image, 0)
    interpreter.invoke()
    return {"arena_bytes": high, "reported_bytes": reported}


def smallest_arena(runs: Callable[[int], bool], start: int, limit: int) -> int | None:
    """The smallest arena size (to ARENA_SEARCH_STEP) for which `runs` holds: doubling from `start` until it runs
    (None past `limit`), then bisecting down. Assumes a larger arena never fails where a smaller one runs."""
    high = start
    while not runs(high):
        high *= 2
        if high > limit:
            return None
    low = 0
    while high - low > ARENA_SEARCH_STEP:
        middle = (low + high) // 2 // ARENA_SEARCH_STEP * ARENA_SEARCH_STEP
        if middle <= low:
            break
        low, high = (low, middle) if runs(middle) else (middle, high)
    return high


def firmware_inputs(meta: dict) -> dict:
    """What the C-source generator (csource.write_c_sources) needs from this artifact, in its argument names."""
    anchors = _anchors(meta["imgsz"], meta.get("strides"))
    by_index = sorted(("box_dist", "cls_logit"), key=lambda role: meta[role]["output_index"])
    quant = {role: (meta[role]["quantization"]["scale"], meta[role]["quantization"]["zero_point"])
             for role in ("input", "box_dist", "cls_logit")}
    return {"input_quant": quant["input"], "output_quants": {r: quant[r] for r in ("box_dist", "cls_logit")},
            "channels_last": _channels_last(meta, "box_dist", anchors), "arena_bytes": meta["arena_bytes"],
            "ops": list(meta["operators"]), "output_order": by_index}


# --- conversion ---------------------------------------------------------------------------------------------------


class TfliteInt8Backend:
    """Candidates as full-integer INT8 .tflite files made by onnx2tf and the TFLite converter, run in TFLM.

    TFLM has no float kernels beside its integer ones, so there is nothing to
    keep float (rules.float_fallback is False) and one candidate: the
    converter's min/max calibration over our calibration images.
    """

    rules = TFLITE_FULL_INT8
    ranked_by = ""  # nothing can be kept float, so nothing is ranked
    fixed_float_units: tuple[str, ...] = ()
    float_outputs: tuple[str, ...] = ()

    def __init__(self, target: TfliteMicroStm32, fp32_onnx: Path, info: ModelInfo, work: Path,
                 calibration_batches: list[np.ndarray]):
        check_input_size(info.imgsz, info.strides)
        check_onnx_ops(fp32_onnx)  # before minutes of conversion
        self.target, self.fp32_onnx, self.info, self.work = target, Path(fp32_onnx), info, Path(work)
        self.batches = calibration_batches
        self.operators = 0
        self.float_model: Path | None = None  # onnx2tf's FP32 .tflite, kept for comparison

    def tap(self):
        from edge_deploy.calibration.onnxrt import onnx_activation_tap

        tap = onnx_activation_tap(self.fp32_onnx)
        # Statistics of the FP32 model itself (NCHW); the converter calibrates on the same images on its own.
        return lambda batch: tap(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))

    def build(self, ranges, float_units: list[str], out: Path) -> Path:
        if float_units:
            raise ConfigError("stm32: TensorFlow Lite Micro runs every operator in INT8; no layer can stay float")
        path = Path(out).with_suffix(".tflite")
        path.parent.mkdir(parents=True, exist_ok=True)
        seconds = convert_to_tflite(self.fp32_onnx, self.batches, path, self.work / f"convert-{path.stem}")
        self.conversion_seconds = seconds
        description = describe_tflite(path)
        check_integer_model(description, path.name)
        check_tflite_ops(description)
        self.operators = sum(1 for _ in description["operators"])
        return path

    def runtime(self, built: Path) -> Infer:
        meta = {"imgsz": self.info.imgsz, "strides": self.info.strides, **describe_tflite(built)}
        return tflm_infer(built, HOST_ARENA_BYTES, meta)

    def rank_units(self, ranges, batches: list[np.ndarray]):
        return []  # no unit can be kept float on a TFLM build

    def units(self) -> int:
        return self.operators

    def rewritten(self, built: Path) -> dict[str, str]:
        return {}  # the TFLite converter's graph, as it wrote it


def convert_to_tflite(fp32_onnx: Path, batches: list[np.ndarray], out: Path, work: Path) -> float:
    """ONNX -> full-integer INT8 .tflite in a child interpreter; returns the seconds it took."""
    import cv2

    for name in ("onnx2tf", "tensorflow", "tf_keras"):
        if _missing(name):
            raise ToolchainMissing(f"target stm32 needs onnx2tf and tensorflow-cpu ({name} is missing): "
                                   "pip install 'edge-deploy[stm32]' && pip install --no-deps tf-keras==2.21.0 "
                                   "onnx2tf==1.29.24")
    # The child runs inside `work`: a relative path (a relative DEPLOY_HOME, the default ./.deploy) would not
    # name the same folder from there.
    work, out = Path(work).resolve(), Path(out).resolve()
    images = np.concatenate(batches).astype(np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DeployError(f"stm32: calibration batches must be NHWC RGB, got shape {images.shape}")
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calibration.npy", images)
    # onnx2tf checks its TF graph against ONNX Runtime on 20 sample images it downloads unless this file is in
    # its working folder: ours, from the calibration set, so it never reaches the network.
    sample = np.stack([cv2.resize(images[i % len(images)], (128, 128), interpolation=cv2.INTER_AREA)
                       for i in range(20)]).astype(np.float32)
    np.save(work / ONNX2TF_SAMPLE, sample)
    static = static_onnx(Path(fp32_onnx), work / "static.onnx")
    job = {"onnx": str(static.resolve()), "tf": str((work / "tf").resolve()),
           "calibration": str((work / "calibration.npy").resolve()), "out": str(Path(out).resolve())}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "TF_ENABLE_ONEDNN_OPTS": "0",
           # Any download attempt fails at once on a closed local port instead of waiting for a network.
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", f"from {__name__} import _convert_child; _convert_child()",
                               str(work / "job.json")], cwd=work, env=env, capture_output=True, text=True,
                              timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConversionMismatch(f"stm32: the TFLite conversion ran past {CONVERT_TIMEOUT_S} s") from None
    (work / "convert.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not Path(out).is_file():
        raise ConversionMismatch(f"stm32: ONNX -> TFLite conversion failed: {_last_error(done.stdout + done.stderr)}")
    return round(time.perf_counter() - started, 1)


def static_onnx(source: Path, out: Path) -> Path:
    """The ONNX with batch 1 everywhere and shapes inferred again: onnx2tf places its NHWC transposes by shape,
    and with the symbolic batch of our export it does the C2f blocks' Concat in the wrong layout."""
    import onnx

    model = onnx.load(str(source))
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(out))
    return out


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _last_error(output: str) -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def _convert_child() -> None:
    """The child interpreter's work: onnx2tf to a Keras model, then the TFLite converter's full-integer INT8."""
    import onnx2tf
    import tensorflow as tf

    job = json.loads(Path(sys.argv[1]).read_text())
    # disable_model_save: the Keras model is all the converter needs; onnx2tf's SavedModel and FP32/FP16 .tflite
    # files would double the conversion time.
    model = onnx2tf.convert(input_onnx_file_path=job["onnx"], output_folder_path=job["tf"], not_use_onnxsim=True,
                            disable_model_save=True, non_verbose=True, verbosity="error")
    images = np.load(job["calibration"])

    def representative():
        for image in images:
            yield [image[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    Path(job["out"]).write_bytes(converter.convert())
