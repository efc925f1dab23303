from pathlib import Path

import pytest

from edge_deploy.targets.jetson.trtexec import parse_trt_version, parse_trtexec, trtexec_command, trtexec_run_command

SAMPLES = Path(__file__).parents[1] / "samples" / "trtexec"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def test_tensorrt10_sample_with_three_percentiles():
    parsed = parse_trtexec(sample("trt10-percentiles.txt"))
    assert parsed["layout"] == "trt10"
    assert parsed["trt_version"] is None  # the excerpt starts at the summary, after the version lines
    assert parsed["throughput_qps"] == 130.298
    assert parsed["latency_ms"] == {"min": 5.38672, "max": 13.3664, "mean": 7.60628, "median": 7.16092,
                                    "p90": 10.2996, "p95": 10.8698, "p99": 12.9675}
    assert parsed["gpu_compute_ms"] == {"min": 5.34595, "max": 13.3388, "mean": 7.58404, "median": 7.14139,
                                        "p90": 10.2881, "p95": 10.8175, "p99": 12.9485}
    assert parsed["h2d_ms"] == 0.0122212
    assert parsed["d2h_ms"] == 0.0100141
    assert parsed["enqueue_ms"] == 7.63062
    assert parsed["warnings"] == []


def test_tensorrt8_xavier_nx_sample():
    parsed = parse_trtexec(sample("trt8-xavier-nx.txt"))
    assert parsed["layout"] == "trt8"
    assert parsed["throughput_qps"] == 27207.0
    # The End-to-End Host Latency line (TensorRT 8.0-8.2) must not be taken for the latency.
    assert parsed["latency_ms"] == {"min": 0.564209, "max": 0.593018, "mean": 0.573891, "median": 0.572998,
                                    "p99": 0.587769}
    assert parsed["gpu_compute_ms"] == {"min": 0.554932, "max": 0.58374, "mean": 0.564682, "median": 0.564087,
                                        "p99": 0.578552}
    assert parsed["enqueue_ms"] == 0.140747
    assert parsed["h2d_ms"] == 0.00656457
    assert parsed["d2h_ms"] == 0.00265072
    assert parsed["warnings"] == []


def test_tensorrt7_legacy_sample():
    parsed = parse_trtexec(sample("trt7-legacy.txt"))
    assert parsed["layout"] == "trt7"
    # Host latency, not the "end to end" figures beside it nor the 10-run averages above it.
    assert parsed["latency_ms"] == {"min": 1.64058, "max": 6.2915, "mean": 1.66069, "median": 1.65601,
                                    "p99": 1.67065}
    # TensorRT 7 prints 0 qps for explicit-batch engines: reported as unknown, with the reason.
    assert parsed["throughput_qps"] is None
    assert parsed["warnings"] == ["throughput not reported: TensorRT 7 printed 0 qps, as it does for "
                                  "explicit-batch engines"]
    # The excerpt stops before the Enqueue Time and GPU Compute blocks.
    assert parsed["gpu_compute_ms"] is None
    assert parsed["enqueue_ms"] is None
    assert parsed["h2d_ms"] is None and parsed["d2h_ms"] is None


def test_tensorrt7_gpu_compute_and_enqueue_blocks():
    # The blocks TensorRT 7.1/7.2's printEpilog writes after Host Latency (format from its source; made-up values).
    log = sample("trt7-legacy.txt") + "\n".join([
        "[06/12/2022-22:34:00] [I] Enqueue Time",
        "[06/12/2022-22:34:00] [I] min: 0.8 ms",
        "[06/12/2022-22:34:00] [I] max: 2.5 ms",
        "[06/12/2022-22:34:00] [I] median: 0.9 ms",
        "[06/12/2022-22:34:00] [I] GPU Compute",
        "[06/12/2022-22:34:00] [I] min: 1.5 ms",
        "[06/12/2022-22:34:00] [I] max: 6.1 ms",
        "[06/12/2022-22:34:00] [I] mean: 1.56 ms",
        "[06/12/2022-22:34:00] [I] median: 1.55 ms",
        "[06/12/2022-22:34:00] [I] percentile: 1.58 ms at 99%",
        "[06/12/2022-22:34:00] [I] total compute time: 2.9 s",
    ])
    parsed = parse_trtexec(log)
    assert parsed["gpu_compute_ms"] == {"min": 1.5, "max": 6.1, "mean": 1.56, "median": 1.55, "p99": 1.58}
    assert parsed["enqueue_ms"] is None  # TensorRT 7 prints no mean enqueue time
    assert parsed["latency_ms"]["mean"] == 1.66069


def test_trtexec_warnings_and_version_lines():
    # Lines as TensorRT 8.6's trtexec prints them (texts from its source), around the real Xavier NX summary.
    log = "\n".join([
        "&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # /usr/src/tensorrt/bin/trtexec --loadEngine=m.engine",
        "[12/06/2022-15:00:10] [I] TensorRT version: 8.6.1",
        "[12/06/2022-15:00:11] [W] [TRT] Using an engine plan file across different models of devices is not "
        "recommended",
        sample("trt8-xavier-nx.txt"),
        "[12/06/2022-15:00:21] [W] * Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU "
        "may be under-utilized.",
        "[12/06/2022-15:00:21] [W]   If not already in use, --useCudaGraph (utilize CUDA graphs where possible) "
        "may increase the throughput.",
        "[12/06/2022-15:00:21] [W] * GPU compute time is unstable, with coefficient of variance = 11.2%.",
        "[12/06/2022-15:00:21] [W]   If not already in use, locking GPU clock frequency or adding --useSpinWait "
        "may improve the stability.",
        "[12/06/2022-15:00:21] [I] Explanations of the performance metrics are printed in the verbose logs.",
        "&&&& PASSED TensorRT.trtexec [TensorRT v8601] # /usr/src/tensorrt/bin/trtexec --loadEngine=m.engine",
    ])
    parsed = parse_trtexec(log)
    assert parsed["trt_version"] == "8.6.1"
    assert parsed["warnings"] == [
        "Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be under-utilized. "
        "If not already in use, --useCudaGraph (utilize CUDA graphs where possible) may increase the throughput.",
        "GPU compute time is unstable, with coefficient of variance = 11.2%. If not already in use, locking GPU "
        "clock frequency or adding --useSpinWait may improve the stability.",
    ]
    assert parsed["latency_ms"]["p99"] == 0.587769


@pytest.mark.parametrize("line, version", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --onnx=model.onnx", "8.5.2"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b17] # trtexec --onnx=model.onnx", "10.3.0"),
    ("[10/01/2021-11:03:56] [I] TensorRT version: 8001", "8.0.1"),  # TensorRT 8.0 printed the packed number
    ("[10/03/2024-10:47:50] [I] TensorRT version: 10.3.0", "10.3.0"),
    ("[10/03/2024-10:47:50] [I] Plan was created with TensorRT version 8.6.1", None),
])
def test_tensorrt_version_forms(line, version):
    assert parse_trt_version(line) == version
    assert parse_trtexec(line + "\n" + sample("trt10-percentiles.txt"))["trt_version"] == version


@pytest.mark.parametrize("log", [
    "",
    "&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --onnx=model.onnx\n[E] Engine could not be created",
    # the summary header and throughput, then the log ends
    "\n".join(sample("trt10-percentiles.txt").splitlines()[:2]),
    # the Latency line itself cut off mid-way
    "\n".join(sample("trt10-percentiles.txt").splitlines()[:2]) + "\n"
    + sample("trt10-percentiles.txt").splitlines()[2][:60],
    # TensorRT 7: the Host Latency block cut after its first lines
    "\n".join(sample("trt7-legacy.txt").splitlines()[:4]),
], ids=["empty", "build-failed", "after-throughput", "mid-latency-line", "trt7-mid-block"])
def test_a_log_without_a_latency_summary_is_refused(log):
    with pytest.raises(ValueError, match="no trtexec latency summary found") as raised:
        parse_trtexec(log)
    assert "\n" not in str(raised.value)


def test_build_command_per_precision():
    common = ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", "--timingCacheFile=timing.cache"]
    assert trtexec_command("model.onnx", "model.engine", "int8", "timing.cache") == [*common, "--int8", "--fp16"]
    assert trtexec_command("model.onnx", "model.engine", "fp16", "timing.cache") == [*common, "--fp16"]
    assert trtexec_command("model.onnx", "model.engine", "fp32", "timing.cache") == common


def test_build_command_options():
    command = trtexec_command("my model.onnx", "model.engine", "int8", "timing.cache",
                              shapes="images:1x3x640x640", dla_core=1, calib_cache="calibration.cache",
                              extra=("--verbose", "--memPoolSize=workspace:1024"))
    assert isinstance(command, list) and all(isinstance(arg, str) for arg in command)
    assert command == ["trtexec", "--onnx=my model.onnx", "--saveEngine=model.engine",
                       "--timingCacheFile=timing.cache", "--int8", "--fp16", "--shapes=images:1x3x640x640",
                       "--useDLACore=1", "--allowGPUFallback", "--calib=calibration.cache", "--verbose",
                       "--memPoolSize=workspace:1024"]
    assert trtexec_command("m.onnx", "m.engine", "fp16", "t.cache", dla_core=0)[-2:] == ["--useDLACore=0",
                                                                                         "--allowGPUFallback"]
    # DLA has no FP32: the build is allowed, and GPU fallback puts every layer on the GPU.
    assert trtexec_command("m.onnx", "m.engine", "fp32", "t.cache", dla_core=0)[4:] == ["--useDLACore=0",
                                                                                        "--allowGPUFallback"]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"precision": "bf16"}, ValueError, "precision 'bf16'"),
    ({"precision": "fp16", "calib_cache": "c.cache"}, ValueError, "only means something for int8"),
    ({"precision": "int8", "dla_core": -1}, ValueError, "dla_core"),
    ({"precision": "int8", "extra": "--verbose"}, TypeError, "sequence of arguments"),
])
def test_build_command_refuses_nonsense(kwargs, error, message):
    arguments = {"onnx": "m.onnx", "engine": "m.engine", "timing_cache": "t.cache", **kwargs}
    with pytest.raises(error, match=message):
        trtexec_command(**arguments)


@pytest.mark.parametrize("major, minor, percentile", [
    (7, None, "99"),
    (8, None, "99"),  # minor unknown: 8.0-8.4 would read a list as its first number only
    (8, 4, "99"),
    (8, 5, "90,95,99"),
    (8, 6, "90,95,99"),
    (10, None, "90,95,99"),
    (10, 3, "90,95,99"),
])
def test_run_command_percentiles_follow_the_tensorrt_version(major, minor, percentile):
    command = trtexec_run_command("model.engine", 200, 500, trt_major=major, trt_minor=minor)
    assert command == ["trtexec", "--loadEngine=model.engine", "--iterations=200", "--warmUp=500",
                       "--duration=0", f"--percentile={percentile}"]


def test_run_command_on_a_dla_core():
    command = trtexec_run_command("model.dla.engine", 50, 0, dla_core=1, trt_major=8, trt_minor=5)
    assert command[-1] == "--useDLACore=1"
    assert "--allowGPUFallback" not in command  # a build option; the engine already holds the fallback layers


@pytest.mark.parametrize("args, kwargs", [
    (("m.engine", 0, 500), {"trt_major": 10}),
    (("m.engine", 10, -1), {"trt_major": 10}),
    (("m.engine", 10, 500), {"trt_major": 6}),
    (("m.engine", 10, 500, -2), {"trt_major": 10}),
])
def test_run_command_refuses_nonsense(args, kwargs):
    with pytest.raises(ValueError):
        trtexec_run_command(*args, **kwargs)
