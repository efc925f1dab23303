"""Adding a target is one folder and one registry line: a whole build runs for one the pipeline never saw.

The dummy target below lives in a temporary folder of its own. It takes NHWC
input (a Transpose in front of the FP32 graph), runs in ONNX Runtime and
declares FP32 only; nothing in the pipeline knows its name or its files.
"""

import json
import textwrap

import pytest

from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.errors import ConfigError
from edge_deploy.targets import TARGETS

DUMMY = '''
from pathlib import Path
import json, shutil
import numpy as np
import onnx
from onnx import helper

from edge_deploy.targets.base import Converted, Target
from edge_deploy.targets.cpu import OnnxRuntimeCpu


class NhwcOnnx(Target):
    name = "dummy"
    description = "ONNX Runtime fed NHWC input, for the test of the target seam"
    toolchain = ("onnx", "onnxruntime")
    runtime_packages = ("onnxruntime", "numpy")
    precisions = ("fp32",)
    default_precision = "fp32"
    input_layout = "NHWC"
    runner = OnnxRuntimeCpu.runner  # the ONNX Runtime runner takes whatever layout the model has

    def convert(self, fp32_onnx, quantized, precision, info, out_dir):
        model = onnx.load(str(fp32_onnx))
        graph_input = model.graph.input[0]
        graph_input.name = "images_nhwc"
        dims = graph_input.type.tensor_type.shape.dim
        order = [dims[0], dims[2], dims[3], dims[1]]
        shape = [d.dim_param or d.dim_value for d in order]
        del graph_input.type.tensor_type.shape.dim[:]
        for value in shape:
            graph_input.type.tensor_type.shape.dim.add().CopyFrom(
                helper.make_tensor_type_proto(1, [value]).tensor_type.shape.dim[0])
        model.graph.node.insert(0, helper.make_node("Transpose", ["images_nhwc"], ["images"], perm=[0, 3, 1, 2]))
        artifact = Path(out_dir) / "model.onnx"
        onnx.save(model, str(artifact))
        return Converted({"model": artifact}, {"layout": "NHWC"})

    def runtime(self, artifact_dir, threads=None):
        from edge_deploy.calibration.onnxrt import ort_infer
        return ort_infer(Path(artifact_dir) / "model.onnx", threads)

    def prepare_job(self, artifact_dir, job, input_tensor, job_dir):
        OnnxRuntimeCpu().prepare_job(artifact_dir, job, input_tensor, job_dir)
'''


@pytest.fixture
def dummy_registered(tmp_path, monkeypatch):
    package = tmp_path / "plugins" / "dummy_nhwc"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(DUMMY))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setitem(TARGETS, "dummy", "dummy_nhwc:NhwcOnnx")  # the one registry line


def test_a_new_target_builds_through_every_stage(dummy_registered, deploy_home, shapes_yaml, tmp_path):
    from edge_deploy.pipeline.build import run_build
    from edge_deploy.pipeline.results import AccuracyReport, CompileReport, SpeedReport

    result = run_build(BuildConfig(target="dummy", output=tmp_path / "dist", probe={"runs": 50, "warmup": 1}),
                       deploy_home)
    runtime = json.loads((result.bundle / "runtime.json").read_text())
    assert runtime["target"] == "dummy" and runtime["input"]["layout"] == "NHWC"
    compile_report = CompileReport.from_json(result.metrics("compile"))
    assert compile_report.check_value <= 1e-4 and compile_report.notes == {"layout": "NHWC"}
    accuracy = AccuracyReport.from_json(result.metrics("verify"))
    # Run on NHWC input in its own runtime, the artifact scores what the FP32 reference scores.
    assert accuracy.artifact is not None and abs(accuracy.drop_points) <= 0.01
    speed = SpeedReport.from_json(result.metrics("probe"))
    assert speed.artifact is not None and speed.artifact.runtime.startswith("onnxruntime")
    assert "FP32 on dummy" in (result.bundle / "README.md").read_text()


def test_what_a_target_does_not_declare_is_refused_before_any_stage(dummy_registered, deploy_home, tmp_path):
    from edge_deploy.pipeline.build import run_build

    with pytest.raises(ConfigError, match="target dummy supports precisions fp32, not int8"):
        run_build(BuildConfig(target="dummy", precision="int8", output=tmp_path / "dist"), deploy_home)
    assert not (tmp_path / "dist").exists()
