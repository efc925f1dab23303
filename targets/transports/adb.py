"""An Android phone over adb (adbutils): the `adb` transport.

Android has no Python, so neither launch.py nor the target's runner runs there. The device side is ncnn's own
benchmark, `benchncnn`, built for arm64-v8a by the user (its path on this machine comes from the inventory;
edge-deploy does not ship it). A session pushes the artifact's .param and benchncnn into a folder under
/data/local/tmp, checks their sha256 there, runs benchncnn under `timeout`, pulls its output back, maps it into
the one result schema and removes the folder.

What benchncnn measures, and so what a result from this transport means:
- it reads the .param only: the weights are zeros and the input is 0.01 everywhere. Timings of a dense
  network do not depend on the values, but this is ncnn's graph on this phone, not our probe image;
- min, max and mean over `runs` timed runs after its own fixed warm-up; no percentiles, load time, memory or
  throughput, which are therefore None ("not reported");
- it turns on ncnn's FP16 and INT8 paths wherever the CPU has them, whatever the artifact's precision.

Power: the shell that runs benchncnn also samples the battery's current_now and voltage_now from sysfs, first
idle and then while benchncnn runs. Only a phone running from its battery gives a figure: on USB it charges,
and the battery's current is then not what the phone draws.

The adb server is never started behind the user's back (adbutils would): a probe that leaves a daemon
running, or one that talks to a server nobody meant, is worse than a clear message.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import socket
from pathlib import Path

from edge_deploy.pipeline.artifacts import sha256_file
from edge_deploy.pipeline.errors import ConfigError, DeviceError, DeviceTimeout, InputError, ToolchainMissing
from edge_deploy.targets.arm.benchncnn import parse_benchncnn
from edge_deploy.targets.runners import power
from edge_deploy.targets.runners.measure import write_result
from edge_deploy.targets.transports import EXIT_DAMAGED, GRACE_S, ConnectionDropped, Execution, Session, Transport

DEVICE_DIR = "/data/local/tmp/edge-deploy"
BATTERY = "/sys/class/power_supply/battery"
# The version of the mapping from benchncnn's output into a result; it stands where a runner's version would.
MAPPING_VERSION = 1
SERVER_CHECK_S = 2.0
SHORT_COMMAND_S = 60.0
EM_AARCH64 = 183
# benchncnn's fixed warm-up: 8 runs on the CPU, 10 with a GPU device.
WARMUP_CPU, WARMUP_GPU = 8, 10
# What ncnn prints when it cannot load or run a graph. benchncnn goes on and times the empty graph anyway, so
# such a line must fail the job instead of leaving a timing that means nothing.
NCNN_FAILURE = re.compile(r"failed|not exists|not registered|not ready|too old|issue with|unsupported|"
                          r"tensor shape empty|unrecognized arg|while model has", re.IGNORECASE)
POWER_SAMPLE = re.compile(r"^(idle|run) (-?\d+) (-?\d+) (\S.*)$")
# The device script's pause between two battery readings (and it takes five idle ones before benchncnn starts).
SAMPLE_INTERVAL_S = 0.2
FACT_PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.build.version.release", "ro.build.version.sdk",
              "ro.product.cpu.abi", "ro.soc.model", "ro.board.platform", "ro.hardware")
STATE_HINTS = {
    "unauthorized": "accept the USB debugging prompt on the phone",
    "authorizing": "accept the USB debugging prompt on the phone",
    "offline": "unplug and replug it, or run `adb reconnect`",
    "no": "adb may not open its USB device: check your udev rules (`adb devices` says more)",
    "connecting": "wait for it to connect, or replug it",
    "recovery": "boot it into Android", "bootloader": "boot it into Android", "sideload": "boot it into Android",
}

# Device-side scripts. Nothing is ever put into their text: every value arrives as a positional parameter of
# `sh -c`, and every argument of that command line is quoted, so file names reach the phone as they are.
CHECK_SCRIPT = 'cd "$1" && shift && sha256sum -- "$@"'
FACTS_SCRIPT = 'for p in "$@"; do echo "$p=$(getprop "$p")"; done; echo "uname=$(uname -m)"; echo "cpus=$(nproc)"'
BENCH_SCRIPT = (
    'cd "$1" || exit 65; battery=$2; limit=$3; interval=$4; shift 4; sampler=; '
    'sample() { c=; v=; s=; read -r c < "$battery/current_now"; read -r v < "$battery/voltage_now"; '
    'read -r s < "$battery/status"; echo "$1 $c $v $s"; }; '
    'if [ -n "$battery" ]; then '
    'for i in 1 2 3 4 5; do sample idle; sleep "$interval"; done > power.log 2>&1; '
    '(while :; do sample run; sleep "$interval"; done) >> power.log 2>&1 & sampler=$!; fi; '
    'timeout -k 5 "$limit" ./benchncnn "$@" > bench.txt 2>&1; code=$?; '
    'if [ -n "$sampler" ]; then kill "$sampler"; fi; '
    'if [ "$code" -ne 0 ]; then tail -n 1 bench.txt; fi; '
    'exit "$code"'
)


def _adbutils():
    try:
        import adbutils
    except ImportError:
        raise ToolchainMissing("Android devices need adbutils: pip install 'edge-deploy[adb]'") from None
    return adbutils


def benchncnn_arguments(param: str, shape: tuple[int, int, int], runs: int, threads: int, powersave: int) -> list:
    """benchncnn's arguments: positional up to the fifth (runs, threads, powersave 0 all cores / 2 big cores, GPU
    device -1 none, cooling-down 0: no 10 s sleep, the idle power readings come first instead), then key=value;
    shape is ncnn's [w,h,c]."""
    width, height, channels = shape
    return [str(int(runs)), str(int(threads)), str(int(powersave)), "-1", "0", f"param={param}",
            f"shape=[{int(width)},{int(height)},{int(channels)}]"]


def bench_command(remote_dir: str, arguments: list, limit_s: float, battery: str) -> str:
    """The adb shell command line that runs benchncnn in remote_dir, bounded by `timeout`; an empty `battery`
    skips the power readings."""
    return shlex.join(["sh", "-c", BENCH_SCRIPT, "edge-deploy", remote_dir, battery, str(int(limit_s)),
                       str(SAMPLE_INTERVAL_S), *arguments])


def benchncnn_result(output: str, model: str, device: dict, runtime: str, job: dict, label: str, *,
                     arguments: list = (), power_log: str | None = None, power_off: str | None = None) -> dict:
    """benchncnn's output for `model` as a runner's result.json; what benchncnn does not report is None.

    power_log: the battery readings the phone's shell took; power_off: why none were taken."""
    failures = [line.strip() for line in output.splitlines() if " min = " not in line and NCNN_FAILURE.search(line)]
    if failures:
        raise DeviceError(f"{label}: benchncnn could not run the model: {failures[0]}")
    try:
        parsed = parse_benchncnn(output)
    except InputError:
        last = (output.strip().splitlines() or ["no output"])[-1].strip()
        raise DeviceError(f"{label}: benchncnn printed no timing (its last line: {last})") from None
    timing = parsed["models"].get(model)
    if timing is None:
        raise DeviceError(f"{label}: benchncnn printed no timing for {model} (only for "
                          f"{', '.join(parsed['models'])})")
    settings = parsed["settings"]
    runs = settings.get("loop_count")
    if power_off:
        power_figures = {"status": "unavailable", "reason": power_off}
    else:
        # The timed runs lasted their count times their mean; the readings also cover the warm-up runs.
        seconds = runs * timing["avg_ms"] / 1000 if runs else None
        power_figures = battery_power(power_log, seconds, runs)
    return {
        "runner": "benchncnn", "runner_version": MAPPING_VERSION, "runtime": runtime, "host": device,
        "threads": settings.get("num_threads"), "precision": job.get("precision"), "batch": 1,
        "warmup": WARMUP_GPU if settings.get("gpu_device", -1) != -1 else WARMUP_CPU, "runs": runs,
        "load_ms": None,
        "latency_ms": {"p50": None, "p90": None, "p99": None, "mean": timing["avg_ms"], "min": timing["min_ms"],
                       "max": timing["max_ms"]},
        "fps": None, "memory_mb": {"rss_before_load": None, "peak_rss": None}, "power": power_figures,
        "job": {**{k: v for k, v in job.items() if k != "files"}, "benchncnn_arguments": list(arguments)},
        "benchncnn": {"model": model, "settings": settings,
                      "weights": "zeros: benchncnn reads only the .param",
                      "input": "0.01 everywhere, not the probe image",
                      "options": "ncnn's FP16 and INT8 paths on wherever the CPU has them, whatever the "
                                 "artifact's precision"},
    }


def battery_power(log: str | None, seconds: float | None = None, inferences: int | None = None) -> dict:
    """The phone's draw from its battery, from the sysfs readings its shell took before and while benchncnn ran.

    The readings are judged as power.py judges a battery on a device with Python: only a discharging battery
    counts, and µA/µV or mA/mV are told apart by magnitude; power.summarize makes the result."""
    if log is None:
        return {"status": "unavailable", "reason": "no battery readings came back from the phone"}
    readings, statuses, unreadable = {"idle": [], "run": []}, set(), ""
    for line in log.splitlines():
        sample = POWER_SAMPLE.match(line.strip())
        if sample is None:
            unreadable = unreadable or line.strip()
            continue
        readings[sample[1]].append((abs(int(sample[2])), abs(int(sample[3]))))
        statuses.add(sample[4].strip())
    if not readings["run"]:
        why = f"the battery could not be read: {unreadable}" if unreadable else "no battery reading during the run"
        return {"status": "unavailable", "reason": why}
    if statuses - {"Discharging"}:
        state = ", ".join(sorted(s.lower() for s in statuses - {"Discharging"}))
        return {"status": "unavailable",
                "reason": f"the battery was {state}: while a charger (USB included) feeds the phone, the battery's "
                          "current is not its draw; run unplugged (adb over Wi-Fi: `adb tcpip`)"}
    current, voltage = (readings["idle"] or readings["run"])[0]
    if current == 0 or voltage == 0:
        return {"status": "unavailable", "reason": f"the battery reads a {'current' if current == 0 else 'voltage'} "
                                                   "of 0: its fuel gauge does not report the draw"}
    amps = 1e-3 if current < power.SMALLEST_MICROAMPS else 1e-6
    volts = 1e-3 if voltage < power.SMALLEST_MICROVOLTS else 1e-6
    sensor = power.Sensor()
    sensor.name = "battery (current_now x voltage_now, read by the phone's shell)"
    sensor.note = (f"{power.BatteryPower.note}; current read in {'mA' if amps == 1e-3 else 'µA'}, voltage in "
                   f"{'mV' if volts == 1e-3 else 'µV'}; the readings during the run include benchncnn's warm-up")

    def window(pairs):
        return [(i * SAMPLE_INTERVAL_S, c * amps * v * volts) for i, (c, v) in enumerate(pairs)]

    return power.summarize(sensor, window(readings["idle"]), window(readings["run"]), seconds, inferences,
                           SAMPLE_INTERVAL_S)


def server_unreachable(host: str, port: int) -> str | None:
    """None when an adb server listens at host:port, else why not."""
    try:
        socket.create_connection((host, port), timeout=SERVER_CHECK_S).close()
    except socket.timeout:
        return f"no answer within {SERVER_CHECK_S:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def pick_device(devices: list, serial: str | None, label: str, server: str) -> str:
    """The serial of the phone to use among the adb server's devices, or one line saying what to do."""
    listing = ", ".join(f"{d.serial} ({d.state})" for d in devices) or "none"
    if serial:
        chosen = [d for d in devices if d.serial == serial]
        if not chosen:
            raise DeviceError(f"{label}: the adb server at {server} has no device {serial} (it lists: {listing})")
    elif not devices:
        raise DeviceError(f"{label}: no Android device on the adb server at {server}: connect the phone by USB "
                          "with USB debugging on (`adb devices` lists it)")
    elif len(devices) > 1:
        raise DeviceError(f"{label}: the adb server at {server} lists several devices ({listing}); name one with "
                          "`serial:` in devices.yaml")
    else:
        chosen = devices
    device = chosen[0]
    if device.state != "device":
        state = "no permissions" if device.state == "no" else device.state
        raise DeviceError(f"{label}: the phone {device.serial} is {state}: "
                          f"{STATE_HINTS.get(device.state, 'it must be in the `device` state')}")
    return device.serial


def checked_benchncnn(path, label: str) -> Path:
    if path is None:
        raise ToolchainMissing(f"{label}: the adb transport runs ncnn's benchncnn on the phone: set `benchncnn:` in "
                               "devices.yaml to an arm64-v8a build of it (ncnn's benchmark/benchncnn; edge-deploy "
                               "does not ship it)")
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
    except OSError as exc:
        raise ToolchainMissing(f"{label}: benchncnn {path}: {exc.strerror or exc}") from None
    elf64_little = header[:6] == b"\x7fELF\x02\x01"
    if not elf64_little or int.from_bytes(header[18:20], "little") != EM_AARCH64:
        raise ToolchainMissing(f"{label}: {path} is not an arm64 (aarch64) program; build benchncnn for Android "
                               "arm64-v8a")
    return path


def input_shape(job_dir: Path, job: dict, label: str) -> tuple[int, int, int]:
    """ncnn's [w, h, c] of the job's NCHW input, read from the .npy header (benchncnn fills its own values)."""
    import numpy as np

    try:
        shape = np.load(job_dir / str(job.get("input")), mmap_mode="r").shape
    except (OSError, ValueError):
        raise DeviceError(f"{label}: the job has no readable input tensor (job.json `input`), so its shape for "
                          "benchncnn is unknown") from None
    if len(shape) != 4:
        raise DeviceError(f"{label}: the job's input has shape {list(shape)}, not NCHW")
    _, channels, height, width = shape
    return int(width), int(height), int(channels)


def _reason(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else ""
    return (text.strip().splitlines() or [type(exc).__name__])[0]


class AdbTransport(Transport):
    kind = "adb"
    runs_python_runners = False

    def __init__(self, name: str = "", serial: str | None = None, benchncnn: Path | str | None = None, *,
                 adb_server: str | None = None, device_dir: str = DEVICE_DIR, power_sensor: str = "auto",
                 battery: str = BATTERY, threads: int | None = None, benchncnn_version: str | None = None):
        """adb_server: host:port of the adb server (default: ANDROID_ADB_SERVER_HOST/PORT, else
        127.0.0.1:5037). threads: benchncnn's threads when a job names none (else all cores).
        benchncnn_version: the ncnn release the binary was built from, as results should name it."""
        _adbutils()
        self.name, self.serial = name, serial
        self.benchncnn = checked_benchncnn(benchncnn, self.label)
        host, _, port = adb_server.rpartition(":") if adb_server and ":" in adb_server else (adb_server, "", "")
        self.adb_host = host or os.environ.get("ANDROID_ADB_SERVER_HOST") or "127.0.0.1"
        try:
            self.adb_port = int(port or os.environ.get("ANDROID_ADB_SERVER_PORT") or 5037)
        except ValueError:
            raise ConfigError(f"{self.label}: the adb server's port must be a number") from None
        if power_sensor not in ("auto", "android-battery", "none"):
            raise ConfigError(f"{self.label}: an adb device reads power from its battery (power_sensor: "
                              f"android-battery, auto or none), not {power_sensor}")
        self.battery = "" if power_sensor == "none" else battery
        self.device_dir = device_dir.rstrip("/") or DEVICE_DIR
        self.threads, self.benchncnn_version = threads, benchncnn_version
        self._facts: dict | None = None
        self._benchncnn_sha256: str | None = None

    @property
    def server(self) -> str:
        return f"{self.adb_host}:{self.adb_port}"

    def python(self) -> list[str]:
        return []  # no Python on Android: the session runs benchncnn itself

    def benchncnn_sha256(self) -> str:
        if self._benchncnn_sha256 is None:
            self._benchncnn_sha256 = sha256_file(self.benchncnn)
        return self._benchncnn_sha256

    def runtime(self) -> str:
        built = self.benchncnn_version or f"build sha256 {self.benchncnn_sha256()[:12]}"
        return f"ncnn benchncnn ({built})"

    def device(self):
        """The phone, through a running adb server; one DeviceError line when either is not there."""
        adbutils = _adbutils()
        unreachable = server_unreachable(self.adb_host, self.adb_port)
        if unreachable:
            raise DeviceError(f"{self.label}: no adb server at {self.server} ({unreachable}): start it with "
                              "`adb start-server` (Android platform-tools), connect the phone with USB debugging "
                              "on, or set ANDROID_ADB_SERVER_HOST/PORT to where one runs")
        client = adbutils.AdbClient(host=self.adb_host, port=self.adb_port, socket_timeout=SHORT_COMMAND_S)
        try:
            devices = client.list()
        except (adbutils.AdbError, OSError) as exc:
            raise DeviceError(f"{self.label}: the adb server at {self.server} did not list its devices "
                              f"({_reason(exc)})") from None
        return client.device(serial=pick_device(devices, self.serial, self.label, self.server))

    def shell(self, device, command: str, timeout: float, doing: str):
        adbutils = _adbutils()
        try:
            return device.shell2(command, timeout=timeout)
        except (adbutils.AdbTimeout, socket.timeout):
            raise DeviceTimeout(f"{self.label}: the phone went silent while {doing} ({timeout:.0f} s)") from None
        except (adbutils.AdbError, OSError) as exc:
            raise ConnectionDropped(f"{self.label}: lost the phone while {doing} ({_reason(exc)})") from None

    def facts(self, device=None) -> dict:
        """What the phone says of itself (asked once: it does not change while a transport lives)."""
        if self._facts is None:
            device = device or self.device()
            command = shlex.join(["sh", "-c", FACTS_SCRIPT, "edge-deploy", *FACT_PROPS])
            said = self.shell(device, command, SHORT_COMMAND_S, "saying what it is").output
            values = dict(line.strip().split("=", 1) for line in said.splitlines() if "=" in line)
            cpus = values.get("cpus", "")
            self._facts = {
                "serial": device.serial, "machine": values.get("uname") or "unknown",
                "processor": values.get("ro.soc.model") or values.get("ro.board.platform")
                or values.get("ro.hardware") or "unknown",
                "cpus": int(cpus) if cpus.isdigit() else None, "abi": values.get("ro.product.cpu.abi"),
                "model": f"{values.get('ro.product.manufacturer', '')} {values.get('ro.product.model', '')}".strip(),
                "android": values.get("ro.build.version.release"), "sdk": values.get("ro.build.version.sdk"),
            }
        return self._facts

    def describe(self, packages: tuple[str, ...]) -> dict:
        facts = self.facts()
        return {"transport": self.kind, "device": self.name, "adb_server": self.server, **facts,
                "benchncnn_sha256": self.benchncnn_sha256(),
                "packages": {p: self.runtime() if p == "ncnn" else "not used (benchncnn runs alone)"
                             for p in packages}}

    async def adescribe(self, packages: tuple[str, ...]) -> dict:
        return await asyncio.to_thread(self.describe, packages)

    async def open(self) -> Session:
        return await asyncio.to_thread(self._open)

    def _open(self) -> "AdbSession":
        device = self.device()
        facts = self.facts(device)
        if facts["machine"] != "aarch64" and not str(facts["abi"]).startswith("arm64"):
            raise DeviceError(f"{self.label}: the phone is {facts['machine']} ({facts['abi']}); benchncnn at "
                              f"{self.benchncnn} is an arm64 program")
        return AdbSession(self, device)


class AdbSession(Session):
    def __init__(self, transport: AdbTransport, device):
        self.transport, self.device = transport, device
        self.label = transport.label
        self.job: dict = {}
        self.param, self.shape, self.expected, self.arguments = "", (0, 0, 0), {}, []

    def _shell(self, argv: list[str], doing: str, timeout: float = SHORT_COMMAND_S):
        return self.transport.shell(self.device, shlex.join(argv), timeout, doing)

    async def push(self, job_dir: Path) -> str:
        return await asyncio.to_thread(self._push, Path(job_dir))

    def _push(self, job_dir: Path) -> str:
        adbutils = _adbutils()
        job = json.loads((job_dir / "job.json").read_text())
        param, files = job.get("param"), job.get("files") or {}
        if not isinstance(param, str) or param not in files:
            raise DeviceError(f"{self.label}: the job names no ncnn .param; an adb device runs ncnn's benchncnn, "
                              "so it probes the `arm` target's artifacts only")
        if "/" in param or any(c.isspace() for c in param):
            # benchncnn names the model in its result line by this name, and the line is split on white space.
            raise DeviceError(f"{self.label}: benchncnn cannot report a model file named {param!r}; name it "
                              "without white space")
        self.job, self.param, self.shape = job, param, input_shape(job_dir, job, self.label)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", job_dir.name)[:40]
        remote = f"{self.transport.device_dir}/{folder}-{secrets.token_hex(6)}"
        made = self._shell(["mkdir", "-p", "--", remote], "creating the job folder")
        if made.returncode != 0:
            raise DeviceError(f"{self.label}: cannot create {remote} on the phone "
                              f"({(made.output.strip().splitlines() or ['no output'])[-1]}); check device_dir")
        try:
            self.device.sync.push(job_dir / param, f"{remote}/{param}", mode=0o644)
            self.device.sync.push(self.transport.benchncnn, f"{remote}/benchncnn", mode=0o755)
        except adbutils.AdbError as exc:
            self._remove(remote)
            raise DeviceError(f"{self.label}: cannot write the job to {remote} ({_reason(exc)}); check the space "
                              "left on the phone") from None
        except OSError as exc:
            raise ConnectionDropped(f"{self.label}: lost the phone while uploading the job ({_reason(exc)})") \
                from None
        self.expected = {param: files[param], "benchncnn": self.transport.benchncnn_sha256()}
        return remote

    async def execute(self, argv: list[str], remote_dir: str, timeout: float) -> Execution:
        # argv is launch.py's command line; on Android the job is benchncnn, built here from the job itself.
        return await asyncio.to_thread(self._execute, remote_dir, timeout)

    def _execute(self, remote: str, timeout: float) -> Execution:
        damaged = self._damaged(remote)
        if damaged:
            return Execution(EXIT_DAMAGED, damaged)
        threads = self.job.get("threads") or self.transport.threads
        # Threads the job names are meant for the big cores; with none named, every core works.
        powersave = 2 if threads else 0
        threads = threads or self.transport.facts(self.device).get("cpus") or 1
        self.arguments = benchncnn_arguments(self.param, self.shape, self.job.get("runs", 8), threads, powersave)
        command = bench_command(remote, self.arguments, timeout, self.transport.battery)
        done = self.transport.shell(self.device, command, timeout + GRACE_S, "benchncnn ran")
        return Execution(done.returncode, done.output)

    def _damaged(self, remote: str) -> str | None:
        """What of the pushed files is not whole on the phone, as launch.py would say it; None when all are."""
        checked = self._shell(["sh", "-c", CHECK_SCRIPT, "edge-deploy", remote, *self.expected], "checking the job")
        found = {}
        for line in checked.output.splitlines():
            digest, _, name = line.strip().partition(" ")
            if len(digest) == 64:
                found[name.strip().lstrip("*")] = digest.lower()
        if not found and checked.returncode in (126, 127):
            last = (checked.output.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"{self.label}: cannot check the job's sha256 on the phone ({last}); Android 8 or "
                              "later has sha256sum")
        for name, expected in self.expected.items():
            if name not in found:
                return f"{name} is missing on the device"
            if found[name] != expected:
                return f"{name} does not match its sha256 (damaged in transfer or changed on the device)"
        return None

    async def pull(self, remote_dir: str, names: list[str], job_dir: Path) -> None:
        await asyncio.to_thread(self._pull, remote_dir, names, Path(job_dir))

    def _pull(self, remote: str, names: list[str], job_dir: Path) -> None:
        for name in names:
            if name == "result.json":
                self._write_result(remote, job_dir)
                continue
            data = self._read(remote, name)
            if data is not None:
                partial = job_dir / f".{name}.partial"
                partial.write_bytes(data)
                os.replace(partial, job_dir / name)

    def _read(self, remote: str, name: str) -> bytes | None:
        adbutils = _adbutils()
        try:
            return self.device.sync.read_bytes(f"{remote}/{name}")
        except adbutils.AdbError:
            return None  # the phone answered: the file is not there
        except OSError as exc:
            raise ConnectionDropped(f"{self.label}: lost the phone while downloading {name} ({_reason(exc)})") \
                from None

    def _write_result(self, remote: str, job_dir: Path) -> None:
        output = self._read(remote, "bench.txt")
        if output is None:
            raise DeviceError(f"{self.label}: benchncnn left no output on the phone")
        log, off = None, None
        if self.transport.battery:
            read = self._read(remote, "power.log")
            log = None if read is None else read.decode(errors="replace")
        else:
            off = "power_sensor is none for this device"
        data = benchncnn_result(output.decode(errors="replace"), self.param, self.transport.facts(self.device),
                                self.transport.runtime(), self.job, self.label, arguments=self.arguments,
                                power_log=log, power_off=off)
        write_result(job_dir, data)

    async def clean(self, remote_dir: str) -> None:
        await asyncio.to_thread(self._remove, remote_dir)

    def _remove(self, remote: str) -> None:
        if not remote.startswith(self.transport.device_dir + "/"):
            return  # never remove what this transport did not make
        try:
            self._shell(["rm", "-rf", "--", remote], "removing the job folder")
        except DeviceTimeout:
            pass  # a folder left in /data/local/tmp costs nothing; the result is what matters
