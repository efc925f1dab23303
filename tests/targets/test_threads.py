"""Every runtime gets a thread count it reports as a number, never "runtime default"."""

import json
import os

import numpy as np

from edge_deploy.targets.arm import runner as ncnn_runner
from edge_deploy.targets.cpu import OnnxRuntimeCpu
from edge_deploy.targets.cpu import runner as ort_runner


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def test_a_job_without_threads_runs_and_reports_every_available_core(exported, preprocess, tmp_path):
    target = OnnxRuntimeCpu()
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(exported["onnx"].path.read_bytes())
    tensor = np.zeros((1, 3, preprocess.imgsz, preprocess.imgsz), np.float32)
    for threads, expected, source in ((None, available_cores(), "every core available"), (1, 1, "job")):
        job_dir = tmp_path / f"job-{threads}"
        job_dir.mkdir()
        target.prepare_job(artifact, {"warmup": 1, "runs": 3, "threads": threads}, tensor, job_dir)
        result = ort_runner.main(job_dir)
        assert result["threads"] == expected and result["threads_from"] == source
        assert "runtime default" not in json.dumps(result)


def test_ncnn_thread_count_is_the_jobs_or_every_available_core():
    assert ncnn_runner.thread_count({"threads": 3}) == 3
    assert ncnn_runner.thread_count({"threads": None}) == available_cores()
    assert ort_runner.thread_count({}) == available_cores()
