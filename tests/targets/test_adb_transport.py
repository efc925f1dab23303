"""The adb transport, as far as it can be tested honestly without a phone.

No adb server is faked: the command line the phone's shell receives is checked as text and run in this
machine's POSIX shell, the mapping is fed ncnn's real benchncnn output, and the connection is tried against a
port where no adb server listens.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("adbutils")

from adbutils import AdbDeviceInfo  # noqa: E402

from edge_deploy.pipeline.errors import DeviceError, DeviceTimeout, ToolchainMissing  # noqa: E402
from edge_deploy.pipeline.results import ProbeResult  # noqa: E402
from edge_deploy.targets.transports.adb import (  # noqa: E402
    BENCH_SCRIPT, AdbTransport, battery_power, bench_command, benchncnn_arguments, benchncnn_result, checked_benchncnn,
    pick_device)

SAMPLE = Path(__file__).parents[1] / "samples" / "benchncnn" / "rpi3b-plus.txt"
HOSTILE_DIR = "/data/local/tmp/edge-deploy/it's $(reboot); `id` \"x\""
HOSTILE_PARAM = "m;o'del$(id).param"
# Port 1 (tcpmux): nothing answers adb there, with or without a network.
NO_SERVER = "127.0.0.1:1"
JOB = {"param": "model.ncnn.param", "runs": 8, "warmup": 10, "threads": 4, "precision": "fp32",
       "files": {"model.ncnn.param": "0" * 64}}


@pytest.fixture
def arm64_header(tmp_path) -> Path:
    """Only an arm64 ELF header: it stands for benchncnn where the job never gets as far as running it."""
    path = tmp_path / "benchncnn"
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[18:20] = (183).to_bytes(2, "little")
    path.write_bytes(bytes(header))
    return path


def test_every_argument_reaches_the_phone_shell_quoted():
    arguments = benchncnn_arguments(HOSTILE_PARAM, (640, 480, 3), runs=50, threads=4, powersave=2)
    command = bench_command(HOSTILE_DIR, arguments, limit_s=900, battery="/sys/class/power_supply/battery")
    script = shlex.quote(BENCH_SCRIPT)
    assert command == (
        f"sh -c {script} edge-deploy "
        "'/data/local/tmp/edge-deploy/it'\"'\"'s $(reboot); `id` \"x\"' /sys/class/power_supply/battery 900 0.2 "
        "50 4 2 -1 0 'param=m;o'\"'\"'del$(id).param' 'shape=[640,480,3]'")
    # The script's own text carries no value: each one is a positional parameter.
    assert "640" not in BENCH_SCRIPT and "reboot" not in BENCH_SCRIPT


def _phone_folder(tmp_path, benchncnn_body: str) -> tuple[Path, Path]:
    """A folder with a hostile name and a stand-in benchncnn script, and a stand-in sysfs battery folder."""
    folder = tmp_path / "it's $(touch pwned); `id`"
    folder.mkdir()
    stand_in = folder / "benchncnn"
    stand_in.write_text("#!/bin/sh\n" + benchncnn_body)
    stand_in.chmod(0o755)
    battery = tmp_path / "battery supply"
    battery.mkdir()
    for name, value in {"current_now": "-1200000", "voltage_now": "3900000", "status": "Discharging"}.items():
        (battery / name).write_text(value + "\n")
    return folder, battery


def test_the_command_line_runs_in_a_posix_shell_with_every_name_intact(tmp_path):
    # This machine's sh and coreutils stand in for the phone's mksh and toybox: the same POSIX parsing. The
    # stand-in benchncnn records its arguments and prints in benchncnn's format.
    stand_in = ("printf '%s\\n' \"$@\" > argv.txt\nsleep 0.8\n"
                "echo \"loop_count = $1\" >&2\necho \"num_threads = $2\" >&2\n"
                "echo '   m;o'\\''del$(id).param  min = 1.00  max = 2.00  avg = 1.50' >&2\n")
    folder, battery = _phone_folder(tmp_path, stand_in)
    arguments = benchncnn_arguments(HOSTILE_PARAM, (640, 640, 3), 50, 4, 2)
    command = bench_command(str(folder), arguments, 30, str(battery))
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (folder / "argv.txt").read_text().splitlines() == \
        ["50", "4", "2", "-1", "0", f"param={HOSTILE_PARAM}", "shape=[640,640,3]"]
    assert not list(tmp_path.rglob("pwned"))
    data = benchncnn_result((folder / "bench.txt").read_text(), HOSTILE_PARAM, {}, "ncnn", JOB, "phone",
                            arguments=arguments, power_log=(folder / "power.log").read_text())
    assert data["latency_ms"]["mean"] == 1.5 and (data["runs"], data["threads"]) == (50, 4)
    figures = data["power"]
    assert figures["status"] == "measured" and figures["average_watts"] == pytest.approx(4.68)
    assert figures["idle_watts"] == pytest.approx(4.68) and figures["idle_samples"] == 5 and figures["samples"] >= 2


def test_a_failing_benchncnn_gives_its_exit_code_and_last_line(tmp_path):
    folder, _ = _phone_folder(tmp_path, "echo 'layer YoloDetect not exists or registered' >&2\nexit 3\n")
    command = bench_command(str(folder), benchncnn_arguments("model.ncnn.param", (640, 640, 3), 50, 4, 2), 30, "")
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout.strip().splitlines()[-1] == "layer YoloDetect not exists or registered"
    assert not (folder / "power.log").exists()  # no battery named: no readings taken


def test_the_real_benchncnn_sample_maps_into_the_result_schema():
    data = benchncnn_result(SAMPLE.read_text(), "squeezenet", {"machine": "aarch64", "cpus": 4},
                            "ncnn benchncnn (20210720)", JOB, "phone", arguments=["8", "4", "0", "-1", "1"],
                            power_off="power_sensor is none for this device")
    result = ProbeResult.from_runner(data, {"transport": "adb"})
    assert result.runner == "benchncnn" and result.runtime == "ncnn benchncnn (20210720)"
    assert result.latency_ms == {"p50": None, "p90": None, "p99": None, "mean": 94.25, "min": 93.77, "max": 94.78}
    # benchncnn reports neither throughput, load time nor memory: "not reported", never a number.
    assert result.fps is None and result.load_ms is None
    assert result.memory_mb == {"rss_before_load": None, "peak_rss": None}
    # What benchncnn did (its fixed warm-up of 8), not what the job asked (10).
    assert (result.threads, result.runs, result.warmup, result.batch) == (4, 8, 8, 1)
    assert result.power == {"status": "unavailable", "reason": "power_sensor is none for this device"}
    assert result.device["cpus"] == 4 and "files" not in result.job
    assert result.job["benchncnn_arguments"] == ["8", "4", "0", "-1", "1"]
    assert result.extra["benchncnn"]["weights"].startswith("zeros")
    assert result.extra["benchncnn"]["settings"]["cooling_down"] == 1
    int8 = benchncnn_result(SAMPLE.read_text(), "resnet18_int8", {}, "ncnn", JOB, "phone", power_off="none")
    assert int8["latency_ms"]["mean"] == 166.53


def test_battery_readings_during_the_sample_run_give_energy_per_inference():
    log = "idle 400000 3900000 Discharging\n" * 5 + "run -1500000 3800000 Discharging\n" * 4
    data = benchncnn_result(SAMPLE.read_text(), "squeezenet", {}, "ncnn", JOB, "phone", power_log=log)
    figures = data["power"]
    assert figures["status"] == "measured" and figures["average_watts"] == 5.7 and figures["idle_watts"] == 1.56
    # 8 timed runs of 94.25 ms at 5.7 W, 1.56 W of it there when idle.
    assert figures["busy_energy_per_inference_mj"] == pytest.approx(5.7 * 0.09425 * 1000, rel=1e-3)
    assert figures["energy_per_inference_mj"] == pytest.approx((5.7 - 1.56) * 0.09425 * 1000, rel=1e-3)


def test_an_ncnn_load_failure_is_never_taken_for_a_timing():
    # ncnn prints its error and benchncnn times the empty graph anyway.
    settings, results = SAMPLE.read_text().split("          squeezenet", 1)
    text = settings + "layer YoloDetect not exists or registered\n          squeezenet" + results
    with pytest.raises(DeviceError, match="^phone: benchncnn could not run the model: layer YoloDetect not exists"):
        benchncnn_result(text, "squeezenet", {}, "ncnn", JOB, "phone", power_off="none")
    with pytest.raises(DeviceError, match="no timing for model.ncnn.param .only for squeezenet, "):
        benchncnn_result(SAMPLE.read_text(), "model.ncnn.param", {}, "ncnn", JOB, "phone", power_off="none")


def test_battery_readings_give_watts_only_when_the_phone_runs_from_its_battery():
    discharging = "idle 400000 3900000 Discharging\n" + "run -1500000 3800000 Discharging\n" * 3
    assert battery_power(discharging)["average_watts"] == 5.7
    charging = discharging.replace("run -1500000 3800000 Discharging", "run 900000 4300000 Charging")
    assert "the battery was charging: while a charger" in battery_power(charging)["reason"]
    # A driver that reports mA and mV, as some phones' do.
    assert battery_power(discharging.replace("400000 3900000", "400 3900").replace("-1500000 3800000", "-1500 3800")
                         )["average_watts"] == 5.7
    assert "of 0" in battery_power("idle 0 3900000 Discharging\nrun 0 3900000 Discharging\n")["reason"]
    denied = "sh: can't open /sys/class/power_supply/battery/current_now: Permission denied\nrun   Discharging\n"
    assert battery_power(denied) == {"status": "unavailable", "reason": "the battery could not be read: sh: can't "
                                     "open /sys/class/power_supply/battery/current_now: Permission denied"}


def test_no_adb_server_is_one_clear_line(tmp_path, arm64_header):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"param": "model.ncnn.param", "runs": 8}))
    (job / "model.ncnn.param").write_text("7767517\n")
    np.save(job / "input.npy", np.zeros((1, 3, 32, 32), np.float32))
    transport = AdbTransport("phone", benchncnn=arm64_header, adb_server=NO_SERVER)
    runner = Path(__file__).parents[2] / "targets" / "arm" / "runner.py"
    for attempt in (lambda: transport.run(job, runner), lambda: transport.describe(("ncnn",))):
        with pytest.raises(DeviceError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"phone: no adb server at {NO_SERVER} (")
        assert "start it with `adb start-server`" in message and "\n" not in message
        assert not isinstance(info.value, DeviceTimeout)


def test_which_phone_and_why_not_in_one_line():
    server = "127.0.0.1:5037"
    with pytest.raises(DeviceError, match="^phone: no Android device on the adb server at 127.0.0.1:5037: connect"):
        pick_device([], None, "phone", server)
    with pytest.raises(DeviceError, match="is unauthorized: accept the USB debugging prompt on the phone$"):
        pick_device([AdbDeviceInfo("R58M", "unauthorized")], None, "phone", server)
    two = [AdbDeviceInfo("R58M", "device"), AdbDeviceInfo("emulator-5554", "device")]
    with pytest.raises(DeviceError, match=r"several devices \(R58M \(device\), emulator-5554 \(device\)\); name one"):
        pick_device(two, None, "phone", server)
    with pytest.raises(DeviceError, match="has no device 9A1 .it lists: R58M"):
        pick_device(two, "9A1", "phone", server)
    assert pick_device(two, "emulator-5554", "phone", server) == "emulator-5554"


def test_benchncnn_must_be_an_arm64_program(tmp_path):
    with pytest.raises(ToolchainMissing, match="set `benchncnn:` in devices.yaml"):
        checked_benchncnn(None, "phone")
    with pytest.raises(ToolchainMissing, match="No such file"):
        checked_benchncnn(tmp_path / "missing", "phone")
    with pytest.raises(ToolchainMissing, match="is not an arm64"):
        checked_benchncnn(Path(sys.executable).resolve(), "phone")
