"""Self-contained ncnn probe: `python ncnn_probe.py JOB_DIR`.

Needs the standard library, numpy, the `ncnn` Python package, and measure.py and
power.py beside it, so it runs unchanged on an ARM board with its job folder. JOB_DIR
holds job.json, model.ncnn.param/.bin and input.npy (a real preprocessed image,
NCHW); result.json is written there atomically.
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

RUNNER_VERSION = 3


def thread_count(job: dict) -> int:
    """The job's thread count, else every core this process may run on: always a number, set and reported."""
    if job.get("threads"):
        return int(job["threads"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_net(job_dir: Path, job: dict):
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = thread_count(job)
    fp16 = job.get("precision") == "fp16"
    net.opt.use_fp16_storage = fp16
    net.opt.use_fp16_packed = fp16
    net.opt.use_fp16_arithmetic = fp16
    if net.load_param(str(job_dir / job["param"])) != 0 or net.load_model(str(job_dir / job["bin"])) != 0:
        raise RuntimeError("ncnn could not load the model")
    return net


def run_once(net, image_chw, outputs: list[str]):
    """One inference. `ncnn.Mat(ndarray)` does not copy: the array is kept alive here and the Mat cloned."""
    import ncnn
    import numpy as np

    data = np.ascontiguousarray(image_chw, dtype=np.float32)
    extractor = net.create_extractor()
    extractor.input("in0", ncnn.Mat(data).clone())
    results = []
    for name in outputs:
        ret, mat = extractor.extract(name)
        if ret != 0:
            raise RuntimeError(f"ncnn could not compute {name}")
        results.append(np.array(mat))
    return results


def main(job_dir: Path) -> dict:
    import ncnn
    import numpy as np

    state_start = measure.device_state()
    job = json.loads((job_dir / "job.json").read_text())
    image = np.load(job_dir / job["input"])[0]
    rss_before = measure.status_mb("VmRSS")
    t0 = time.perf_counter()
    net = open_net(job_dir, job)
    load_ms = (time.perf_counter() - t0) * 1000
    outputs = job.get("outputs", ["out0", "out1"])
    # The first run pays for allocations and packing the weights: reported on its own, and counted as a warm-up run.
    t = time.perf_counter()
    first_outputs = run_once(net, image, outputs)
    first_ms = (time.perf_counter() - t) * 1000
    if job.get("save_outputs"):
        # For cross-checking runtimes (e.g. this same model on aarch64): the outputs themselves.
        np.savez(job_dir / "outputs.npz", *first_outputs)
    for _ in range(max(job["warmup"] - 1, 0)):
        run_once(net, image, outputs)

    timings = []
    loop_s = 0.0

    def timed_runs():
        nonlocal loop_s
        loop_start = time.perf_counter()
        for _ in range(job["runs"]):
            t = time.perf_counter()
            run_once(net, image, outputs)
            timings.append((time.perf_counter() - t) * 1000)
        loop_s = time.perf_counter() - loop_start

    power = measure.measure_power(timed_runs, job["runs"], job)
    state_end = measure.device_state()
    return {
        "runner": "ncnn_probe", "runner_version": RUNNER_VERSION, "runtime": f"ncnn {ncnn.__version__}",
        "host": {**measure.host(), "state": {"start": state_start, "end": state_end}},
        "threads": int(net.opt.num_threads), "threads_from": "job" if job.get("threads") else "every core available",
        "precision": job.get("precision", "fp32"),
        "batch": 1, "warmup": job["warmup"], "runs": job["runs"], "load_ms": round(load_ms, 2),
        "first_inference_ms": round(first_ms, 3),
        "latency_ms": measure.latency_summary(timings), "samples_ms": [round(ms, 3) for ms in timings],
        "fps": round(job["runs"] / loop_s, 2),
        "memory_mb": {"rss_before_load": round(rss_before, 1), "peak_rss": round(measure.status_mb("VmHWM"), 1)},
        "power": power, "job": measure.echo_job(job),
    }


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    measure.write_result(directory, main(directory))
