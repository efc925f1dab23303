"""Precisions and backends' quantization rules, as data the pipeline asks instead of branching on names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    # None: that part stays float. INT4 weight-only still calibrates (GPTQ reads activations).
    activation_bits: int | None
    weight_bits: int | None

    @property
    def calibrated(self) -> bool:
        return self.weight_bits is not None

    @property
    def float_fallback(self) -> bool:
        """Whether sensitive units may be kept float to meet the budget (INT8 weights and activations)."""
        return self.activation_bits == 8 and self.weight_bits == 8


PRECISIONS = {
    "fp32": PrecisionSpec("fp32", None, None),
    "fp16": PrecisionSpec("fp16", None, None),
    "int8": PrecisionSpec("int8", 8, 8),
    "w4a8": PrecisionSpec("w4a8", 8, 4),
    "int4": PrecisionSpec("int4", None, 4),
}

RANGE_METHODS = ("minmax", "percentile", "entropy")  # ties go to the simplest


@dataclass(frozen=True)
class QuantRules:
    """How one backend consumes INT8: what it can represent and what the search may change."""

    name: str
    methods: tuple[str, ...]  # range methods it accepts, in the order `auto` tries them
    # True: zero-point-0 activations only; None: the build's `quantize.symmetric` decides.
    symmetric_activations: bool | None
    per_channel_weights: bool
    unit_kind: str  # what the float fallback keeps float: ONNX nodes, ncnn layers, ...
    quantized_inputs: str  # which tensors get Q/DQ or a scale, in words, for reports
    # Calibration files written from the chosen ranges for other toolchains; only where the backend's
    # tensors are the ONNX graph's own, whose names those toolchains know.
    calibration_files: tuple[str, ...] = ()
    # Op types whose inputs are quantized (empty: every op the quantizer supports), op types whose outputs get
    # no Q/DQ of their own, and whether biases become INT32: where the consumer fuses layers, Q/DQ in the wrong
    # place costs a reformat or a lost fusion instead of saving time.
    op_types: tuple[str, ...] = ()
    float_outputs_of: tuple[str, ...] = ()
    quantize_bias: bool = True
    # Whether the search may keep sensitive units float: False where the runtime has no float kernels beside its
    # integer ones (a full-integer microcontroller model), so a mixed candidate could not run there.
    float_fallback: bool = True
    # Convs whose input has fewer channels than this stay float, whatever the search decides: a stem conv on the
    # 3-channel image has too short a reduction for the integer GEMM to pay, and quantizing the image costs a pass
    # of its own (benchmarks/ort_operators.py measures it; 0 = none).
    float_convs_below_channels: int = 0
    # Whether the shape ops between the last weighted layers and the graph outputs (Reshape, Concat, ...) stay
    # float, so the outputs are not rounded to one 8-bit grid: the decode reads each box side as the expectation of
    # a softmax over 16 logits, and one grid over every scale's logits moved boxes enough to cost 0.34 fidelity
    # points on the real-image YOLOv8s-size model (benchmarks/fidelity_floor.py).
    float_outputs: bool = False
    # Whether the weighted layers that compute those outputs read float inputs too. Where a weighted node runs in
    # integer only with its output quantized (below), they run float whatever their inputs, so rounding the inputs
    # saves no time, and its error lands on the outputs with no later layer to average it: the class logits it
    # moves decide which of two neighbouring anchors NMS keeps, a box a few pixels off. On the real-image
    # YOLOv8s-size model the Percentile build lost 1.18 fidelity points on its report photos with them rounded and
    # 0.91 without, 0.64 and 0.45 on the selection photos; MinMax 0.94 and 1.03, 1.08 and 0.50 (within noise on the
    # report photos); the speed is the same (benchmarks/fidelity_floor.py).
    float_output_layers: bool = False
    # Whether a weighted node runs in integer only when its output is quantized too (onnxruntime fuses
    # Dequantize-Conv-Quantize into QLinearConv; TensorRT needs only the inputs'): where so, a weighted node whose
    # output nothing quantizes runs float, and its weights are stored float instead of dequantized on every run.
    integer_needs_quantized_output: bool = False
    # Whether a quantized whole-factor nearest upsampling is written as channels-last pixel copies instead of a
    # Resize (calibration.qdq.tile_nearest_upsamples): where the runtime runs quantized tensors channels-last and
    # its 8-bit Resize is slow in that layout. Same values; only where it runs and how fast changes.
    upsample_as_tile: bool = False

    def symmetric(self, requested: bool) -> bool:
        return requested if self.symmetric_activations is None else self.symmetric_activations


ONNXRUNTIME_QDQ = QuantRules("onnxruntime QDQ", RANGE_METHODS, None, True, "node",
                             "every float input of every node onnxruntime's quantizer supports",
                             calibration_files=("tensorrt-cache",), float_convs_below_channels=8,
                             float_outputs=True, float_output_layers=True, integer_needs_quantized_output=True,
                             upsample_as_tile=True)
NCNN_INT8 = QuantRules("ncnn INT8", ("minmax", "entropy"), True, True, "layer",
                       "the input blob of every Convolution (ncnn's int8_scale_term)", float_output_layers=True)

# TensorRT's explicit quantization: Q/DQ on the inputs of the layers that run in INT8 (weighted layers, and both
# inputs of residual Adds so the add fuses into the preceding convolution's epilogue), never on their outputs
# (a Q/DQ between a convolution and its activation would split a fused kernel), symmetric activations and
# per-channel symmetric weights, float biases (TensorRT quantizes them itself).
TENSORRT_QDQ = QuantRules("TensorRT explicit QDQ", RANGE_METHODS, True, True, "node",
                          "the inputs of Conv, ConvTranspose, MatMul, Gemm and residual Add (none on their outputs)",
                          calibration_files=("tensorrt-cache",),
                          op_types=("Conv", "ConvTranspose", "MatMul", "Gemm", "Add"),
                          float_outputs_of=("Conv", "ConvTranspose", "MatMul", "Gemm", "Add"),
                          quantize_bias=False)

# The TFLite converter's full-integer quantization, as TensorFlow Lite Micro runs it: it calibrates itself with
# the min/max of every tensor over the representative images it is given (our calibration set), so minmax is the
# only method that describes what it does; our ranges do not reach it. INT8 per-channel symmetric weights, INT8
# asymmetric activations (TFLite's int8 scheme has a zero point), INT32 biases, INT8 model input and outputs.
# No float fallback: a TFLM build registers integer kernels only.
TFLITE_FULL_INT8 = QuantRules("TFLite full-integer INT8 (converter calibration)", ("minmax",), False, True,
                              "operator",
                              "every tensor, model input and outputs included (the TFLite converter's own min/max "
                              "over the calibration images)",
                              float_fallback=False)
