import json

import numpy as np
import pytest

from edge_deploy.pipeline.errors import DeployError
from edge_deploy.pipeline.stages.export import OUTPUT_NAMES, max_relative_error, parity_inputs
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.arm import NcnnArm


@pytest.fixture(scope="module")
def calibration_images(shapes_yaml, preprocess):
    from edge_deploy.calibration.preprocess import load_tensor
    from edge_deploy.calibration.sets import calibration_set

    chosen = calibration_set(shapes_yaml, preprocess, size=32, seed=0, min_recommended=1)
    return [load_tensor(p, preprocess)[0][0] for p in chosen.files]


@pytest.fixture(scope="module")
def info(model_info):
    return ModelInfo.from_json(model_info)


def int8_model(exported, info, calibration_images, work, method="entropy", float_layers=()):
    """The arm target's INT8 backend as the quantize stage drives it: statistics through ncnn, then a build."""
    from edge_deploy.calibration.ranges import collect_statistics, ranges_for

    backend = NcnnArm().quant_backend("int8", exported["onnx"].path, info, work / "backend", {})
    stats = collect_statistics(backend.tap(), [np.stack(calibration_images)])
    return backend, backend.build(ranges_for(stats, method, symmetric=True), list(float_layers), work / "int8")


@pytest.fixture(scope="module")
def compiled(exported, info, tmp_path_factory, calibration_images):
    artifacts = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path_factory.mktemp(f"ncnn-{precision}")
        NcnnArm().compile(exported["onnx"].path, None, precision, info, folder)
        artifacts[precision] = folder
    _, candidate = int8_model(exported, info, calibration_images, tmp_path_factory.mktemp("ncnn-int8-work"))
    folder = tmp_path_factory.mktemp("ncnn-int8")
    NcnnArm().compile(exported["onnx"].path, candidate, "int8", info, folder)
    artifacts["int8"] = folder
    return artifacts


def test_pnnx_writes_a_param_bin_pair_stock_ncnn_loads(compiled):
    folder = compiled["fp32"]
    param = (folder / "model.ncnn.param").read_text().splitlines()
    assert param[0] == "7767517"
    layer_types = {line.split()[0] for line in param[2:]}
    assert {"Input", "Convolution", "Swish", "Concat"} <= layer_types
    assert json.loads((folder / "ncnn.json").read_text())["imgsz"] == 160
    runtime = json.loads((folder / "runtime.json").read_text())
    assert runtime["input"] == {"name": "in0", "layout": "NCHW", "imgsz": 160, "dtype": "float32", "scale": "1/255",
                                "colour": "RGB", "letterbox_pad": 114}
    assert (compiled["fp16"] / "model.ncnn.bin").stat().st_size < (folder / "model.ncnn.bin").stat().st_size * 0.6


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_ncnn_outputs_match_onnxruntime(compiled, exported, precision, tolerance):
    import onnxruntime as ort

    batch = parity_inputs(160, count=2)
    session = ort.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    reference = session.run(list(OUTPUT_NAMES), {"images": batch})
    produced = NcnnArm().runtime(compiled[precision])(batch)
    for ref, got in zip(reference, produced):
        assert got.shape == ref.shape
        assert max_relative_error(ref, got) < tolerance


def test_int8_outputs_stay_close_to_fp32(compiled, exported):
    import onnxruntime as ort

    from edge_deploy.calibration.ranges import sqnr_db

    batch = parity_inputs(160, count=2)
    session = ort.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    reference = session.run(list(OUTPUT_NAMES), {"images": batch})
    produced = NcnnArm().runtime(compiled["int8"])(batch)
    assert all(sqnr_db(ref, got) > 20 for ref, got in zip(reference, produced))


def test_wrong_input_size_is_a_clear_error(compiled):
    with pytest.raises(DeployError, match="compiled for 160x160 input, got 96x96"):
        NcnnArm().runtime(compiled["fp32"])(np.zeros((1, 3, 96, 96), np.float32))


def test_probe_runner_measures_ncnn_through_the_local_transport(compiled, tmp_path):
    from edge_deploy.targets.transports.local import LocalTransport

    target = NcnnArm()
    job = tmp_path / "job"
    job.mkdir()
    target.prepare_job(compiled["fp16"], {"warmup": 2, "runs": 50, "threads": 1}, parity_inputs(160, count=1), job)
    result = LocalTransport().run(job, target.runner, target.runtime_packages)
    assert result.runtime.startswith("ncnn ") and result.runs == 50 and result.threads == 1
    assert result.device["transport"]["packages"]["ncnn"] == result.runtime.split()[1]
    latency = result.latency_ms
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert len(result.samples_ms) == 50 and max(result.samples_ms) == latency["max"] and latency["std"] >= 0
    assert result.first_inference_ms > 0 and result.job["precision"] == "fp16" and "files" not in result.job
    assert set(result.device["state"]) == {"start", "end"}
    assert result.power["status"] == "unavailable" and result.power["reason"]


@pytest.mark.parametrize("reference_precision", ["fp32", "fp16"])
def test_a_paired_job_times_int8_and_another_build_in_one_process(compiled, tmp_path, reference_precision):
    """The probe's FP32 build, or any other build bench --against names: the reference's own precision is read
    from its build and reported."""
    from edge_deploy.pipeline.stages.probe import split_pair
    from edge_deploy.targets.transports.local import LocalTransport

    target = NcnnArm()
    job = tmp_path / "job"
    job.mkdir()
    target.prepare_job(compiled["int8"], {"warmup": 2, "runs": 50, "threads": 1}, parity_inputs(160, count=1), job,
                       reference_dir=compiled[reference_precision])
    reference, result = split_pair(LocalTransport().run(job, target.runner, target.runtime_packages))
    assert (reference.extra["precision"], result.extra["precision"]) == (reference_precision, "int8")
    assert result.extra["interleaved_block"] > 0 and result.job["reference"]["param"] == "reference.model.ncnn.param"
    for timed in (reference, result):
        assert timed.runtime.startswith("ncnn ") and timed.runs == 50 and len(timed.samples_ms) == 50
        assert 0 < timed.latency_ms["p50"] <= timed.latency_ms["p90"] and timed.first_inference_ms > 0
        assert timed.power["status"] == "unavailable" and timed.power["reason"]
    # The FP32 build loads second, into a process that already holds the artifact, and says so.
    assert reference.load_ms > 0 and result.load_ms > 0 and "with" in reference.memory_mb
    assert reference.memory_mb["rss_before_load"] > result.memory_mb["rss_before_load"]


def test_int8_is_written_as_ncnn2int8_would(compiled):
    from edge_deploy.targets.arm.ncnn_int8 import TAG_INT8, output_convs, read_param

    folder = compiled["int8"]
    _, layers = read_param(folder / "model.ncnn.param")
    # The box and class convs of each of the three scales read float inputs (QuantRules.float_output_layers).
    outputs = output_convs(layers, [NcnnArm.io_names["box_dist"], NcnnArm.io_names["cls_logit"]])
    assert len(outputs) == 6
    assert all(layer.param("8") is None for layer in layers if layer.name in outputs)
    convs = [layer for layer in layers if layer.kind == "Convolution" and layer.name not in outputs]
    assert convs and all(layer.param("8") == "2" for layer in convs)
    assert int.from_bytes((folder / "model.ncnn.bin").read_bytes()[:4], "little") == TAG_INT8
    assert (folder / "model.ncnn.bin").stat().st_size < (compiled["fp32"] / "model.ncnn.bin").stat().st_size / 3
    from edge_deploy.calibration.formats import read_ncnn_table

    weights, activations = read_ncnn_table(folder / "model.table")
    assert set(weights) == set(activations) == {layer.name for layer in convs}


def test_int8_writer_round_trips_an_unquantized_model(compiled, tmp_path):
    from edge_deploy.targets.arm.ncnn_int8 import write_int8

    source = compiled["fp32"]
    write_int8(source / "model.ncnn.param", source / "model.ncnn.bin", tmp_path, {})
    assert (tmp_path / "model.ncnn.bin").read_bytes() == (source / "model.ncnn.bin").read_bytes()


def test_calibration_that_gives_zero_scales_is_refused(exported, info, tmp_path):
    from edge_deploy.pipeline.errors import InputError

    black = [np.zeros((3, 160, 160), np.float32)] * 2
    with pytest.raises(InputError, match="all-zero input, so no INT8 scale exists"):
        int8_model(exported, info, black, tmp_path, method="minmax")


def test_operators_ncnn_cannot_run_are_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_deploy.pipeline.errors import ConversionMismatch

    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"]), helper.make_node("Hardmax", ["c"], ["box_dist"], axis=1),
         helper.make_node("Identity", ["c"], ["cls_logit"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("box_dist", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("cls_logit", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], [0.1] * 12)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "hardmax.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    small = ModelInfo("hardmax.onnx", "test", "detect", ["a"], 32, [8, 16, 32], 16, 12)
    with pytest.raises(ConversionMismatch, match="ncnn has no layer for Hardmax"):
        NcnnArm().compile(tmp_path / "hardmax.onnx", None, "fp32", small, out)
    assert not (out / "model.ncnn.param").exists()


def test_int8_keeps_the_most_harmful_layers_fp32_to_meet_a_budget(exported, info, small_shapes_yaml, preprocess,
                                                                   calibration_images, tmp_path):
    """The shared search drives the ncnn backend: layers that hurt most alone stay FP32, 1, 2, 4, ... of them."""
    from edge_deploy.calibration.onnxrt import ort_infer
    from edge_deploy.calibration.ranges import collect_statistics
    from edge_deploy.calibration.search import search
    from edge_deploy.calibration.sets import labelled_split
    from edge_deploy.pipeline.evaluate import coco_map
    from edge_deploy.targets.arm.ncnn_int8 import read_param

    val = labelled_split(small_shapes_yaml, "val", preprocess)
    evaluate = lambda infer: coco_map(val, infer, [8, 16, 32], 4)["map50_95"]  # noqa: E731
    reference = evaluate(ort_infer(exported["onnx"].path))
    backend = NcnnArm().quant_backend("int8", exported["onnx"].path, info, tmp_path / "backend", {})
    stats = collect_statistics(backend.tap(), [np.stack(calibration_images)])
    outcome = search(backend, stats, ("entropy",), True,
                     lambda built: round((reference - evaluate(backend.runtime(built))) * 100, 2), 0.0,
                     [np.stack(calibration_images[:8])], tmp_path / "candidates")
    trials = outcome.candidates
    assert len(trials) > 1 and len(outcome.sensitivity) == backend.units()
    assert [len(t.float_units) for t in trials[1:]] == [2 ** i for i in range(len(trials) - 1)]
    assert outcome.within_budget or outcome.best.drop_points == min(t.drop_points for t in trials)
    _, layers = read_param(outcome.best.built / "model.ncnn.param")
    kept = {layer.name for layer in layers if layer.kind == "Convolution" and layer.param("8") is None}
    assert kept == {*outcome.best.float_units, *backend.fixed_float_units} and len(backend.fixed_float_units) == 6


def test_ranking_scores_each_layer_by_what_ncnn_gives_at_the_outputs(exported, info, calibration_images,
                                                                      tmp_path):
    """Every convolution is ranked once, by the outputs' error with only it in INT8, simulated in the FP32 ONNX
    graph; a layer whose input range is cut to a hundredth (so INT8 clips almost everything) comes first, and a
    layer's score is what ncnn itself gives with that layer alone in INT8."""
    from edge_deploy.calibration.qdq import anchor_weights, weighted_sqnr_db
    from edge_deploy.calibration.ranges import collect_statistics, ranges_for

    lines = []
    backend = NcnnArm().quant_backend("int8", exported["onnx"].path, info, tmp_path / "backend",
                                      {"progress": lines.append})
    ranges = ranges_for(collect_statistics(backend.tap(), [np.stack(calibration_images[:8])]), "minmax", True)
    victim = backend.convs[len(backend.convs) // 2]
    low, high = ranges[victim.bottoms[0]]
    spoiled = {**ranges, victim.bottoms[0]: (low / 100, high / 100)}
    images = np.stack(calibration_images[:4])
    ranked = backend.rank_units(spoiled, [images])
    assert sorted(r.unit for r in ranked) == sorted(layer.name for layer in backend.convs)
    assert ranked[0].unit == victim.name
    assert lines[-1].startswith("ranking layers (each alone rounded, by the outputs' error on 4 images): layer "
                                f"{len(ranked)}/{len(ranked)} (")
    honest = {r.unit: r.sqnr_db for r in backend.rank_units(ranges, [images])}
    assert ranked[0].sqnr_db < honest[victim.name] - 10
    assert "outputs on 4 calibration images" in backend.ranked_by
    assert not (tmp_path / "backend" / "ranking").exists()

    fp32 = NcnnArm().runtime(backend.fp32_dir, threads=1)(images)
    weights = anchor_weights({"cls_logit": fp32[1]})
    for name, layer_ranges, score in ((victim.name, spoiled, ranked[0].sqnr_db),
                                      (min(honest, key=honest.get), ranges, min(honest.values()))):
        alone = backend.build(layer_ranges, [c.name for c in backend.convs if c.name != name], tmp_path / name)
        outputs = backend.runtime(alone)(images)
        assert min(weighted_sqnr_db(r, c, weights) for r, c in zip(fp32, outputs)) == pytest.approx(score, abs=0.1)


def test_a_layer_whose_weights_the_graph_does_not_have_is_refused_by_the_ranking(exported, info, tmp_path):
    """The ranking finds each ncnn layer in the ONNX graph by its weights; a graph without them (not the one pnnx
    converted) is a typed error naming the layer, not a ranking of other layers."""
    import onnx
    from onnx import numpy_helper

    from edge_deploy.pipeline.errors import ConversionMismatch
    from edge_deploy.targets.arm.ncnn_int8 import onnx_convs, read_param

    backend = NcnnArm().quant_backend("int8", exported["onnx"].path, info, tmp_path / "backend", {})
    found = onnx_convs(backend.layers, backend.fp32_dir / "model.ncnn.bin", exported["onnx"].path)
    _, layers = read_param(backend.fp32_dir / "model.ncnn.param")
    assert set(found) == {layer.name for layer in layers if layer.kind == "Convolution"}
    assert len({node.name for node in found.values()}) == len(found)
    model = onnx.load(str(exported["onnx"].path))
    victim = backend.convs[3]
    weight = next(i for i in model.graph.initializer if i.name == found[victim.name].input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(ConversionMismatch, match=f"ncnn layer {victim.name}: no Conv of other.onnx"):
        onnx_convs(backend.layers, backend.fp32_dir / "model.ncnn.bin", tmp_path / "other.onnx")


def test_calibration_runs_each_image_once_and_gives_the_same_statistics_every_run(exported, info, calibration_images,
                                                                                   tmp_path):
    """Two batches through collect_statistics: one inference per image (its progress line counts them), extremes
    of the full tensors, a bounded sample for the histograms, and the same numbers from a second run."""
    from edge_deploy.calibration.ranges import collect_statistics
    from edge_deploy.targets.arm import Progress, SampledTap, ncnn_net, runner
    from edge_deploy.targets.arm.workers import NcnnInProcess

    batches = [np.stack(calibration_images[:8]), np.stack(calibration_images[8:16])]
    backend = NcnnArm().quant_backend("int8", exported["onnx"].path, info, tmp_path / "backend",
                                      {"calibration_batches": batches})
    per_image = 4096  # below the largest convolution inputs at 160 px, so those are sampled
    blobs = list(dict.fromkeys(layer.bottoms[0] for layer in backend.convs))
    runs = []
    for _ in range(2):
        lines = []
        tap = SampledTap(NcnnInProcess(ncnn_net(backend.fp32_dir, "fp32", threads=1)), blobs,
                         Progress("calibrating: image", 16, lines.append), per_image)
        runs.append(collect_statistics(tap, batches))
        assert lines[-1].startswith("calibrating: image 16/16") and not any("image 17" in line for line in lines)
    first, second = runs
    assert first.keys() == second.keys() == set(blobs)
    for name in blobs:
        assert (first[name].lowest, first[name].highest) == (second[name].lowest, second[name].highest)
        assert np.array_equal(first[name].hist, second[name].hist)
        assert np.array_equal(first[name].abs_hist, second[name].abs_hist)

    net = ncnn_net(backend.fp32_dir, "fp32", threads=1)
    full = [runner.run_once(net, image, blobs) for image in calibration_images[:16]]
    sizes = [full[0][i].size for i in range(len(blobs))]
    assert max(sizes) > per_image >= min(sizes)
    for i, name in enumerate(blobs):
        assert first[name].lowest == min(float(values[i].min()) for values in full)
        assert first[name].highest == max(float(values[i].max()) for values in full)
        # Every image contributes the same number of values: its whole tensor or the sample, plus two extremes
        # per batch.
        assert first[name].hist.sum() == 16 * min(sizes[i], per_image) + 2 * len(batches)


def test_worker_processes_give_what_one_process_gives(exported, info, calibration_images, shapes_yaml, preprocess,
                                                      tmp_path, monkeypatch):
    """Scoring and calibration spread over processes: the same outputs, the same statistics, images in order."""
    import shutil

    from edge_deploy.calibration.ranges import collect_statistics
    from edge_deploy.calibration.sets import calibration_set
    from edge_deploy.pipeline.evaluate import run_detections
    from edge_deploy.targets.arm import Progress, SampledTap, ncnn_net, workers
    from edge_deploy.targets.arm.workers import NcnnInProcess, NcnnWorkers

    batches = [np.stack(calibration_images[:8]), np.stack(calibration_images[8:12])]
    backend = NcnnArm().quant_backend("int8", exported["onnx"].path, info, tmp_path / "backend",
                                      {"calibration_batches": batches})
    blobs = list(dict.fromkeys(layer.bottoms[0] for layer in backend.convs))
    pool = NcnnWorkers(backend.fp32_dir, "fp32", 2)
    alone = collect_statistics(SampledTap(NcnnInProcess(ncnn_net(backend.fp32_dir, "fp32", threads=1)), blobs,
                                          Progress("calibrating: image", 12, lambda _: None), 4096), batches)
    spread = collect_statistics(SampledTap(pool, blobs, Progress("calibrating: image", 12, lambda _: None), 4096),
                                batches)
    for name in blobs:
        assert (alone[name].lowest, alone[name].highest) == (spread[name].lowest, spread[name].highest)
        assert np.array_equal(alone[name].hist, spread[name].hist)

    # The scoring runtime at a size that takes workers (the threshold lowered to this model's size).
    monkeypatch.setattr(workers, "MIN_IMGSZ", info.imgsz)
    write_fp32 = tmp_path / "fp32-artifact"
    shutil.copytree(backend.fp32_dir, write_fp32)
    infer = NcnnArm().runtime(write_fp32, threads=1)
    single = NcnnArm().runtime(write_fp32, threads=2)
    assert infer.images_at_once == 2 * single.images_at_once  # two processes, each given as many as one net
    split = calibration_set(shapes_yaml, preprocess, size=12, seed=0, min_recommended=1)
    ours, reference = run_detections(split, infer, info.strides), run_detections(split, single, info.strides)
    assert all(np.array_equal(a, b) for a, b in zip(ours.per_image, reference.per_image))
