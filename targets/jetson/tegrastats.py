"""Jetson's tegrastats: one line parsed, and the tool run as a power sensor for power.py.

Standard library only and Python 3.8+: this file is copied onto the Jetson beside the runner (as
`tegrastats.py`), beside the shared power.py whose rail choice it uses. The runner reads the INA3221 rails
from sysfs where it can (power.py does that itself); tegrastats is the fallback, for boards whose sysfs
rails are not readable.

tegrastats has changed across boards and JetPacks: JetPack 5+ lines start with a timestamp, JetPack 4 lines
do not; rails read `VDD_IN 4761mW/4778mW` (now/average) or, on old boards, `VDD_IN 1931/1931` (milliwatts without
the unit); the GPU reads `GR3D_FREQ 0%@1300`, `GR3D_FREQ 0%@[305]` or `0%@[0,0]` (one clock per GPC on Orin),
or `GR3D_FREQ 12%` with no clock at all; temperature sensor names are upper or lower case depending on the
release.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

try:  # inside the package here; beside the script on a device
    from edge_deploy.targets.runners import power
except ImportError:
    import power

NOT_CONNECTED = power.NOT_CONNECTED
# What tegrastats prints for a thermal sensor that is powered off (e.g. the CV and GPU zones of an idle AGX Orin).
SENSOR_OFF_C = -256.0

_NUMBER = r"\d+(?:\.\d+)?"
_TIMESTAMP = re.compile(r"^\s*(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)(?=\s)")
_RAM = re.compile(rf"\bRAM ({_NUMBER})/({_NUMBER})([kMG])B\b")
_GPU = re.compile(rf"\bGR3D(?:_FREQ)? (?:(?P<load>{_NUMBER})%)?(?:@(?:\[(?P<clocks>[\d,]+)\]|(?P<clock>{_NUMBER})))?")
# now/average, with or without "mW"; JetPack 7 prints a third figure, skipped here.
_RAIL = re.compile(rf"\b(?P<name>[A-Z][A-Z0-9_]*) (?P<now>{_NUMBER})(?:mW)?/(?P<avg>{_NUMBER})(?:mW)?"
                   rf"(?:/{_NUMBER}(?:mW)?)?(?=\s|$)")
_RAIL_NOW_ONLY = re.compile(rf"\b(?P<name>[A-Z][A-Z0-9_]*) (?P<now>{_NUMBER})mW(?=\s|$)")
# name@45.5C; JetPack 7 prints name@45.5C/45.5C, whose second figure is skipped here.
_TEMPERATURE = re.compile(r"\b(?P<name>[A-Za-z][A-Za-z0-9_]*)@(?P<celsius>-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)?\b")
_MEMORY_FIGURES = {"RAM", "SWAP", "IRAM"}
_MB_PER_UNIT = {"k": 1 / 1024, "M": 1.0, "G": 1024.0}


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line: {timestamp, ram_mb: (used, total), gpu_load_percent, gpu_freq_mhz,
    rails_mw: {name: {now, avg}}, temps_c: {name: celsius}}; what the line lacks is None or left out.

    Powered-off temperature sensors (-256C) and not-connected rails (NC) are left out. With one clock per GPC,
    gpu_freq_mhz is the highest.
    """
    timestamp = _TIMESTAMP.match(line)
    ram = _RAM.search(line)
    ram_mb = None
    if ram:
        scale = _MB_PER_UNIT[ram[3]]
        ram_mb = (float(ram[1]) * scale, float(ram[2]) * scale)

    gpu_load = gpu_freq = None
    gpu = _GPU.search(line)
    if gpu:
        gpu_load = float(gpu["load"]) if gpu["load"] is not None else None
        if gpu["clocks"]:
            gpu_freq = max(float(clock) for clock in gpu["clocks"].split(",") if clock)
        elif gpu["clock"] is not None:
            gpu_freq = float(gpu["clock"])

    rails: dict[str, dict] = {}
    for match in _RAIL.finditer(line):
        if match["name"] not in _MEMORY_FIGURES and match["name"] != NOT_CONNECTED:
            rails[match["name"]] = {"now": float(match["now"]), "avg": float(match["avg"])}
    for match in _RAIL_NOW_ONLY.finditer(line):
        if match["name"] not in rails and match["name"] != NOT_CONNECTED:
            rails[match["name"]] = {"now": float(match["now"]), "avg": None}

    temperatures = {}
    for match in _TEMPERATURE.finditer(line):
        celsius = float(match["celsius"])
        if celsius > SENSOR_OFF_C:
            temperatures[match["name"]] = celsius

    return {"timestamp": timestamp[1] if timestamp else None, "ram_mb": ram_mb, "gpu_load_percent": gpu_load,
            "gpu_freq_mhz": gpu_freq, "rails_mw": rails, "temps_c": temperatures}


def rails_now(parsed: dict) -> dict:
    """{rail: milliwatts now} of one parsed line, the form power.py's rail choice takes."""
    return {name: rail["now"] for name, rail in parsed["rails_mw"].items()}


class TegrastatsSensor(power.Sensor):
    """tegrastats running beside the job; each line it prints is one reading of the module's power."""

    def __init__(self, command: list):
        self.name = "tegrastats"
        self.rails: tuple = ()
        self._lines: list = []
        self._lock = threading.Lock()
        self._first_line = threading.Event()
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._collect, name="tegrastats-reader", daemon=True).start()

    def _collect(self) -> None:
        for line in self._process.stdout:
            if line.strip():
                with self._lock:
                    self._lines.append(line.strip())
                self._first_line.set()

    def choose_rails(self, timeout_s: float) -> None:
        """Waits for the first line and picks the module's rails from it; SensorUnusable when it cannot."""
        if not self._first_line.wait(timeout_s):
            raise power.SensorUnusable(f"tegrastats printed nothing in {timeout_s:.0f} s")
        with self._lock:
            first = self._lines[0]
        rails = rails_now(parse_tegrastats(first))
        self.rails = power.module_rails(rails)
        if not self.rails:
            listed = ", ".join(sorted(rails)) or "none"
            raise power.SensorUnusable(f"tegrastats shows no rail that carries the whole module's power (rails: "
                                       f"{listed})")
        self.name = "tegrastats " + "+".join(self.rails)

    def read(self) -> list:
        with self._lock:
            lines, self._lines = self._lines, []
        watts = []
        for line in lines:
            milliwatts = power.module_milliwatts(rails_now(parse_tegrastats(line)), self.rails)
            if milliwatts is not None:
                watts.append(milliwatts / 1000)
        return watts

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def open_tegrastats(root: str | None, interval_s: float) -> power.Sensor | None:
    """power.py's opener signature; `root` is unused (tegrastats reads the real device, found on PATH)."""
    tool = shutil.which("tegrastats")
    if tool is None:
        return None
    interval_ms = max(1, round(interval_s * 1000))
    sensor = TegrastatsSensor([tool, "--interval", str(interval_ms)])
    try:
        # A slow first line is the tool starting up; a few intervals and a second of grace are plenty.
        sensor.choose_rails(1.0 + 3 * interval_s)
    except power.SensorUnusable:
        sensor.close()
        raise
    return sensor


OPENER = ("tegrastats", open_tegrastats)
