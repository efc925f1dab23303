"""`deploy bench`, `deploy devices` and `deploy results` with real SSH devices (OpenSSH servers on 127.0.0.1)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import sshd as sshd_helper
from tests.conftest import DEPLOY, run_deploy

pytestmark = pytest.mark.skipif(sshd_helper.unavailable() is not None, reason=str(sshd_helper.unavailable()))
pytest.importorskip("asyncssh")


@pytest.fixture(scope="module")
def bundle(cpu_fp32_bundle) -> Path:
    return cpu_fp32_bundle


@pytest.fixture
def lab(tmp_path):
    """Two boards, each its own sshd, and the inventory naming them."""
    servers = {name: sshd_helper.Sshd.prepare(tmp_path / name).start() for name in ("board-a", "board-b")}
    workdir = tmp_path / "device-tmp"
    workdir.mkdir()
    inventory = {"devices": {name: {**s.inventory_entry([sys.executable], workdir), "target": "cpu",
                                    "attempts": 1}
                             for name, s in servers.items()}}
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump(inventory))
    yield tmp_path, servers, workdir
    for server in servers.values():
        server.kill()


def test_bench_runs_on_every_named_device_and_keeps_each_result(bundle, lab, deploy_home):
    cwd, servers, workdir = lab
    done = run_deploy(["bench", str(bundle), "--device", "board-a", "--device", "board-b", "--runs", "50",
                       "--json"], cwd, deploy_home)
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    assert [o["device"] for o in outcomes] == ["board-a", "board-b"] and all(o["ok"] for o in outcomes)
    for outcome in outcomes:
        result = outcome["result"]
        assert result["device"]["transport"]["transport"] == "ssh"
        assert result["runtime"].startswith("onnxruntime") and len(result["samples_ms"]) == 50
        assert result["job"]["runs"] == 50 and result["job"]["input_image"]["image"].startswith("generated")
        assert set(result["host_timings"]) == {"connect_s", "upload_s", "run_s", "download_s"}
    stored = json.loads(run_deploy(["results", "--json", "--bundle", bundle.name], cwd, deploy_home).stdout)
    ids = {o["stored_id"] for o in outcomes}
    assert ids <= {r["id"] for r in stored["results"]}
    assert list(workdir.iterdir()) == []


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, deploy_home) -> Path:
    """The default INT8 build of the embedded model: the same model as `bundle`, in the same runtime."""
    out = tmp_path_factory.mktemp("cpu-int8-dist")
    done = run_deploy(["build", "--json", "--runs", "50", "--output", str(out)], out, deploy_home)
    assert done.returncode == 0, done.stderr
    return Path(json.loads(done.stdout)["bundle"])


def test_bench_against_an_fp32_bundle_times_both_in_turns_on_the_device(int8_bundle, bundle, lab, deploy_home):
    """--against puts the FP32 bundle into the device's job beside the INT8 one: both are timed there in turns,
    both results are stored, and the speed-up is that device's."""
    cwd, _, _ = lab
    done = run_deploy(["bench", str(int8_bundle), "--against", str(bundle), "--device", "board-a", "--runs", "50",
                       "--threads", "1", "--json"], cwd, deploy_home)
    assert done.returncode == 0, done.stderr
    (outcome,) = json.loads(done.stdout)
    result, reference, speed = outcome["result"], outcome["reference"], outcome["speed"]
    assert result["device"]["transport"]["device"] == reference["device"]["transport"]["device"] == "board-a"
    assert len(result["samples_ms"]) == len(reference["samples_ms"]) == 50
    assert speed["timing"] == "in one process, in turns" and speed["speedup_rounds"]["rounds"] == 10
    assert speed["speedup_p50"] == round(reference["latency_ms"]["p50"] / result["latency_ms"]["p50"], 3)
    # INT8 runs this model well under FP32's time at one thread: results filed under the wrong bundle would not.
    assert speed["speedup_p50"] > 1 and speed["reference_label"] == f"the FP32 bundle {bundle.name}"
    stored = json.loads(run_deploy(["results", "--json", "--device", "board-a"], cwd, deploy_home).stdout)
    rows = {(r["bundle"], r["role"], r["precision"]) for r in stored["results"]}
    assert {(bundle.name, "reference", "fp32"), (int8_bundle.name, "artifact", "int8")} <= rows
    text = run_deploy(["bench", str(int8_bundle), "--against", str(bundle), "--device", "board-b", "--runs", "50",
                       "--threads", "1"], cwd, deploy_home)
    assert text.returncode == 0, text.stderr
    assert f"as fast as the FP32 bundle {bundle.name} at p50, timed in one process, in turns" in text.stdout
    assert "; FP32 p50 " in text.stdout
    # Any other precision of the same model and target is a reference too, named as what it is: here the FP32
    # bundle against the INT8 one, which it does not outrun.
    done = run_deploy(["bench", str(bundle), "--against", str(int8_bundle), "--device", "board-b", "--runs", "50",
                       "--threads", "1", "--json"], cwd, deploy_home)
    assert done.returncode == 0, done.stderr
    (outcome,) = json.loads(done.stdout)
    assert outcome["speed"]["reference_label"] == f"the INT8 bundle {int8_bundle.name}"
    assert outcome["reference_precision"] == "int8" and outcome["speed"]["speedup_p50"] < 1
    stored = json.loads(run_deploy(["results", "--json", "--device", "board-b"], cwd, deploy_home).stdout)
    assert (int8_bundle.name, "reference", "int8") in {(r["bundle"], r["role"], r["precision"])
                                                       for r in stored["results"]}


def test_bench_against_refuses_what_it_cannot_pair_before_any_job(int8_bundle, bundle, lab, deploy_home):
    cwd, _, workdir = lab
    inventory = yaml.safe_load((cwd / "devices.yaml").read_text())
    inventory["devices"]["uart"] = {"transport": "serial", "port": str(cwd / "no-such-port")}
    (cwd / "devices.yaml").write_text(yaml.safe_dump(inventory))
    for bench_args, message in (
            ([str(int8_bundle), "--against", str(int8_bundle), "--device", "board-a"],
             f"--against {int8_bundle} holds the same model files as {int8_bundle.name}: there is nothing to compare"),
            ([str(int8_bundle), "--against", str(bundle), "--device", "uart"],
             "--against needs devices that run the Python runners, and uart cannot"),
            ([str(int8_bundle), "--against", str(cwd / "missing"), "--device", "board-a"], "missing")):
        done = run_deploy(["bench", *bench_args], cwd, deploy_home)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert list(workdir.iterdir()) == []


SLOW_PYTHON = [sys.executable, "-c", "import runpy, sys, time; time.sleep(60); sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')"]


def test_a_device_dying_mid_run_loses_no_result_that_arrived(bundle, lab, deploy_home):
    cwd, servers, workdir = lab
    inventory = yaml.safe_load((cwd / "devices.yaml").read_text())
    inventory["devices"]["board-b"]["python"] = SLOW_PYTHON  # a board that takes a minute to answer
    (cwd / "devices.yaml").write_text(yaml.safe_dump(inventory))
    before = {r["id"] for r in _results(cwd, deploy_home, "board-a")}
    process = subprocess.Popen([str(DEPLOY), "bench", str(bundle), "--device", "board-a", "--device", "board-b",
                                "--runs", "50", "--json"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_env(deploy_home))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and {r["id"] for r in _results(cwd, deploy_home, "board-a")} == before:
        time.sleep(0.2)
    servers["board-b"].kill()  # board-b loses power while its job runs
    out, err = process.communicate(timeout=300)
    outcomes = {o["device"]: o for o in json.loads(out)}
    assert process.returncode == 6, err
    assert outcomes["board-a"]["ok"] and not outcomes["board-b"]["ok"], out
    assert err.strip() == f"error: 1 of 2 devices failed (board-b); results that arrived are in " \
                          f"{deploy_home / 'results.sqlite'}"
    assert outcomes["board-a"]["stored_id"] in {r["id"] for r in _results(cwd, deploy_home, "board-a")}
    failures = json.loads(run_deploy(["results", "--json", "--device", "board-b"], cwd, deploy_home).stdout)
    assert any("connection lost" in f["error"] or "cannot connect" in f["error"] for f in failures["failures"])


def _env(home: Path) -> dict:
    import os

    env = {**os.environ, "DEPLOY_HOME": str(home), "COLUMNS": "160"}
    env.pop("DEPLOY_DEBUG", None)
    return env


def _results(cwd: Path, home: Path, device: str) -> list[dict]:
    done = run_deploy(["results", "--json", "--device", device], cwd, home)
    return json.loads(done.stdout)["results"] if done.returncode == 0 and done.stdout.strip() else []


def _stored(cwd: Path, home: Path, device: str) -> int:
    return len(_results(cwd, home, device))


def test_a_busy_device_is_waited_for_and_then_reported(bundle, lab, deploy_home):
    cwd, _, _ = lab
    locks = deploy_home / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / "board-a.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.truncate(0)
        held.write("pid 4242\n")
        held.flush()
        done = run_deploy(["bench", str(bundle), "--device", "board-a", "--runs", "50", "--timeout", "2"], cwd,
                          deploy_home)
    assert done.returncode == 7
    assert "board-a: failed: board-a: still in use by another run (pid 4242)" in done.stdout
    # Progress lines go to stderr when it is not a terminal; the error is one line, the last.
    assert done.stderr.count("error:") == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 devices failed (board-a)")
    assert "waiting for board-a: in use by pid 4242" in done.stderr


def test_an_unknown_device_name_suggests_the_closest(bundle, lab, deploy_home):
    cwd, _, _ = lab
    done = run_deploy(["bench", str(bundle), "--device", "board-c"], cwd, deploy_home)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().startswith("error: unknown device 'board-c' (did you mean 'board-")
    assert done.stderr.count("\n") == 1


def test_devices_lists_the_inventory_and_says_which_answer(lab, deploy_home):
    cwd, servers, _ = lab
    servers["board-b"].kill()
    done = run_deploy(["devices", "--json"], cwd, deploy_home)
    rows = {row["device"]: row for row in json.loads(done.stdout)}
    assert done.returncode == 6
    assert rows["local"]["state"]["ok"] and rows["board-a"]["state"]["ok"]
    assert "onnxruntime" in rows["board-a"]["state"]["summary"]
    assert not rows["board-b"]["state"]["ok"] and "cannot connect" in rows["board-b"]["state"]["summary"]
    listed = run_deploy(["devices", "--no-check"], cwd, deploy_home)
    assert listed.returncode == 0 and "board-a" in listed.stdout and "ssh" in listed.stdout


def test_an_inventory_mistake_is_one_line_naming_the_key(lab, deploy_home):
    cwd, _, _ = lab
    (cwd / "bad.yaml").write_text("devices:\n  pi:\n    transport: ssh\n    adress: 10.0.0.2\n")
    done = run_deploy(["devices", "--inventory", str(cwd / "bad.yaml")], cwd, deploy_home)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: bad.yaml: device pi: unknown key 'adress' (did you mean 'address'?)" \
        or "unknown key 'adress' (did you mean 'address'?)" in done.stderr
    (cwd / "bad.yaml").write_text("devices:\n  pi:\n    transport: ssh\n    address: 10.0.0.2\n")
    done = run_deploy(["devices", "--inventory", str(cwd / "bad.yaml")], cwd, deploy_home)
    assert done.returncode == 2 and "a ssh device needs host_key" in done.stderr


def test_build_probes_on_the_named_device_and_stores_both_results(lab, deploy_home):
    cwd, _, _ = lab
    done = run_deploy(["build", "--json", "--device", "board-a", "--runs", "50", "--output", str(cwd / "dist")], cwd,
                      deploy_home)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    probe = next(s for s in summary["stages"] if s["stage"] == "probe")
    assert not probe["cache_hit"]
    metrics = probe["metrics"]
    for role in ("reference", "artifact"):
        assert metrics[role]["device"]["transport"]["transport"] == "ssh"
        assert metrics[role]["device"]["transport"]["device"] == "board-a"
    assert metrics["speedup_p50"] > 0  # both ran on the same board, so the ratio means something
    card = (Path(summary["bundle"]) / "README.md").read_text()
    assert "reached through the `ssh` transport" in card
    stored = json.loads(run_deploy(["results", "--json", "--device", "board-a"], cwd, deploy_home).stdout)["results"]
    assert {r["role"] for r in stored if r["bundle"] == Path(summary["bundle"]).name} >= {"reference", "artifact"}


def test_build_with_an_unknown_device_stops_before_any_stage(lab, deploy_home):
    cwd, _, _ = lab
    started = time.monotonic()
    done = run_deploy(["build", "--device", "bord-a"], cwd, deploy_home)
    assert done.returncode == 2 and "unknown device 'bord-a' (did you mean 'board-a'?)" in done.stderr
    assert done.stderr.count("\n") == 1 and "load" not in done.stdout
    assert time.monotonic() - started < 60


def test_ctrl_c_stops_the_device_jobs_and_keeps_what_arrived(bundle, lab, deploy_home):
    import signal

    cwd, _, workdir = lab
    inventory = yaml.safe_load((cwd / "devices.yaml").read_text())
    inventory["devices"]["board-b"]["python"] = SLOW_PYTHON
    (cwd / "devices.yaml").write_text(yaml.safe_dump(inventory))
    process = subprocess.Popen([str(DEPLOY), "bench", str(bundle), "--device", "board-b", "--runs", "50"], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(deploy_home))
    deadline = time.monotonic() + 60
    seen = []
    for line in process.stderr:  # progress lines: the job is running on the board once this one appears
        seen.append(line)
        if "board-b: running" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (seen, err)
    assert err.strip().splitlines()[-1] == ("error: interrupted; the jobs still running were stopped, and results "
                                            "that arrived are kept in the results store (deploy results)")
    # The job was killed on the board and its folder removed, not left to run out its timeout.
    alive = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert alive == [] and list(workdir.iterdir()) == []


def test_a_device_that_could_not_build_the_fp32_beside_says_why_there_is_no_speed_up():
    """A Jetson whose FP32 engine would not build still times the bundle: its line says why no speed-up follows."""
    from edge_deploy.pipeline.bench import DeviceOutcome, outcome_line
    from edge_deploy.pipeline.results import ProbeResult
    from tests.targets.test_transports import RESULT

    reason = "the FP32 engine to time beside the artifact could not be built: trtexec failed (reference-build.log)"
    result = ProbeResult.from_runner({**RESULT, "reference_failed": reason}, {"transport": "ssh", "device": "orin"})
    line = outcome_line(DeviceOutcome("orin", result))
    assert line.startswith("orin: fakert 1.0, p50 1.0 ms") and line.endswith(f"; no speed-up: {reason}")
