"""What every device-side runner measures the same way: latency statistics, memory, the device's facts and
state, and power (through power.py). Standard library only, Python 3.8+.

Runners are pushed to a device as plain scripts with this file and power.py beside them, so they import it as a
top-level module there and as part of the package here. Device files (procfs, sysfs, /etc) are read under a root
(the `root` arguments, else ROOT) and tools (nvpmodel, getprop) are looked up on TOOL_PATH (None: $PATH), so tests
can lay out a fake device in a folder. What a device does not say is None, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

try:  # inside the package here; beside the script on a device
    from edge_deploy.targets.runners import power
except ImportError:
    import power

ROOT = "/"
TOOL_PATH = None
# DMI fields a board maker left at the firmware template's value: they name no product.
DMI_PLACEHOLDERS = {"", "to be filled by o.e.m.", "default string", "system product name", "system manufacturer",
                    "not specified", "not applicable", "none", "unknown", "o.e.m.", "x.x", "type1productconfigid"}
# Thermal drivers report a sensor that is off or not ready with values like -256 °C or -274 °C; no device runs there.
COLDEST_REAL_C = -100.0


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak).

    VmHWM belongs to the process image, so unlike getrusage's ru_maxrss it does
    not carry over the parent's peak across fork and exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def percentile(sorted_values: list, q: float) -> float:
    """Linear interpolation between closest ranks."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_summary(timings_ms: list) -> dict:
    """p50/p90/p99, mean, min, max and std of the warm runs. std is that of these runs themselves (divided by n),
    the spread a reader compares between devices, not an estimate of some wider population's."""
    ordered = sorted(timings_ms)
    mean = sum(ordered) / len(ordered)
    std = math.sqrt(sum((value - mean) ** 2 for value in ordered) / len(ordered))
    return {"p50": round(percentile(ordered, 50), 3), "p90": round(percentile(ordered, 90), 3),
            "p99": round(percentile(ordered, 99), 3), "mean": round(mean, 3),
            "min": round(ordered[0], 3), "max": round(ordered[-1], 3), "std": round(std, 3)}


def _under(root: str | None, path: str) -> str:
    return os.path.join(root or ROOT, path.lstrip("/"))


def read_fact(root: str | None, path: str) -> str | None:
    """A device file's text without the NULs device-tree strings end in; None when missing, unreadable or empty."""
    try:
        with open(_under(root, path), "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    return text.replace("\x00", " ").strip() or None


def _cpuinfo_field(root: str | None, names: tuple) -> str | None:
    text = read_fact(root, "/proc/cpuinfo")
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names and value.strip():
            return value.strip()
    return None


def cpu_name(root: str | None = None) -> str:
    return _cpuinfo_field(root, ("model name", "Model")) or platform.processor() or "unknown"


# INT8 and FP16 speed-ups depend on these more than on the clock: name them wherever a timing is shown.
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
                "amx_int8": "AMX-INT8", "asimd": "NEON", "asimddp": "dot-product", "asimdhp": "FP16 arithmetic",
                "i8mm": "I8MM", "sve": "SVE"}


def vector_extensions(root: str | None = None) -> str:
    flags = _cpuinfo_field(root, ("flags", "Features"))
    if flags is None:
        return "unknown"
    present = set(flags.split())
    return ", ".join(name for flag, name in VECTOR_FLAGS.items() if flag in present) or "none listed"


def run_tool(argv: list) -> str | None:
    """A device tool's output (stdout), or None where the tool is missing or fails."""
    tool = shutil.which(argv[0], path=TOOL_PATH)
    if tool is None:
        return None
    try:
        done = subprocess.run([tool, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def getprop(name: str) -> str | None:
    """An Android system property, where this is Android (adb shell has getprop; nothing else does)."""
    return run_tool(["getprop", name])


def hostname(root: str | None = None) -> str | None:
    return read_fact(root, "/proc/sys/kernel/hostname")


def device_id(root: str | None = None) -> str | None:
    """A stable name for this device: a hash of its machine-id, else its hostname.

    machine-id(5) asks that the ID itself stay private and that programs publish an application-specific hash of
    it instead; results end up in reports, so the hash is what they carry.
    """
    machine_id = read_fact(root, "/etc/machine-id") or read_fact(root, "/var/lib/dbus/machine-id")
    if machine_id:
        return "machine-id:" + hashlib.sha256(b"edge-deploy device id\n" + machine_id.encode()).hexdigest()[:16]
    name = hostname(root)
    return f"hostname:{name}" if name else None


def _dmi(root: str | None, field: str) -> str | None:
    value = read_fact(root, f"/sys/class/dmi/id/{field}")
    return None if value is None or value.lower() in DMI_PLACEHOLDERS else value


def board_model(root: str | None = None) -> str | None:
    """The board or product, as the device tree (ARM boards), DMI (PCs, x86 boards) or Android names it."""
    model = read_fact(root, "/proc/device-tree/model")
    if model:
        return model
    product = _dmi(root, "product_name")
    if product:
        vendor = _dmi(root, "sys_vendor")
        return f"{vendor} {product}" if vendor and not product.startswith(vendor) else product
    android = [getprop("ro.product.manufacturer"), getprop("ro.product.model")]
    return " ".join(part for part in android if part) or None


def soc(root: str | None = None) -> str | None:
    """The system-on-chip: the device tree's last `compatible` entry (the most generic: the SoC itself), else the
    `Hardware` line older ARM kernels put in /proc/cpuinfo, else Android's properties."""
    compatible = read_fact(root, "/proc/device-tree/compatible")
    if compatible:
        return compatible.split()[-1]
    return (_cpuinfo_field(root, ("Hardware",)) or getprop("ro.soc.model") or getprop("ro.board.platform")
            or getprop("ro.hardware"))


def os_name(root: str | None = None) -> str | None:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        for line in (read_fact(root, path) or "").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "PRETTY_NAME" and value.strip().strip("\"'"):
                return value.strip().strip("\"'")
    release = getprop("ro.build.version.release")
    return f"Android {release}" if release else None


def kernel(root: str | None = None) -> str | None:
    return read_fact(root, "/proc/sys/kernel/osrelease")


def parse_nvpmodel(text: str) -> dict | None:
    """`nvpmodel -q`'s answer: {"name": "MAXN", "id": 0}, or None. The mode's number is the line after its name."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        found = re.match(r"NV Power Mode\s*:\s*(.+)", line)
        if found:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            return {"name": found[1].strip(), "id": int(following) if following.isdigit() else None}
    return None


def cpufreq_governors(root: str | None = None) -> str | None:
    governors = set()
    for policy in _numbered(_under(root, "/sys/devices/system/cpu/cpufreq"), r"policy(\d+)"):
        governor = read_fact(None, os.path.join(policy, "scaling_governor"))
        if governor:
            governors.add(governor)
    return ", ".join(sorted(governors)) or None


def power_mode(root: str | None = None) -> dict | None:
    """The Jetson power mode where nvpmodel answers, else the cpufreq governor(s); None when neither is known."""
    answer = run_tool(["nvpmodel", "-q"])
    mode = parse_nvpmodel(answer) if answer else None
    if mode is not None:
        return {"source": "nvpmodel", **mode}
    governor = cpufreq_governors(root)
    return {"source": "cpufreq governor", "name": governor} if governor else None


def host(root: str | None = None) -> dict:
    """What the device says of itself, once per job. Every value is read from the device, or None."""
    return {"machine": platform.machine(), "processor": cpu_name(root), "cpus": os.cpu_count(),
            "vector_extensions": vector_extensions(root), "id": device_id(root), "hostname": hostname(root),
            "model": board_model(root), "soc": soc(root), "os": os_name(root), "kernel": kernel(root),
            "power_mode": power_mode(root)}


def _numbered(folder: str, pattern: str) -> list:
    """Entries of `folder` whose names match `pattern` (one number group), in numeric order (cpu2 before cpu10)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = sorted((int(match[1]), name) for name in names for match in [re.fullmatch(pattern, name)] if match)
    return [os.path.join(folder, name) for _, name in found]


def cpu_clocks_mhz(root: str | None = None) -> dict | None:
    clocks = {}
    for cpu in _numbered(_under(root, "/sys/devices/system/cpu"), r"cpu(\d+)"):
        khz = read_fact(None, os.path.join(cpu, "cpufreq", "scaling_cur_freq"))
        if khz and khz.isdigit():
            clocks[os.path.basename(cpu)] = round(int(khz) / 1000, 1)
    return clocks or None


def temperatures_c(root: str | None = None) -> dict | None:
    temperatures = {}
    for zone in _numbered(_under(root, "/sys/class/thermal"), r"thermal_zone(\d+)"):
        millidegrees = read_fact(None, os.path.join(zone, "temp"))
        try:
            celsius = int(millidegrees) / 1000
        except (TypeError, ValueError):
            continue
        if celsius < COLDEST_REAL_C:
            continue
        name = read_fact(None, os.path.join(zone, "type")) or os.path.basename(zone)
        # Several zones may share a type (acpitz on PCs); the later ones are told apart by their zone.
        temperatures[name if name not in temperatures else f"{name} ({os.path.basename(zone)})"] = celsius
    return temperatures or None


def devfreq_clocks_mhz(root: str | None = None) -> dict | None:
    """Clocks of the GPU, NPU and memory controllers that devfreq drives (a Jetson's GPU, a Mali, an RK NPU)."""
    clocks = {}
    folder = _under(root, "/sys/class/devfreq")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        hertz = read_fact(None, os.path.join(folder, name, "cur_freq"))
        if hertz and hertz.isdigit():
            clocks[name] = round(int(hertz) / 1e6, 1)
    return clocks or None


def device_state(root: str | None = None) -> dict:
    """What changes under load: CPU clocks (cpufreq), other clocks (devfreq) and temperatures (thermal zones).
    Taken at the start and at the end of a job, it shows throttling or a governor that never ramped up."""
    return {"cpu_mhz": cpu_clocks_mhz(root), "devfreq_mhz": devfreq_clocks_mhz(root),
            "temps_c": temperatures_c(root)}


def echo_job(job: dict) -> dict:
    """The job's settings as the device received them; the file hashes are launch.py's business, not a result."""
    return {key: value for key, value in job.items() if key != "files"}


def measure_power(run, inferences: int | None, job: dict | None = None, root: str | None = None) -> dict:
    """Calls `run()` (the timed runs) and returns the power they drew where a sensor exists, with the job's
    idle window and sampling interval; {"status": "unavailable", "reason": ...} (never 0) otherwise."""
    idle_s, interval_s = power.job_settings(job or {})
    return power.measure(run, inferences, idle_s, interval_s, root=root)


# Runs per model between switches when two models are timed in one process: short, so that a busy second or a
# clock change falls on both models, and long enough that a switch's cold caches are a small part of a block.
PAIR_BLOCK = 5


def blocks_in_turns(names: list, count: int, block: int = PAIR_BLOCK):
    """(name, runs) for each block when `count` runs of each named model are taken in blocks of `block`, in turn,
    the order reversed every round (A B, B A, ...) so that neither model always runs right after the other."""
    done = dict.fromkeys(names, 0)
    round_index = 0
    while any(done[name] < count for name in names):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            runs = min(block, count - done[name])
            if runs > 0:
                done[name] += runs
                yield name, runs
        round_index += 1


def interleaved(runs: dict, count: int, block: int = PAIR_BLOCK) -> dict:
    """`count` timed calls (ms) of each callable in `runs`, in blocks taken in turn (blocks_in_turns)."""
    timings = {name: [] for name in runs}
    for name, calls in blocks_in_turns(list(runs), count, block):
        for _ in range(calls):
            t = time.perf_counter()
            runs[name]()
            timings[name].append((time.perf_counter() - t) * 1000)
    return timings


def measure_power_each(runs: dict, count: int, inferences: int | None, job: dict | None = None,
                       root: str | None = None) -> dict:
    """Each model's power from a window of its own `count` runs: a window over interleaved runs would describe
    neither model. Without a sensor nothing runs, and each says why."""
    idle_s, interval_s = power.job_settings(job or {})
    meter = power.PowerMeter.find(root, interval_s)
    if meter.sensor is None:
        return {name: meter.report(inferences) for name in runs}
    meter.close()
    return {name: power.measure(lambda run=run: [run() for _ in range(count)], inferences, idle_s, interval_s,
                                root=root)
            for name, run in runs.items()}


def time_models(runs: dict, count: int, inferences: int, job: dict) -> tuple:
    """Each model's `count` timed runs (ms), power and FPS, where `inferences` is what `count` runs infer (a batch
    of n is n). One model: its runs back to back, the power window over them. Two: in turns, then each one's power
    from a window of its own runs."""
    if len(runs) > 1:
        timings = interleaved(runs, count)
        # Runs back to back, as a serving loop runs them; the loop's own overhead is not in the sum.
        fps = {name: inferences / (sum(timings[name]) / 1000) for name in runs}
        return timings, measure_power_each(runs, count, inferences, job), fps
    (name, run), = runs.items()
    timings, loop_s = [], 0.0

    def timed_runs():
        nonlocal loop_s
        loop_start = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            run()
            timings.append((time.perf_counter() - t) * 1000)
        loop_s = time.perf_counter() - loop_start

    drawn = measure_power(timed_runs, inferences, job)
    return {name: timings}, {name: drawn}, {name: inferences / loop_s}


def time_opened(models: dict, count: int, inferences: int, job: dict) -> tuple:
    """time_models over the models a runner opened and warmed up ("artifact", and "reference" when the job names
    one; each with its `run` and the `memory_mb` read after its warm-up). The FP32 build's memory was read with
    the artifact loaded and says so; an artifact alone in the process takes in its timed runs' peak too."""
    if "reference" in models:
        models["reference"]["memory_mb"]["with"] = "the artifact loaded in the same process"
    timed = time_models({name: model["run"] for name, model in models.items()}, count, inferences, job)
    if "reference" not in models:
        models["artifact"]["memory_mb"]["peak_rss"] = round(status_mb("VmHWM"), 1)
    return timed


def model_figures(model: dict, timings: list, drawn: dict, fps: float, job: dict) -> dict:
    """What every runner reports of one model it timed; `model` holds its load_ms, first_ms and memory_mb."""
    return {"warmup": job["warmup"], "runs": job["runs"], "load_ms": round(model["load_ms"], 2),
            "first_inference_ms": round(model["first_ms"], 3), "latency_ms": latency_summary(timings),
            "samples_ms": [round(ms, 3) for ms in timings], "fps": round(fps, 2), "memory_mb": model["memory_mb"],
            "power": drawn, "job": echo_job(job)}


def job_result(results: dict, state_start: dict, state_end: dict) -> dict:
    """result.json: the artifact's figures and the device, and the FP32 build's figures under `reference` when
    it was timed beside the artifact."""
    found = {**results["artifact"], "host": {**host(), "state": {"start": state_start, "end": state_end}}}
    if "reference" in results:
        found.update(reference=results["reference"], interleaved_block=PAIR_BLOCK)
    return found


def write_result(job_dir: Path, result: dict) -> None:
    """result.json appears whole or not at all, so a dropped connection never leaves half a result."""
    tmp = job_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, job_dir / "result.json")
