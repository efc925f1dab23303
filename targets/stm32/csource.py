"""Deployable C sources for the stm32 target: TensorFlow Lite Micro on a Cortex-M (issue #15).

The firmware engineer gets a folder to drop into an STM32CubeIDE project:

    model_data.h/.cc    the .tflite flatbuffer as a 16-byte aligned const array (flash)
    detector_config.h   everything this model's decode depends on, as macros
    detector.h/.c       portable C99: letterbox + int8 quantization of a camera frame,
                        dequantization, DFL decode and NMS; no heap, caller-owned buffers
    inference.h/.cc     the TFLM entry point (resolver, interpreter, static arena, invoke)
    serial_probe.h/.c   the board's side of `deploy bench` over a UART (targets/stm32/serial_probe.py)
    README.md           how to build it in, flash and RAM numbers

detector.c is the C twin of pipeline/detect.py: on the same dequantized outputs it
keeps the same detections in the same order (tests/targets/test_stm32_csource.py runs it
under qemu and compares). The sources are fixed text plus detector_config.h, so
nothing model-specific hides in code, and the same inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edge_deploy.pipeline.errors import ConfigError, InputError
from edge_deploy.targets.stm32.serial_probe import MAX_RUNS as PROBE_MAX_RUNS, SERIAL_PROBE_C, SERIAL_PROBE_H

OUTPUT_NAMES = ("box_dist", "cls_logit")
PAD_VALUE = 114  # calibration/preprocess.py's letterbox colour
MODEL_ALIGNMENT = 16  # TFLM reads the flatbuffer in place; its tensors' buffers need 16-byte alignment
DEFAULT_CANDIDATE_CAP = 512  # each candidate costs 33 bytes of RAM; see README "RAM"
CANDIDATE_BYTES = 28  # sizeof(detector_candidate_t) on a 32-bit Cortex-M
FILES = ("model_data.h", "model_data.cc", "detector_config.h", "detector.h", "detector.c", "inference.h",
         "inference.cc", "serial_probe.h", "serial_probe.c", "README.md")

# TFLite builtin operator (schema name) -> MicroMutableOpResolver method, as TFLM names them. An op outside this
# table is refused rather than guessed: a wrong method name would only show up in the firmware build.
RESOLVER_METHODS = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "COS": "AddCos", "CUMSUM": "AddCumSum", "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "IF": "AddIf", "READ_VARIABLE": "AddReadVariable", "SVDF": "AddSvdf",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "DEPTH_TO_SPACE": "AddDepthToSpace", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv", "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog",
    "LOG_SOFTMAX": "AddLogSoftmax", "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic", "MAX_POOL_2D": "AddMaxPool2D",
    "MAXIMUM": "AddMaximum", "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad",
    "MUL": "AddMul", "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad",
    "PADV2": "AddPadV2", "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "REDUCE_MAX": "AddReduceMax",
    "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "ROUND": "AddRound", "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv", "UNPACK": "AddUnpack", "ZEROS_LIKE": "AddZerosLike",
}


# --------------------------------------------------------------------------------------------------------------
# The arithmetic the C code shares with Python: tests and the model side use these, not their own copies.

def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """real = scale * (q - zero_point) in float32, rounded exactly as detector.c rounds it."""
    return np.float32(scale) * (np.asarray(q).astype(np.int32) - int(zero_point)).astype(np.float32)


def quantize(real: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """int8 as TFLite's QUANTIZE op makes it: round half away from zero, then clamp."""
    scaled = np.asarray(real, dtype=np.float64) / float(scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(rounded + int(zero_point), -128, 127).astype(np.int8)


def input_table(scale: float, zero_point: int) -> np.ndarray:
    """The int8 input value of each 8-bit pixel: Preprocess's float32 x/255, then quantize."""
    pixels = np.arange(256, dtype=np.float32) * np.float32(1 / 255.0)
    return quantize(pixels, scale, zero_point)


def anchor_count(imgsz: int, strides: Sequence[int]) -> int:
    return sum((imgsz // s) ** 2 for s in strides)


def workspace_bytes(max_candidates: int) -> int:
    """sizeof(detector_workspace_t) on a 32-bit Cortex-M: candidates, two index arrays, a flag each."""
    raw = max_candidates * (CANDIDATE_BYTES + 2 + 2 + 1)
    return (raw + 3) // 4 * 4


# --------------------------------------------------------------------------------------------------------------
# C text helpers


def c_float(value: float) -> str:
    """A float literal that is exactly float32(value): numpy's shortest round-trip digits, plus 'f'."""
    text = str(np.float32(value))
    if not any(ch in text for ch in ".en"):
        text += ".0"
    return text + "f"


def c_string(text: str) -> str:
    """A C string literal; non-ASCII and control bytes as 3-digit octal so no escape swallows a digit."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F and ch != "?":  # '?' avoided: trigraphs
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_initializer(values: Sequence[str], per_line: int, indent: str = "    ") -> str:
    lines = [", ".join(values[i:i + per_line]) for i in range(0, len(values), per_line)]
    return ",\n".join(indent + line for line in lines)


def _macro_list(values: Sequence[str]) -> str:
    """A brace initializer as a one-line macro body."""
    return "{ " + ", ".join(values) + " }"


def _macro_block(values: Sequence[str], per_line: int) -> str:
    """A long brace initializer as a multi-line macro body (every line but the last ends in a backslash)."""
    lines = [", ".join(values[i:i + per_line]) for i in range(0, len(values), per_line)]
    body = [f"    {line}," if n < len(lines) - 1 else f"    {line}" for n, line in enumerate(lines)]
    return " \\\n".join(["{", *body, "}"])


# --------------------------------------------------------------------------------------------------------------
# Argument checks: every mistake here would otherwise surface on the board as silently wrong boxes.


def _check(imgsz, strides, reg_max, names, input_quant, output_quants, arena_bytes, conf, iou, max_det,
           max_candidates, ops, output_order) -> tuple[list[str], dict[str, tuple[float, int]]]:
    if not isinstance(imgsz, int) or imgsz <= 0:
        raise ConfigError(f"stm32 C sources: imgsz must be a positive integer, got {imgsz!r}")
    if not strides or any(not isinstance(s, int) or s <= 0 or s > imgsz for s in strides):
        raise ConfigError(f"stm32 C sources: strides must be positive integers up to imgsz, got {list(strides)}")
    if not isinstance(reg_max, int) or not 1 <= reg_max <= 64:
        raise ConfigError(f"stm32 C sources: reg_max must be an integer in 1..64, got {reg_max!r}")
    if not names:
        raise ConfigError("stm32 C sources: the model has no class names")
    anchors = anchor_count(imgsz, strides)
    if anchors * max(len(names), 4 * reg_max) >= 2 ** 31:
        raise ConfigError(f"stm32 C sources: {anchors} anchors x {len(names)} classes is too large for a MCU")
    quants = {"input": input_quant, **{name: (output_quants or {}).get(name) for name in OUTPUT_NAMES}}
    checked = {}
    for name, quant in quants.items():
        try:
            scale, zero_point = float(quant[0]), quant[1]
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"stm32 C sources: quantization of '{name}' must be (scale, zero_point), "
                              f"got {quant!r}") from None
        if not (math.isfinite(scale) and scale > 0 and np.isfinite(np.float32(scale)) and np.float32(scale) > 0):
            raise ConfigError(f"stm32 C sources: scale of '{name}' must be a positive float32, got {scale!r}")
        if not isinstance(zero_point, (int, np.integer)) or not -128 <= int(zero_point) <= 127:
            raise ConfigError(f"stm32 C sources: zero point of '{name}' must be an int8, got {zero_point!r}")
        checked[name] = (scale, int(zero_point))
    if not isinstance(arena_bytes, int) or arena_bytes <= 0:
        raise ConfigError(f"stm32 C sources: arena_bytes must be a positive integer, got {arena_bytes!r}")
    if not 0.0 <= conf < 1.0:
        raise ConfigError(f"stm32 C sources: conf must be in [0, 1), got {conf}")
    if not 0.0 <= iou <= 1.0:
        raise ConfigError(f"stm32 C sources: iou must be in [0, 1], got {iou}")
    if not isinstance(max_det, int) or max_det <= 0:
        raise ConfigError(f"stm32 C sources: max_det must be a positive integer, got {max_det!r}")
    if not isinstance(max_candidates, int) or not 1 <= max_candidates <= 65535:
        raise ConfigError(f"stm32 C sources: max_candidates must be in 1..65535, got {max_candidates!r}")
    if sorted(output_order) != sorted(OUTPUT_NAMES):
        raise ConfigError(f"stm32 C sources: output_order must name {' and '.join(OUTPUT_NAMES)}, "
                          f"got {list(output_order)}")
    resolved = []
    for op in ops:
        key = str(op).strip().upper()
        if key not in RESOLVER_METHODS:
            raise InputError(f"stm32 C sources: the model uses op '{op}', which this generator cannot register "
                             f"with TFLM's MicroMutableOpResolver")
        resolved.append(key)
    if not resolved:
        raise InputError("stm32 C sources: the model's op list is empty")
    return sorted(set(resolved)), checked


# --------------------------------------------------------------------------------------------------------------
# The generator


def write_c_sources(tflite: Path, out_dir: Path, *, imgsz: int, strides: Sequence[int], reg_max: int,
                    names: Sequence[str], input_quant: tuple[float, int],
                    output_quants: Mapping[str, tuple[float, int]], channels_last: bool, arena_bytes: int,
                    conf: float, iou: float, max_det: int, ops: Sequence[str],
                    output_order: Sequence[str] = OUTPUT_NAMES, max_candidates: int | None = None,
                    agnostic: bool = False) -> dict[str, Path]:
    """Writes the deployable sources into out_dir and returns {file name: path}.

    `ops` are the model's TFLite builtin operators by schema name ("CONV_2D", ...);
    `output_order` is which interpreter output index holds which map; `channels_last`
    says whether both outputs are (1, anchors, channels) rather than (1, channels, anchors).
    `max_candidates` bounds the (anchor, class) pairs above `conf` that NMS sees (RAM);
    by default every pair fits up to 512.
    """
    tflite, out_dir = Path(tflite), Path(out_dir)
    try:
        model = tflite.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the TFLite model {tflite}: {exc.strerror or exc}") from None
    if not model:
        raise InputError(f"the TFLite model {tflite} is empty")
    strides = [int(s) for s in strides]
    names = [str(n) for n in names]
    anchors = anchor_count(imgsz, strides) if isinstance(imgsz, int) and imgsz > 0 and all(
        isinstance(s, int) and s > 0 for s in strides) else 0
    if max_candidates is None:
        max_candidates = max(1, min(anchors * len(names), DEFAULT_CANDIDATE_CAP))
    op_list, quants = _check(imgsz, strides, reg_max, names, input_quant, output_quants, arena_bytes, float(conf),
                             float(iou), max_det, max_candidates, list(ops), list(output_order))
    settings = dict(imgsz=imgsz, strides=strides, reg_max=reg_max, names=names, quants=quants,
                    channels_last=bool(channels_last), arena_bytes=arena_bytes, conf=float(conf), iou=float(iou),
                    max_det=max_det, max_candidates=max_candidates, agnostic=bool(agnostic),
                    anchors=anchors, output_order=list(output_order), ops=op_list,
                    model_name=tflite.name, model_bytes=len(model), model_sha256=hashlib.sha256(model).hexdigest())
    texts = {
        "model_data.h": MODEL_DATA_H,
        "model_data.cc": _model_data_cc(model, settings),
        "detector_config.h": _config_h(settings),
        "detector.h": DETECTOR_H,
        "detector.c": DETECTOR_C,
        "inference.h": INFERENCE_H,
        "inference.cc": _inference_cc(settings),
        "serial_probe.h": SERIAL_PROBE_H,
        "serial_probe.c": SERIAL_PROBE_C,
        "README.md": _readme(settings),
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        for name in FILES:
            path = out_dir / name
            # newline="\n": the same bytes on every host, and CubeIDE copes with LF everywhere
            with open(path, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(texts[name])
            written[name] = path
    except OSError as exc:
        raise InputError(f"cannot write the C sources into {out_dir}: {exc.strerror or exc}") from None
    return written


def _model_data_cc(model: bytes, s: dict) -> str:
    hex_bytes = [f"0x{b:02x}" for b in model]
    return f"""\
// model_data.cc: generated by edge-deploy from {s['model_name']} ({s['model_bytes']} bytes,
// sha256 {s['model_sha256']}). Do not edit; regenerate instead.
//
// const: the array stays in flash and TFLM reads it in place. alignas(16): TFLM maps tensor
// buffers straight onto this memory, and its int8 kernels expect that alignment.
#include "model_data.h"

alignas({MODEL_ALIGNMENT}) const unsigned char g_detector_model_data[] = {{
{c_initializer(hex_bytes, 16)}
}};

const unsigned int g_detector_model_data_len = {len(model)}u;
"""


MODEL_DATA_H = f"""\
/* model_data.h: generated by edge-deploy. The .tflite flatbuffer, defined in model_data.cc.
 * C linkage so that C code (a bootloader, a CRC check) can reach it too. */
#ifndef DETECTOR_MODEL_DATA_H
#define DETECTOR_MODEL_DATA_H

#ifdef __cplusplus
extern "C" {{
#endif

/* The definition is alignas(DETECTOR_MODEL_ALIGNMENT); TFLM reads the flatbuffer in place. */
#define DETECTOR_MODEL_ALIGNMENT {MODEL_ALIGNMENT}

extern const unsigned char g_detector_model_data[];
extern const unsigned int g_detector_model_data_len;

#ifdef __cplusplus
}}
#endif

#endif /* DETECTOR_MODEL_DATA_H */
"""


def _config_h(s: dict) -> str:
    quants = s["quants"]
    table = [str(int(v)) for v in input_table(*quants["input"])]
    cells = [s["imgsz"] // stride for stride in s["strides"]]
    names = [c_string(n) for n in s["names"]]
    box_index = s["output_order"].index("box_dist")
    cls_index = s["output_order"].index("cls_logit")
    return f"""\
/* detector_config.h: generated by edge-deploy for {s['model_name']} (sha256 {s['model_sha256'][:16]}...).
 * Everything the decode of this model depends on. Regenerate rather than edit: the values
 * come from the converted model (quantization) and the build (thresholds, arena). */
#ifndef DETECTOR_CONFIG_H
#define DETECTOR_CONFIG_H

/* Input: imgsz x imgsz x 3, NHWC, RGB, int8. Pixels are x/255 then quantized. */
#define DETECTOR_IMGSZ {s['imgsz']}
#define DETECTOR_INPUT_BYTES ({s['imgsz']} * {s['imgsz']} * 3)
#define DETECTOR_INPUT_SCALE {c_float(quants['input'][0])}
#define DETECTOR_INPUT_ZERO_POINT ({quants['input'][1]})
#define DETECTOR_PAD_VALUE {PAD_VALUE}
/* int8 input value of each 8-bit pixel value, computed on the host as TFLite quantizes. */
#define DETECTOR_INPUT_TABLE {_macro_block(table, 16)}

/* Anchors: levels of imgsz/stride cells, concatenated, row-major within a level. */
#define DETECTOR_NUM_LEVELS {len(s['strides'])}
#define DETECTOR_STRIDES {_macro_list([str(v) for v in s['strides']])}
#define DETECTOR_LEVEL_CELLS {_macro_list([str(v) for v in cells])}
#define DETECTOR_NUM_ANCHORS {s['anchors']}
#define DETECTOR_REG_MAX {s['reg_max']}
#define DETECTOR_NUM_CLASSES {len(s['names'])}
#define DETECTOR_CLASS_NAMES {_macro_block(names, 4)}

/* Outputs. 1: both are (1, anchors, channels); 0: both are (1, channels, anchors).
 * box_dist channels are side-major: (left, top, right, bottom) x reg_max DFL logits. */
#define DETECTOR_CHANNELS_LAST {1 if s['channels_last'] else 0}
#define DETECTOR_BOX_OUTPUT_INDEX {box_index}
#define DETECTOR_CLS_OUTPUT_INDEX {cls_index}
#define DETECTOR_BOX_SCALE {c_float(quants['box_dist'][0])}
#define DETECTOR_BOX_ZERO_POINT ({quants['box_dist'][1]})
#define DETECTOR_CLS_SCALE {c_float(quants['cls_logit'][0])}
#define DETECTOR_CLS_ZERO_POINT ({quants['cls_logit'][1]})

/* Post-processing defaults (detector_params_t can override them per call). */
#define DETECTOR_CONF_THRESHOLD {c_float(s['conf'])}
#define DETECTOR_IOU_THRESHOLD {c_float(s['iou'])}
#define DETECTOR_MAX_DET {s['max_det']}
#define DETECTOR_AGNOSTIC_NMS {1 if s['agnostic'] else 0}
/* (anchor, class) pairs above the threshold that NMS can hold; past it the lowest scores go. */
#define DETECTOR_MAX_CANDIDATES {s['max_candidates']}

/* Memory: the model in flash, the TFLM arena in RAM (measured on the host, includes the
 * input and output tensors). */
#define DETECTOR_MODEL_BYTES {s['model_bytes']}
#define DETECTOR_ARENA_BYTES {s['arena_bytes']}

/* What the serial probe (serial_probe.c) tells the host this firmware was built from. */
#define DETECTOR_MODEL_SHA256 "{s['model_sha256']}"

#endif /* DETECTOR_CONFIG_H */
"""


DETECTOR_H = """\
/* detector.h: generated by edge-deploy. Pre- and post-processing of the detector in portable
 * C99: letterbox + int8 quantization of an RGB888 frame, dequantization, DFL box decode and
 * NMS, matching edge-deploy's pipeline/detect.py. No heap: every buffer is the caller's, sized
 * by detector_config.h. Thread-safe as long as each thread has its own workspace. */
#ifndef DETECTOR_H
#define DETECTOR_H

#include <stddef.h>
#include <stdint.h>

#include "detector_config.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: detector_* functions return a count (>= 0) or one of these. */
#define DETECTOR_OK 0
#define DETECTOR_ERR_ARGUMENT (-1)  /* a NULL pointer, a negative size, a frame too small */
#define DETECTOR_ERR_MODEL (-2)     /* the model's schema, shapes or quantization differ from the config */
#define DETECTOR_ERR_OPS (-3)       /* TFLM could not register an operator */
#define DETECTOR_ERR_ARENA (-4)     /* AllocateTensors failed: DETECTOR_ARENA_BYTES too small */
#define DETECTOR_ERR_INVOKE (-5)
#define DETECTOR_ERR_NOT_READY (-6) /* detector_init() has not succeeded */

/* One detection: corners in input pixels (or frame pixels after detector_to_frame). */
typedef struct {
    float x1, y1, x2, y2;
    float score;
    int32_t class_id;
} detector_detection_t;

typedef struct {
    float conf;       /* keep (anchor, class) pairs scoring strictly above this */
    float iou;        /* suppress a box overlapping a better one by more than this */
    int32_t max_det;
    int32_t agnostic; /* 0: NMS per class (pipeline/detect.py); 1: across classes */
} detector_params_t;

#define DETECTOR_PARAMS_DEFAULT \\
    { DETECTOR_CONF_THRESHOLD, DETECTOR_IOU_THRESHOLD, DETECTOR_MAX_DET, DETECTOR_AGNOSTIC_NMS }

/* Where a frame went inside the model input; detector_to_frame undoes it. */
typedef struct {
    float ratio;
    int32_t pad_x, pad_y;
    int32_t width, height;
} detector_letterbox_t;

typedef struct {
    float box[4];
    float score;
    uint32_t key; /* anchor * classes + class: the Python order, which breaks score ties */
    int32_t class_id;
} detector_candidate_t;

/* Scratch for one decode. Large (see README "RAM"): make it static, not a local. */
typedef struct {
    detector_candidate_t candidates[DETECTOR_MAX_CANDIDATES];
    uint16_t order[DETECTOR_MAX_CANDIDATES];
    uint16_t scratch[DETECTOR_MAX_CANDIDATES];
    uint8_t suppressed[DETECTOR_MAX_CANDIDATES];
} detector_workspace_t;

extern const char *const detector_class_names[DETECTOR_NUM_CLASSES];

/* Letterboxes an RGB888 frame (row_stride bytes per row) into `input`, the model's
 * DETECTOR_INPUT_BYTES int8 NHWC tensor: scaled to fit with bilinear filtering, centred,
 * padded with DETECTOR_PAD_VALUE, quantized. Returns DETECTOR_OK or DETECTOR_ERR_ARGUMENT. */
int detector_preprocess_rgb888(const uint8_t *frame, int32_t width, int32_t height, int32_t row_stride,
                               int8_t *input, detector_letterbox_t *letterbox);

/* The model's raw int8 outputs -> up to `capacity` detections, best first. Returns the count. */
int detector_decode_int8(const int8_t *box_dist, const int8_t *cls_logit, const detector_params_t *params,
                         detector_workspace_t *workspace, detector_detection_t *out, int32_t capacity);

/* The same for outputs already dequantized to float (same layout). */
int detector_decode_float(const float *box_dist, const float *cls_logit, const detector_params_t *params,
                          detector_workspace_t *workspace, detector_detection_t *out, int32_t capacity);

/* Maps detections from input pixels back onto the frame the letterbox came from, clipped to it. */
void detector_to_frame(detector_detection_t *detections, int32_t count, const detector_letterbox_t *letterbox);

#ifdef __cplusplus
}
#endif

#endif /* DETECTOR_H */
"""


DETECTOR_C = r"""/* detector.c: generated by edge-deploy. See detector.h.
 *
 * Every float operation below is the one pipeline/detect.py performs, in the same order and
 * in float32, so that a threshold decision (score > conf, IoU > iou) and a tie between equal
 * scores go the same way on the MCU as on the host. Build this file without -ffast-math. */
#include "detector.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* A fused multiply-add rounds once where numpy rounds twice; the pragma keeps them apart
 * even in projects built with -std=gnu11 (whose default fuses). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if DETECTOR_MAX_CANDIDATES > 65535
#error "DETECTOR_MAX_CANDIDATES must fit the uint16_t candidate indices"
#endif

const char *const detector_class_names[DETECTOR_NUM_CLASSES] = DETECTOR_CLASS_NAMES;

static const int8_t input_table[256] = DETECTOR_INPUT_TABLE;
static const int32_t level_strides[DETECTOR_NUM_LEVELS] = DETECTOR_STRIDES;
static const int32_t level_cells[DETECTOR_NUM_LEVELS] = DETECTOR_LEVEL_CELLS;

#define BOX_CHANNELS (4 * DETECTOR_REG_MAX)
#if DETECTOR_CHANNELS_LAST
#define BOX_INDEX(anchor, channel) ((uint32_t)(anchor) * BOX_CHANNELS + (uint32_t)(channel))
#define CLS_INDEX(anchor, cls) ((uint32_t)(anchor) * DETECTOR_NUM_CLASSES + (uint32_t)(cls))
#else
#define BOX_INDEX(anchor, channel) ((uint32_t)(channel) * DETECTOR_NUM_ANCHORS + (uint32_t)(anchor))
#define CLS_INDEX(anchor, cls) ((uint32_t)(cls) * DETECTOR_NUM_ANCHORS + (uint32_t)(anchor))
#endif

/* ------------------------------------------------------------------------------------------ */
/* Preprocessing                                                                               */

/* Python's round(side * imgsz / longest), ties to even, in integers: the float version can land
 * on the other side of .5 and shift the whole image by a pixel. */
static int32_t scaled_side(int32_t side, int32_t longest)
{
    const int64_t num = (int64_t)side * DETECTOR_IMGSZ;
    int64_t q = num / longest;
    const int64_t twice_rest = 2 * (num % longest);
    if (twice_rest > longest || (twice_rest == longest && (q & 1) != 0)) {
        q += 1;
    }
    return (int32_t)q;
}

/* OpenCV's INTER_LINEAR source taps for one output coordinate: pixel centres aligned, edges
 * clamped, the weight of the first tap in 1/2048ths. The source position
 * (dst + 0.5) * src_len / dst_len - 0.5 is the fraction num / den; one correctly rounded float
 * division of the two (exact integers below 2^24) gives the float OpenCV derives from its double
 * arithmetic, and so the same weights. Step by step in float, they drift by one now and then. */
static void source_taps(int32_t dst, int32_t src_len, int32_t dst_len, int32_t *first, int32_t *second,
                        int32_t *weight)
{
    const int32_t num = (2 * dst + 1) * src_len - dst_len;
    float pos = (float)num / (float)(2 * dst_len);
    int32_t index = (int32_t)floorf(pos);
    pos -= (float)index;
    if (index < 0) {
        index = 0;
        pos = 0.0f;
    }
    if (index >= src_len - 1) {
        index = src_len - 1;
        pos = 0.0f;
    }
    *first = index;
    *second = index + 1 < src_len ? index + 1 : index;
    *weight = (int32_t)lrintf((1.0f - pos) * 2048.0f);
}

int detector_preprocess_rgb888(const uint8_t *frame, int32_t width, int32_t height, int32_t row_stride,
                               int8_t *input, detector_letterbox_t *letterbox)
{
    int32_t new_w, new_h, left, top, x, y;
    const int8_t pad = input_table[DETECTOR_PAD_VALUE];
    /* The size limit keeps source_taps' integers exact. */
    if (frame == NULL || input == NULL || letterbox == NULL || width <= 0 || height <= 0 || width > 32767 ||
        height > 32767 || row_stride < 3 * width) {
        return DETECTOR_ERR_ARGUMENT;
    }
    if (width >= height) {
        new_w = DETECTOR_IMGSZ;
        new_h = scaled_side(height, width);
    } else {
        new_h = DETECTOR_IMGSZ;
        new_w = scaled_side(width, height);
    }
    if (new_w < 1 || new_h < 1) {
        return DETECTOR_ERR_ARGUMENT;
    }
    /* preprocess.py pads round(pad - 0.1) before and round(pad + 0.1) after: the odd pixel goes
     * after, i.e. floor before. */
    left = (DETECTOR_IMGSZ - new_w) / 2;
    top = (DETECTOR_IMGSZ - new_h) / 2;
    letterbox->ratio = (float)DETECTOR_IMGSZ / (float)(width >= height ? width : height);
    letterbox->pad_x = left;
    letterbox->pad_y = top;
    letterbox->width = width;
    letterbox->height = height;

    for (y = 0; y < DETECTOR_IMGSZ; ++y) {
        int8_t *row = input + (size_t)y * DETECTOR_IMGSZ * 3;
        const int32_t sy = y - top;
        if (sy < 0 || sy >= new_h) {
            memset(row, pad, (size_t)DETECTOR_IMGSZ * 3);
            continue;
        }
        memset(row, pad, (size_t)left * 3);
        memset(row + (size_t)(left + new_w) * 3, pad, (size_t)(DETECTOR_IMGSZ - left - new_w) * 3);
        if (new_w == width && new_h == height) {
            /* The usual case on a camera set to the model's size: no filtering, exact. */
            const uint8_t *src = frame + (size_t)sy * (size_t)row_stride;
            int8_t *dst = row + (size_t)left * 3;
            for (x = 0; x < new_w * 3; ++x) {
                dst[x] = input_table[src[x]];
            }
        } else {
            int32_t y0, y1, wy0, wy1;
            source_taps(sy, height, new_h, &y0, &y1, &wy0);
            wy1 = 2048 - wy0;
            for (x = 0; x < new_w; ++x) {
                int32_t x0, x1, wx0, wx1, ch;
                const uint8_t *r0 = frame + (size_t)y0 * (size_t)row_stride;
                const uint8_t *r1 = frame + (size_t)y1 * (size_t)row_stride;
                int8_t *dst = row + (size_t)(left + x) * 3;
                source_taps(x, width, new_w, &x0, &x1, &wx0);
                wx1 = 2048 - wx0;
                for (ch = 0; ch < 3; ++ch) {
                    const int32_t top_sum = wx0 * r0[x0 * 3 + ch] + wx1 * r0[x1 * 3 + ch];
                    const int32_t bottom_sum = wx0 * r1[x0 * 3 + ch] + wx1 * r1[x1 * 3 + ch];
                    /* Rounded as OpenCV's vectorised uint8 path rounds (it drops 4 bits per row
                     * sum before weighting): the host's cv2.resize is the reference. */
                    int32_t value = (((wy0 * (top_sum >> 4)) >> 16) + ((wy1 * (bottom_sum >> 4)) >> 16) + 2) >> 2;
                    value = value < 0 ? 0 : (value > 255 ? 255 : value);
                    dst[ch] = input_table[value];
                }
            }
        }
    }
    return DETECTOR_OK;
}

void detector_to_frame(detector_detection_t *detections, int32_t count, const detector_letterbox_t *letterbox)
{
    int32_t i;
    if (detections == NULL || letterbox == NULL || letterbox->ratio <= 0.0f) {
        return;
    }
    for (i = 0; i < count; ++i) {
        detector_detection_t *d = &detections[i];
        const float w = (float)letterbox->width, h = (float)letterbox->height;
        d->x1 = (d->x1 - (float)letterbox->pad_x) / letterbox->ratio;
        d->x2 = (d->x2 - (float)letterbox->pad_x) / letterbox->ratio;
        d->y1 = (d->y1 - (float)letterbox->pad_y) / letterbox->ratio;
        d->y2 = (d->y2 - (float)letterbox->pad_y) / letterbox->ratio;
        d->x1 = d->x1 < 0.0f ? 0.0f : (d->x1 > w ? w : d->x1);
        d->x2 = d->x2 < 0.0f ? 0.0f : (d->x2 > w ? w : d->x2);
        d->y1 = d->y1 < 0.0f ? 0.0f : (d->y1 > h ? h : d->y1);
        d->y2 = d->y2 < 0.0f ? 0.0f : (d->y2 > h ? h : d->y2);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Decode                                                                                      */

/* One output map, int8 or float, read as float32 values. */
typedef struct {
    const int8_t *q;
    const float *f;
    float scale;
    int32_t zero_point;
} source_t;

static float value_at(const source_t *source, uint32_t index)
{
    if (source->q != NULL) {
        return source->scale * (float)((int32_t)source->q[index] - source->zero_point);
    }
    return source->f[index];
}

/* DFL: each side's distance is the expectation of a softmax over reg_max bins. */
static void decode_box(const source_t *box, uint32_t anchor, float ax, float ay, float stride, float out[4])
{
    float dist[4];
    int32_t side, bin;
    for (side = 0; side < 4; ++side) {
        float bins[DETECTOR_REG_MAX];
        float peak = -FLT_MAX, sum = 0.0f, expectation = 0.0f;
        for (bin = 0; bin < DETECTOR_REG_MAX; ++bin) {
            bins[bin] = value_at(box, BOX_INDEX(anchor, side * DETECTOR_REG_MAX + bin));
            peak = bins[bin] > peak ? bins[bin] : peak;
        }
        for (bin = 0; bin < DETECTOR_REG_MAX; ++bin) {
            bins[bin] = expf(bins[bin] - peak);
            sum += bins[bin];
        }
        for (bin = 0; bin < DETECTOR_REG_MAX; ++bin) {
            expectation += (float)bin * (bins[bin] / sum);
        }
        dist[side] = expectation;
    }
    out[0] = (ax - dist[0]) * stride;
    out[1] = (ay - dist[1]) * stride;
    out[2] = (ax + dist[2]) * stride;
    out[3] = (ay + dist[3]) * stride;
}

/* A logit below this cannot pass `score > conf`; skipping expf for it is the bulk of the time
 * saved. The margin keeps rounding in expf from ever turning the shortcut into a rejection. */
static float logit_floor(float conf)
{
    float logit;
    if (!(conf > 0.0f)) {
        return -FLT_MAX;
    }
    if (!(conf < 1.0f)) {
        return FLT_MAX;
    }
    logit = logf(conf / (1.0f - conf));
    return logit - (1e-3f + 1e-3f * fabsf(logit));
}

/* Python sorts by score, then by (anchor, class) order; so does this. */
static int ranks_before(const detector_candidate_t *c, uint16_t a, uint16_t b)
{
    if (c[a].score != c[b].score) {
        return c[a].score > c[b].score;
    }
    return c[a].key < c[b].key;
}

/* The candidate to drop when the workspace is full: lowest score, latest in Python's order. */
static uint32_t worst_candidate(const detector_candidate_t *c, uint32_t count)
{
    uint32_t i, worst = 0;
    for (i = 1; i < count; ++i) {
        if (ranks_before(c, (uint16_t)worst, (uint16_t)i)) {
            worst = i;
        }
    }
    return worst;
}

/* Bottom-up merge sort of the candidate indices: O(n log n) with no recursion and the
 * workspace's second index array as the only extra memory. */
static void sort_candidates(detector_workspace_t *ws, uint32_t count)
{
    uint16_t *src = ws->order, *dst = ws->scratch, *swap;
    uint32_t width, lo, i;
    for (i = 0; i < count; ++i) {
        ws->order[i] = (uint16_t)i;
    }
    for (width = 1; width < count; width *= 2) {
        for (lo = 0; lo < count; lo += 2 * width) {
            const uint32_t mid = lo + width < count ? lo + width : count;
            const uint32_t hi = lo + 2 * width < count ? lo + 2 * width : count;
            uint32_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) {
                dst[k++] = ranks_before(ws->candidates, src[b], src[a]) ? src[b++] : src[a++];
            }
            while (a < mid) {
                dst[k++] = src[a++];
            }
            while (b < hi) {
                dst[k++] = src[b++];
            }
        }
        swap = src;
        src = dst;
        dst = swap;
    }
    if (src != ws->order) {
        memcpy(ws->order, src, count * sizeof(ws->order[0]));
    }
}

static float clip0(float v)
{
    return v > 0.0f ? v : 0.0f;
}

static int decode(const source_t *box, const source_t *cls, const detector_params_t *params,
                  detector_workspace_t *ws, detector_detection_t *out, int32_t capacity)
{
    const float floor_logit = logit_floor(params->conf);
    /* Python shifts each class into its own region so that one NMS pass acts per class; the
     * same shift (in float32) keeps the IoU arithmetic identical. */
    const float class_offset = params->agnostic ? 0.0f : (float)DETECTOR_IMGSZ * 4.0f;
    uint32_t count = 0, worst = 0, anchor = 0, k, m;
    int32_t level, limit, kept = 0;

    for (level = 0; level < DETECTOR_NUM_LEVELS; ++level) {
        const int32_t cells = level_cells[level];
        const float stride = (float)level_strides[level];
        int32_t cx, cy;
        for (cy = 0; cy < cells; ++cy) {
            for (cx = 0; cx < cells; ++cx, ++anchor) {
                float decoded[4];
                int have_box = 0;
                int32_t c;
                for (c = 0; c < DETECTOR_NUM_CLASSES; ++c) {
                    const float logit = value_at(cls, CLS_INDEX(anchor, c));
                    float score;
                    uint32_t slot;
                    if (!(logit > floor_logit)) {
                        continue;
                    }
                    score = 1.0f / (1.0f + expf(-logit));
                    if (!(score > params->conf)) {
                        continue;
                    }
                    if (count == DETECTOR_MAX_CANDIDATES && !(score > ws->candidates[worst].score)) {
                        continue; /* full, and not better than the worst kept */
                    }
                    if (!have_box) {
                        /* Only anchors with a candidate pay for the 4 x reg_max softmax. */
                        decode_box(box, anchor, (float)cx + 0.5f, (float)cy + 0.5f, stride, decoded);
                        have_box = 1;
                    }
                    slot = count < DETECTOR_MAX_CANDIDATES ? count++ : worst;
                    memcpy(ws->candidates[slot].box, decoded, sizeof(decoded));
                    ws->candidates[slot].score = score;
                    ws->candidates[slot].key = anchor * DETECTOR_NUM_CLASSES + (uint32_t)c;
                    ws->candidates[slot].class_id = c;
                    if (count == DETECTOR_MAX_CANDIDATES) {
                        worst = worst_candidate(ws->candidates, count);
                    }
                }
            }
        }
    }

    sort_candidates(ws, count);
    memset(ws->suppressed, 0, count);
    limit = params->max_det < capacity ? params->max_det : capacity;
    /* Greedy NMS, as detect.nms: the best remaining box is kept and suppresses every later box
     * that overlaps it by more than the threshold. */
    for (k = 0; k < count && kept < limit; ++k) {
        const detector_candidate_t *best = &ws->candidates[ws->order[k]];
        float shift, bx1, by1, bx2, by2, best_area;
        if (ws->suppressed[ws->order[k]]) {
            continue;
        }
        shift = (float)best->class_id * class_offset;
        bx1 = best->box[0] + shift;
        by1 = best->box[1] + shift;
        bx2 = best->box[2] + shift;
        by2 = best->box[3] + shift;
        best_area = clip0(bx2 - bx1) * clip0(by2 - by1);
        out[kept].x1 = best->box[0];
        out[kept].y1 = best->box[1];
        out[kept].x2 = best->box[2];
        out[kept].y2 = best->box[3];
        out[kept].score = best->score;
        out[kept].class_id = best->class_id;
        ++kept;
        for (m = k + 1; m < count; ++m) {
            const uint16_t j = ws->order[m];
            const detector_candidate_t *other = &ws->candidates[j];
            float other_shift, ox1, oy1, ox2, oy2, area, inter, iou;
            if (ws->suppressed[j]) {
                continue;
            }
            other_shift = (float)other->class_id * class_offset;
            ox1 = other->box[0] + other_shift;
            oy1 = other->box[1] + other_shift;
            ox2 = other->box[2] + other_shift;
            oy2 = other->box[3] + other_shift;
            area = clip0(ox2 - ox1) * clip0(oy2 - oy1);
            inter = clip0((bx2 < ox2 ? bx2 : ox2) - (bx1 > ox1 ? bx1 : ox1)) *
                    clip0((by2 < oy2 ? by2 : oy2) - (by1 > oy1 ? by1 : oy1));
            iou = inter / (best_area + area - inter + 1e-9f);
            if (!(iou <= params->iou)) {
                ws->suppressed[j] = 1;
            }
        }
    }
    return kept;
}

static int valid_call(const void *box_dist, const void *cls_logit, const detector_params_t *params,
                      const detector_workspace_t *workspace, const detector_detection_t *out, int32_t capacity)
{
    return box_dist != NULL && cls_logit != NULL && params != NULL && workspace != NULL &&
           (out != NULL || capacity == 0) && capacity >= 0 && params->max_det >= 0;
}

int detector_decode_int8(const int8_t *box_dist, const int8_t *cls_logit, const detector_params_t *params,
                         detector_workspace_t *workspace, detector_detection_t *out, int32_t capacity)
{
    source_t box, cls;
    if (!valid_call(box_dist, cls_logit, params, workspace, out, capacity)) {
        return DETECTOR_ERR_ARGUMENT;
    }
    box.q = box_dist;
    box.f = NULL;
    box.scale = DETECTOR_BOX_SCALE;
    box.zero_point = DETECTOR_BOX_ZERO_POINT;
    cls.q = cls_logit;
    cls.f = NULL;
    cls.scale = DETECTOR_CLS_SCALE;
    cls.zero_point = DETECTOR_CLS_ZERO_POINT;
    return decode(&box, &cls, params, workspace, out, capacity);
}

int detector_decode_float(const float *box_dist, const float *cls_logit, const detector_params_t *params,
                          detector_workspace_t *workspace, detector_detection_t *out, int32_t capacity)
{
    source_t box, cls;
    if (!valid_call(box_dist, cls_logit, params, workspace, out, capacity)) {
        return DETECTOR_ERR_ARGUMENT;
    }
    box.q = NULL;
    box.f = box_dist;
    box.scale = 1.0f;
    box.zero_point = 0;
    cls.q = NULL;
    cls.f = cls_logit;
    cls.scale = 1.0f;
    cls.zero_point = 0;
    return decode(&box, &cls, params, workspace, out, capacity);
}
"""


INFERENCE_H = """\
/* inference.h: generated by edge-deploy. The detector on TensorFlow Lite Micro, from a camera
 * frame to detections. Callable from C; implemented in inference.cc, which needs TFLM. */
#ifndef DETECTOR_INFERENCE_H
#define DETECTOR_INFERENCE_H

#include <stddef.h>
#include <stdint.h>

#include "detector.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Builds the interpreter once (later calls return the first result): DETECTOR_OK, or
 * DETECTOR_ERR_MODEL / _OPS / _ARENA when the model does not fit these sources. */
int detector_init(void);

/* The int8 input tensor (DETECTOR_INPUT_BYTES, NHWC, RGB) to fill yourself, or NULL. */
int8_t *detector_input(void);

/* Runs the model on the current input tensor; detections in input pixels. Returns the count. */
int detector_invoke(detector_detection_t *out, int32_t capacity);

/* Letterboxes `frame` into the input, runs, maps detections back onto the frame. */
int detector_run_rgb888(const uint8_t *frame, int32_t width, int32_t height, int32_t row_stride,
                        detector_detection_t *out, int32_t capacity);

/* Bytes of the arena the interpreter actually uses (0 before detector_init succeeds). */
size_t detector_arena_used_bytes(void);

#ifdef __cplusplus
}
#endif

#endif /* DETECTOR_INFERENCE_H */
"""


def _inference_cc(s: dict) -> str:
    calls = "\n".join(f"    if (resolver.{RESOLVER_METHODS[op]}() != kTfLiteOk) return DETECTOR_ERR_OPS;"
                      for op in s["ops"])
    if s["channels_last"]:
        box_shape, cls_shape = ("DETECTOR_NUM_ANCHORS", "4 * DETECTOR_REG_MAX"), ("DETECTOR_NUM_ANCHORS",
                                                                                  "DETECTOR_NUM_CLASSES")
    else:
        box_shape, cls_shape = ("4 * DETECTOR_REG_MAX", "DETECTOR_NUM_ANCHORS"), ("DETECTOR_NUM_CLASSES",
                                                                                  "DETECTOR_NUM_ANCHORS")
    return f"""\
// inference.cc: generated by edge-deploy. The detector on TensorFlow Lite Micro.
//
// This file needs TFLM's headers and library, which are not part of these sources (see
// README.md); edge-deploy cannot compile it on the host for that reason. Everything else
// here (detector.c, model_data.cc) is compiled and run under emulation before it ships.
//
// No heap: the arena is a static array of the size measured on the host, the resolver and
// interpreter are function statics built once by detector_init().
#include "inference.h"

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "detector.h"
#include "detector_config.h"
#include "model_data.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"

// Some TFLM trees define it only in a header the interpreter does not include.
#ifndef TFLITE_SCHEMA_VERSION
#define TFLITE_SCHEMA_VERSION 3
#endif

// Define to place the arena in a given RAM, e.g.
//   -DDETECTOR_ARENA_ATTRIBUTES='__attribute__((section(".axisram")))'
#ifndef DETECTOR_ARENA_ATTRIBUTES
#define DETECTOR_ARENA_ATTRIBUTES
#endif

namespace {{

// The operators of {s['model_name']}; registering only these keeps the other kernels out of flash.
constexpr int kOpCount = {len(s['ops'])};
using Resolver = tflite::MicroMutableOpResolver<kOpCount>;

alignas(16) uint8_t tensor_arena[DETECTOR_ARENA_BYTES] DETECTOR_ARENA_ATTRIBUTES;
detector_workspace_t workspace;
tflite::MicroInterpreter *interpreter = nullptr;

int register_ops(Resolver &resolver) {{
{calls}
    return DETECTOR_OK;
}}

// The generated config must describe the model actually linked in: a wrong layout or scale
// would not crash, it would decode garbage boxes.
bool is_int8(const TfLiteTensor *tensor, float scale, int32_t zero_point) {{
    return tensor != nullptr && tensor->type == kTfLiteInt8 && tensor->params.zero_point == zero_point &&
           std::fabs(tensor->params.scale - scale) <= 1e-6f * scale;
}}

bool has_dims(const TfLiteTensor *tensor, int d0, int d1, int d2, int d3) {{
    const int want[4] = {{d0, d1, d2, d3}};
    const int rank = d3 < 0 ? 3 : 4;
    if (tensor == nullptr || tensor->dims == nullptr || tensor->dims->size != rank) return false;
    for (int i = 0; i < rank; ++i) {{
        if (tensor->dims->data[i] != want[i]) return false;
    }}
    return true;
}}

int build() {{
    const tflite::Model *model = tflite::GetModel(g_detector_model_data);
    if (model->version() != TFLITE_SCHEMA_VERSION) return DETECTOR_ERR_MODEL;
    static Resolver resolver;
    const int status = register_ops(resolver);
    if (status != DETECTOR_OK) return status;
    static tflite::MicroInterpreter instance(model, resolver, tensor_arena, sizeof(tensor_arena));
    if (instance.AllocateTensors() != kTfLiteOk) return DETECTOR_ERR_ARENA;
    const TfLiteTensor *input = instance.input(0);
    const TfLiteTensor *box = instance.output(DETECTOR_BOX_OUTPUT_INDEX);
    const TfLiteTensor *cls = instance.output(DETECTOR_CLS_OUTPUT_INDEX);
    if (!has_dims(input, 1, DETECTOR_IMGSZ, DETECTOR_IMGSZ, 3) ||
        !is_int8(input, DETECTOR_INPUT_SCALE, DETECTOR_INPUT_ZERO_POINT) ||
        !has_dims(box, 1, {box_shape[0]}, {box_shape[1]}, -1) ||
        !is_int8(box, DETECTOR_BOX_SCALE, DETECTOR_BOX_ZERO_POINT) ||
        !has_dims(cls, 1, {cls_shape[0]}, {cls_shape[1]}, -1) ||
        !is_int8(cls, DETECTOR_CLS_SCALE, DETECTOR_CLS_ZERO_POINT)) {{
        return DETECTOR_ERR_MODEL;
    }}
    interpreter = &instance;
    return DETECTOR_OK;
}}

}}  // namespace

extern "C" int detector_init(void) {{
    static const int status = build();
    return status;
}}

extern "C" int8_t *detector_input(void) {{
    return interpreter != nullptr ? interpreter->input(0)->data.int8 : nullptr;
}}

extern "C" int detector_invoke(detector_detection_t *out, int32_t capacity) {{
    if (interpreter == nullptr) return DETECTOR_ERR_NOT_READY;
    if (interpreter->Invoke() != kTfLiteOk) return DETECTOR_ERR_INVOKE;
    const detector_params_t params = DETECTOR_PARAMS_DEFAULT;
    return detector_decode_int8(interpreter->output(DETECTOR_BOX_OUTPUT_INDEX)->data.int8,
                                interpreter->output(DETECTOR_CLS_OUTPUT_INDEX)->data.int8, &params, &workspace,
                                out, capacity);
}}

extern "C" int detector_run_rgb888(const uint8_t *frame, int32_t width, int32_t height, int32_t row_stride,
                                   detector_detection_t *out, int32_t capacity) {{
    if (interpreter == nullptr) return DETECTOR_ERR_NOT_READY;
    detector_letterbox_t letterbox;
    const int status = detector_preprocess_rgb888(frame, width, height, row_stride, detector_input(), &letterbox);
    if (status != DETECTOR_OK) return status;
    const int count = detector_invoke(out, capacity);
    if (count > 0) detector_to_frame(out, count, &letterbox);
    return count;
}}

extern "C" size_t detector_arena_used_bytes(void) {{
    return interpreter != nullptr ? interpreter->arena_used_bytes() : 0;
}}
"""


def _kib(n: int) -> str:
    return f"{n} bytes ({n / 1024:.1f} KiB)"


def _readme(s: dict) -> str:
    ws = workspace_bytes(s["max_candidates"])
    layout = "(1, anchors, channels)" if s["channels_last"] else "(1, channels, anchors)"
    ops = ", ".join(s["ops"])
    return f"""\
# Detector for STM32 (TensorFlow Lite Micro)

Generated by edge-deploy from `{s['model_name']}` (sha256 `{s['model_sha256']}`).
Regenerate rather than edit: `detector_config.h` carries this model's quantization and anchors.

| file | what | builds with |
|---|---|---|
| `model_data.h`, `model_data.cc` | the .tflite as a 16-byte aligned `const` array (flash) | any C++11 compiler |
| `detector_config.h` | image size, strides, anchors, classes, quantization, thresholds, arena size | - |
| `detector.h`, `detector.c` | preprocessing, dequantization, DFL decode, NMS; C99, no heap | any C99 compiler |
| `inference.h`, `inference.cc` | the TFLM entry point | C++ with TFLM |
| `serial_probe.h`, `serial_probe.c` | answers `deploy bench --device` over a UART: times the inference on the board | any C99 compiler |

edge-deploy's tests compile `detector.c` and `model_data.cc` as generated here with
`arm-none-eabi-gcc -Wall -Wextra -Werror` for Cortex-M4 and Cortex-M7 and run the decode under
qemu on a stored model output, where its detections equal edge-deploy's Python reference.
`inference.cc` is not compiled there (TFLM is not part of these sources).

## Model

- input: `(1, {s['imgsz']}, {s['imgsz']}, 3)` int8, NHWC, RGB, pixel/255 quantized with scale
  {s['quants']['input'][0]!r} and zero point {s['quants']['input'][1]}
- outputs {layout}, int8: `box_dist` (4 x {s['reg_max']} DFL bins) and `cls_logit`
  ({len(s['names'])} classes: {', '.join(s['names'])}) over {s['anchors']} anchors
  (strides {', '.join(map(str, s['strides']))})
- operators: {ops}
- defaults: confidence > {s['conf']}, IoU {s['iou']}, at most {s['max_det']} detections,
  NMS {'across classes' if s['agnostic'] else 'per class'}

## Memory

- **Flash**: the model array, {_kib(s['model_bytes'])}, plus code: TFLM's interpreter
  and the kernels of the operators above (read their size from your map file) and
  `detector.c` (a few KiB with `expf`/`logf` from the C library).
- **RAM**: the tensor arena, {_kib(s['arena_bytes'])} (`DETECTOR_ARENA_BYTES`,
  measured on the host; the input and output tensors live inside it), plus the decode
  workspace `detector_workspace_t`, {_kib(ws)} for {s['max_candidates']} candidates
  (33 bytes each; `inference.cc` holds one as a static). The functions themselves need a
  few hundred bytes of stack (about 300 for the decode with reg_max 16 at `-O2` on a
  Cortex-M4, by `-fstack-usage`, plus `expf`'s); keep `detector_workspace_t` off the stack.
- If `detector_init()` returns `DETECTOR_ERR_ARENA`, the TFLM build on the board needs more
  than the host measured (other kernels, other alignment): raise `DETECTOR_ARENA_BYTES` and
  read the real need from `detector_arena_used_bytes()`.

## Adding it to an STM32CubeIDE project

1. TFLM itself: build it from the tflite-micro repository for your core with the CMSIS-NN
   kernels (its Makefile's `cortex_m_generic` target, `TARGET_ARCH=cortex-m4+fp` or
   `cortex-m7+fp`, `OPTIMIZED_KERNEL_DIR=cmsis_nn`, goal `microlite`), or export a source
   tree with its `create_tflm_tree.py` and add that folder to the project; TFLM's own
   documentation has the current form of both.
2. The project must be C++ (right-click the project > *Convert to C++*), since
   `inference.cc` and `model_data.cc` are C++; `main.c` stays C and calls `inference.h`.
3. Copy this folder into the project (e.g. `Core/Detector/`), add it and TFLM's include
   folders (the tree root, `third_party/flatbuffers/include`, `third_party/gemmlowp`,
   `third_party/ruy`) under *C/C++ Build > Settings > Include paths*, and link
   `libtensorflow-microlite.a` if you built the library.
4. Compiler settings: keep `-mfloat-abi=hard` with the core's FPU (`fpv4-sp-d16` on M4,
   `fpv5-sp-d16`/`fpv5-d16` on M7), `-O2` or `-Os`, and no `-ffast-math` for `detector.c`
   (the decode follows the host's float rounding to keep the same detections).
   `-DDETECTOR_ARENA_ATTRIBUTES='__attribute__((section(".your_ram")))'` places the arena in
   a particular RAM (e.g. AXI SRAM on an H7; not DTCM if DMA writes the input).
5. Use it:

```c
#include "inference.h"

static detector_detection_t detections[DETECTOR_MAX_DET];

if (detector_init() != DETECTOR_OK) {{ /* model/config mismatch or arena too small */ }}
int n = detector_run_rgb888(frame, width, height, width * 3, detections, DETECTOR_MAX_DET);
for (int i = 0; i < n; ++i) {{
    /* detections[i].x1 .. y2 in frame pixels, .score, detector_class_names[detections[i].class_id] */
}}
```

A camera delivering RGB565 or YUV needs its frame converted to RGB888 first (the
DMA2D can do this on most STM32s), or write your own loop into `detector_input()` using
the same quantization table (`DETECTOR_INPUT_TABLE`).

## Measuring latency on the board

`serial_probe.c` is the board's side of edge-deploy's serial transport: with it in the
firmware, `deploy bench <bundle> --device <board>` (a `transport: serial` device in
`devices.yaml`) times the model on the board itself, with the board's own counter, and
keeps the result like any device's. Feed it every byte the UART receives, from the main loop:

```c
#include "inference.h"
#include "serial_probe.h"

static detector_detection_t found[DETECTOR_MAX_DET];
static serial_probe_t probe;

static void uart_write(void *ctx, const char *text, size_t n) {{
    (void)ctx; HAL_UART_Transmit(&huart3, (const uint8_t *)text, (uint16_t)n, HAL_MAX_DELAY);
}}
static uint32_t cycles(void *ctx) {{ (void)ctx; return DWT->CYCCNT; }}
static int invoke(void *ctx) {{ (void)ctx; return detector_invoke(found, DETECTOR_MAX_DET) < 0 ? -1 : 0; }}

static serial_probe_port_t port = {{uart_write, cycles, 0, invoke, "NUCLEO-H743ZI2",
                                    "tflite-micro + CMSIS-NN", 0, NULL}};

/* in main(), after detector_init(): */
CoreDebug->DEMCR |= CoreDebug_DEMCR_TRCENA_Msk; DWT->CYCCNT = 0; DWT->CTRL |= DWT_CTRL_CYCCNTENA_Msk;
port.ticks_per_second = SystemCoreClock;
port.arena_used_bytes = detector_arena_used_bytes();
serial_probe_init(&probe, &port);
for (;;) {{ uint8_t b; if (HAL_UART_Receive(&huart3, &b, 1, 10) == HAL_OK) serial_probe_feed(&probe, b); }}
```

The firmware answers only with the sha256 of the model it was built from
(`DETECTOR_MODEL_SHA256`): the host refuses a result from a board flashed with another model.
It times up to `SERIAL_PROBE_MAX_RUNS` ({PROBE_MAX_RUNS}) inferences per job (4 bytes of RAM each) and
reads no power sensor (power is reported `unavailable`). edge-deploy's tests compile it for
Cortex-M4 and run it under qemu against the host's transport over an emulated UART.

## How close to the host pipeline

- **Decode and NMS** (`detector_decode_int8`): same detections as edge-deploy's
  `pipeline/detect.py` on the same dequantized outputs (boxes to float rounding, same
  classes, same order, score ties broken the same way). Differences are possible only when
  a score or an IoU lies within a float rounding of a threshold, or when more than
  `DETECTOR_MAX_CANDIDATES` pairs pass the confidence threshold (the lowest are dropped).
- **Preprocessing** (`detector_preprocess_rgb888`): a frame at the model's size, one that
  only needs padding (e.g. {s['imgsz']} wide, less tall) and one that is scaled down gives
  exactly the host's input (OpenCV's `INTER_LINEAR` fixed-point arithmetic, reproduced; tested
  on edge-deploy's val images). A frame smaller than the model input, scaled up, can differ by
  one quantization step in about one value in a hundred (OpenCV rounds some halves down there).
"""
