"""Self-contained Jetson runner: `python3 runner.py JOB_DIR`, run on the Jetson itself.

Needs the standard library, JetPack's `trtexec` (on PATH or in /usr/src/tensorrt/bin), and, beside this
script, measure.py, trtexec.py and power.py. JOB_DIR holds job.json, the bundle's model.onnx (and for
TensorRT 8.x's implicit INT8, model.fp32.onnx + calibration.cache). The runner builds the engine with the
job's recipe (an engine is tied to this GPU and TensorRT version, so it is built here), times it with
trtexec, samples tegrastats (or the INA3221 rails) while it runs and while idle, and writes result.json
atomically; the engine, its build log and the timing log stay in JOB_DIR to be brought back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

try:  # inside the package here; beside the script on a device
    from edge_deploy.targets.jetson import power, trtexec
    from edge_deploy.targets.runners import measure
except ImportError:
    import measure
    import power
    import trtexec

RUNNER_VERSION = 1
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/usr/bin/trtexec")


class JobFailed(RuntimeError):
    """A step of the job failed; the message ends with the tail of the tool's log, kept in full in JOB_DIR."""


def find_trtexec() -> str:
    found = shutil.which(os.environ.get("TRTEXEC", "trtexec"))
    if found:
        return found
    for candidate in TRTEXEC_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise JobFailed("trtexec not found (install JetPack's TensorRT, or set TRTEXEC to its path)")


def run_logged(command: list[str], log: Path, timeout: float) -> str:
    """Runs a tool with its output in `log`; a failure carries the log's last line."""
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        tail = [line for line in text.splitlines() if line.strip()][-1:] or [f"exit code {done.returncode}"]
        raise JobFailed(f"{Path(command[0]).name} failed ({log.name}): {tail[0].strip()}")
    return text


class PowerSampler:
    """Power samples in the background: tegrastats lines where the tool exists, else the INA3221 rails read
    from sysfs at the same interval, else nothing (and power is then 'unavailable', never 0)."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[dict] = []
        self.process = None
        self.stopped = threading.Event()
        tool = shutil.which("tegrastats")
        if tool:
            self.process = subprocess.Popen([tool, "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read_tegrastats, daemon=True).start()
        elif power.read_ina3221_sysfs():
            threading.Thread(target=self._poll_sysfs, args=(interval_ms / 1000,), daemon=True).start()

    def _read_tegrastats(self):
        for line in self.process.stdout:
            if line.strip():
                self.samples.append(power.parse_tegrastats(line.strip()))

    def _poll_sysfs(self, interval_s: float):
        while not self.stopped.wait(interval_s):
            rails = power.read_ina3221_sysfs()
            self.samples.append({"rails_mw": {name: {"now": mw, "avg": None} for name, mw in rails.items()}})

    def take(self) -> list[dict]:
        taken, self.samples = self.samples, []
        return taken

    def stop(self):
        self.stopped.set()
        if self.process is not None:
            self.process.terminate()


def device_facts() -> dict:
    """What ties an engine to its device: the board (device tree), and L4T's release, as the device reports them."""
    facts = {}
    for key, path in (("board", "/proc/device-tree/model"), ("l4t", "/etc/nv_tegra_release")):
        try:
            facts[key] = Path(path).read_text(errors="replace").strip("\x00\n ").splitlines()[0]
        except (OSError, IndexError):
            facts[key] = None
    return facts


def check_cache_version(cache: Path, trt_version: str | None) -> None:
    """An implicit-INT8 calibration cache is read only by the TensorRT it names; another would misread it."""
    header = cache.read_text(errors="replace").splitlines()[0] if cache.exists() else ""
    written_for = header.split("-")[1] if header.startswith("TRT-") and header.count("-") >= 2 else None
    if trt_version is None or written_for is None:
        return
    major, minor, patch = (int(v) for v in (trt_version.split(".") + ["0", "0"])[:3])
    here = str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)
    if written_for[:-2] != here[:-2]:  # the patch level does not change the cache format
        raise JobFailed(f"calibration.cache was written for TensorRT {written_for} but this device has "
                        f"TensorRT {trt_version}: build again with the profile of this device (--profile)")


# AGX Orin has no input rail; its GPU+SoC, CPU+CV and 5 V system rails together are the module's draw
# (the system rail alone barely moves with inference).
RAILS_SUMMED_WITHOUT_INPUT_RAIL = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")


def module_power(samples: list[dict]) -> tuple[str | None, list[float]]:
    rails = [s["rails_mw"] for s in samples if s.get("rails_mw")]
    rail = power.module_rail(rails[0]) if rails else None
    if rail == "VIN_SYS_5V0":
        parts = [name for name in RAILS_SUMMED_WITHOUT_INPUT_RAIL if name in rails[0]]
        return "+".join(parts), [sum(r[name]["now"] for name in parts) for r in rails if all(n in r for n in parts)]
    return rail, [r[rail]["now"] for r in rails if rail in r]


def main(job_dir: Path) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    recipe = job["engine_build"]
    tool = find_trtexec()
    timeout = float(job.get("timeout_s", 3600))
    mode = "dla" if job.get("dla_core") is not None else "build"
    if job.get("implicit_int8"):  # TensorRT 8.x's calibrator path, from the cache instead of Q/DQ
        mode = "tensorrt8_implicit"
        banner = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=60)
        check_cache_version(job_dir / "calibration.cache", trtexec.parse_trt_version(banner.stdout + banner.stderr))
    if mode not in recipe:
        raise JobFailed(f"the bundle's recipe has no '{mode}' build (an implicit-INT8 build needs an INT8 bundle)")
    build = [tool, *recipe[mode][1:]]
    t0 = time.perf_counter()
    build_log = run_logged(build, job_dir / "build.log", timeout)
    build_s = time.perf_counter() - t0
    engine = next((a.split("=", 1)[1] for a in build if a.startswith("--saveEngine=")), "model.engine")

    sampler = PowerSampler()
    time.sleep(2.0)  # idle power, before the timed runs
    idle = sampler.take()
    version = trtexec.parse_trt_version(build_log)
    major, minor = (int(v) for v in (version or "8.0").split(".")[:2])  # unknown: the oldest flags are safest
    timing_command = [tool, *trtexec.trtexec_run_command(engine, int(job["runs"]), int(job.get("warmup_ms", 500)),
                                                         job.get("dla_core"), trt_major=major,
                                                         trt_minor=minor)[1:]]
    timing_log = run_logged(timing_command, job_dir / "timing.log", timeout)
    busy = sampler.take()
    sampler.stop()
    timing = trtexec.parse_trtexec(timing_log)

    rail, busy_mw = module_power(busy)
    _, idle_mw = module_power(idle)
    if rail and busy_mw and idle_mw and timing.get("throughput_qps"):
        # --duration=0 makes the count exact; the time they took is the count over the measured throughput (the
        # wall clock would add loading the engine).
        inferences = int(job["runs"])
        energy = power.energy_per_inference(busy_mw, idle_mw, inferences / timing["throughput_qps"], inferences,
                                            rail=rail)
        power_report = {"status": "measured", "rail": rail, "average_watts": round(sum(busy_mw) / len(busy_mw) / 1000,
                                                                                  3), **energy}
    else:
        power_report = {"status": "unavailable",
                        "reason": "no tegrastats or INA3221 power rail on this device" if not rail
                        else "too few power samples"}
    latency = timing["latency_ms"]
    return {
        "runner": "tensorrt_trtexec", "runner_version": RUNNER_VERSION,
        "runtime": f"TensorRT {timing.get('trt_version') or 'unknown'} (trtexec)", "host": measure.host(),
        "threads": None, "precision": recipe["precision"], "batch": 1, "warmup": int(job.get("warmup_ms", 500)),
        "runs": int(job["runs"]), "load_ms": round(build_s * 1000, 1),
        "latency_ms": {"p50": latency.get("median"), "p90": latency.get("p90"), "p99": latency.get("p99"),
                       "mean": latency.get("mean"), "min": latency.get("min"), "max": latency.get("max")},
        "fps": timing.get("throughput_qps"), "memory_mb": {"rss_before_load": None, "peak_rss": None},
        "power": power_report, "gpu_compute_ms": timing.get("gpu_compute_ms"), "warnings": timing.get("warnings", []),
        "engine": engine, "logs": ["build.log", "timing.log"], "jetson_device": device_facts(),
        # The host pulls these back with result.json: the engine built here, and the logs that explain it.
        "bring_back": [engine, "build.log", "timing.log"],
        "tensorrt": version,
    }


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    try:
        measure.write_result(directory, main(directory))
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
