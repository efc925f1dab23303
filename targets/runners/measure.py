"""What every device-side runner measures the same way. Standard library only.

Runners are pushed to a device as plain scripts with this file beside them,
so they import it as a top-level module there and as part of the package here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

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


def latency_summary(timings_ms: list[float]) -> dict:
    ordered = sorted(timings_ms)
    return {"p50": round(percentile(ordered, 50), 3), "p90": round(percentile(ordered, 90), 3),
            "p99": round(percentile(ordered, 99), 3), "mean": round(sum(ordered) / len(ordered), 3),
            "min": round(ordered[0], 3), "max": round(ordered[-1], 3)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# INT8 and FP16 speed-ups depend on these more than on the clock: name them wherever a timing is shown.
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
                "amx_int8": "AMX-INT8", "asimd": "NEON", "asimddp": "dot-product", "asimdhp": "FP16 arithmetic",
                "i8mm": "I8MM", "sve": "SVE"}


def vector_extensions() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return ", ".join(name for flag, name in VECTOR_FLAGS.items() if flag in present) or "none listed"
    except OSError:
        pass
    return "unknown"


def host() -> dict:
    return {"machine": platform.machine(), "processor": cpu_name(), "cpus": os.cpu_count(),
            "vector_extensions": vector_extensions()}


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


def measure_power(run) -> dict:
    """Calls `run()` and returns the power it drew where a sensor exists; 'unavailable' (never 0) otherwise."""
    unavailable = RaplPower.available()
    if unavailable is not None:
        run()
        return {"status": "unavailable", "reason": unavailable}
    power = RaplPower()
    power.start()
    run()
    return power.stop()


def write_result(job_dir: Path, result: dict) -> None:
    """result.json appears whole or not at all, so a dropped connection never leaves half a result."""
    tmp = job_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, job_dir / "result.json")
