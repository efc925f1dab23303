"""Self-contained Jetson runner: `python3 runner.py JOB_DIR`, run on the Jetson itself.

Needs the standard library, JetPack's `trtexec` (on PATH or in /usr/src/tensorrt/bin), and, beside this
script, measure.py, power.py, trtexec.py and tegrastats.py. JOB_DIR holds job.json, the bundle's model.onnx (and
for TensorRT 8.x's implicit INT8, model.fp32.onnx + calibration.cache). The runner builds the engine with the
job's recipe (an engine is tied to this GPU and TensorRT version, so it is built here), times it with
trtexec (the job's warm-up runs, after trtexec's own warm-up, are left out of the times), samples the INA3221
rails (or tegrastats) while it runs and while idle, and writes result.json atomically; the engine, its build
log and the timing log stay in JOB_DIR to be brought back. When job.json names a `reference` (an ONNX, its
precision and its build command: the FP32 ones in a build's probe), its engine is built too and the two engines
are timed in turns, one trtexec run per block of inferences, and each one's power is read in a run of its own.
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

RUNNER_VERSION = 4
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/usr/bin/trtexec")
# trtexec writes every timed inference here (--exportTimes): the raw samples behind its summary.
TIMES_FILE = "times.json"
TIMING_LOGS = {"artifact": "timing.log", "reference": "reference-timing.log"}
TIMES_FILES = {"artifact": TIMES_FILE, "reference": f"reference-{TIMES_FILE}"}
# Timed inferences per engine between switches when another engine is timed beside the artifact. Each block is a
# trtexec run that loads its engine and warms up again, so blocks are longer than the Python runners' (five).
PAIR_BLOCK = 25


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


def exported_times(path: Path) -> list:
    """Each timed inference's (latency ms, GPU compute ms or None) from trtexec's --exportTimes file; [] where
    there is none.

    The file is a JSON list with one entry per inference, whose latencyMs is the figure trtexec's own latency
    summary is made of and computeMs its GPU compute time; entries without a latency are skipped.
    """
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [(float(entry["latencyMs"]),
             float(entry["computeMs"]) if isinstance(entry.get("computeMs"), (int, float)) else None)
            for entry in entries if isinstance(entry, dict) and isinstance(entry.get("latencyMs"), (int, float))]


class Timer:
    """trtexec timing saved engines on this device: `iterations` timed inferences after the job's warm-up, each
    call's log and exported per-inference times kept in the job folder.

    The warm-up is trtexec's own (`warmup_ms` of it), then the job's `warmup` runs: trtexec has no warm-up counted
    in runs, so it is asked for that many inferences more and the first ones of its exported times are left out.
    Every trtexec run loads its engine again, so each run gets the whole warm-up."""

    def __init__(self, tool: str, job: dict, trt_version: str | None, timeout: float, dla_cores: dict):
        # An unknown version gets the oldest flags, which every trtexec takes.
        self.major, self.minor = (int(v) for v in (trt_version or "8.0").split(".")[:2])
        self.tool, self.job, self.timeout, self.dla_cores = tool, job, timeout, dla_cores
        self.warmup_ms = int(job.get("warmup_ms", 500))
        self.warmup_runs = int(job.get("warmup", 0))

    def run(self, engine: str, iterations: int, log: str, times: str, every_time: bool = False) -> tuple:
        """(trtexec's summary, [(latency ms, GPU compute ms or None) per timed inference]). trtexec's summary and
        throughput cover the warm-up runs too; the per-inference times do not. `every_time`: fewer exported times
        than inferences asked for stop the job (they always do where warm-up runs must be told apart)."""
        command = [self.tool, *trtexec.trtexec_run_command(
            engine, self.warmup_runs + iterations, self.warmup_ms, self.dla_cores.get(engine),
            trt_major=self.major, trt_minor=self.minor)[1:], f"--exportTimes={times}"]
        Path(times).unlink(missing_ok=True)
        text = run_logged(command, Path(log), self.timeout)
        timed = exported_times(Path(times))
        if (every_time or self.warmup_runs) and len(timed) < self.warmup_runs + iterations:
            asked = f"{self.warmup_runs} warm-up and {iterations}" if self.warmup_runs else str(iterations)
            raise JobFailed(f"trtexec exported {len(timed)} per-inference times for {asked} timed inferences of "
                            f"{engine} ({Path(log).name})")
        return trtexec.parse_trtexec(text), timed[self.warmup_runs:]


def in_turns(timer: Timer, engines: dict, runs: int, block: int) -> tuple:
    """`runs` timed inferences of each engine in blocks of `block`, one trtexec run per block, the engines taken in
    turn and the order reversed every round, so that clocks and heat that change during the job fall on both.
    Returns each engine's per-inference (latency, compute) pairs, in round order, and trtexec's advice from its
    blocks."""
    samples, advice = {name: [] for name in engines}, {name: [] for name in engines}
    for name, count in measure.blocks_in_turns(list(engines), runs, block):
        # Rounds are compared block by block: a short block would pair one engine's runs with the wrong runs of
        # the other, so every block must export every time.
        summary, timed = timer.run(engines[name], count, TIMING_LOGS[name], TIMES_FILES[name], every_time=True)
        advice[name] += [text for text in summary.get("warnings", []) if text not in advice[name]]
        samples[name] += timed[:count]
    return samples, advice


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
    builds = {"artifact": (recipe[mode], "build.log")}
    if job.get("reference"):
        # The same network's engine at the reference's precision (FP32 in a build's probe), built here too: the
        # speed-up is then TensorRT's own, on this GPU.
        builds["reference"] = (job["reference"]["build"], "reference-build.log")
    engines, build_ms, version, reference_failed = {}, {}, None, None
    for name, (command, log) in builds.items():
        t0 = time.perf_counter()
        try:
            build_log = run_logged([tool, *command[1:]], job_dir / log, timeout)
        except JobFailed as exc:
            if name == "artifact":
                raise
            # The artifact's engine is what the job is for: it is still timed, alone, and the host times the
            # reference another way (a build's probe) or says why there is no speed-up (bench).
            reference_failed = (f"the {job['reference']['precision'].upper()} engine to time beside the artifact "
                                f"could not be built: {exc}")
            continue
        build_ms[name] = round((time.perf_counter() - t0) * 1000, 1)
        engines[name] = next((a.split("=", 1)[1] for a in command if a.startswith("--saveEngine=")), "model.engine")
        version = version or trtexec.parse_trt_version(build_log)
    # Only the artifact's engine may be on a DLA core; the reference's is built for the GPU.
    timer = Timer(tool, job, version, timeout, {engines["artifact"]: job.get("dla_core")})
    runs = int(job["runs"])
    idle_s, interval_s = power.job_settings(job)

    def powered_run(name: str) -> tuple:
        """One run of `runs` inferences of an engine with the power rails sampled around it (and idle before)."""
        meter = power.PowerMeter.find(interval_s=interval_s, extra=(tegrastats.OPENER,))
        try:
            meter.measure_idle(idle_s)
            meter.start()
            summary, timed = timer.run(engines[name], runs, TIMING_LOGS[name], TIMES_FILES[name])
            meter.stop()
        finally:
            meter.close()
        throughput = summary.get("throughput_qps")
        # --duration=0 makes the count exact, and the time the inferences took is the count over the measured
        # throughput: the busy window's wall clock would add trtexec loading the engine. Without a throughput
        # the energy per inference is left out rather than guessed. The window holds the warm-up runs too.
        inferences = timer.warmup_runs + runs
        return summary, timed, meter.report(inferences if throughput else None,
                                            seconds=inferences / throughput if throughput else None)

    figures = {}
    if len(engines) == 1:
        summary, timed, drawn = powered_run("artifact")
        # trtexec's own summary would count the warm-up runs among the timed ones.
        figures["artifact"] = (exported_figures(timed, drawn, summary.get("warnings", [])) if timer.warmup_runs
                               else trtexec_figures(summary, timed, drawn))
    else:
        turns, advice = in_turns(timer, engines, runs, PAIR_BLOCK)
        sensing = power.PowerMeter.find(interval_s=interval_s, extra=(tegrastats.OPENER,))
        sensing.close()
        for name in engines:
            # Each engine's power from a run of its own (a window over runs in turns would describe neither);
            # without a sensor no extra run is made.
            drawn = powered_run(name)[2] if sensing.sensor is not None else sensing.report(None)
            figures[name] = exported_figures(turns[name], drawn, advice[name])
    state_end = measure.device_state()

    def result(name: str) -> dict:
        return {"runner": "tensorrt_trtexec", "runner_version": RUNNER_VERSION,
                "runtime": f"TensorRT {version or 'unknown'} (trtexec)", "threads": None,
                "precision": recipe["precision"] if name == "artifact" else job["reference"]["precision"],
                "batch": 1,
                # Loading an engine is not building it.
                "warmup": timer.warmup_runs, "warmup_ms": timer.warmup_ms, "runs": runs, "load_ms": None,
                "engine_build_ms": build_ms[name],
                # trtexec times its first inference inside its warm-up and never reports it.
                "first_inference_ms": None, "memory_mb": {"rss_before_load": None, "peak_rss": None},
                "job": measure.echo_job(job), "engine": engines[name], **figures[name]}

    found = {**result("artifact"), "host": {**measure.host(), "state": {"start": state_start, "end": state_end}},
             "logs": ["build.log", TIMING_LOGS["artifact"]], "jetson_device": device_facts(),
             # The host pulls these back with result.json: the engine built here, and the logs that explain it.
             "bring_back": [engines["artifact"], "build.log", TIMING_LOGS["artifact"]], "tensorrt": version}
    if "reference" in engines:
        # Each block is a trtexec run of its own, so every block pays its engine load and warm-up.
        found.update(reference=result("reference"), interleaved_block=PAIR_BLOCK, interleaved_tool="trtexec")
    if reference_failed:
        found.update(reference_failed=reference_failed, logs=[*found["logs"], "reference-build.log"])
    return found


def trtexec_figures(summary: dict, timed: list, drawn: dict) -> dict:
    """An engine timed alone: trtexec's own summary, its exported times and the power drawn while it ran."""
    latencies = [latency for latency, _ in timed]
    latency = summary["latency_ms"]
    return {"latency_ms": {"p50": latency.get("median"), "p90": latency.get("p90"), "p99": latency.get("p99"),
                           "mean": latency.get("mean"), "min": latency.get("min"), "max": latency.get("max"),
                           "std": measure.latency_summary(latencies)["std"] if latencies else None},
            "samples_ms": [round(ms, 3) for ms in latencies], "fps": summary.get("throughput_qps"), "power": drawn,
            "gpu_compute_ms": summary.get("gpu_compute_ms"), "warnings": summary.get("warnings", [])}


def exported_figures(timed: list, drawn: dict, advice: list) -> dict:
    """An engine's statistics from its exported per-inference times alone (every block's, when timed in turns
    with another), leaving out what trtexec's summary would count too: the warm-up runs, and engine loads."""
    latencies = [latency for latency, _ in timed]
    computes = [compute for _, compute in timed if compute is not None]
    return {"latency_ms": measure.latency_summary(latencies), "samples_ms": [round(ms, 3) for ms in latencies],
            # Inferences back to back, as they ran: trtexec's throughput is per run, warm-up runs included.
            "fps": round(len(latencies) / (sum(latencies) / 1000), 2), "power": drawn,
            "gpu_compute_ms": trtexec_shaped(measure.latency_summary(computes))
            if computes and len(computes) == len(latencies) else None, "warnings": advice}


def trtexec_shaped(summary: dict) -> dict:
    """A latency summary under the names trtexec's own summary uses, so gpu_compute_ms reads the same either way."""
    return {"min": summary["min"], "max": summary["max"], "mean": summary["mean"], "median": summary["p50"],
            "p90": summary["p90"], "p99": summary["p99"]}


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    try:
        measure.write_result(directory, main(directory))
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
