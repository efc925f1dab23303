"""Self-contained ONNX Runtime probe: `python ort_probe.py JOB_DIR`.

Needs only the standard library, numpy and onnxruntime, so the same file runs
on this machine or is copied to a device with its job folder. JOB_DIR holds
job.json, the model and input.npy (a real preprocessed image); result.json is
written there atomically.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

RUNNER_VERSION = 1
RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak).

    VmHWM belongs to the process image, so unlike getrusage's ru_maxrss it does
    not carry over the parent's peak across fork and exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class RaplPower:
    """Package energy from Linux powercap (Intel RAPL); average watts over a measured interval."""

    def __init__(self):
        self._start = None
        self._t0 = 0.0

    @staticmethod
    def available() -> str | None:
        if not RAPL_ENERGY.exists():
            return "no power sensor found (no RAPL powercap on this machine)"
        try:
            int(RAPL_ENERGY.read_text())
        except (OSError, ValueError) as exc:
            return f"RAPL powercap present but unreadable ({exc.__class__.__name__})"
        return None

    def start(self) -> None:
        self._start, self._t0 = int(RAPL_ENERGY.read_text()), time.perf_counter()

    def stop(self) -> dict:
        joules = (int(RAPL_ENERGY.read_text()) - self._start) / 1e6
        seconds = time.perf_counter() - self._t0
        if joules <= 0:  # the counter wrapped; a wrong number is worse than none
            return {"status": "unavailable", "reason": "RAPL counter wrapped during the run"}
        return {"status": "measured", "sensor": "rapl package-0", "average_watts": round(joules / seconds, 3),
                "note": "whole CPU package, not the model alone"}


def main(job_dir: Path) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    import numpy as np
    import onnxruntime as ort

    batch = np.load(job_dir / job["input"])
    rss_before = status_mb("VmRSS")
    options = ort.SessionOptions()
    if job.get("threads"):
        options.intra_op_num_threads = int(job["threads"])
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(job_dir / job["model"]), options, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1000
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(job["warmup"]):
        session.run(None, feed)

    unavailable = RaplPower.available()
    power = RaplPower() if unavailable is None else None
    if power:
        power.start()
    timings = []
    wall0 = time.perf_counter()
    for _ in range(job["runs"]):
        t = time.perf_counter()
        session.run(None, feed)
        timings.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - wall0
    power_result = power.stop() if power else {"status": "unavailable", "reason": unavailable}

    ordered = sorted(timings)
    return {
        "runner": "ort_probe", "runner_version": RUNNER_VERSION,
        "runtime": f"onnxruntime {ort.__version__}", "providers": session.get_providers(),
        "host": {"machine": platform.machine(), "processor": cpu_name(), "cpus": os.cpu_count()},
        "threads": job.get("threads") or "runtime default",
        "batch": int(batch.shape[0]), "warmup": job["warmup"], "runs": job["runs"],
        "load_ms": round(load_ms, 2),
        "latency_ms": {"p50": round(percentile(ordered, 50), 3), "p90": round(percentile(ordered, 90), 3),
                       "p99": round(percentile(ordered, 99), 3), "mean": round(sum(ordered) / len(ordered), 3),
                       "min": round(ordered[0], 3), "max": round(ordered[-1], 3)},
        "fps": round(job["runs"] * int(batch.shape[0]) / wall, 2),
        "memory_mb": {"rss_before_load": round(rss_before, 1),
                      "peak_rss": round(status_mb("VmHWM"), 1)},
        "power": power_result,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    result = main(directory)
    tmp = directory / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, directory / "result.json")
