import json
import subprocess
import sys

import numpy as np
import pytest

from edge_deploy.calibration.preprocess import load_tensor
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets import TARGETS, load_target
from edge_deploy.targets.cpu import OnnxRuntimeCpu
from edge_deploy.targets.runners import power
from edge_deploy.targets.runners.measure import percentile


def test_probe_measures_real_runs_and_never_invents_power(exported, model_info, preprocess, shapes_yaml, tmp_path):
    from edge_deploy.targets.cpu import runner as cpu_runner
    from edge_deploy.targets.transports.local import LocalTransport

    target = OnnxRuntimeCpu()
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    target.compile(exported["onnx"].path, None, "fp32", ModelInfo.from_json(model_info), artifact)
    image = sorted((shapes_yaml.parent / "images" / "val").iterdir())[0]
    tensor, _ = load_tensor(image, preprocess)
    job = tmp_path / "job"
    job.mkdir()
    target.prepare_job(artifact, {"warmup": 3, "runs": 50, "threads": 1}, tensor, job)
    result = LocalTransport().run(job, target.runner, target.runtime_packages)
    latency = result.latency_ms
    assert result.runs == 50 and result.threads == 1
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert 0 <= latency["std"] <= latency["max"] - latency["min"]
    # Every warm run, in order, and the summary is theirs; the first (cold) run is apart from them.
    assert len(result.samples_ms) == 50 and min(result.samples_ms) == latency["min"]
    assert max(result.samples_ms) == latency["max"] and result.first_inference_ms > 0
    assert result.job == {"warmup": 3, "runs": 50, "threads": 1, "model": "model.onnx", "input": "input.npy",
                          "runner": "runner.py", "runner_version": cpu_runner.RUNNER_VERSION,
                          "timeout_s": result.job["timeout_s"]}
    assert set(result.device["state"]) == {"start", "end"} and "kernel" in result.device
    assert result.fps > 0 and result.load_ms > 0
    assert result.memory_mb["peak_rss"] >= result.memory_mb["rss_before_load"] > 0
    sensor, reason = power.find_sensor()
    if sensor is not None:
        sensor.close()
        # 50 runs of a small model may be too short for an instantaneous sensor: then it says so.
        if result.power["status"] == "measured":
            assert result.power["sensor"] == sensor.name and result.power["average_watts"] > 0
        else:
            assert "too few power readings" in result.power["reason"]
    else:
        assert result.power == {"status": "unavailable", "reason": reason}
    # What the device wrote is what the host returns, plus the transport's description of the device.
    written = json.loads((job / "result.json").read_text())
    assert result.latency_ms == written["latency_ms"] and result.device["processor"] == written["host"]["processor"]
    assert result.device["transport"]["transport"] == "local"
    assert result.device["transport"]["packages"]["onnxruntime"] == result.runtime.split()[1]


def test_a_paired_job_times_the_artifact_and_its_fp32_build_in_turns(exported, model_info, preprocess, shapes_yaml,
                                                                       tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_deploy.pipeline.stages.probe import split_pair
    from edge_deploy.targets.transports.local import LocalTransport

    target = OnnxRuntimeCpu()
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    target.compile(exported["onnx"].path, None, "fp32", ModelInfo.from_json(model_info), artifact)
    # In the reference's place, a one-node model on the same input: far faster than the detector, so a result
    # filed under the wrong model shows.
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    detector_input = onnx.load(str(artifact / "model.onnx")).graph.input[0]
    one_node = helper.make_graph([helper.make_node("ReduceMax", [detector_input.name], ["peak"], keepdims=0)],
                                 "one_node", [detector_input], [helper.make_tensor_value_info("peak", TensorProto.FLOAT,
                                                                                              None)])
    onnx.save(helper.make_model(one_node, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
              str(fp32 / "model.onnx"))
    image = sorted((shapes_yaml.parent / "images" / "val").iterdir())[0]
    tensor, _ = load_tensor(image, preprocess)
    job = tmp_path / "job"
    job.mkdir()
    target.prepare_job(artifact, {"warmup": 2, "runs": 50, "threads": 1}, tensor, job, reference_dir=fp32)
    assert json.loads((job / "job.json").read_text())["reference"] == {"model": "reference.onnx"}
    both = LocalTransport().run(job, target.runner, target.runtime_packages)
    reference, result = split_pair(both)
    assert both.extra["interleaved_block"] > 0 and "interleaved_block" not in reference.extra
    assert "reference" not in result.extra and reference.extra["providers"] == ["CPUExecutionProvider"]
    for timed in (reference, result):
        assert timed.runs == 50 and len(timed.samples_ms) == 50 and timed.threads == 1
        assert 0 < timed.latency_ms["min"] <= timed.latency_ms["p50"] <= timed.latency_ms["max"]
        assert timed.fps > 0 and timed.load_ms > 0 and timed.power["status"] in ("measured", "unavailable")
        assert timed.device == both.device and timed.started_at == both.started_at
    assert reference.latency_ms["max"] < result.latency_ms["min"]
    assert reference.memory_mb["with"] == "the artifact loaded in the same process" and "with" not in result.memory_mb


def test_runtime_matches_plain_onnxruntime(exported, model_info, tmp_path):
    import onnxruntime as ort

    target = OnnxRuntimeCpu()
    target.compile(exported["onnx"].path, None, "fp32", ModelInfo.from_json(model_info), tmp_path)
    batch = np.random.default_rng(0).uniform(0, 1, (1, 3, 160, 160)).astype(np.float32)
    ours = target.runtime(tmp_path)(batch)
    session = ort.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"images": batch})
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_listing_targets_imports_no_toolchain():
    code = ("import sys; from click.testing import CliRunner; from edge_deploy.pipeline.cli import main; "
            "r = CliRunner().invoke(main, ['targets']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt', 'tensorflow', 'ncnn', 'ultralytics') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert set(TARGETS) >= {"cpu"} and load_target("cpu") is OnnxRuntimeCpu


class FaultyFp32Cpu(OnnxRuntimeCpu):
    """The cpu target with a converter that gets its FP32 build slightly wrong: one weight scaled by 1.1."""

    def convert(self, fp32_onnx, quantized, precision, info, out_dir, extras=None):
        import onnx
        from onnx import numpy_helper

        converted = super().convert(fp32_onnx, quantized, precision, info, out_dir)
        if precision == "fp32":
            model = onnx.load(str(out_dir / "model.onnx"))
            weight = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, weight.name))
            onnx.save(model, str(out_dir / "model.onnx"))
        return converted


def test_the_probe_refuses_an_fp32_build_that_differs_from_its_onnx(exported, model_info, shapes_yaml, preprocess,
                                                                     tmp_path):
    """The FP32 build timed beside the artifact is the speed-up's yardstick: one that does not compute what its
    ONNX computes stops the probe before any timing, naming the output."""
    from edge_deploy.pipeline.artifacts import Artifact
    from edge_deploy.pipeline.errors import ConversionMismatch
    from edge_deploy.pipeline.stages.probe import ProbeStage
    from edge_deploy.targets.transports.local import LocalTransport

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    OnnxRuntimeCpu().compile(exported["onnx"].path, None, "fp32", ModelInfo.from_json(model_info), artifact)
    image = sorted((shapes_yaml.parent / "images" / "val").iterdir())[0]
    inputs = {"model_info": exported["model_info"], "onnx": exported["onnx"], "artifact": Artifact.of(artifact)}
    for target, refused in ((OnnxRuntimeCpu(), False), (FaultyFp32Cpu(), True)):
        out = tmp_path / f"probe-{type(target).__name__}"
        out.mkdir()
        stage = ProbeStage(target, "int8", image, preprocess, 1, 5, 1, LocalTransport(), OnnxRuntimeCpu(),
                           LocalTransport())
        if not refused:
            assert stage.run(inputs, out).metrics["reference_label"] == "FP32 ONNX"
            continue
        with pytest.raises(ConversionMismatch, match=r"probe\[cpu\]: the FP32 build timed beside the artifact: "
                                                     r"output '\w+' differs from its ONNX parent"):
            stage.run(inputs, out)
