"""The arm target's model on a real aarch64 ncnn build (PyPI's aarch64 wheel) under qemu-user.

Emulated timings mean nothing and are not looked at; the outputs must match x86 ncnn.
"""

import json
import shutil

import numpy as np
import pytest

from pipeline.artifacts import Artifact
from pipeline.engine import Engine
from pipeline.stages.export import ExportStage, max_relative_error, parity_inputs
from pipeline.stages.load import LoadStage
from targets import aarch64
from targets.arm import NcnnArm
from tests.conftest import EMBEDDED_MODEL

pytestmark = pytest.mark.skipif(aarch64.available() is not None, reason=str(aarch64.available()))
IMGSZ = 64  # emulation is slow; a small input keeps the run short


@pytest.fixture(scope="module")
def small_models(deploy_home, shapes_yaml, tmp_path_factory):
    """The embedded detector at a small input size, as FP32 and as INT8 ncnn models."""
    from calibration.preprocess import Preprocess, load_tensor
    from calibration.sets import calibration_set

    engine = Engine(tmp_path_factory.mktemp("a64-cache"))
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(deploy_home, IMGSZ), available).artifacts)
    available.update(engine.run(ExportStage(deploy_home, 17, True, 1e-4), available).artifacts)
    pre = Preprocess(IMGSZ)
    images = [load_tensor(p, pre)[0][0] for p in calibration_set(shapes_yaml, pre, 16, 0, min_recommended=1).files]
    folders = {}
    for precision in ("fp32", "int8"):
        folders[precision] = tmp_path_factory.mktemp(f"a64-ncnn-{precision}")
        NcnnArm().compile(available["onnx"].path, precision, folders[precision], images, "minmax")
    return folders


@pytest.mark.parametrize("cpu, precision, tolerance", [("cortex-a53", "fp32", 1e-3), ("cortex-a76", "fp16", 3e-2),
                                                        ("cortex-a53", "int8", 3e-2)])
def test_aarch64_ncnn_matches_x86(small_models, tmp_path, cpu, precision, tolerance):
    small_model = small_models["int8" if precision == "int8" else "fp32"]
    batch = parity_inputs(IMGSZ, count=1)
    reference = NcnnArm().runtime(small_model)(batch)
    job = tmp_path / "job"
    job.mkdir()
    for name in ("model.ncnn.param", "model.ncnn.bin"):
        shutil.copyfile(small_model / name, job / name)
    np.save(job / "input.npy", batch)
    (job / "job.json").write_text(json.dumps({
        "param": "model.ncnn.param", "bin": "model.ncnn.bin", "input": "input.npy", "precision": precision,
        "threads": 1, "warmup": 0, "runs": 1, "outputs": ["out0", "out1"], "save_outputs": True}))
    aarch64.run_runner("ncnn_probe", job, cpu)
    result = json.loads((job / "result.json").read_text())
    assert result["host"]["machine"] == "aarch64"
    with np.load(job / "outputs.npz") as produced:
        for index, ref in enumerate(reference):
            got = produced[f"arr_{index}"]
            assert got.shape == ref.shape[1:]
            assert max_relative_error(ref[0], got) < tolerance
