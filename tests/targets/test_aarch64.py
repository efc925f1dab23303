"""The arm target's model on a real aarch64 ncnn build (PyPI's aarch64 wheel), through the qemu transport.

Emulated timings mean nothing and are not looked at; the outputs must match x86 ncnn.
"""

import numpy as np
import pytest

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.ranges import collect_statistics, ranges_for
from edge_deploy.calibration.sets import calibration_set
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.stages.export import ExportStage, max_relative_error, parity_inputs
from edge_deploy.pipeline.stages.load import LoadStage
from edge_deploy.targets.arm import NcnnArm
from edge_deploy.targets.transports import qemu
from tests.conftest import EMBEDDED_MODEL

pytestmark = pytest.mark.skipif(qemu.available() is not None, reason=str(qemu.available()))
IMGSZ = 64  # emulation is slow; a small input keeps the run short


@pytest.fixture(scope="module")
def small_models(deploy_home, shapes_yaml, tmp_path_factory):
    """The embedded detector at a small input size, as FP32 and as INT8 ncnn models."""
    import json

    engine = Engine(tmp_path_factory.mktemp("a64-cache"))
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(deploy_home, IMGSZ), available).artifacts)
    available.update(engine.run(ExportStage(deploy_home, 17, True, 1e-4), available).artifacts)
    info = ModelInfo.from_json(json.loads(available["model_info"].path.read_text()))
    pre = Preprocess(IMGSZ)
    images = [load_tensor(p, pre)[0][0] for p in calibration_set(shapes_yaml, pre, 16, 0, min_recommended=1).files]
    target = NcnnArm()
    folders = {"fp32": tmp_path_factory.mktemp("a64-ncnn-fp32"), "int8": tmp_path_factory.mktemp("a64-ncnn-int8")}
    target.compile(available["onnx"].path, None, "fp32", info, folders["fp32"])
    work = tmp_path_factory.mktemp("a64-int8-work")
    backend = target.quant_backend("int8", available["onnx"].path, info, work / "backend", {})
    stats = collect_statistics(backend.tap(), [np.stack(images)])
    candidate = backend.build(ranges_for(stats, "minmax", symmetric=True), [], work / "candidate")
    target.compile(available["onnx"].path, candidate, "int8", info, folders["int8"])
    return folders


@pytest.mark.parametrize("cpu, precision, tolerance", [("cortex-a53", "fp32", 1e-3), ("cortex-a76", "fp16", 3e-2),
                                                        ("cortex-a53", "int8", 3e-2)])
def test_aarch64_ncnn_matches_x86(small_models, tmp_path, cpu, precision, tolerance):
    target = NcnnArm()
    small_model = small_models["int8" if precision == "int8" else "fp32"]
    batch = parity_inputs(IMGSZ, count=1)
    reference = target.runtime(small_model)(batch)
    job = tmp_path / "job"
    job.mkdir()
    target.prepare_job(small_model, {"threads": 1, "warmup": 0, "runs": 1, "save_outputs": True}, batch, job)
    if precision == "fp16":  # the FP32 model run with ncnn's FP16 storage and arithmetic
        import json

        config = json.loads((job / "job.json").read_text())
        (job / "job.json").write_text(json.dumps({**config, "precision": "fp16"}))
    result = qemu.QemuUserTransport(cpu).run(job, target.runner, target.runtime_packages)
    assert result.device["machine"] == "aarch64"
    assert result.device["transport"] == {"transport": "qemu", "machine": "aarch64", "cpu": cpu, "emulated": True,
                                          "packages": result.device["transport"]["packages"]}
    assert result.device["transport"]["packages"]["ncnn"] != "not installed"
    with np.load(job / "outputs.npz") as produced:
        for index, ref in enumerate(reference):
            got = produced[f"arr_{index}"]
            assert got.shape == ref.shape[1:]
            assert max_relative_error(ref[0], got) < tolerance
