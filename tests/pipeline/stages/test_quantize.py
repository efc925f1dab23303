
import numpy as np
import onnx
import pytest

from edge_deploy.calibration.formats import read_trt_cache
from edge_deploy.calibration.preprocess import load_tensor
from edge_deploy.calibration.qdq import fake_quant_activation, fake_quant_weight
from edge_deploy.calibration.ranges import sqnr_db
from edge_deploy.calibration.sets import calibration_set, choice_splits
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.errors import AccuracyGateError
from edge_deploy.pipeline.results import QuantizationReport
from edge_deploy.pipeline.stages.quantize import QuantizeStage
from edge_deploy.pipeline.stages.reference import ReferenceStage
from edge_deploy.targets.cpu import OnnxRuntimeCpu


@pytest.fixture(scope="module")
def sets(shapes_yaml, preprocess):
    selection = choice_splits(shapes_yaml, preprocess, 100, 0)[0].head(48)
    calibration = calibration_set(shapes_yaml, preprocess, size=48, seed=0, exclude=frozenset(selection.file_hashes))
    return calibration, selection


@pytest.fixture(scope="module")
def referenced(exported, engine, sets, shapes_yaml, preprocess) -> dict:
    """load + export + the FP32 reference on the selection and report splits."""
    available = dict(exported)
    val = choice_splits(shapes_yaml, preprocess, 100, 0)[1]
    available.update(engine.run(ReferenceStage(sets[1], val), available).artifacts)
    return available


def stage(sets, **overrides):
    settings = dict(method="minmax", symmetric=False, max_map_drop=2.0, on_budget_exceeded="fail")
    settings.update(overrides)
    return QuantizeStage(OnnxRuntimeCpu(), settings.pop("precision", "int8"), *sets, **settings)


def test_int8_keeps_accuracy_and_writes_calibration_files(referenced, engine, sets):
    record = engine.run(stage(sets), referenced)
    ops = {node.op_type for node in onnx.load(str(record.artifacts["quantized"].path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    report = QuantizationReport.from_json(record.metrics)
    assert report.drop_points <= 2.0 and report.float_units == [] and report.within_budget
    assert record.artifacts["quantized"].path.stat().st_size < referenced["onnx"].path.stat().st_size / 2
    header, scales = read_trt_cache(record.artifacts["trt_calibration_cache"].path)
    assert header == "TRT-8601-EntropyCalibration2" and scales["images"] == pytest.approx(1 / 127)
    assert report.method == "minmax" and report.selection.role == "selection"
    assert report.selection.images == 48 and report.selection.source.endswith("images/selection")


def test_the_stem_conv_on_the_image_stays_float_and_is_said_so(referenced, engine, sets):
    record = engine.run(stage(sets), referenced)
    graph = onnx.load(str(record.artifacts["quantized"].path)).graph
    report = QuantizationReport.from_json(record.metrics)
    stem = [n for n in graph.node if n.op_type == "Conv" and n.input[0] == "images"]
    assert [n.name for n in stem] == report.float_for_speed and len(stem) == 1
    initializers = {i.name for i in graph.initializer}
    assert stem[0].input[1] in initializers  # a float weight, not a DequantizeLinear's output
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images"]
    # Every other conv is quantized (its weight comes through a DequantizeLinear), but for the ones that compute the
    # outputs, which stay float so that the outputs are not rounded.
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized_outputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    others = [n for n in graph.node if n.op_type == "Conv" and n not in stem and n.output[0] in quantized_outputs]
    assert len(others) == len([n for n in graph.node if n.op_type == "Conv"]) - 1 - 6  # the stem, 6 head convs
    assert others and all(n.input[1] in dequantized for n in others)
    assert "1 conv(s) on fewer than 8 input channels kept float" in report.choice
    assert report.float_outputs and "so the outputs are not rounded" in report.choice
    # The two upsamplings are written as copies, and the report says so.
    assert sorted(report.rewritten) == ["/inner/model.10/Resize", "/inner/model.13/Resize"]
    assert not [n for n in graph.node if n.op_type == "Resize"]
    assert "2 nodes rewritten for speed, with the same values" in report.choice


def test_selection_images_are_never_calibrated_on(sets):
    calibration, selection = sets
    assert not set(calibration.file_hashes) & set(selection.file_hashes)
    assert len(calibration.files) == 48


def test_calibration_set_is_part_of_the_key(referenced, engine, sets, shapes_yaml, preprocess):
    other = calibration_set(shapes_yaml, preprocess, size=48, seed=1, exclude=frozenset(sets[1].file_hashes))
    assert engine.key(stage(sets), referenced) != engine.key(stage((other, sets[1])), referenced)


def test_methods_a_target_does_not_accept_are_refused_before_any_stage():
    from edge_deploy.pipeline.build import check_against_target
    from edge_deploy.pipeline.config import BuildConfig
    from edge_deploy.pipeline.errors import ConfigError
    from edge_deploy.targets.arm import NcnnArm

    config = BuildConfig(target="arm", precision="int8", quantize={"method": "percentile"})
    with pytest.raises(ConfigError, match="ncnn INT8.*accepts quantize.method auto, minmax, entropy"):
        check_against_target(config, NcnnArm())


def test_calibration_tensors_are_what_inference_is_fed(sets):
    """The quantizer and every runtime read images through the one preprocessing function."""
    from edge_deploy.calibration.preprocess import letterbox, read_image

    calibration, _ = sets
    path = calibration.files[0]
    tensor, lb = load_tensor(path, calibration.preprocess)
    padded, _ = letterbox(read_image(path), calibration.preprocess)
    expected = padded[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255
    assert np.allclose(tensor, expected, atol=1e-7)


def test_budget_nothing_meets_reports_the_best_and_fails(referenced, sets, tmp_path):
    with pytest.raises(AccuracyGateError, match="mAP50-95 points on the selection split.*raise --max-map-drop") \
            as caught:
        # Even every node float does not gain 5 points: no candidate can meet it.
        Engine(tmp_path / "cache").run(stage(sets, method="entropy", max_map_drop=-5.0), referenced)
    # What was tried goes with the error (the build keeps it beside the FP32 model): every candidate scored.
    tried = caught.value.report
    assert caught.value.stage == "quantize" and tried["within_budget"] is False
    assert len(tried["trials"]) > 1 and tried["trials"][0]["float_units"] == []
    assert {"method", "float_units", "drop_points", "drop_interval"} <= set(tried["trials"][-1])
    assert f"loses {tried['drop_points']:.2f}" in str(caught.value)
    # What the error tells the user to do next reuses the search: the same gate from the cache, or --accept-drop
    # (on_budget_exceeded "continue") taking the kept candidate without running it again.
    with pytest.raises(AccuracyGateError) as again:
        Engine(tmp_path / "cache").run(stage(sets, method="entropy", max_map_drop=-5.0), referenced)
    assert str(again.value) == str(caught.value) and again.value.report == tried
    accepted = Engine(tmp_path / "cache").run(stage(sets, method="entropy", max_map_drop=-5.0,
                                                    on_budget_exceeded="continue"), referenced)
    assert accepted.cache_hit and accepted.metrics == tried and "quantized" in accepted.artifacts


def test_fake_quant_helpers():
    x = np.linspace(-1, 3, 101).astype(np.float32)
    assert np.abs(fake_quant_activation(x, -1, 3, symmetric=False) - x).max() <= 4 / 255 / 2 + 1e-6
    assert np.abs(fake_quant_activation(x, -1, 3, symmetric=True) - x).max() <= 3 / 127 / 2 + 1e-6
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[1] *= 100  # per-channel scales keep the small channels precise
    q = fake_quant_weight(w)
    assert np.abs(q[0] - w[0]).max() <= np.abs(w[0]).max() / 127 / 2 + 1e-6
    assert sqnr_db(w, q) > 35


def test_int4_gptq_loses_less_than_round_to_nearest(referenced, engine, sets):
    results = {}
    for method in ("rtn", "gptq"):
        record = engine.run(stage(sets, precision="int4", int4_method=method, max_map_drop=5.0,
                                  on_budget_exceeded="continue"), referenced)
        model = onnx.load(str(record.artifacts["quantized"].path))
        int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
        assert len(int4) == 63 and model.opset_import[0].version == 21
        results[method] = record.metrics["drop_points"]
        assert record.artifacts["quantized"].path.stat().st_size < referenced["onnx"].path.stat().st_size / 4
    assert results["gptq"] < results["rtn"]
    assert results["gptq"] <= 2.0


def test_w4a8_quantizes_activations_and_stores_int4_weights(referenced, engine, sets):
    record = engine.run(stage(sets, precision="w4a8", max_map_drop=2.0, on_budget_exceeded="continue"), referenced)
    model = onnx.load(str(record.artifacts["quantized"].path))
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.INT4 in types
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert record.metrics["drop_points"] <= 2.0


def test_a_node_kept_float_reads_float_inputs(referenced, sets, tmp_path):
    """onnxruntime's quantizer leaves an excluded node's input behind a Quantize/Dequantize pair when the producer
    is quantized; the backend rewires the float node to the tensor before the pair."""
    from edge_deploy.calibration.qdq import OnnxQdqBackend
    from edge_deploy.calibration.ranges import collect_statistics, ranges_for

    calibration, _ = sets
    backend = OnnxQdqBackend(referenced["onnx"].path, tmp_path / "work")
    tensors = [load_tensor(p, calibration.preprocess)[0] for p in calibration.files[:16]]
    ranges = ranges_for(collect_statistics(backend.tap(), tensors), "minmax")
    graph = onnx.load(str(backend.prepared)).graph
    # A conv fed by a SiLU (a quantized Mul), in the middle of the backbone.
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name not in backend.fixed_float_units]
    chosen = convs[len(convs) // 2]
    all_int8 = backend.build(ranges, [], tmp_path / "all-int8")
    one_float = backend.build(ranges, [chosen.name], tmp_path / "one-float")

    def producers(path):
        built = onnx.load(str(path)).graph
        made = {o: n.op_type for n in built.node for o in n.output}
        return {n.name: made.get(n.input[0]) for n in built.node if n.op_type == "Conv"}, built

    before, _ = producers(all_int8)
    after, built = producers(one_float)
    assert before[chosen.name] == "DequantizeLinear"
    assert after[chosen.name] != "DequantizeLinear"
    assert all(after[name] == "DequantizeLinear" for name in after if name not in (chosen.name,
                                                                                   *backend.fixed_float_units))
    # The outputs are not rounded: the shape ops that form them read the last convs' float outputs, and those convs
    # (float in onnxruntime whatever they read) read float inputs.
    assert {n.op_type for n in graph.node if n.name in backend.float_outputs} == {"Reshape", "Concat", "Conv"}
    made = {o: n for n in built.node for o in n.output}
    for output in built.output:
        tail = made[output.name]
        assert tail.name in backend.float_outputs
        assert all(made[i].op_type != "DequantizeLinear" for i in tail.input if i in made)
    # The convs that compute the outputs run float, so their weights are stored float, not dequantized per run.
    initializers = {i.name for i in built.initializer}
    last_convs = [made[i] for n in built.node if n.name in backend.float_outputs for i in n.input
                  if i in made and made[i].op_type == "Conv"]
    assert last_convs and all(conv.input[1] in initializers for conv in last_convs)
    assert all(conv.name in backend.float_outputs and made[conv.input[0]].op_type != "DequantizeLinear"
               for conv in last_convs)
    # Nothing left behind: every Quantize feeds something, every scale is read.
    read = {i for n in built.node for i in n.input}
    assert all(o in read for n in built.node if n.op_type == "QuantizeLinear" for o in n.output)
    assert all(i.name in read for i in built.initializer)



def test_a_silu_input_is_quantized_only_as_far_down_as_its_output_grid_reaches(referenced, sets, tmp_path):
    """A conv's output ahead of a SiLU keeps a grid for the values the SiLU passes on; its negative tail, which the
    SiLU squashes to zero, no longer coarsens it."""
    from onnx import numpy_helper

    from edge_deploy.calibration.qdq import OnnxQdqBackend
    from edge_deploy.calibration.ranges import collect_statistics, quantization_step, ranges_for

    calibration, _ = sets
    backend = OnnxQdqBackend(referenced["onnx"].path, tmp_path / "work")
    tensors = [load_tensor(p, calibration.preprocess)[0] for p in calibration.files[:16]]
    ranges = ranges_for(collect_statistics(backend.tap(), tensors), "minmax")
    assert len(backend.silu) > 10
    floored_tensor = next(t for t in backend.silu if ranges[t][0] < -8)

    def quantize_scales(path):
        built = onnx.load(str(path)).graph
        values = {i.name: numpy_helper.to_array(i) for i in built.initializer}
        return {n.input[0]: float(values[n.input[1]]) for n in built.node if n.op_type == "QuantizeLinear"}

    scales = quantize_scales(backend.build(ranges, [], tmp_path / "all-int8"))
    narrower = [t for t in backend.silu if t in scales
                and scales[t] < quantization_step(*ranges[t], False) * (1 - 1e-4)]
    assert floored_tensor in narrower
    # The SiLUs' own tensors keep the grid of their whole range (ops that only move values, like Slice, share
    # their input's grid in onnxruntime's quantizer, so they are left out).
    made = {o: n.op_type for n in onnx.load(str(backend.prepared)).graph.node for o in n.output}
    others = [t for t in scales if made.get(t) in ("Sigmoid", "Mul") and t in ranges]
    assert others and all(abs(scales[t] - quantization_step(*ranges[t], False)) <= 1e-4 * scales[t] for t in others)


def test_the_ranking_scores_each_node_by_what_reaches_the_outputs(referenced, sets, tmp_path):
    """Every quantizable node is ranked once, by the outputs' error with only it rounded (each anchor weighted by
    FP32's score there); a conv whose input range is cut to a hundredth comes first, and rounding one node of a
    float network costs the outputs far less."""
    from edge_deploy.calibration.qdq import OnnxQdqBackend, downstream_sensitivity
    from edge_deploy.calibration.ranges import collect_statistics, ranges_for

    calibration, _ = sets
    lines = []
    backend = OnnxQdqBackend(referenced["onnx"].path, tmp_path / "work", say=lines.append)
    tensors = [load_tensor(p, calibration.preprocess)[0] for p in calibration.files[:8]]
    ranges = ranges_for(collect_statistics(backend.tap(), tensors), "minmax")
    graph = onnx.load(str(backend.prepared)).graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name not in backend.fixed_float_units]
    victim = convs[len(convs) // 2]
    low, high = ranges[victim.input[0]]
    spoiled = {**ranges, victim.input[0]: (low / 100, high / 100)}
    # Fewer images than the ranking takes: it ranks on those, and says so.
    ranked = backend.rank_units(spoiled, [np.concatenate(tensors[:3])])
    assert "outputs on 3 calibration images" in backend.ranked_by
    assert len({r.unit for r in ranked}) == len(ranked) == backend.units()
    assert ranked[0].unit == victim.name and ranked[0].kind == "Conv"
    # A long step on a large model, so it says how far it has got on the stage's progress channel.
    assert lines[-1].startswith("ranking nodes (each alone rounded, by the outputs' error on 3 images): node "
                                f"{len(ranked)}/{len(ranked)} (")
    honest = {r.unit: r.sqnr_db for r in backend.rank_units(ranges, [np.concatenate(tensors[:8])])}
    assert "outputs on 4 calibration images" in backend.ranked_by
    assert ranked[0].sqnr_db < honest[victim.name] - 10
    # Nothing rounded, nothing ranked; a node the rules keep float is never ranked.
    nothing = downstream_sensitivity(backend.prepared, {}, [np.concatenate(tensors[:4])], False)
    assert nothing == [] and not set(backend.fixed_float_units) & set(honest)
    # The score is the network's outputs' error, not the node's own: the float model with that conv's input behind
    # a real Quantize/Dequantize pair and its weights rounded, scored the same way by hand.
    assert _outputs_with_one_node_rounded(backend.prepared, victim.name, ranges, np.concatenate(tensors[:4])) \
        == pytest.approx(honest[victim.name], abs=0.05)


def _outputs_with_one_node_rounded(prepared, node_name: str, ranges: dict, images: np.ndarray) -> float:
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edge_deploy.calibration.qdq import anchor_weights, weighted_sqnr_db

    model = onnx.load(str(prepared))
    node = next(n for n in model.graph.node if n.name == node_name)
    low, high = min(ranges[node.input[0]][0], 0.0), max(ranges[node.input[0]][1], 0.0)
    scale = (high - low) / 255
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "hand/scale"),
                                    numpy_helper.from_array(np.array(round(-low / scale), np.uint8), "hand/zero")])
    weight = next(i for i in model.graph.initializer if i.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(fake_quant_weight(numpy_helper.to_array(weight)), weight.name))
    model.graph.node.insert(list(model.graph.node).index(node), helper.make_node(
        "QuantizeLinear", [node.input[0], "hand/scale", "hand/zero"], ["hand/q"]))
    model.graph.node.insert(list(model.graph.node).index(node), helper.make_node(
        "DequantizeLinear", ["hand/q", "hand/scale", "hand/zero"], ["hand/dq"]))
    node.input[0] = "hand/dq"

    def run(proto) -> dict:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {session.get_inputs()[0].name: images})))

    reference, rounded = run(onnx.load(str(prepared))), run(model)
    weights = anchor_weights(reference)
    return min(weighted_sqnr_db(reference[name], rounded[name], weights) for name in reference)


def test_cpu_int8_upsamples_by_copying_pixels_with_the_same_outputs(referenced, sets, tmp_path):
    """onnxruntime's rules write each quantized nearest upsampling as channels-last copies (Tile): the same
    outputs to the bit as the Resize they replace, which rules without upsample_as_tile (TensorRT's) keep."""
    import dataclasses

    import onnxruntime as ort

    from edge_deploy.calibration.qdq import OnnxQdqBackend
    from edge_deploy.calibration.ranges import collect_statistics, ranges_for
    from edge_deploy.calibration.rules import ONNXRUNTIME_QDQ

    calibration, _ = sets
    tiled = OnnxQdqBackend(referenced["onnx"].path, tmp_path / "tiled")
    resized = OnnxQdqBackend(referenced["onnx"].path, tmp_path / "resized",
                             dataclasses.replace(ONNXRUNTIME_QDQ, upsample_as_tile=False))
    tensors = [load_tensor(p, calibration.preprocess)[0] for p in calibration.files[:8]]
    ranges = ranges_for(collect_statistics(tiled.tap(), tensors), "minmax")
    models = {"tiled": tiled.build(ranges, [], tmp_path / "tiled.onnx"),
              "resized": resized.build(ranges, [], tmp_path / "resized.onnx")}
    ops = {label: [n.op_type for n in onnx.load(str(path)).graph.node] for label, path in models.items()}
    upsamplings = ops["resized"].count("Resize")
    assert upsamplings == 2 and "Tile" not in ops["resized"]
    assert "Resize" not in ops["tiled"] and ops["tiled"].count("Tile") == upsamplings
    assert len(tiled.rewritten(models["tiled"])) == upsamplings and resized.rewritten(models["resized"]) == {}
    batch = np.concatenate(tensors)
    outputs = {label: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": batch})
               for label, path in models.items()}
    for tiled_output, resized_output in zip(outputs["tiled"], outputs["resized"]):
        np.testing.assert_array_equal(tiled_output, resized_output)
