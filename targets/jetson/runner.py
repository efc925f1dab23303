"""Self-contained Jetson runner: `python3 runner.py JOB_DIR`, run on the Jetson itself.

Needs the standard library, JetPack's `trtexec` (on PATH or in /usr/src/tensorrt/bin), and, beside this
script, measure.py, power.py, trtexec.py and tegrastats.py. JOB_DIR holds job.json, the bundle's model.onnx (and
for TensorRT 8.x's implicit INT8, model.fp32.onnx + calibration.cache). The runner builds the engine with the
job's recipe (an engine is tied to this GPU and TensorRT version, so it is built here), times it with
trtexec, samples the INA3221 rails (or tegrastats) while it runs and while idle, and writes result.json
atomically; the engine, its build log and the timing log stay in JOB_DIR to be brought back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:  # inside the package here; beside the script on a device
    from edge_deploy.targets.jetson import tegrastats, trtexec
    from edge_deploy.targets.runners import measure, power
except ImportError:
    import measure
    import power
    import tegrastats
    import trtexec

RUNNER_VERSION = 2
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/usr/bin/trtexec")
# trtexec writes every timed inference here (--exportTimes): the raw samples behind its summary.
TIMES_FILE = "times.json"


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


def exported_latencies(path: Path) -> list:
    """Each timed inference's latency (ms) from trtexec's --exportTimes file; [] where there is none.

    The file is a JSON list with one entry per inference, whose latencyMs is the figure trtexec's own latency
    summary is made of; entries without one are skipped.
    """
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [float(entry["latencyMs"]) for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("latencyMs"), (int, float))]


def main(job_dir: Path) -> dict:
    state_start = measure.device_state()
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

    version = trtexec.parse_trt_version(build_log)
    major, minor = (int(v) for v in (version or "8.0").split(".")[:2])  # unknown: the oldest flags are safest
    runs = int(job["runs"])
    timing_command = [tool, *trtexec.trtexec_run_command(engine, runs, int(job.get("warmup_ms", 500)),
                                                         job.get("dla_core"), trt_major=major,
                                                         trt_minor=minor)[1:], f"--exportTimes={TIMES_FILE}"]
    (job_dir / TIMES_FILE).unlink(missing_ok=True)
    idle_s, interval_s = power.job_settings(job)
    meter = power.PowerMeter.find(interval_s=interval_s, extra=(tegrastats.OPENER,))
    try:
        meter.measure_idle(idle_s)
        meter.start()
        timing_log = run_logged(timing_command, job_dir / "timing.log", timeout)
        meter.stop()
    finally:
        meter.close()
    state_end = measure.device_state()
    timing = trtexec.parse_trtexec(timing_log)
    throughput = timing.get("throughput_qps")
    # --duration=0 makes the count exact, and the time the inferences took is the count over the measured
    # throughput: the busy window's wall clock would add trtexec loading the engine. Without a throughput the
    # energy per inference is left out rather than guessed.
    power_report = meter.report(runs if throughput else None, seconds=runs / throughput if throughput else None)

    samples = exported_latencies(job_dir / TIMES_FILE)
    latency = timing["latency_ms"]
    std = measure.latency_summary(samples)["std"] if samples else None
    return {
        "runner": "tensorrt_trtexec", "runner_version": RUNNER_VERSION,
        "runtime": f"TensorRT {timing.get('trt_version') or 'unknown'} (trtexec)",
        "host": {**measure.host(), "state": {"start": state_start, "end": state_end}},
        "threads": None, "precision": recipe["precision"], "batch": 1, "warmup": int(job.get("warmup_ms", 500)),
        "runs": runs, "load_ms": round(build_s * 1000, 1),
        # trtexec times its first inference inside its warm-up and never reports it.
        "first_inference_ms": None,
        "latency_ms": {"p50": latency.get("median"), "p90": latency.get("p90"), "p99": latency.get("p99"),
                       "mean": latency.get("mean"), "min": latency.get("min"), "max": latency.get("max"),
                       "std": std},
        "samples_ms": [round(ms, 3) for ms in samples],
        "fps": throughput, "memory_mb": {"rss_before_load": None, "peak_rss": None},
        "power": power_report, "job": measure.echo_job(job),
        "gpu_compute_ms": timing.get("gpu_compute_ms"), "warnings": timing.get("warnings", []),
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
