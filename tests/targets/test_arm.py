import json

import numpy as np
import pytest

from pipeline.errors import DeployError
from pipeline.stages.export import OUTPUT_NAMES, max_relative_error, parity_inputs
from targets.arm import NcnnArm


@pytest.fixture(scope="module")
def calibration_images(shapes_yaml, preprocess):
    from calibration.preprocess import load_tensor
    from calibration.sets import calibration_set

    chosen = calibration_set(shapes_yaml, preprocess, size=32, seed=0, min_recommended=1)
    return [load_tensor(p, preprocess)[0][0] for p in chosen.files]


@pytest.fixture(scope="module")
def compiled(exported, tmp_path_factory, calibration_images):
    artifacts = {}
    for precision in ("fp32", "fp16", "int8"):
        folder = tmp_path_factory.mktemp(f"ncnn-{precision}")
        NcnnArm().compile(exported["onnx"].path, precision, folder, calibration_images)
        artifacts[precision] = folder
    return artifacts


def test_pnnx_writes_a_param_bin_pair_stock_ncnn_loads(compiled):
    folder = compiled["fp32"]
    param = (folder / "model.ncnn.param").read_text().splitlines()
    assert param[0] == "7767517"
    layer_types = {line.split()[0] for line in param[2:]}
    assert {"Input", "Convolution", "Swish", "Concat"} <= layer_types
    assert json.loads((folder / "ncnn.json").read_text())["imgsz"] == 160
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

    from pipeline.int8 import sqnr_db

    batch = parity_inputs(160, count=2)
    session = ort.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    reference = session.run(list(OUTPUT_NAMES), {"images": batch})
    produced = NcnnArm().runtime(compiled["int8"])(batch)
    assert all(sqnr_db(ref, got) > 20 for ref, got in zip(reference, produced))


def test_wrong_input_size_is_a_clear_error(compiled):
    with pytest.raises(DeployError, match="compiled for 160x160 input, got 96x96"):
        NcnnArm().runtime(compiled["fp32"])(np.zeros((1, 3, 96, 96), np.float32))


def test_probe_runner_measures_ncnn(compiled, tmp_path):
    result = NcnnArm().probe(compiled["fp16"], {"warmup": 2, "runs": 50, "threads": 1,
                                               "input_tensor": parity_inputs(160, count=1)}, tmp_path / "job")
    assert result["runtime"].startswith("ncnn ") and result["runs"] == 50 and result["threads"] == 1
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert result["power"]["status"] == "unavailable"


def test_int8_is_written_as_ncnn2int8_would(compiled):
    from targets.ncnn_int8 import TAG_INT8, read_param

    folder = compiled["int8"]
    _, layers = read_param(folder / "model.ncnn.param")
    convs = [layer for layer in layers if layer.kind == "Convolution"]
    assert convs and all(layer.param("8") == "2" for layer in convs)
    assert int.from_bytes((folder / "model.ncnn.bin").read_bytes()[:4], "little") == TAG_INT8
    meta = json.loads((folder / "ncnn.json").read_text())["int8"]
    assert meta["method"] in ("minmax", "kl") and meta["layers"] == len(convs)
    assert (folder / "model.ncnn.bin").stat().st_size < (compiled["fp32"] / "model.ncnn.bin").stat().st_size / 3
    from calibration.formats import read_ncnn_table

    weights, activations = read_ncnn_table(folder / "model.table")
    assert set(weights) == set(activations) == {layer.name for layer in convs}


def test_int8_writer_round_trips_an_unquantized_model(compiled, tmp_path):
    from targets.ncnn_int8 import write_int8

    source = compiled["fp32"]
    write_int8(source / "model.ncnn.param", source / "model.ncnn.bin", tmp_path, {})
    assert (tmp_path / "model.ncnn.bin").read_bytes() == (source / "model.ncnn.bin").read_bytes()


def test_calibration_that_gives_zero_scales_is_refused(exported, tmp_path):
    from pipeline.errors import InputError

    black = [np.zeros((3, 160, 160), np.float32)] * 2
    with pytest.raises(InputError, match="all-zero input, so no INT8 scale exists"):
        NcnnArm().compile(exported["onnx"].path, "int8", tmp_path, black, method="minmax")


def test_operators_ncnn_cannot_run_are_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from pipeline.errors import ConversionMismatch

    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"]), helper.make_node("Hardmax", ["c"], ["box_dist"], axis=1),
         helper.make_node("Identity", ["c"], ["cls_logit"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("box_dist", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("cls_logit", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], [0.1] * 12)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    entry = model.metadata_props.add()
    entry.key, entry.value = "imgsz", "32"
    onnx.save(model, str(tmp_path / "hardmax.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionMismatch, match="ncnn has no layer for Hardmax"):
        NcnnArm().compile(tmp_path / "hardmax.onnx", "fp32", out)
    assert not (out / "model.ncnn.param").exists()


def test_int8_keeps_the_most_harmful_layers_fp32_to_meet_a_budget(exported, small_shapes_yaml, preprocess,
                                                                   calibration_images, tmp_path):
    from calibration.sets import labelled_split
    from pipeline.evaluate import coco_map
    from targets.cpu import ort_infer

    val = labelled_split(small_shapes_yaml, "val", preprocess)
    evaluate = lambda infer: coco_map(val, infer, [8, 16, 32], 4)["map50_95"]  # noqa: E731
    reference = evaluate(ort_infer(exported["onnx"].path))
    target = NcnnArm()

    def score(folder):
        return round((reference - evaluate(target.runtime(folder))) * 100, 2)

    target.compile(exported["onnx"].path, "int8", tmp_path, calibration_images, "entropy", score, budget=0.0)
    meta = json.loads((tmp_path / "ncnn.json").read_text())["int8"]
    trials = meta["trials"]
    assert meta["chosen_by"] == "validation mAP" and len(trials) > 1
    assert [len(t["float_layers"]) for t in trials[1:]] == [2 ** i for i in range(len(trials) - 1)]
    chosen = next(t for t in trials if t["float_layers"] == meta["float_layers"])
    assert chosen["drop_points"] <= 0.0 or chosen["drop_points"] == min(t["drop_points"] for t in trials)
    from targets.ncnn_int8 import read_param

    _, layers = read_param(tmp_path / "model.ncnn.param")
    kept = {layer.name for layer in layers if layer.kind == "Convolution" and layer.param("8") is None}
    assert kept == set(meta["float_layers"])
