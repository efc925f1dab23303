"""The ssh transport against a real OpenSSH server on 127.0.0.1 (see tests/sshd.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_deploy.pipeline.errors import ConfigError, DeviceError, DeviceTimeout
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.targets import load_target
from edge_deploy.targets.transports import run_job
from tests import sshd as sshd_helper

pytestmark = pytest.mark.skipif(sshd_helper.unavailable() is not None, reason=str(sshd_helper.unavailable()))
pytest.importorskip("asyncssh")

from edge_deploy.targets.transports.ssh import SshTransport  # noqa: E402


@pytest.fixture
def sshd(tmp_path):
    server = sshd_helper.Sshd.prepare(tmp_path / "sshd").start()
    yield server
    server.kill()


@pytest.fixture
def device_dir(tmp_path) -> Path:
    """The device's work folder: every job folder must be gone from it after a job."""
    folder = tmp_path / "device tmp 'quoted' $(dir)"  # hostile on purpose: arguments must reach the device as-is
    folder.mkdir()
    return folder


def transport(server, device_dir, **overrides) -> SshTransport:
    settings = {"name": "board", "host": "127.0.0.1", "port": server.port, "user": server.user,
                "host_key": server.host_key, "identity": server.client_key, "python": [sys.executable],
                "workdir": str(device_dir)}
    settings.update(overrides)
    return SshTransport(**settings)


@pytest.fixture(scope="module")
def cpu_job_source(tmp_path_factory, exported, model_info, preprocess, shapes_yaml):
    """The cpu target's FP32 artifact of the embedded model and a real preprocessed image."""
    from edge_deploy.calibration.preprocess import load_tensor

    target = load_target("cpu")()
    artifact = tmp_path_factory.mktemp("cpu-artifact")
    target.compile(exported["onnx"].path, None, "fp32", ModelInfo.from_json(model_info), artifact)
    image = sorted((shapes_yaml.parent / "images" / "val").iterdir())[0]
    return target, artifact, load_tensor(image, preprocess)[0]


def cpu_job(cpu_job_source, folder: Path, runs: int = 50) -> tuple:
    target, artifact, tensor = cpu_job_source
    folder.mkdir(parents=True)
    target.prepare_job(artifact, {"warmup": 2, "runs": runs, "threads": 1}, tensor, folder)
    return target, folder


def test_the_cpu_probe_runs_end_to_end_through_ssh_and_leaves_nothing_on_the_device(sshd, device_dir, tmp_path,
                                                                                   cpu_job_source):
    target, job = cpu_job(cpu_job_source, tmp_path / "job")
    result = transport(sshd, device_dir).run(job, target.runner, target.runtime_packages,
                                             support=target.runner_support)
    assert result.runtime.startswith("onnxruntime ") and result.runs == 50
    assert result.latency_ms["p50"] > 0 and result.fps > 0
    described = result.device["transport"]
    assert described["transport"] == "ssh" and described["device"] == "board"
    assert described["packages"]["onnxruntime"] != "not installed"
    assert described["host_key"].startswith("SHA256:")
    assert set(result.host_timings) == {"connect_s", "upload_s", "run_s", "download_s"}
    assert result.started_at and result.finished_at
    assert (job / "result.json").exists()
    assert list(device_dir.iterdir()) == []


def test_a_host_key_other_than_the_pinned_one_is_refused_before_anything_runs(sshd, device_dir, tmp_path,
                                                                              cpu_job_source):
    other = sshd_helper.keygen(tmp_path / "another_host_key")
    target, job = cpu_job(cpu_job_source, tmp_path / "job")
    with pytest.raises(DeviceError, match="not the one pinned in the inventory") as info:
        transport(sshd, device_dir, host_key=other).run(job, target.runner, target.runtime_packages)
    message = str(info.value)
    assert "\n" not in message and "offered SHA256:" in message
    assert list(device_dir.iterdir()) == []


def test_a_device_without_a_pinned_key_cannot_be_configured(sshd, device_dir):
    with pytest.raises(ConfigError, match="needs its host_key pinned"):
        transport(sshd, device_dir, host_key="")
    with pytest.raises(ConfigError, match="not an SSH public key"):
        transport(sshd, device_dir, host_key="ssh-ed25519 not-base64!")


def test_a_known_hosts_line_is_accepted_as_the_pinned_key(sshd, device_dir):
    line = f"[127.0.0.1]:{sshd.port} {sshd.host_key}"
    assert transport(sshd, device_dir, host_key=line).describe(("numpy",))["packages"]["numpy"] != "not installed"


def test_a_device_without_the_runtime_says_so_in_one_line(sshd, device_dir, tmp_path, cpu_job_source):
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no system python3 without numpy to stand for a bare device")
    target, job = cpu_job(cpu_job_source, tmp_path / "job")
    with pytest.raises(DeviceError, match="cannot run this artifact: the device lacks (numpy|onnxruntime)"):
        transport(sshd, device_dir, python=["/usr/bin/python3"]).run(job, target.runner, target.runtime_packages)
    assert list(device_dir.iterdir()) == []


def test_an_unreachable_device_is_retried_then_reported(tmp_path, device_dir):
    server = sshd_helper.Sshd.prepare(tmp_path / "never-started")  # keys and a port, but nothing listening
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text("{}")
    t = transport(server, device_dir)
    t.attempts, t.backoff_s = 2, 0.1
    with pytest.raises(DeviceError, match=r"cannot connect to .*127\.0\.0\.1.*\(gave up after 2 attempts\)"):
        t.run(job, sshd_helper_runner(tmp_path, "pass"))


def sshd_helper_runner(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "runner.py"
    path.write_text("import json, os, sys, time\nfrom pathlib import Path\nimport measure\njob = Path(sys.argv[1])\n"
                    + body + "\n")
    return path


RESULT = {"runner": "sleepy", "runner_version": 1, "runtime": "none 0", "threads": 1, "batch": 1, "warmup": 0,
          "runs": 50, "load_ms": 1.0, "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0}, "fps": 1.0,
          "memory_mb": {}, "power": {"status": "unavailable", "reason": "test"}}


def test_a_job_that_never_ends_is_stopped_on_the_device(sshd, device_dir, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text("{}")
    runner = sshd_helper_runner(tmp_path, "time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="ran past 2 s"):
        transport(sshd, device_dir).run(job, runner, timeout=2)
    assert time.monotonic() - t0 < 30
    assert list(device_dir.iterdir()) == []


def test_the_server_dying_mid_job_is_survived_by_running_the_job_again(sshd, device_dir, tmp_path):
    """The first attempt is cut off by killing sshd (and the job with it); the device comes back and the retry,
    in a fresh folder, finishes."""
    marker = tmp_path / "attempts.log"
    runner = sshd_helper_runner(tmp_path, f"""
with open({str(marker)!r}, "a") as log:
    log.write("started\\n")
if len(open({str(marker)!r}).read().split()) == 1:
    time.sleep(30)
measure.write_result(job, {json.dumps(RESULT)})
""")
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text("{}")
    t = transport(sshd, device_dir)
    t.backoff_s = 1.0

    def power_cycle():
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        sshd.kill()
        sshd.start()

    cycler = threading.Thread(target=power_cycle)
    cycler.start()
    result = t.run(job, runner, timeout=60)
    cycler.join()
    assert result.runner == "sleepy"
    assert marker.read_text().split() == ["started", "started"]


def test_a_device_that_stays_down_is_reported_in_one_line(sshd, device_dir, tmp_path):
    runner = sshd_helper_runner(tmp_path, "time.sleep(30)")
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text("{}")
    t = transport(sshd, device_dir)
    t.attempts, t.backoff_s = 2, 0.2
    threading.Timer(1.0, sshd.kill).start()
    with pytest.raises(DeviceError, match="gave up after 2 attempts") as info:
        t.run(job, runner, timeout=60)
    assert "\n" not in str(info.value)


def test_twenty_concurrent_jobs_complete(sshd, device_dir, tmp_path, cpu_job_source):
    boards = [transport(sshd, device_dir, name=f"board-{i:02d}") for i in range(20)]
    jobs = [cpu_job(cpu_job_source, tmp_path / f"job-{i:02d}", runs=50) for i in range(20)]

    async def all_jobs():
        return await asyncio.gather(*(run_job(board, job, target.runner, target.runtime_packages, 300,
                                              target.runner_support)
                                      for board, (target, job) in zip(boards, jobs)))

    results = asyncio.run(all_jobs())
    assert [r.device["transport"]["device"] for r in results] == [f"board-{i:02d}" for i in range(20)]
    assert all(r.runs == 50 and r.latency_ms["p50"] > 0 for r in results)
    assert list(device_dir.iterdir()) == []
