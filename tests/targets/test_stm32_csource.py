"""The stm32 target's C sources: generated deterministically, compiled for Cortex-M4/M7 with warnings as errors,
and run under qemu-system-arm on a real model output, where their detections must equal pipeline/detect.py's.

The model output is the embedded detector's FP32 ONNX on a real val image, quantized to int8 with per-tensor
scales chosen here (the decode only sees int8 maps and their scale/zero point; no .tflite is needed for it). The
model array is a placeholder byte string: what is checked about it is that it arrives intact and aligned.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from edge_deploy.calibration.preprocess import letterbox, load_tensor, read_image
from edge_deploy.pipeline import detect
from edge_deploy.pipeline.errors import ConfigError, InputError, ToolchainMissing
from edge_deploy.pipeline.stages.export import OUTPUT_NAMES
from edge_deploy.targets.stm32 import csource, emulate

OPS = ["CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MUL", "LOGISTIC", "CONCATENATION", "MAX_POOL_2D",
       "RESIZE_NEAREST_NEIGHBOR", "STRIDED_SLICE", "RESHAPE", "TRANSPOSE", "PAD", "SPLIT", "SUB"]
INPUT_QUANT = (1 / 255.0, -128)
PLACEHOLDER = b"\x1c\x00\x00\x00TFL3" + np.random.default_rng(7).integers(0, 256, 1003, dtype=np.uint8).tobytes()


def require_toolchain(run: bool = True) -> None:
    reason = emulate.missing(run)
    if reason:
        pytest.skip(f"{reason}; CI installs: apt-get install -y {' '.join(emulate.APT_PACKAGES)}")


def affine(x: np.ndarray) -> tuple[float, int]:
    """An asymmetric per-tensor int8 quantization covering x (non-zero zero points exercise the C dequantize)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0
    return scale, int(round(-128 - lo / scale))


@pytest.fixture(scope="module")
def outputs(exported, model_info, preprocess, shapes_yaml) -> dict:
    """int8 raw outputs (channels-first, as ONNX gives them) of the val image with the most detections."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    best = None
    for path in sorted((shapes_yaml.parent / "images" / "val").iterdir())[:4]:
        tensor, _ = load_tensor(path, preprocess)
        box, cls = (o[0] for o in session.run(list(OUTPUT_NAMES), {"images": tensor}))
        found = len(detect.postprocess(box, cls, model_info["imgsz"], model_info["strides"]))
        if best is None or found > best[0]:
            best = (found, box, cls, path)
    _, box, cls, path = best
    quants = {"box_dist": affine(box), "cls_logit": affine(cls)}
    return {"box": csource.quantize(box, *quants["box_dist"]), "cls": csource.quantize(cls, *quants["cls_logit"]),
            "quants": quants, "image": path}


def generate(out_dir, model_info, outputs, tmp_path_factory, **overrides):
    model = tmp_path_factory.mktemp("tflite") / "detector_int8.tflite"
    model.write_bytes(PLACEHOLDER)
    settings = dict(imgsz=model_info["imgsz"], strides=model_info["strides"], reg_max=model_info["reg_max"],
                    names=model_info["names"], input_quant=INPUT_QUANT, output_quants=outputs["quants"],
                    channels_last=False, arena_bytes=181_248, conf=0.25, iou=0.7, max_det=300, ops=OPS)
    settings.update(overrides)
    return csource.write_c_sources(model, out_dir, **settings)


@pytest.fixture(scope="module")
def harnesses(model_info, outputs, tmp_path_factory):
    """Built lazily per (layout, core, candidate cap): each build is a second or two of arm-none-eabi-gcc."""
    built = {}

    def get(channels_last: bool = False, core: str = "cortex-m4", max_candidates: int | None = None):
        require_toolchain(run=True)
        key = (channels_last, core, max_candidates)
        if key not in built:
            sources = tmp_path_factory.mktemp("csrc")
            generate(sources, model_info, outputs, tmp_path_factory, channels_last=channels_last,
                     max_candidates=max_candidates)
            elf = emulate.build_harness(sources, tmp_path_factory.mktemp("harness"), core)
            built[key] = emulate.Emulator(elf, sources, core)
        return built[key]

    return get


def reference(outputs, model_info, conf, iou, max_det, agnostic=False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pipeline/detect.py on the dequantized maps (agnostic: the same decode, NMS without the class shift)."""
    box = csource.dequantize(outputs["box"], *outputs["quants"]["box_dist"])
    cls = csource.dequantize(outputs["cls"], *outputs["quants"]["cls_logit"])
    imgsz, strides = model_info["imgsz"], model_info["strides"]
    if not agnostic:
        return detect.postprocess(box, cls, imgsz, strides, conf, iou, max_det), box, cls
    boxes, scores = detect.decode(box, cls, imgsz, strides)
    anchor_idx, cls_idx = np.nonzero(scores > conf)
    keep = detect.nms(boxes[anchor_idx], scores[anchor_idx, cls_idx], iou)[:max_det]
    found = np.concatenate([boxes[anchor_idx][keep], scores[anchor_idx, cls_idx][keep, None],
                            cls_idx[keep, None].astype(np.float32)], axis=1)
    return found, box, cls


def assert_same_detections(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=0, atol=1e-3)
    np.testing.assert_allclose(got[:, 4], want[:, 4], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Generation (no toolchain needed)


def test_sources_are_byte_identical_and_carry_the_model(model_info, outputs, tmp_path_factory):
    first = generate(tmp_path_factory.mktemp("a"), model_info, outputs, tmp_path_factory)
    second = generate(tmp_path_factory.mktemp("b"), model_info, outputs, tmp_path_factory)
    assert sorted(first) == sorted(csource.FILES)
    for name in csource.FILES:
        assert first[name].read_bytes() == second[name].read_bytes(), name

    cc = first["model_data.cc"].read_text()
    definition = re.search(r"alignas\(16\) const unsigned char g_detector_model_data\[\] = \{(.*?)\};", cc, re.S)
    assert definition, "model array must be defined alignas(16)"
    assert bytes(int(v, 16) for v in re.findall(r"0x[0-9a-f]{2}", definition.group(1))) == PLACEHOLDER
    assert f"g_detector_model_data_len = {len(PLACEHOLDER)}u;" in cc
    assert "#define DETECTOR_MODEL_ALIGNMENT 16" in first["model_data.h"].read_text()

    config = emulate.read_config(first["detector_config.h"].parent)
    imgsz, strides = model_info["imgsz"], model_info["strides"]
    assert config["DETECTOR_NUM_ANCHORS"] == len(detect.make_anchors(imgsz, strides)[0]) == outputs["box"].shape[1]
    assert config["DETECTOR_ARENA_BYTES"] == 181_248 and config["DETECTOR_MODEL_BYTES"] == len(PLACEHOLDER)
    assert config["DETECTOR_CLS_ZERO_POINT"] == outputs["quants"]["cls_logit"][1]
    text = first["detector_config.h"].read_text()
    assert all(f'"{name}"' in text for name in model_info["names"])
    table = re.search(r"#define DETECTOR_INPUT_TABLE \{(.*?)\}", text, re.S).group(1)
    assert [int(v) for v in re.findall(r"-?\d+", table)] == list(range(-128, 128))  # scale 1/255, zero point -128

    inference = first["inference.cc"].read_text()
    assert "cannot compile it on the host" in inference and f"constexpr int kOpCount = {len(OPS)};" in inference
    assert inference.count("resolver.Add") == len(OPS) and "resolver.AddResizeNearestNeighbor()" in inference
    readme = first["README.md"].read_text()
    assert "181248 bytes (177.0 KiB)" in readme and f"{len(PLACEHOLDER)} bytes" in readme


def test_generator_refuses_what_would_decode_garbage(model_info, outputs, tmp_path_factory, tmp_path):
    cases = [
        ({"ops": ["CONV_2D", "NON_MAX_SUPPRESSION_V5"]}, InputError, "NON_MAX_SUPPRESSION_V5"),
        ({"output_quants": {"box_dist": (0.1, 0)}}, ConfigError, "'cls_logit'"),
        ({"input_quant": (0.0, -128)}, ConfigError, "scale of 'input'"),
        ({"output_quants": {**outputs["quants"], "box_dist": (0.1, 300)}}, ConfigError, "zero point of 'box_dist'"),
        ({"conf": 1.5}, ConfigError, "conf"),
        ({"max_candidates": 70000}, ConfigError, "max_candidates"),
    ]
    for overrides, error, words in cases:
        with pytest.raises(error) as caught:
            generate(tmp_path / "out", model_info, outputs, tmp_path_factory, **overrides)
        assert words in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InputError, match="cannot read the TFLite model"):
        csource.write_c_sources(tmp_path / "missing.tflite", tmp_path / "out", imgsz=160, strides=[8, 16, 32],
                                reg_max=16, names=["a"], input_quant=INPUT_QUANT, output_quants=outputs["quants"],
                                channels_last=False, arena_bytes=1, conf=0.25, iou=0.7, max_det=1, ops=OPS)


def test_missing_toolchain_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainMissing, match="gcc-arm-none-eabi"):
        emulate.compile_sources(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------------
# On the (emulated) MCU


@pytest.mark.parametrize("core", ["cortex-m4", "cortex-m7"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["channels-first", "channels-last"])
def test_generated_c_compiles_with_warnings_as_errors(core, channels_last, model_info, outputs, tmp_path_factory,
                                                      tmp_path):
    require_toolchain(run=False)
    sources = generate(tmp_path / "src", model_info, outputs, tmp_path_factory, channels_last=channels_last)
    objects = emulate.compile_sources(sources["detector.c"].parent, tmp_path / "obj", core)
    assert [o.name for o in objects] == [f"detector.{core}.o", f"serial_probe.{core}.o", f"model_data.{core}.o"]
    assert all(o.stat().st_size > 0 for o in objects)


def test_c_decode_on_cortex_m4_equals_python(harnesses, outputs, model_info):
    emu = harnesses()
    # Low thresholds matter: with over a hundred candidates, many sharing an int8 score, a wrong tie-break or an
    # IoU test off by a little changes the answer (checked by breaking each in detector.c once).
    runs = [dict(conf=0.25, iou=0.7, max_det=300),  # the build's defaults
            dict(conf=0.01, iou=0.45, max_det=300),
            dict(conf=0.001, iou=0.3, max_det=300),
            dict(conf=0.001, iou=0.45, max_det=7),
            dict(conf=0.001, iou=0.5, max_det=300, agnostic=True)]
    for settings in runs:
        want, _, _ = reference(outputs, model_info, **settings)
        assert len(want) >= 2 or settings["max_det"] < 2
        got = emu.decode(outputs["box"], outputs["cls"], **settings)
        assert_same_detections(got, want)
    # The float entry point, fed the same dequantized maps.
    want, box, cls = reference(outputs, model_info, 0.01, 0.45, 300)
    assert_same_detections(emu.decode(box, cls, conf=0.01, iou=0.45, max_det=300), want)


def test_c_decode_reads_channels_last_outputs(harnesses, outputs, model_info):
    emu = harnesses(channels_last=True)
    want, _, _ = reference(outputs, model_info, 0.01, 0.45, 300)
    got = emu.decode(np.ascontiguousarray(outputs["box"].T), np.ascontiguousarray(outputs["cls"].T), conf=0.01,
                     iou=0.45, max_det=300)
    assert len(want) >= 2
    assert_same_detections(got, want)


def test_c_decode_on_cortex_m7_equals_python(harnesses, outputs, model_info):
    # mps2-an500 is qemu's Cortex-M7 board; the FPU flavour differs from the M4's, the answer must not.
    emu = harnesses(core="cortex-m7")
    want, _, _ = reference(outputs, model_info, 0.01, 0.45, 300)
    assert_same_detections(emu.decode(outputs["box"], outputs["cls"], conf=0.01, iou=0.45, max_det=300), want)


def test_full_candidate_workspace_keeps_the_best_scores(harnesses, outputs, model_info):
    emu = harnesses(max_candidates=12)
    box = csource.dequantize(outputs["box"], *outputs["quants"]["box_dist"])
    cls = csource.dequantize(outputs["cls"], *outputs["quants"]["cls_logit"])
    boxes, scores = detect.decode(box, cls, model_info["imgsz"], model_info["strides"])
    anchor_idx, cls_idx = np.nonzero(scores > 0.01)
    assert len(anchor_idx) > 12
    # The 12 best pairs, ties to the earlier (anchor, class), in Python's order: then detect.py's NMS.
    kept = np.sort(np.lexsort((np.arange(len(anchor_idx)), -scores[anchor_idx, cls_idx]))[:12])
    anchor_idx, cls_idx = anchor_idx[kept], cls_idx[kept]
    offset = cls_idx[:, None].astype(np.float32) * (float(model_info["imgsz"]) * 4)
    keep = detect.nms(boxes[anchor_idx] + offset, scores[anchor_idx, cls_idx], 0.45)
    want = np.concatenate([boxes[anchor_idx][keep], scores[anchor_idx, cls_idx][keep, None],
                           cls_idx[keep, None].astype(np.float32)], axis=1)
    assert_same_detections(emu.decode(outputs["box"], outputs["cls"], conf=0.01, iou=0.45, max_det=300), want)


def test_c_preprocessing_matches_the_letterbox(harnesses, outputs, preprocess):
    emu = harnesses()
    table = csource.input_table(*INPUT_QUANT)
    image = read_image(outputs["image"])
    size = preprocess.imgsz
    assert image.shape[1] > size  # the shapes val images are larger than the model input: a real downscale
    frames = {  # name: (BGR frame, exact?)
        "val image, downscaled": (image, True),
        "model width, shorter: padded only": (image[: size * 3 // 4, :size], True),
        "model size: as is": (np.resize(image, (size, size, 3)), True),
        # OpenCV rounds some upscaled values differently (half a grey level, down): off by one at most.
        "small frame, upscaled": (image[: size // 2, : size // 2], False),
    }
    for what, (bgr, exact) in frames.items():
        padded, lb = letterbox(bgr, preprocess)
        want = table[padded[..., ::-1]]
        got, placed = emu.preprocess(bgr[..., ::-1])
        assert (placed["pad_x"], placed["pad_y"]) == (lb.pad_x, lb.pad_y), what
        assert placed["ratio"] == pytest.approx(lb.ratio, rel=1e-6), what
        difference = np.abs(got.astype(np.int16) - want.astype(np.int16))
        if exact:
            assert difference.max() == 0, (what, int((difference > 0).sum()))
        else:
            assert difference.max() <= 1 and (difference > 0).mean() < 0.02, (what, difference.mean())


def test_model_array_is_aligned_and_intact_on_the_target(harnesses):
    emu = harnesses()
    address, data, workspace = emu.model()
    assert address % 16 == 0 and data == PLACEHOLDER
    # README's RAM figure for the decode workspace is the size the ARM compiler gives it.
    assert workspace == csource.workspace_bytes(emu.config["DETECTOR_MAX_CANDIDATES"])
