"""Target jetson: the TensorRT-ready artifact is built and checked here; the engine is built on the device.

TensorRT cannot be installed on these machines, so the QDQ graph is checked by its placement rules and run in
onnxruntime (the same Q/DQ semantics); the device runner is run end to end through the local transport with a
stand-in for `trtexec` that replays a real TensorRT log.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edge_deploy.pipeline.errors import ConversionMismatch
from edge_deploy.targets.jetson import TensorRtJetson, check_tensorrt_placement
from tests.conftest import REPO, build_json, run_deploy

SAMPLES = REPO / "tests" / "samples" / "trtexec"


@pytest.fixture(scope="module")
def jetson_build(deploy_home, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("jetson-user")
    done = run_deploy(["build", "--target", "jetson"], cwd, deploy_home)
    assert done.returncode == 0, done.stderr
    return cwd, done


def test_default_jetson_build_ships_a_tensorrt_ready_bundle(jetson_build, deploy_home):
    cwd, done = jetson_build
    bundle = cwd / "dist" / "yolov8n-160-jetson-int8"
    names = {p.name for p in bundle.iterdir()}
    assert {"model.onnx", "model.fp32.onnx", "calibration.cache", "build_engine.sh", "runtime.json",
            "README.md", "report.html", "manifest.json"} <= names
    # The INT8 model's accuracy in onnxruntime, next to FP32, and no latency pretending to be a Jetson's.
    assert "INT8 on jetson: mAP50" in done.stdout and "latency not measured here" in done.stdout
    # The Xavier NX profile is the default: the cache is for its TensorRT 8.5.
    assert (bundle / "calibration.cache").read_text().splitlines()[0] == "TRT-8502-EntropyCalibration2"
    card = (bundle / "README.md").read_text()
    assert "## On the device" in card and "sh build_engine.sh" in card and "Not measured" in card
    script = (bundle / "build_engine.sh").read_text()
    assert "--int8" in script and "--fp16" in script and "--onnx=model.onnx" in script
    runtime = json.loads((bundle / "runtime.json").read_text())
    assert runtime["engine_build"]["input_shape"] == [1, 3, 160, 160]
    manifest = json.loads((bundle / "manifest.json").read_text())
    accuracy = manifest["metrics"]["accuracy"]
    assert accuracy["within_budget"] and accuracy["drop_points"] <= 0.5
    assert manifest["metrics"]["speed"] is None
    assert run_deploy(["check", str(bundle)], cwd, deploy_home).returncode == 0


def test_the_int8_graph_follows_tensorrt_placement(jetson_build):
    cwd, _ = jetson_build
    model = onnx.load(str(cwd / "dist" / "yolov8n-160-jetson-int8" / "model.onnx"))
    counts = check_tensorrt_placement(model)
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert counts["int8_layers"] + counts["float_layers"] == convs and counts["int8_layers"] >= convs * 0.9
    # Weights per output channel, activations per tensor, everything zero-point 0.
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dq_weights and all(inits[n.input[1]].size > 1 for n in dq_weights)
    # No bias was turned into INT32: TensorRT quantizes biases itself.
    assert all(inits[n.input[0]].dtype == np.int8 for n in dq_weights)


def _conv_graph(zero_point=0, output_qdq=False):
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    wq = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "wq")
    ws = numpy_helper.from_array(np.full(2, 0.1, np.float32), "ws")
    wz = numpy_helper.from_array(np.zeros(2, np.int8), "wz")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(zero_point, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    out = "y"
    if output_qdq:
        nodes += [helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"]),
                  helper.make_node("Sigmoid", ["yd"], ["act"], name="act")]
        out = "act"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], [wq, ws, wz, s, z, w])
    return helper.make_model(graph)


def test_placement_rules_catch_what_tensorrt_would_not_fuse():
    assert check_tensorrt_placement(_conv_graph())["int8_layers"] == 1
    with pytest.raises(ConversionMismatch, match="not symmetric INT8"):
        check_tensorrt_placement(_conv_graph(zero_point=3))
    with pytest.raises(ConversionMismatch, match="Sigmoid"):
        check_tensorrt_placement(_conv_graph(output_qdq=True))


def test_jetson_profiles_are_listed_without_importing_a_toolchain(deploy_home, tmp_path):
    done = run_deploy(["targets", "--json"], tmp_path, deploy_home)
    jetson = json.loads(done.stdout)["jetson"]
    assert [p["name"] for p in jetson["profiles"]] == ["jetson-xavier-nx", "jetson-orin-nano"]
    assert jetson["compile_runs_on"] == "device" and jetson["int8"]["symmetric_activations"] == "always"
    assert jetson["profiles"][0]["facts"]["tensorrt"].startswith("8.5")


def test_fp16_build_is_checked_with_fp16_weights(deploy_home, tmp_path):
    summary = build_json(["--target", "jetson", "--precision", "fp16", "--output", str(tmp_path / "out")],
                         tmp_path, deploy_home)
    stages = {s["stage"]: s["metrics"] for s in summary["stages"]}
    assert "quantize" not in stages and "probe" not in stages
    assert stages["verify"]["artifact"]["map50_95"] > 0.6 and stages["verify"]["drop_points"] <= 0.1
    script = (tmp_path / "out" / "yolov8n-160-jetson-fp16" / "build_engine.sh").read_text()
    assert "--fp16" in script and "--int8" not in script


STANDIN = '''#!{python}
"""A stand-in for trtexec (TensorRT cannot be installed here): writes the engine file a build asks for and replays
a real TensorRT log ({log}) for a timing run, exporting as many per-inference times as --iterations asks for, as
trtexec's --exportTimes does. An engine built from the FP32 reference runs at half the speed, so that results
filed under the wrong engine show."""
import json, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
open("trtexec-calls.txt", "a").write(" ".join(sys.argv[1:]) + "\\n")
if "saveEngine" in args:
    fp32 = " fp32" if "reference" in args["onnx"] else ""
    open(args["saveEngine"], "wb").write(("stand-in engine" + fp32).encode())
    print("[I] Engine built in 1.0 sec.")
    print(open({log!r}).read())
    sys.exit(0)
if "loadEngine" in args:
    time.sleep(0.3)  # long enough for power readings while it "runs"
    slower = 2.0 if open(args["loadEngine"], "rb").read().endswith(b"fp32") else 1.0
    if "exportTimes" in args:
        cycle = (7.0, 7.5, 8.0, 9.5)
        json.dump([{{"count": 4}}] + [{{"startInMs": 0.0, "computeMs": slower * cycle[i % 4] - 0.5,
                                      "latencyMs": slower * cycle[i % 4]}} for i in range(int(args["iterations"]))],
                  open(args["exportTimes"], "w"))
    print(open({log!r}).read())
    sys.exit(0)
sys.exit(2)
'''


def _job_with_trtexec(jetson_build, tmp_path, monkeypatch, script: str, paired: bool = False,
                      reference_precision: str = "fp32", **job):
    """A job folder for the default INT8 bundle, with `script` standing in for trtexec; `paired` adds the FP32
    ONNX as the reference timed beside it, as a build of `reference_precision` (FP32 in a build's probe; a jetson
    FP16 bundle's model.onnx is the same FP32 ONNX, its engine built with --fp16)."""
    tool = tmp_path / "trtexec-stand-in"
    tool.write_text(script)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TRTEXEC", str(tool))
    cwd, _ = jetson_build
    bundle = cwd / "dist" / "yolov8n-160-jetson-int8"
    target = TensorRtJetson()
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    reference_dir = None
    if paired:
        reference_dir = tmp_path / "fp32"
        reference_dir.mkdir()
        (reference_dir / "model.onnx").write_bytes((bundle / "model.fp32.onnx").read_bytes())
        runtime = json.loads((bundle / "runtime.json").read_text())
        (reference_dir / "runtime.json").write_text(json.dumps({**runtime, "precision": reference_precision}))
    target.prepare_job(bundle, {"runs": 50, "warmup_ms": 200, "precision": "int8", **job},
                       np.zeros((1, 3, 160, 160), np.float32), job_dir, reference_dir)
    return target, job_dir


def test_the_device_runner_builds_and_times_the_engine_through_a_transport(jetson_build, tmp_path, monkeypatch):
    """runner.py end to end in a job folder via the local transport, trtexec replaced by a named stand-in."""
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch,
                                        STANDIN.format(python=sys.executable, log=str(log)))
    result = LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    assert result.runtime.startswith("TensorRT") and result.latency_ms["p50"] > 0 and result.fps > 0
    # The raw times trtexec exported, and their spread; its first inference is hidden in its warm-up.
    assert result.samples_ms == ([7.0, 7.5, 8.0, 9.5] * 13)[:50] and result.latency_ms["std"] == 0.93
    assert result.first_inference_ms is None
    assert result.job["runs"] == 50 and result.job["runner"] == "runner.py" and "files" not in result.job
    assert set(result.device["state"]) == {"start", "end"}
    # No INA3221 rails or tegrastats here: never 0.
    assert result.power == {"status": "unavailable", "reason": result.power["reason"]} and result.power["reason"]
    assert (job_dir / "model.engine").read_bytes() == b"stand-in engine"
    assert (job_dir / "build.log").exists() and (job_dir / "timing.log").exists()


def test_the_device_runner_times_the_fp32_engine_beside_the_artifact_in_turns(jetson_build, tmp_path, monkeypatch):
    """With a reference in the job, both engines are built on the device and timed in turns, one trtexec run per
    block, the order reversed every round; the stand-in's FP32 engine runs at half the speed."""
    from edge_deploy.pipeline.stages.probe import round_speedups, split_pair
    from edge_deploy.targets.jetson.runner import PAIR_BLOCK
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch,
                                        STANDIN.format(python=sys.executable, log=str(log)), paired=True)
    both = LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    reference, artifact = split_pair(both)
    block = ([7.0, 7.5, 8.0, 9.5] * 7)[:25]  # each trtexec run starts the stand-in's cycle again
    assert artifact.samples_ms == block * 2 and artifact.extra["precision"] == "int8"
    assert reference.samples_ms == [2 * ms for ms in block * 2] and reference.extra["precision"] == "fp32"
    assert reference.runtime == artifact.runtime and reference.runtime.startswith("TensorRT ")
    # trtexec warms up for a time; the job asked for no warm-up runs after it. Building an engine is not loading it.
    assert artifact.warmup == 0 and artifact.extra["warmup_ms"] == 200
    assert artifact.load_ms is None and artifact.extra["engine_build_ms"] > 0
    assert artifact.extra["interleaved_block"] == PAIR_BLOCK and artifact.extra["interleaved_tool"] == "trtexec"
    assert round_speedups(reference.samples_ms, artifact.samples_ms, PAIR_BLOCK)["median"] == 2.0
    calls = (job_dir / "trtexec-calls.txt").read_text().splitlines()
    builds = [c for c in calls if "--saveEngine=" in c]
    # The FP32 engine: from the FP32 ONNX, no reduced precision, its own timing cache.
    assert "--int8" in builds[0] and "--onnx=reference.onnx" in builds[1]
    assert "--int8" not in builds[1] and "--fp16" not in builds[1] and "reference.timing.cache" in builds[1]
    # 50 runs in blocks of 25: A B, then B A; without a power sensor no run beyond those.
    timed = [c.split("--loadEngine=")[1].split()[0] for c in calls if "--loadEngine=" in c]
    assert timed == ["model.engine", "reference.engine", "reference.engine", "model.engine"]
    assert all("--iterations=25" in c for c in calls if "--loadEngine=" in c)
    assert artifact.power["status"] == reference.power["status"] == "unavailable"
    # Only the artifact's engine and logs come back; the FP32 engine was only timed.
    assert set(artifact.extra["bring_back"]) == {"model.engine", "build.log", "timing.log"}
    assert (job_dir / "reference.engine").read_bytes() == b"stand-in engine fp32"


@pytest.mark.parametrize("paired", [False, True])
def test_the_jobs_warm_up_runs_are_run_and_left_out_of_every_trtexec_runs_times(jetson_build, tmp_path, monkeypatch,
                                                                              paired):
    """trtexec warms up for a time; the job's warm-up runs come after it, in every trtexec run (each loads its
    engine again), and are neither in the samples nor in the statistics, which then come from the exported times
    rather than trtexec's summary (that counts them)."""
    from edge_deploy.pipeline.stages.probe import split_pair
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch,
                                        STANDIN.format(python=sys.executable, log=str(log)), paired=paired, warmup=3)
    result = LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    artifact = split_pair(result)[1] if paired else result
    calls = [c for c in (job_dir / "trtexec-calls.txt").read_text().splitlines() if "--loadEngine=" in c]
    per_run = 25 if paired else 50
    assert calls and all(f"--iterations={3 + per_run}" in c and "--warmUp=200" in c for c in calls)
    # The stand-in's cycle starts again in every trtexec run; its first three times are the warm-up runs'.
    kept = ([7.0, 7.5, 8.0, 9.5] * 15)[3:3 + per_run]
    assert artifact.samples_ms == kept * (50 // per_run)
    assert artifact.latency_ms["p50"] == pytest.approx(np.median(kept))
    assert artifact.latency_ms["mean"] == pytest.approx(np.mean(kept))
    assert artifact.fps == round(50 / (sum(kept) * (50 // per_run) / 1000), 2)
    assert artifact.warmup == 3 and artifact.extra["warmup_ms"] == 200


def test_a_trtexec_that_exports_too_few_times_to_leave_out_the_warm_up_fails(jetson_build, tmp_path, monkeypatch):
    from edge_deploy.pipeline.errors import DeviceError
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    short = STANDIN.format(python=sys.executable, log=str(log)).replace('int(args["iterations"])', "50")
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch, short, warmup=3)
    with pytest.raises(DeviceError, match="exported 50 per-inference times for 3 warm-up and 50 timed inferences"):
        LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)


def test_a_reference_of_another_precision_is_built_and_reported_at_it(jetson_build, tmp_path, monkeypatch):
    """bench --against an FP16 bundle: the reference engine is built with --fp16 and its result says FP16."""
    from edge_deploy.pipeline.stages.probe import split_pair
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch,
                                        STANDIN.format(python=sys.executable, log=str(log)), paired=True,
                                        reference_precision="fp16")
    reference, artifact = split_pair(LocalTransport().run(job_dir, target.runner, target.runtime_packages,
                                                          support=target.runner_support))
    assert (reference.extra["precision"], artifact.extra["precision"]) == ("fp16", "int8")
    builds = [c for c in (job_dir / "trtexec-calls.txt").read_text().splitlines() if "--saveEngine=" in c]
    assert "--onnx=reference.onnx" in builds[1] and "--fp16" in builds[1] and "--int8" not in builds[1]
    assert "reference.timing.cache" in builds[1]


def test_only_the_artifact_engine_runs_on_the_dla_core(jetson_build, tmp_path, monkeypatch):
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch,
                                        STANDIN.format(python=sys.executable, log=str(log)), paired=True, dla_core=1)
    LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    calls = (job_dir / "trtexec-calls.txt").read_text().splitlines()
    on_dla = {"--useDLACore=1" in c for c in calls if "--loadEngine=model.dla.engine" in c}
    assert on_dla == {True}
    assert not any("--useDLACore" in c for c in calls if "reference" in c)


def test_a_block_with_fewer_exported_times_than_asked_fails_the_paired_job(jetson_build, tmp_path, monkeypatch):
    """Rounds are compared block by block, so a trtexec that timed fewer inferences than asked stops the job
    rather than pairing one engine's runs with the wrong runs of the other."""
    from edge_deploy.pipeline.errors import DeviceError
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    short = STANDIN.format(python=sys.executable, log=str(log)).replace('int(args["iterations"])', "4")
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch, short, paired=True)
    with pytest.raises(DeviceError, match="trtexec exported 4 per-inference times for 25 timed inferences"):
        LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)


def test_the_device_runner_measures_power_from_tegrastats(tmp_path, monkeypatch):
    """The runner's power path end to end, on a job made by hand (no bundle build): tegrastats replaying a real
    Orin Nano sample stands in for the board, trtexec for TensorRT."""
    from edge_deploy.targets.jetson import engine_recipe
    from edge_deploy.targets.runners import power
    from edge_deploy.targets.transports.local import LocalTransport
    from tests.targets.test_jetson_tegrastats import stand_in

    sensor, _ = power.find_sensor()
    if sensor is not None:
        sensor.close()
        pytest.skip(f"this machine's own sensor ({sensor.name}) comes before tegrastats")
    stand_in(tmp_path, monkeypatch, REPO / "tests" / "samples" / "tegrastats" / "orin-nano-jp6-idle.txt")
    tool = tmp_path / "trtexec-stand-in"
    tool.write_text(STANDIN.format(python=sys.executable, log=str(next(SAMPLES.glob("trt8*.txt")))))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TRTEXEC", str(tool))
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "model.onnx").write_bytes(b"the stand-in never reads it")
    np.save(job_dir / "input.npy", np.zeros((1, 3, 160, 160), np.float32))
    (job_dir / "job.json").write_text(json.dumps({
        "runs": 50, "warmup_ms": 200, "model": "model.onnx", "input": "input.npy",
        "engine_build": engine_recipe("int8", 160, False), "power_idle_s": 0.2, "power_interval_ms": 20}))
    target = TensorRtJetson()
    result = LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    assert result.power["status"] == "measured" and result.power["sensor"] == "tegrastats VDD_IN"
    assert result.power["average_watts"] == 4.761 and result.power["idle_watts"] == 4.761
    # The time the inferences took is the count over trtexec's throughput, not the tool's whole run.
    assert result.power["seconds"] == round(50 / result.fps, 6) and result.power["inferences"] == 50
    assert result.power["busy_energy_per_inference_mj"] == pytest.approx(4.761 / result.fps * 1000, abs=1e-4)
    assert result.power["energy_per_inference_mj"] == 0.0


def test_a_failing_trtexec_is_one_line_with_the_log_tail(jetson_build, tmp_path, monkeypatch):
    from edge_deploy.pipeline.errors import DeviceError
    from edge_deploy.targets.transports.local import LocalTransport

    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch,
                                        f"#!{sys.executable}\nprint('[E] [TRT] ModelImporter: unsupported operator "
                                        "Foo')\nraise SystemExit(1)\n")
    with pytest.raises(DeviceError, match="unsupported operator Foo"):
        LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    assert "unsupported operator Foo" in (job_dir / "build.log").read_text()
    assert os.path.exists(job_dir / "job.json")


def test_a_calibration_cache_for_another_tensorrt_is_refused_on_the_device(tmp_path):
    from edge_deploy.targets.jetson import runner

    cache = tmp_path / "calibration.cache"
    cache.write_text("TRT-8502-EntropyCalibration2\nimages: 3c010a14\n")
    runner.check_cache_version(cache, "8.5.3")  # a patch level apart reads the same format
    with pytest.raises(runner.JobFailed, match="written for TensorRT 8502 but this device has TensorRT 10.3.0"):
        runner.check_cache_version(cache, "10.3.0")


def test_the_engine_is_built_in_process_only_where_tensorrt_and_a_gpu_exist(jetson_build):
    from edge_deploy.targets.jetson.engine import unavailable

    cwd, _ = jetson_build
    runtime = json.loads((cwd / "dist" / "yolov8n-160-jetson-int8" / "runtime.json").read_text())
    reason = unavailable()
    if reason is not None:
        # These machines: no TensorRT libraries. The bundle says the engine is built on the device, and why.
        assert "model.engine" not in runtime["files"].values()
        pytest.skip(f"no engine build here: {reason}")
    assert runtime["files"]["engine"] == "model.engine"


def _builds_on_an_ssh_jetson(tmp_path, deploy_home, script: str, builds: int = 1) -> list:
    """`deploy build --target jetson --device xavier` `builds` times over real SSH (a local OpenSSH server stands
    for the Jetson), with `script` standing in for trtexec."""
    from tests import sshd as sshd_helper

    if sshd_helper.unavailable():
        pytest.skip(sshd_helper.unavailable())
    pytest.importorskip("asyncssh")
    tool = tmp_path / "trtexec-stand-in"
    tool.write_text(script)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    server = sshd_helper.Sshd.prepare(tmp_path / "sshd").start()
    try:
        entry = server.inventory_entry(["env", f"TRTEXEC={tool}", sys.executable], tmp_path)
        (tmp_path / "devices.yaml").write_text(yaml.safe_dump({"devices": {"xavier": {**entry, "target": "jetson"}}}))
        return [run_deploy(["build", "--target", "jetson", "--device", "xavier", "--runs", "50", "--json",
                            "--output", str(tmp_path / f"dist-{n}")], tmp_path, deploy_home) for n in range(builds)]
    finally:
        server.kill()


def test_build_with_a_device_builds_and_times_the_engine_there_and_ships_it(jetson_build, tmp_path, deploy_home):
    """The engine is built on the device, timed there in turns with TensorRT's FP32 engine, and comes back into
    the bundle."""
    log = next(SAMPLES.glob("trt8*.txt"))
    done, = _builds_on_an_ssh_jetson(tmp_path, deploy_home, STANDIN.format(python=sys.executable, log=str(log)))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    probe = next(s for s in summary["stages"] if s["stage"] == "probe")["metrics"]
    assert probe["artifact"]["runtime"].startswith("TensorRT")
    assert probe["artifact"]["device"]["transport"]["device"] == "xavier"
    # Against TensorRT's own FP32 engine, built and timed in the same job on the device.
    assert probe["reference"]["runtime"] == probe["artifact"]["runtime"]
    assert probe["reference"]["device"]["transport"]["device"] == "xavier"
    assert probe["reference_label"] == "FP32 on jetson" and probe["speedup_p50"] == 2.0
    assert probe["timing"] == "in turns, one trtexec run per block" and probe["speedup_rounds"]["rounds"] == 2
    bundle = Path(summary["bundle"])
    assert (bundle / "built_on_device" / "model.engine").read_bytes() == b"stand-in engine"
    assert {"build.log", "timing.log"} <= {p.name for p in (bundle / "built_on_device").iterdir()}
    card = (bundle / "README.md").read_text()
    assert "## Built on the device" in card and "Not measured" not in card
    # The build's own 10 warm-up runs, after trtexec's warm-up in every trtexec run.
    assert "50 runs after 500 ms of warm-up, then 10 warm-up runs" in card
    assert run_deploy(["check", str(bundle)], tmp_path, deploy_home).returncode == 0


def _failing_fp32_build(log: Path) -> str:
    """The stand-in, except that building the FP32 reference engine fails the way a device out of memory does."""
    return STANDIN.format(python=sys.executable, log=str(log)).replace(
        'if "saveEngine" in args:',
        'if "saveEngine" in args and "reference" in args["onnx"]:\n'
        '    print("[E] [TRT] Error Code 2: OutOfMemory (no memory left on the device)")\n'
        '    sys.exit(1)\n'
        'if "saveEngine" in args:', 1)


def test_an_fp32_engine_that_will_not_build_leaves_the_artifact_timed_alone(jetson_build, tmp_path, monkeypatch):
    from edge_deploy.targets.transports.local import LocalTransport

    log = next(SAMPLES.glob("trt8*.txt"))
    target, job_dir = _job_with_trtexec(jetson_build, tmp_path, monkeypatch, _failing_fp32_build(log), paired=True)
    result = LocalTransport().run(job_dir, target.runner, target.runtime_packages, support=target.runner_support)
    assert "reference" not in result.extra and "interleaved_block" not in result.extra
    assert "could not be built" in result.extra["reference_failed"]
    assert "reference-build.log" in result.extra["reference_failed"] and "OutOfMemory" in result.extra["reference_failed"]
    assert result.samples_ms == ([7.0, 7.5, 8.0, 9.5] * 13)[:50] and result.extra["precision"] == "int8"
    timed = [c for c in (job_dir / "trtexec-calls.txt").read_text().splitlines() if "--loadEngine=" in c]
    assert len(timed) == 1 and "--loadEngine=model.engine" in timed[0]


def test_a_build_whose_fp32_engine_fails_falls_back_to_the_onnx_and_tries_again_next_time(jetson_build, tmp_path,
                                                                                          deploy_home):
    """The build still publishes, its speed-up against the FP32 ONNX in a job of its own (the stand-in Jetson has
    onnxruntime), says so, and caches nothing of the probe, so the next build tries the pair again."""
    log = next(SAMPLES.glob("trt8*.txt"))
    first, second = _builds_on_an_ssh_jetson(tmp_path, deploy_home, _failing_fp32_build(log), builds=2)
    for done in (first, second):
        assert done.returncode == 0, done.stderr
        assert "the FP32 ONNX is timed in a job of its own instead" in done.stderr
        probe = next(s for s in json.loads(done.stdout)["stages"] if s["stage"] == "probe")
        assert not probe["cache_hit"]
        metrics = probe["metrics"]
        assert metrics["reference_label"] == "FP32 ONNX" and metrics["timing"] == "in two jobs, one after the other"
        assert metrics["reference"]["runtime"].startswith("onnxruntime")
        assert metrics["artifact"]["runtime"].startswith("TensorRT")
        assert metrics["reference"]["device"]["transport"]["device"] == "xavier"
