"""Self-contained ONNX Runtime probe: `python ort_probe.py JOB_DIR`.

Needs the standard library, numpy, onnxruntime, and measure.py and power.py beside
it, so the same files run on this machine or are copied to a device with the job
folder.
JOB_DIR holds job.json, the model and input.npy (a real preprocessed image), and
another build of the model (its FP32 one in a build's probe) when job.json names a
reference to time beside it; result.json is written there atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

try:  # inside the package here; beside the script on a device
    from edge_deploy.targets.runners import measure
except ImportError:
    import measure

RUNNER_VERSION = 5


def thread_count(job: dict) -> int:
    """The job's thread count, else every core this process may run on: always a number, set on the session
    and reported, never left to the runtime (ONNX Runtime would pick its own default per machine)."""
    if job.get("threads"):
        return int(job["threads"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_model(job_dir: Path, model: str, batch, threads: int, warmup: int) -> dict:
    """A session on `model`, warmed up: its load time, first run, the process's memory around it, and one run."""
    import onnxruntime as ort

    rss_before = measure.status_mb("VmRSS")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(job_dir / model), options, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1000
    feed = {session.get_inputs()[0].name: batch}
    # The first run pays for allocations and kernel choices: reported on its own, and counted as a warm-up run.
    t = time.perf_counter()
    session.run(None, feed)
    first_ms = (time.perf_counter() - t) * 1000
    for _ in range(max(warmup - 1, 0)):
        session.run(None, feed)
    return {"session": session, "run": lambda: session.run(None, feed), "load_ms": load_ms, "first_ms": first_ms,
            # Read before any other model loads: a second model in the process would be counted as this one's.
            "memory_mb": {"rss_before_load": round(rss_before, 1), "peak_rss": round(measure.status_mb("VmHWM"), 1)}}


def main(job_dir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    state_start = measure.device_state()
    job = json.loads((job_dir / "job.json").read_text())
    batch = np.load(job_dir / job["input"])
    images = int(batch.shape[0])
    threads = thread_count(job)
    models = {"artifact": open_model(job_dir, job["model"], batch, threads, job["warmup"])}
    if job.get("reference"):
        # Another build of the model (the FP32 one this artifact came from, in a build's probe), timed in this
        # process in turns with it: the speed-up is then one runtime's, on one machine, in one moment.
        models["reference"] = open_model(job_dir, job["reference"]["model"], batch, threads, job["warmup"])
    # Energy per image, like fps: a batch of n is n inferences.
    timings, power, fps = measure.time_opened(models, job["runs"], job["runs"] * images, job)
    state_end = measure.device_state()

    def result(name: str) -> dict:
        model = models[name]
        return {"runner": "ort_probe", "runner_version": RUNNER_VERSION, "runtime": f"onnxruntime {ort.__version__}",
                "providers": model["session"].get_providers(), "threads": threads,
                "threads_from": "job" if job.get("threads") else "every core available", "batch": images,
                **measure.model_figures(model, timings[name], power[name], fps[name], job)}

    return measure.job_result({name: result(name) for name in models}, state_start, state_end)


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    measure.write_result(directory, main(directory))
