"""The transport layer with real processes: what a device job returns, and how it fails."""

import json
import sys
import textwrap

import pytest

from edge_deploy.pipeline.errors import DeviceError, DeviceTimeout
from edge_deploy.targets.transports.local import LocalTransport

RESULT = {"runner": "fake", "runner_version": 1, "runtime": "fakert 1.0", "host": {"machine": "x", "cpus": 2},
          "threads": 1, "batch": 1, "warmup": 0, "runs": 50, "load_ms": 1.0,
          "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}, "fps": 900.0,
          "memory_mb": {"peak_rss": 10.0}, "power": {"status": "unavailable", "reason": "no sensor"},
          "providers": ["CPUExecutionProvider"]}


def runner(tmp_path, body: str):
    path = tmp_path / "runner.py"
    path.write_text("import json, sys, time\nfrom pathlib import Path\njob = Path(sys.argv[1])\n" + textwrap.dedent(body))
    return path


def job_dir(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "job.json").write_text("{}")
    return folder


def test_a_job_comes_back_as_a_typed_result_naming_the_device(tmp_path):
    script = runner(tmp_path, f"""
        import measure  # the shared measurements travel with every runner
        measure.write_result(job, {json.dumps(RESULT)})
    """)
    result = LocalTransport().run(job_dir(tmp_path), script, ("numpy",))
    assert result.runtime == "fakert 1.0" and result.latency_ms["p90"] == 2.0
    assert result.device["machine"] == "x" and result.device["transport"]["transport"] == "local"
    assert result.device["transport"]["packages"]["numpy"] != "not installed"
    assert result.extra == {"providers": ["CPUExecutionProvider"]}
    assert result.power_text() == "unavailable"


def test_a_failed_measurement_names_the_runner_error(tmp_path):
    script = runner(tmp_path, "sys.exit('ncnn could not load the model')\n")
    with pytest.raises(DeviceError, match="local: the device job failed: ncnn could not load the model") as info:
        LocalTransport().run(job_dir(tmp_path), script)
    assert not isinstance(info.value, DeviceTimeout)


def test_a_runner_that_writes_no_result_is_a_failure_not_an_empty_result(tmp_path):
    script = runner(tmp_path, "pass\n")
    with pytest.raises(DeviceError, match="finished without writing result.json"):
        LocalTransport().run(job_dir(tmp_path), script)


def test_a_job_that_never_ends_is_stopped_and_reported_as_a_timeout(tmp_path):
    script = runner(tmp_path, "time.sleep(60)\n")
    with pytest.raises(DeviceTimeout, match="ran past 1 s"):
        LocalTransport().run(job_dir(tmp_path), script, timeout=1)


def test_a_stale_result_from_an_earlier_run_is_never_returned(tmp_path):
    folder = job_dir(tmp_path)
    (folder / "result.json").write_text(json.dumps(RESULT))
    with pytest.raises(DeviceError):
        LocalTransport().run(folder, runner(tmp_path, "sys.exit(2)\n"))


def test_the_local_transport_runs_a_fresh_interpreter():
    assert LocalTransport().python() == [sys.executable]


def test_a_timing_whose_spread_says_the_machine_was_busy_is_flagged():
    from edge_deploy.pipeline.results import ProbeResult
    from edge_deploy.pipeline.stages.probe import contention

    def result(p50, p90, fastest=None):
        latency = {"p50": p50, "p90": p90, "p99": p90, **({"min": fastest} if fastest else {})}
        return ProbeResult.from_runner({**RESULT, "latency_ms": latency}, {})

    assert contention([result(4.0, 4.4)]) is None
    assert "p90 9.0 ms is 2.2x its p50 4.0 ms" in contention([result(4.0, 4.4), result(4.0, 9.0)])
    # Most runs slowed alike: the p90 stays near the p50, the fastest run shows what the machine could do.
    assert contention([result(59.37, 63.4, 58.1)]) is None
    assert "p50 52.3 ms is 1.33x its fastest run (39.27 ms)" in contention([result(52.3, 60.2, 39.27)])
