"""INT8 with onnxruntime's QDQ quantizer, driven by this project's own activation ranges.

onnxruntime calibrates and quantizes in one call; here the two are split:
ranges come from calibration/ranges.py (computed once per calibration set),
and are handed to the quantizer through its calibration-cache file, so that
trying another method or another set of float layers costs one quantizer run
and no inference.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.calibration.progress import Progress
from edge_deploy.calibration.rules import ONNXRUNTIME_QDQ, QuantRules
from edge_deploy.calibration.search import UnitSensitivity
from edge_deploy.pipeline.errors import DeployError


@contextlib.contextmanager
def quiet_onnxruntime_tools():
    # The quantization tools log per-node chatter and print progress to stdout.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def prepare(fp32_path: Path, out_path: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, graph clean-up) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_onnxruntime_tools():
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def quantize(prepared: Path, out_path: Path, ranges: dict[str, tuple[float, float]], per_channel: bool,
             symmetric: bool, exclude: list[str] = (), weight_bits: int = 8, rules: QuantRules = ONNXRUNTIME_QDQ) -> Path:
    """Static QDQ quantization of `prepared` with the given activation ranges; `exclude` nodes stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    cache = Path(out_path).with_suffix(".ranges.json")
    data = {name: TensorData(lowest=np.float32(low), highest=np.float32(high)) for name, (low, high) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    weight_type = {8: QuantType.QInt8, 4: QuantType.QInt4}[weight_bits]
    try:
        with quiet_onnxruntime_tools():
            quantize_static(
                str(prepared), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                # Symmetric INT8 activations (zero point 0) are what TensorRT and ARM kernels want; x86
                # onnxruntime prefers unsigned activations with signed weights.
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=weight_type,
                nodes_to_exclude=list(exclude), calibration_cache_path=str(cache),
                op_types_to_quantize=list(rules.op_types) or None,
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                               "OpTypesToExcludeOutputQuantization": list(rules.float_outputs_of),
                               "QuantizeBias": rules.quantize_bias},
            )
    except (ValueError, RuntimeError, KeyError) as exc:
        raise DeployError(f"quantize: onnxruntime's quantizer failed: {str(exc).splitlines()[0]}") from None
    finally:
        cache.unlink(missing_ok=True)
    return out_path


SHAPE_OPS = ("Reshape", "Concat", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def output_tail(graph) -> tuple[list[str], list[str]]:
    """The shape-only nodes between the graph outputs and the layers that compute them, and those of the layers that
    carry weights (in graph order)."""
    producer = {out: node for node in graph.node for out in node.output}
    tail, computing, pending = [], set(), [o.name for o in graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in tail:
            continue
        if node.op_type not in SHAPE_OPS:
            computing.add(node.name)
            continue
        tail.append(node.name)
        pending += list(node.input)
    return tail, [n.name for n in graph.node if n.name in computing and n.op_type in WEIGHT_INPUT]


def tensor_readers(graph) -> dict[str, list]:
    """{tensor name: the nodes that read it, in graph order}."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def silu_inputs(graph) -> dict[str, str]:
    """{input: output} of every SiLU written as Sigmoid and Mul (x * sigmoid(x)) whose input nothing else reads."""
    found = {}
    for tensor, nodes in tensor_readers(graph).items():
        sigmoid = next((n for n in nodes if n.op_type == "Sigmoid"), None)
        mul = next((n for n in nodes if n.op_type == "Mul"), None)
        if (len(nodes) == 2 and sigmoid is not None and mul is not None
                and sorted(mul.input) == sorted([tensor, sigmoid.output[0]])):
            found[tensor] = mul.output[0]
    return found


def drop_unread_quantization(graph) -> None:
    """Removes the Quantize/Dequantize nodes nothing reads any more (pairs go whole), then the initializers
    nothing reads (their scales, zero points, stored weights), so the file holds no dead Quantize work."""
    while True:
        read = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for node in graph.node for i in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def feed_float_inputs(path: Path, float_nodes: list[str]) -> Path:
    """Gives each node kept float the float values of its inputs, in place.

    onnxruntime's quantizer only leaves an excluded node's own output unquantized: a tensor it reads still passes
    through a Quantize/Dequantize pair when its producer (or another reader) is quantized, so the "float" node
    computed on rounded inputs. On the real-image YOLOv8s-size fixture model the float fallback then scored the
    same drop with 1, 2, 4 ... 32 nodes float. The pair stays for the tensor's quantized readers; the float node
    reads the tensor before it.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    wanted = set(float_nodes)
    rewired = False
    for node in graph.node:
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dequantize = producer.get(name)
            quantize = producer.get(dequantize.input[0]) if dequantize is not None else None
            if (dequantize is not None and dequantize.op_type == "DequantizeLinear" and quantize is not None
                    and quantize.op_type == "QuantizeLinear"):
                node.input[k] = quantize.input[0]
                rewired = True
    if not rewired:
        return path
    drop_unread_quantization(graph)
    onnx.save(model, str(path))
    return path


def dequantized_constants(graph, of_node=lambda node: True) -> list[tuple]:
    """(node, input index, value) for each input after the first that a node `of_node` accepts reads through a
    DequantizeLinear of an initializer (its weights and biases): the float value that Dequantize computes, in
    float32 as it does."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in filter(of_node, graph.node):
        for k, name in enumerate(node.input):
            dequantize = producer.get(name)
            if k == 0 or dequantize is None or dequantize.op_type != "DequantizeLinear" \
                    or dequantize.input[0] not in initializers:
                continue
            values = numpy_helper.to_array(initializers[dequantize.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(initializers[dequantize.input[1]]).astype(np.float32)
            zero = (numpy_helper.to_array(initializers[dequantize.input[2]]).astype(np.float32)
                    if len(dequantize.input) > 2 and dequantize.input[2] else np.float32(0))
            if scale.ndim == 1 and values.ndim > 1:
                axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1) % values.ndim
                shape = [1] * values.ndim
                shape[axis] = scale.size
                scale, zero = scale.reshape(shape), np.reshape(zero, shape if np.ndim(zero) else ())
            found.append((node, k, ((values - zero) * scale).astype(np.float32)))
    return found


def store_float_weights(path: Path) -> Path:
    """Stores float the weights and biases of the weighted nodes that run float, in place: the values the
    Dequantize computed, once. Outputs change by float rounding only (a different kernel adds in another order).

    A Conv whose output no Quantize reads (the head's last convs once the outputs stay float) has no integer kernel
    in onnxruntime: it ran in float on weights dequantized on every run, which also kept onnxruntime from packing
    them once (`DequantizeLinear` 0.10 ms of the embedded model's 2.5 ms).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}

    def runs_float(node) -> bool:
        return node.op_type in WEIGHT_INPUT and bool(node.output) and node.output[0] not in quantized

    to_store = dequantized_constants(graph, runs_float)
    if not to_store:
        return path
    for node, k, value in to_store:
        floated = f"{node.input[k]}_float"
        graph.initializer.append(numpy_helper.from_array(value, floated))
        node.input[k] = floated
    drop_unread_quantization(graph)
    onnx.save(model, str(path))
    return path


def _whole_factor_nearest_upsample(node, initializers: dict) -> tuple[int, int] | None:
    """(height factor, width factor) of a Resize that repeats each pixel a whole number of times (nearest, the
    asymmetric coordinates and floor rounding PyTorch's nn.Upsample exports, constant scales 1, 1, s, t); None for
    any other Resize, whose output would not be plain repetition."""
    from onnx import helper, numpy_helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (attributes.get("mode") != b"nearest" or attributes.get("coordinate_transformation_mode") != b"asymmetric"
            or attributes.get("nearest_mode") != b"floor" or attributes.get("antialias", 0) or "axes" in attributes
            or len(node.input) != 3 or node.input[2] not in initializers):
        return None
    scales = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
    if scales.shape != (4,) or scales[0] != 1 or scales[1] != 1:
        return None
    height, width = scales[2:]
    if height < 1 or width < 1 or height != int(height) or width != int(width):
        return None
    return int(height), int(width)


UPSAMPLING_AS_COPIES = ("each a quantized nearest upsampling, written as channels-last copies with Transpose, Reshape "
                        "and Tile because onnxruntime's 8-bit Resize is slow in its channels-last layout")


def tile_nearest_upsamples(path: Path) -> list[str]:
    """Writes, in place, each quantized whole-factor nearest upsampling (a Resize between a Dequantize and a
    Quantize) as Transpose to channels-last, Reshape, Tile, Reshape, Transpose back, on the Quantize's grid: the
    same values, moved as whole pixel vectors. Why: onnxruntime runs a quantized graph channels-last and takes
    that layout through a Resize, where its 8-bit nearest Resize has no fast path; on the real-image YOLOv8s-size
    model at 256 px its two upsamplings took 1.0 ms of INT8's 35-44 (0.2 ms in FP32), written this way 0.1 ms
    (benchmarks/ort_operators.py). The Transposes cancel against the layout's own. Returns the Resizes rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = tensor_readers(graph)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    rewritten = []
    for node in list(graph.node):
        factors = _whole_factor_nearest_upsample(node, initializers) if node.op_type == "Resize" else None
        dequantize, quantizers = producer.get(node.input[0]), readers.get(node.output[0], [])
        if (factors is None or dequantize is None or dequantize.op_type != "DequantizeLinear"
                or len(quantizers) != 1 or quantizers[0].op_type != "QuantizeLinear"
                or any(o.name == node.output[0] for o in graph.output)):
            continue
        _, channels, height, width = shapes.get(node.input[0], [None] * 4)
        scale, zero = quantizers[0].input[1], quantizers[0].input[2]
        # One scale for the whole tensor, so that it still holds once the channels are moved last.
        if None in (channels, height, width) or scale not in initializers or \
                numpy_helper.to_array(initializers[scale]).size != 1:
            continue
        stem, (up_h, up_w) = node.name, factors
        graph.initializer.extend([
            numpy_helper.from_array(np.array([-1, height, 1, width, 1, channels], np.int64), f"{stem}_pixels"),
            numpy_helper.from_array(np.array([1, 1, up_h, 1, up_w, 1], np.int64), f"{stem}_repeats"),
            numpy_helper.from_array(np.array([-1, height * up_h, width * up_w, channels], np.int64),
                                    f"{stem}_upsampled")])
        chain, last = [], node.input[0]

        def step(op: str, inputs: list[str], output: str, **attributes) -> None:
            nonlocal last
            chain.append(helper.make_node(op, [last, *inputs], [output], name=f"{stem}/{op}_{len(chain)}",
                                          **attributes))
            # Each step's output back on the Quantize's grid, so that onnxruntime runs the step on 8-bit data.
            chain.append(helper.make_node("QuantizeLinear", [output, scale, zero], [f"{output}_q"],
                                          name=f"{output}_QuantizeLinear"))
            chain.append(helper.make_node("DequantizeLinear", [f"{output}_q", scale, zero], [f"{output}_dq"],
                                          name=f"{output}_DequantizeLinear"))
            last = f"{output}_dq"

        step("Transpose", [], f"{stem}_channels_last", perm=[0, 2, 3, 1])
        step("Reshape", [f"{stem}_pixels"], f"{stem}_pixels_out")
        step("Tile", [f"{stem}_repeats"], f"{stem}_tiled")
        step("Reshape", [f"{stem}_upsampled"], f"{stem}_upsampled_out")
        chain.append(helper.make_node("Transpose", [last], [node.output[0]], name=f"{stem}/Transpose_back",
                                      perm=[0, 3, 1, 2]))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(chain):
            graph.node.insert(position + offset, new)
        rewritten.append(stem)
    if not rewritten:
        return []
    drop_unread_quantization(graph)
    onnx.save(model, str(path))
    return rewritten


def fake_quant_activation(x: np.ndarray, low: float, high: float, symmetric: bool) -> np.ndarray:
    """Quantize and dequantize as a QDQ pair with this range would (8 bits)."""
    if symmetric:
        bound = max(abs(low), abs(high))
        scale = bound / 127 if bound > 0 else 1.0
        return (np.clip(np.round(x / scale), -127, 127) * scale).astype(np.float32)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    zero = np.round(-low / scale)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def fake_quant_weight(w: np.ndarray, bits: int = 8, per_channel: bool = True) -> np.ndarray:
    """Symmetric signed weights, per output channel (axis 0) or per tensor."""
    limit = 2 ** (bits - 1) - 1
    axes = tuple(range(1, w.ndim)) if per_channel else None
    bound = np.abs(w).max(axis=axes, keepdims=per_channel) if w.size else 0
    scale = np.where(bound > 0, bound / limit, 1.0)
    return (np.clip(np.round(w / scale), -limit, limit) * scale).astype(np.float32)


WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def thin_convs(graph, below_channels: int) -> list[str]:
    """Conv nodes whose input has fewer than `below_channels` channels (weight in-channels x groups)."""
    if below_channels <= 0:
        return []
    weight_dims = {i.name: list(i.dims) for i in graph.initializer}
    thin = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weight_dims:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = weight_dims[node.input[1]]
        if len(dims) > 1 and dims[1] * groups < below_channels:
            thin.append(node.name)
    return thin


# Images the ranking runs per unit: each unit costs a full inference per image, and which units hurt the outputs
# most does not need many images to show.
DOWNSTREAM_IMAGES = 4


def downstream_sensitivity(prepared: Path, ranges: dict[str, tuple[float, float]], batches: list[np.ndarray],
                           symmetric: bool, per_channel: bool = True, op_types: tuple[str, ...] = (),
                           skip: tuple[str, ...] = (), say: Callable[[str], None] | None = None,
                           node_ranges: dict[str, dict[str, tuple[float, float]]] | None = None,
                           unit: str = "node") -> list[UnitSensitivity]:
    """Each quantizable node's harm to the network's outputs with only that node quantized, most harmful first.

    A node's own output error says little about what reaches the detections: a stride-32 head conv can be the
    worst-rounded node and still decide no box, while a clipped range early on spoils everything after it. Here
    the float network runs with one node's activation inputs and weights rounded as the INT8 model will round
    them, and its outputs are compared with the float network's, each anchor weighted by the FP32 model's score
    there (`cls_logit`, where the model has one), so that what decides no detection counts for little.

    With one node rounded, everything before it is the float network's, so each rounding error is known from one
    float pass: every quantizable input gets an added error input, zero but for the node being scored. One
    session serves every node, and a node costs its inferences and no model build.

    `node_ranges` gives a node's inputs ranges of their own, for a runtime that rounds one tensor differently for
    each reader (ncnn gives every reader of a blob its own copy and scale); `ranges` serves the other nodes. `unit`
    is what the progress line calls a node (ncnn's are layers).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edge_deploy.calibration.onnxrt import session_options, session_with_all_outputs, tensor_types

    model = onnx.load(str(prepared))
    graph = model.graph
    types = tensor_types(model)
    initializers = {i.name: i for i in graph.initializer}
    images = np.concatenate(batches)[:DOWNSTREAM_IMAGES]
    float_session, _ = session_with_all_outputs(prepared)
    image_input = float_session.get_inputs()[0].name
    values = {image_input: images, **dict(zip([o.name for o in float_session.get_outputs()],
                                              float_session.run(None, {image_input: images})))}
    del float_session

    # Per scored node: the error inputs it reads, each with the tensor it rounds and that rounding's range (an
    # activation, whose float values are in `values`) or the rounding error itself (a weight's).
    units: list[tuple] = []
    nodes, needed = [], set()
    for node in graph.node:
        rounds = []
        if node.output and not (op_types and node.op_type not in op_types) and node.name not in skip:
            its_ranges = (node_ranges or {}).get(node.name, ranges)
            for position, name in enumerate(node.input):
                if (name and name not in initializers and name in its_ranges and name in values
                        and types.get(name) == onnx.TensorProto.FLOAT):
                    rounds.append((position, (name, its_ranges[name])))
                elif position == WEIGHT_INPUT.get(node.op_type) and name in initializers:
                    weight = numpy_helper.to_array(initializers[name])
                    rounds.append((position, fake_quant_weight(weight, 8, per_channel) - weight))
        if not any(isinstance(what, tuple) for _, what in rounds):
            nodes.append(node)  # no activation of it is one the INT8 model rounds: not a unit
            continue
        fed = []
        for position, what in rounds:
            added = f"unit_error/{len(units)}/{position}"
            graph.input.append(helper.make_tensor_value_info(added, onnx.TensorProto.FLOAT, None))
            nodes.append(helper.make_node("Add", [node.input[position], added], [f"{added}/input"]))
            node.input[position] = f"{added}/input"
            fed.append((added, what))
            if isinstance(what, tuple):
                needed.add(what[0])
        nodes.append(node)
        units.append((node, fed))
    values = {name: values[name] for name in needed}
    if not units:
        return []
    del graph.node[:]
    graph.node.extend(nodes)
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    zero = np.zeros((), np.float32)
    silent = {added: zero for _, fed in units for added, _ in fed}

    def error(what) -> np.ndarray:
        if not isinstance(what, tuple):
            return what
        name, (low, high) = what
        return fake_quant_activation(values[name], low, high, symmetric) - values[name]

    def outputs(fed: list) -> list:
        return session.run(None, {**silent, image_input: images, **{added: error(what) for added, what in fed}})

    reference = outputs([])
    weight = anchor_weights(dict(zip(output_names, reference)))
    results = []
    progress = Progress(f"ranking {unit}s (each alone rounded, by the outputs' error on {len(images)} images): "
                        f"{unit}", len(units), say)
    for node, fed in units:
        candidate = outputs(fed)
        progress.step()
        worst = min(weighted_sqnr_db(r, c, weight) for r, c in zip(reference, candidate))
        results.append(UnitSensitivity(node.name, node.op_type, round(worst, 2)))
    return sorted(results, key=lambda r: r.sqnr_db)


def anchor_weights(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """(images, anchors): the FP32 model's best class score at each anchor, where the model has a `cls_logit`
    output; None (every value counts alike) otherwise."""
    logits = outputs.get("cls_logit")
    if logits is None or logits.ndim != 3:
        return None
    return 1.0 / (1.0 + np.exp(-logits.max(axis=1).astype(np.float64)))


def weighted_sqnr_db(reference: np.ndarray, candidate: np.ndarray, weight: np.ndarray | None) -> float:
    """sqnr_db of one output with each anchor weighted, where the output is laid out (images, channels, anchors)
    like the weights; unweighted otherwise."""
    from edge_deploy.calibration.ranges import sqnr_db

    per_anchor = weight is not None and reference.ndim == 3 and reference.shape[-1] == weight.shape[-1]
    return sqnr_db(reference, candidate, weight[:, None, :] if per_anchor else None)


def ranked_by_text(alone: str, batches: list[np.ndarray] | None = None) -> str:
    """How downstream_sensitivity scores, for a report: on the images of `batches` it ranks on (a calibration set
    under DOWNSTREAM_IMAGES ranks on what it has), DOWNSTREAM_IMAGES before any ranking."""
    images = DOWNSTREAM_IMAGES if batches is None else min(DOWNSTREAM_IMAGES, sum(len(b) for b in batches))
    return (f"{alone}, scored by the SQNR of the model's outputs on {images} calibration "
            f"image{'' if images == 1 else 's'}, each anchor weighted by the FP32 model's score there")


RANKED_ALONE = "Each node quantized alone in the float model"


class OnnxQdqBackend:
    """Candidates as QDQ ONNX files built by onnxruntime's quantizer with this project's ranges.

    Serves every target that consumes a QDQ ONNX (ONNX Runtime, TensorRT's
    explicit quantization); the rules say what the consumer can represent.
    With 4-bit weights (W4A8, INT4), the weights are rounded once (RTN or GPTQ)
    and activation statistics are taken on the model with those weights.
    """

    def __init__(self, fp32_onnx: Path, work: Path, rules: QuantRules = ONNXRUNTIME_QDQ,
                 activation_bits: int | None = 8, weight_bits: int = 8, int4_method: str = "gptq",
                 int4_group: int = 0, calibration_batches: list[np.ndarray] | None = None, symmetric: bool = False,
                 say: Callable[[str], None] | None = None):
        self.rules, self.say = rules, say  # `say`: the quantize stage's progress channel
        self.symmetric = rules.symmetric(symmetric)
        self.activation_bits, self.weight_bits = activation_bits, weight_bits
        work.mkdir(parents=True, exist_ok=True)
        self.prepared = prepare(fp32_onnx, work / "prepared.onnx")
        self.weights = None
        self.source = self.prepared
        if weight_bits == 4:
            from edge_deploy.calibration.int4 import quantize_weights, with_int4_grid

            self.weights = quantize_weights(self.prepared, int4_method, int4_group, calibration_batches)
            # Activation ranges are measured on the model the activations will flow through.
            self.source = with_int4_grid(self.prepared, self.weights, work / "int4grid.onnx")
        # Nodes the rules keep float (for speed, or so that the outputs are not rounded) are never quantized: not
        # candidates for the fallback, not counted.
        import onnx

        graph = onnx.load(str(self.prepared), load_external_data=False).graph
        tail, layers = output_tail(graph) if rules.float_outputs else ((), ())
        self.float_outputs = (*tail, *(layers if rules.float_output_layers else ()))
        self.thin_convs = tuple(thin_convs(graph, rules.float_convs_below_channels))
        self.fixed_float_units = (*self.thin_convs, *self.float_outputs)
        self.silu = silu_inputs(graph)
        self.ranked_by = ranked_by_text(RANKED_ALONE)
        self.rewritten_by_build: dict[Path, list[str]] = {}
        self.quantizable_units = sum(1 for n in graph.node if (not rules.op_types or n.op_type in rules.op_types)
                                     and n.name not in self.fixed_float_units)

    def activation_ranges(self, ranges) -> dict[str, tuple[float, float]]:
        """The ranges a candidate quantizes with: a SiLU's input reaches down only as far as its output's grid can
        tell apart (ranges.floor_silu_inputs). That holds with the SiLU's Mul kept float too: its output is still
        rounded for the quantized nodes that read it, and the Sigmoid still reads the rounded input."""
        from edge_deploy.calibration.ranges import floor_silu_inputs

        return floor_silu_inputs(ranges, self.silu, self.symmetric)

    def tap(self):
        from edge_deploy.calibration.onnxrt import onnx_activation_tap

        return onnx_activation_tap(self.source)

    def build(self, ranges, float_units: list[str], out: Path) -> Path:
        from edge_deploy.calibration.int4 import replace_int8_weights, write_weight_only

        path = out.with_suffix(".onnx")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.activation_bits is None:
            return write_weight_only(self.prepared, self.weights, path)
        kept_float = [*self.fixed_float_units, *float_units]
        quantize(self.source, path, self.activation_ranges(ranges), self.rules.per_channel_weights,
                 self.symmetric, kept_float, rules=self.rules)
        feed_float_inputs(path, kept_float)
        self.rewritten_by_build[path] = tile_nearest_upsamples(path) if self.rules.upsample_as_tile else []
        # W4A8 keeps its INT4 weights wherever it can (replace_int8_weights below).
        if self.rules.integer_needs_quantized_output and self.weights is None:
            store_float_weights(path)
        if self.weights is not None:
            replace_int8_weights(path, self.weights, path)
        return path

    def runtime(self, built: Path):
        from edge_deploy.calibration.onnxrt import SCORING_THREADS, ort_infer

        return ort_infer(built, SCORING_THREADS)

    def rank_units(self, ranges, batches: list[np.ndarray]) -> list[UnitSensitivity]:
        self.ranked_by = ranked_by_text(RANKED_ALONE, batches)
        return downstream_sensitivity(self.prepared, self.activation_ranges(ranges), batches, self.symmetric,
                                      self.rules.per_channel_weights, self.rules.op_types, self.fixed_float_units,
                                      self.say)

    def units(self) -> int:
        return self.quantizable_units

    def rewritten(self, built: Path) -> dict[str, str]:
        return {node: UPSAMPLING_AS_COPIES for node in self.rewritten_by_build.get(Path(built), [])}
