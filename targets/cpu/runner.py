"""Self-contained ONNX Runtime probe: `python ort_probe.py JOB_DIR`.

Needs the standard library, numpy, onnxruntime and measure.py beside it, so the
same files run on this machine or are copied to a device with the job folder.
JOB_DIR holds job.json, the model and input.npy (a real preprocessed image);
result.json is written there atomically.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

try:  # inside the package here; beside the script on a device
    from edge_deploy.targets.runners import measure
except ImportError:
    import measure

RUNNER_VERSION = 2


def main(job_dir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    job = json.loads((job_dir / "job.json").read_text())
    batch = np.load(job_dir / job["input"])
    rss_before = measure.status_mb("VmRSS")
    options = ort.SessionOptions()
    if job.get("threads"):
        options.intra_op_num_threads = int(job["threads"])
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(job_dir / job["model"]), options, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1000
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(job["warmup"]):
        session.run(None, feed)

    timings = []

    def timed_runs():
        for _ in range(job["runs"]):
            t = time.perf_counter()
            session.run(None, feed)
            timings.append((time.perf_counter() - t) * 1000)

    wall0 = time.perf_counter()
    power = measure.measure_power(timed_runs)
    wall = time.perf_counter() - wall0
    return {
        "runner": "ort_probe", "runner_version": RUNNER_VERSION,
        "runtime": f"onnxruntime {ort.__version__}", "providers": session.get_providers(),
        "host": measure.host(), "threads": job.get("threads") or "runtime default",
        "batch": int(batch.shape[0]), "warmup": job["warmup"], "runs": job["runs"], "load_ms": round(load_ms, 2),
        "latency_ms": measure.latency_summary(timings),
        "fps": round(job["runs"] * int(batch.shape[0]) / wall, 2),
        "memory_mb": {"rss_before_load": round(rss_before, 1), "peak_rss": round(measure.status_mb("VmHWM"), 1)},
        "power": power,
    }


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    measure.write_result(directory, main(directory))
