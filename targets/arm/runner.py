"""Self-contained ncnn probe: `python ncnn_probe.py JOB_DIR`.

Needs the standard library, numpy, the `ncnn` Python package, and measure.py and
power.py beside it, so it runs unchanged on an ARM board with its job folder. JOB_DIR
holds job.json, model.ncnn.param/.bin and input.npy (a real preprocessed image,
NCHW), and another build's param/bin (the FP32 one in a build's probe) when job.json
names a reference to time beside it; result.json is written there atomically.
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

RUNNER_VERSION = 4


def thread_count(job: dict) -> int:
    """The job's thread count, else every core this process may run on: always a number, set and reported."""
    if job.get("threads"):
        return int(job["threads"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_net(job_dir: Path, job: dict, model: dict | None = None):
    """`model` names the param, bin and precision (the job's own when None)."""
    import ncnn

    model = model or job
    net = ncnn.Net()
    net.opt.num_threads = thread_count(job)
    fp16 = model.get("precision") == "fp16"
    net.opt.use_fp16_storage = fp16
    net.opt.use_fp16_packed = fp16
    net.opt.use_fp16_arithmetic = fp16
    if net.load_param(str(job_dir / model["param"])) != 0 or net.load_model(str(job_dir / model["bin"])) != 0:
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


def open_model(job_dir: Path, job: dict, model: dict | None, image, outputs: list[str]) -> dict:
    """A net, warmed up: its load time, first run and outputs, the process's memory around it, and one run."""
    rss_before = measure.status_mb("VmRSS")
    t0 = time.perf_counter()
    net = open_net(job_dir, job, model)
    load_ms = (time.perf_counter() - t0) * 1000
    # The first run pays for allocations and packing the weights: reported on its own, and counted as a warm-up run.
    t = time.perf_counter()
    first_outputs = run_once(net, image, outputs)
    first_ms = (time.perf_counter() - t) * 1000
    for _ in range(max(job["warmup"] - 1, 0)):
        run_once(net, image, outputs)
    return {"net": net, "run": lambda: run_once(net, image, outputs), "load_ms": load_ms, "first_ms": first_ms,
            "first_outputs": first_outputs, "precision": (model or job).get("precision", "fp32"),
            # Read before any other model loads: a second model in the process would be counted as this one's.
            "memory_mb": {"rss_before_load": round(rss_before, 1), "peak_rss": round(measure.status_mb("VmHWM"), 1)}}


def main(job_dir: Path) -> dict:
    import ncnn
    import numpy as np

    state_start = measure.device_state()
    job = json.loads((job_dir / "job.json").read_text())
    image = np.load(job_dir / job["input"])[0]
    outputs = job.get("outputs", ["out0", "out1"])
    models = {"artifact": open_model(job_dir, job, None, image, outputs)}
    if job.get("save_outputs"):
        # For cross-checking runtimes (e.g. this same model on aarch64): the outputs themselves.
        np.savez(job_dir / "outputs.npz", *models["artifact"]["first_outputs"])
    if job.get("reference"):
        # Another build of the model (the FP32 one this artifact came from, in a build's probe), timed in this
        # process in turns with it: the speed-up is then one runtime's, on one machine, in one moment.
        models["reference"] = open_model(job_dir, job, job["reference"], image, outputs)
    timings, power, fps = measure.time_opened(models, job["runs"], job["runs"], job)
    state_end = measure.device_state()

    def result(name: str) -> dict:
        model = models[name]
        return {"runner": "ncnn_probe", "runner_version": RUNNER_VERSION, "runtime": f"ncnn {ncnn.__version__}",
                "threads": int(model["net"].opt.num_threads),
                "threads_from": "job" if job.get("threads") else "every core available",
                "precision": model["precision"], "batch": 1,
                **measure.model_figures(model, timings[name], power[name], fps[name], job)}

    return measure.job_result({name: result(name) for name in models}, state_start, state_end)


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    measure.write_result(directory, main(directory))
