"""ONNX Runtime as the reference runtime: an FP32 (or QDQ) ONNX file as a callable, and its activation tap.

The FP32 ONNX model run by ONNX Runtime is the reference every artifact is
judged against, whatever the target; the quantization code reads intermediate
tensors through the same sessions.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# ONNX Runtime's and ncnn's thread count while scoring: accuracy does not depend on speed, and one thread gives
# the same numbers on every machine whatever else runs on it.
SCORING_THREADS = 1
# Scoring spreads images, not threads: each image is computed alone at SCORING_THREADS, so the numbers stay the
# same, and up to this many images are computed at once (each one's activations are held meanwhile).
MAX_SCORING_WORKERS = 4


def _cores_to_run_on() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The cores a build may use, where fewer than it may run on: a search trial's share of the machine (set by the trial
# from the CPUs it declares to Ray), or a user's. Not OMP_NUM_THREADS: importing Ultralytics sets that to 1.
CPUS_VARIABLE = "DEPLOY_CPUS"


def usable_cores() -> int:
    """The cores this process may use: those it may run on, or fewer where DEPLOY_CPUS says so (a search trial
    given one CPU then scores one image at a time, where before every one of N trials at once used every core)."""
    cores = _cores_to_run_on()
    budget = os.environ.get(CPUS_VARIABLE, "").strip()
    return max(1, min(cores, int(budget))) if budget.isdigit() and int(budget) > 0 else cores


def scoring_workers() -> int:
    """Images computed at once while scoring: one per usable core, at most MAX_SCORING_WORKERS."""
    return min(usable_cores(), MAX_SCORING_WORKERS)


def session_options(threads: int | None = None):
    """onnxruntime CPU session options at `threads` intra-op threads; by default onnxruntime's own choice (every
    physical core), or the process's CPU budget where it has fewer usable cores (a search trial)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    budget = usable_cores()
    if threads or budget < _cores_to_run_on():
        options.intra_op_num_threads = threads or budget
    return options


def ort_infer(model: Path, threads: int | None = None) -> Infer:
    """One ONNX file in an ONNX Runtime CPU session, as a batch -> (box_dist, cls_logit) callable.

    At one thread (scoring), the images of a batch run one per image on a few Python threads at once:
    onnxruntime releases the GIL while it computes and a session may be run from several threads.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), session_options(threads), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    workers = scoring_workers() if threads == 1 else 1
    lanes = ThreadPoolExecutor(workers) if workers > 1 else None

    def one(image: np.ndarray):
        return session.run(None, {input_name: image[None]})

    def infer(batch: np.ndarray):
        if lanes is None or len(batch) == 1:
            box_dist, cls_logit = session.run(None, {input_name: batch})
            return box_dist, cls_logit
        per_image = list(lanes.map(one, batch))
        return np.concatenate([o[0] for o in per_image]), np.concatenate([o[1] for o in per_image])

    infer.images_at_once = 2 * workers if lanes else 1
    infer.lanes = lanes
    return infer


def tensor_types(model) -> dict[str, int]:
    """ONNX element type of every tensor the graph names (inputs, node outputs, initializers)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def session_with_all_outputs(model_path: Path, float_only: bool = True):
    """An onnxruntime session that also returns every intermediate tensor; and those tensors' names."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    types = tensor_types(model)
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    names = list(graph_inputs)
    for node in model.graph.node:
        names += [o for o in node.output if o and o in types and
                  (types[o] == onnx.TensorProto.FLOAT or not float_only)]
    names = list(dict.fromkeys(names))
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing and name not in graph_inputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = session_options()
    # Optimisations would fuse nodes away and hide their outputs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, names


def onnx_activation_tap(model_path: Path):
    """An activation tap over every float tensor of an ONNX model: batch -> {tensor name: values}."""
    session, _ = session_with_all_outputs(model_path)
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    def tap(batch: np.ndarray) -> dict[str, np.ndarray]:
        values = dict(zip(outputs, session.run(outputs, {input_name: batch})))
        values[input_name] = batch
        return values

    return tap
