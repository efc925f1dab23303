"""Target stm32: a real full-integer INT8 .tflite, run in TensorFlow Lite Micro and in LiteRT.

A narrow YOLOv8 (width 1/8 of the n scale, random seeded weights) at 96 px is
converted once through the target's own backend (onnx2tf + the TFLite
converter in a child interpreter); its accuracy is not the point here, its
operators, arena, flash and outputs are. Nothing is mocked: TFLM's Python
runtime runs the model with the arena the firmware would get.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.errors import ConfigError, InputError
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets.base import Profile

# Looked up, not imported: TensorFlow is loaded only by the conversion's child interpreter.
if any(importlib.util.find_spec(m) is None for m in ("tflite_micro", "onnx2tf", "tensorflow", "ai_edge_litert")):
    pytest.skip("target stm32 needs the stm32 extra (tflite-micro, onnx2tf, tensorflow-cpu, ai-edge-litert)",
                allow_module_level=True)

from edge_deploy.targets.stm32 import (  # noqa: E402
    META, MODEL_FILE, TFLM_BUILTINS, ArenaTooSmall, TfliteMicroStm32, check_input_size, describe_tflite, litert_infer,
    require_fit, smallest_arena, tflm_infer, tflm_interpreter)

IMGSZ = 96
# YOLOv8's layout at width 0.125 of its n scale: a detector small enough for any of the chips' flash.
TINY_YAML = """
nc: 4
depth_multiple: 0.33
width_multiple: 0.125
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]]
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]]
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]]
  - [-1, 3, C2f, [256]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 12], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 9], 1, Concat, [1]]
  - [-1, 3, C2f, [1024]]
  - [[15, 18, 21], 1, Detect, [nc]]
"""


@pytest.fixture(scope="module")
def tiny(engine, deploy_home, tmp_path_factory):
    from edge_deploy.pipeline.stages.export import ExportStage
    from edge_deploy.pipeline.stages.load import LoadStage

    source = tmp_path_factory.mktemp("stm32-model") / "yolov8-tiny.yaml"
    source.write_text(TINY_YAML)
    available = {"source": Artifact.of(source)}
    available.update(engine.run(LoadStage(deploy_home, IMGSZ, ["a", "b", "c", "d"]), available).artifacts)
    available.update(engine.run(ExportStage(deploy_home, 17, True, 1e-4), available).artifacts)
    info = ModelInfo.from_json(json.loads(available["model_info"].path.read_text()))
    return available["onnx"].path, info


@pytest.fixture(scope="module")
def images(small_shapes_yaml):
    from edge_deploy.calibration.preprocess import Preprocess, load_tensor

    files = sorted((small_shapes_yaml.parent / "images" / "train").iterdir())[:16]
    return np.concatenate([load_tensor(p, Preprocess(imgsz=IMGSZ, layout="NHWC"))[0] for p in files])


@pytest.fixture(scope="module")
def built(tiny, images, tmp_path_factory):
    """The quantize stage's view: the backend builds the one candidate; compile turns it into the artifact."""
    onnx_path, info = tiny
    work = tmp_path_factory.mktemp("stm32-work")
    target = TfliteMicroStm32()
    # Relative folders, as the default DEPLOY_HOME (./.deploy) makes every stage's: the conversion's child process
    # works in another folder and must still find its files.
    here = os.getcwd()
    os.chdir(work)
    try:
        backend = target.quant_backend("int8", onnx_path, info, Path("backend"),
                                       {"calibration_batches": [images[:8], images[8:]], "symmetric": False})
        candidate = work / backend.build(None, [], Path("candidates") / "000-minmax-float0")
    finally:
        os.chdir(here)
    artifact = tmp_path_factory.mktemp("stm32-artifact")
    converted = target.compile(onnx_path, candidate, "int8", info, artifact, profile="stm32h747")
    return {"backend": backend, "candidate": candidate, "artifact": artifact, "converted": converted,
            "onnx": onnx_path, "info": info, "work": work}


def test_the_artifact_is_full_integer_with_boxes_and_scores_on_their_own_scales(built):
    meta = json.loads((built["artifact"] / META).read_text())
    assert meta["input"]["dtype"] == "int8" and meta["input"]["shape"] == [1, IMGSZ, IMGSZ, 3]
    assert meta["box_dist"]["dtype"] == meta["cls_logit"]["dtype"] == "int8"
    assert meta["box_dist"]["quantization"]["scale"] != meta["cls_logit"]["quantization"]["scale"]
    # Pixels are 0..1: 1/255 per step loses nothing of an 8-bit image.
    assert meta["input"]["quantization"]["scale"] == pytest.approx(1 / 255, rel=1e-3)
    runtime = json.loads((built["artifact"] / "runtime.json").read_text())
    assert runtime["target"] == "stm32" and runtime["input"]["layout"] == "NHWC" and runtime["input"]["dtype"] == "int8"
    assert runtime["quantization"]["cls_logit"] == meta["cls_logit"]["quantization"]
    assert runtime["arena_bytes"] == meta["arena_bytes"] == built["converted"].notes["arena_bytes"]
    assert set(built["converted"].notes["operators"]) <= TFLM_BUILTINS


def test_tflm_and_litert_give_the_same_outputs_and_follow_the_fp32_model(built, images):
    from edge_deploy.calibration.onnxrt import ort_infer
    from edge_deploy.calibration.ranges import sqnr_db

    meta = json.loads((built["artifact"] / META).read_text())
    batch = images[:4]
    tflm = TfliteMicroStm32().runtime(built["artifact"])(batch)
    litert = litert_infer(built["artifact"] / MODEL_FILE, meta)(batch)
    optimized = litert_infer(built["artifact"] / MODEL_FILE, meta, kernels="optimized")(batch)
    reference = ort_infer(built["onnx"])(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    for role, ours, theirs, fast, fp32 in zip(("box_dist", "cls_logit"), tflm, litert, optimized, reference):
        assert ours.shape == fp32.shape
        # The same INT8 arithmetic in two runtimes: identical, to the last step.
        assert np.array_equal(ours, theirs), role
        # XNNPACK requantizes with its own rounding: close to TFLM, not equal.
        assert sqnr_db(ours, fast) > 20, role
        assert sqnr_db(fp32, ours) > 10, role


def test_the_measured_arena_runs_the_model_and_much_less_does_not(built, images):
    notes = built["converted"].notes
    arena = notes["arena_bytes"]
    assert 0 < arena <= notes["arena_reported_bytes"] + 4096
    meta = json.loads((built["artifact"] / META).read_text())
    model = built["artifact"] / MODEL_FILE
    tflm_infer(model, arena, {**meta})(images[:1])
    with pytest.raises(ArenaTooSmall):
        tflm_interpreter(model, arena * 3 // 4)
    assert notes["flash_model_bytes"] == model.stat().st_size
    assert "not measured" in notes["latency"]


def test_the_arena_search_finds_the_smallest_size_to_its_step_and_gives_up_past_its_limit():
    asked = []

    def runs(size: int) -> bool:
        asked.append(size)
        return size >= 1000

    assert smallest_arena(runs, 512, 1 << 20) == 1008  # 1000 rounded up to TFLM's 16-byte alignment
    assert all(size % 16 == 0 for size in asked)
    assert smallest_arena(lambda size: False, 512, 4096) is None


def test_fit_is_recorded_for_every_chip_and_a_chip_too_small_is_refused_with_the_numbers(built):
    notes = built["converted"].notes
    assert notes["fits"]["stm32h747"]["fits"] and set(notes["fits"]) == {"stm32h747", "stm32f746", "stm32l4r9"}
    tiny_chip = Profile("tiny-chip", "a chip too small", facts={"flash_bytes": 64 * 1024, "sram_bytes": 48 * 1024})
    with pytest.raises(ConfigError) as refused:
        require_fit(tiny_chip, notes["arena_bytes"], notes["flash_model_bytes"], IMGSZ)
    message = str(refused.value)
    assert "\n" not in message and "does not fit tiny-chip" in message
    assert "flash" in message and "arena" in message and "KiB" in message
    assert "--prune" in message and "--imgsz" in message


def test_a_profile_the_model_does_not_fit_stops_compile_before_anything_is_written(built, tmp_path):
    small = type("SmallChips", (TfliteMicroStm32,), {"profiles": (
        Profile("stm32-small", "too small", facts={"flash_bytes": 96 * 1024, "sram_bytes": 64 * 1024}),)})
    with pytest.raises(ConfigError, match="does not fit stm32-small"):
        small().compile(built["onnx"], built["candidate"], "int8", built["info"], tmp_path, profile="stm32-small")
    assert list(tmp_path.iterdir()) == []


def test_an_operator_tflm_lacks_is_named_with_its_layer_before_any_conversion(tmp_path):
    nodes = [helper.make_node("Conv", ["images", "w"], ["features"], name="backbone/conv"),
             helper.make_node("TopK", ["features", "k"], ["top", "indices"], name="head/topk", axis=-1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("top", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], np.ones(12, np.float32).tolist()),
         helper.make_tensor("k", TensorProto.INT64, [1], [5])])
    path = tmp_path / "topk.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    info = ModelInfo("topk.onnx", "custom", "detect", ["a"], 96, [8, 16, 32], 16, 12)
    with pytest.raises(InputError) as refused:
        TfliteMicroStm32().quant_backend("int8", path, info, tmp_path / "work", {"calibration_batches": []})
    message = str(refused.value)
    assert "'head/topk'" in message and "TopK" in message and "TOPK_V2" in message and "\n" not in message
    assert not (tmp_path / "work").exists()  # refused before any conversion work


def test_float_models_and_input_sizes_off_the_stride_are_refused(built, tmp_path, monkeypatch, deploy_home):
    from edge_deploy.pipeline.build import run_build
    from edge_deploy.pipeline.config import BuildConfig
    from edge_deploy.targets import TARGETS

    monkeypatch.setitem(TARGETS, "stm32", "edge_deploy.targets.stm32:TfliteMicroStm32")
    with pytest.raises(ConfigError, match="target stm32 supports precisions int8, not fp32"):
        run_build(BuildConfig(target="stm32", precision="fp32", output=tmp_path / "dist"), deploy_home)
    assert not (tmp_path / "dist").exists()
    float_model = float_tflite(tmp_path / "float.tflite")
    with pytest.raises(InputError, match="float32 input tensor; the target runs full-integer INT8 models only"):
        TfliteMicroStm32().compile(built["onnx"], float_model, "int8", built["info"], tmp_path / "a")
    with pytest.raises(InputError, match="takes a full-integer INT8 model"):
        TfliteMicroStm32().compile(built["onnx"], None, "fp32", built["info"], tmp_path / "b")
    with pytest.raises(ConfigError, match="input size 100 is not a multiple of the model's largest stride 32; use 96 or 128"):
        check_input_size(100, [8, 16, 32])
    with pytest.warns(UserWarning, match="outside 96..192"):
        check_input_size(320, [8, 16, 32])
    check_input_size(128, [8, 16, 32])


def test_the_tflite_is_described_from_its_own_flatbuffer(built):
    described = describe_tflite(built["artifact"] / MODEL_FILE)
    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert sorted(described["box_dist"]["shape"]) == sorted([1, anchors, 64])
    assert sorted(described["cls_logit"]["shape"]) == sorted([1, anchors, 4])
    assert {"CONV_2D", "LOGISTIC", "MUL", "CONCATENATION"} <= set(described["operators"])


def float_tflite(path):
    """A TFLite flatbuffer with float32 input and outputs (no operators needed: it is refused on its tensors)."""
    import flatbuffers
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    tensors = []
    for name, shape in (("images", [1, IMGSZ, IMGSZ, 3]), ("box_dist", [1, 64, anchors]),
                        ("cls_logit", [1, 4, anchors])):
        tensor = schema.TensorT()
        tensor.name, tensor.shape, tensor.type, tensor.buffer = name, shape, schema.TensorType.FLOAT32, 0
        tensors.append(tensor)
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [1, 2], []
    model = schema.ModelT()
    model.version, model.buffers, model.subgraphs, model.operatorCodes = 3, [schema.BufferT()], [graph], []
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


def test_a_board_job_names_the_model_for_the_firmware_and_no_python_device_runs_it(built, tmp_path):
    from edge_deploy.pipeline.errors import DeviceError
    from edge_deploy.targets.transports import stage_job
    from edge_deploy.targets.transports.local import LocalTransport
    from edge_deploy.targets.transports.serial import job_request

    target = TfliteMicroStm32()
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    target.prepare_job(built["artifact"], {"warmup": 2, "runs": 10, "threads": None}, probe_tensor(), job_dir)
    job = stage_job(job_dir, target.runner, target.runner_support, 60)
    # What the serial transport sends the board: the sha256 its firmware must have been built from.
    request = job_request(job, "nucleo-h7")
    assert request["model"] == MODEL_FILE and request["model_sha256"] == job["files"][MODEL_FILE]
    assert request["runner_version"] == 1 and request["arena_bytes"] == built["converted"].notes["arena_bytes"]
    fresh = tmp_path / "local"
    fresh.mkdir()
    target.prepare_job(built["artifact"], {"warmup": 1, "runs": 1, "threads": None}, probe_tensor(), fresh)
    with pytest.raises(DeviceError, match="cannot run this artifact: an stm32 artifact runs inside the board's"):
        LocalTransport().run(fresh, target.runner, target.runtime_packages, timeout=60)


def probe_tensor():
    return np.zeros((1, IMGSZ, IMGSZ, 3), np.float32)


def test_a_model_too_big_for_the_chip_is_refused_before_quantizing(tmp_path, deploy_home):
    """3.2 M parameters need at least 3.2 MB of flash as INT8: the build says so right after loading the model,
    not after minutes of conversion."""
    from tests.conftest import run_deploy

    done = run_deploy(["build", "--target", "stm32"], tmp_path, deploy_home)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert "stm32: the model cannot fit stm32h747" in done.stderr and "fewer weights (--prune" in done.stderr
    assert "quantize" not in done.stdout and "load: done" in done.stdout
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
