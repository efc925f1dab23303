"""Jetson power and load: one `tegrastats` line parsed, the INA3221 power monitors read from sysfs, and the
energy an inference costs.

Standard library only: this file is copied onto the Jetson beside the runner, so it imports nothing from the
project. Python 3.8 or newer (JetPack 5 and 6).

tegrastats has changed across boards and JetPacks: JetPack 5+ lines start with a timestamp, JetPack 4 lines
do not; rails read `VDD_IN 4761mW/4778mW` (now/average) or, on old boards, `VDD_IN 1931/1931` (milliwatts without
the unit); the GPU reads `GR3D_FREQ 0%@1300`, `GR3D_FREQ 0%@[305]` or `0%@[0,0]` (one clock per GPC on Orin),
or `GR3D_FREQ 12%` with no clock at all; temperature sensor names are upper or lower case depending on the
release.
"""

from __future__ import annotations

import glob
import os
import re

# Rails that measure the module's whole input: VDD_IN on Orin NX/Nano, Xavier NX and TX2, POM_5V_IN on the
# Jetson Nano (JetPack 4).
MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# AGX Orin has no input rail. VIN_SYS_5V0 is its 5 V system supply, which NVIDIA describes as feeding the I/O;
# GPU/SoC and CPU/CV power arrive on VDD_GPU_SOC and VDD_CPU_CV, beside it rather than through it.
AGX_ORIN_SYSTEM_RAIL = "VIN_SYS_5V0"
# The INA3221 channels a board leaves unconnected are labelled NC, several per board.
NOT_CONNECTED = "NC"
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


def module_rail(rails: dict) -> str | None:
    """The rail to read for the whole module's power, given rails keyed by name (parse_tegrastats' rails_mw or
    read_ina3221_sysfs' result): VDD_IN (POM_5V_IN on a Jetson Nano) where it exists; on AGX Orin, which has no
    input rail, VIN_SYS_5V0; otherwise None.

    VIN_SYS_5V0 is a stand-in, not the module's input: NVIDIA describes it as the 5 V system rail, and the GPU's
    and CPU's power (VDD_GPU_SOC, VDD_CPU_CV) do not flow through it, so inference barely moves it.
    """
    for name in MODULE_INPUT_RAILS:
        if name in rails:
            return name
    if AGX_ORIN_SYSTEM_RAIL in rails:
        return AGX_ORIN_SYSTEM_RAIL
    return None


def energy_per_inference(busy_mw: list[float], idle_mw: list[float], seconds: float, inferences: int,
                         rail: str | None = None) -> dict:
    """Mean power while inferring and while idle (milliwatts, one rail's samples), their difference, and the
    energy each inference cost above idle (mW x s = mJ), plus the same from the busy power alone.

    The result names `rail` when one is given. A negative difference is kept: it says the idle reading was
    noisier than the workload, which a clamp to zero would hide.
    """
    if not busy_mw or not idle_mw:
        raise ValueError("energy per inference needs power samples both while busy and while idle")
    if not seconds > 0:
        raise ValueError(f"the busy period must last a positive number of seconds, not {seconds!r}")
    if isinstance(inferences, bool) or not isinstance(inferences, int) or inferences < 1:
        raise ValueError(f"inferences must be a positive integer, not {inferences!r}")
    busy = sum(busy_mw) / len(busy_mw)
    idle = sum(idle_mw) / len(idle_mw)
    result = {
        "busy_mw": busy,
        "idle_mw": idle,
        "delta_mw": busy - idle,
        "seconds": seconds,
        "inferences": inferences,
        "energy_per_inference_mj": (busy - idle) * seconds / inferences,
        "busy_energy_per_inference_mj": busy * seconds / inferences,
    }
    if rail is not None:
        result["rail"] = rail
    return result


def read_ina3221_sysfs(root: str = "/sys") -> dict[str, float]:
    """Each INA3221 rail's power now, {label: milliwatts}, from sysfs under `root`; {} where there is none.

    JetPack 4 has NVIDIA's iio driver (bus/i2c/drivers/ina3221x/*/iio:device*/: rail_name_N, in_powerN_input
    in mW); JetPack 5 and 6 have the mainline hwmon driver (bus/i2c/drivers/ina3221/*/hwmon/hwmonK/: inN_label,
    inN_input in mV, currN_input in mA), whose hwmon number differs from boot to boot. Channels that cannot be
    read (disabled, or the driver says no data) are left out, as are NC channels and hwmon's in7, the sum of the
    shunt voltages, which has no current of its own.
    """
    drivers = glob.escape(os.path.join(root, "bus", "i2c", "drivers"))
    rails: dict[str, float] = {}
    for device_dir in sorted(glob.glob(os.path.join(drivers, "ina3221x", "*", "iio:device*"))):
        device = os.path.basename(os.path.dirname(device_dir))
        for name_file in sorted(glob.glob(os.path.join(device_dir, "rail_name_*"))):
            channel = name_file.rsplit("_", 1)[1]
            milliwatts = _read_number(os.path.join(device_dir, f"in_power{channel}_input"))
            _add_rail(rails, _read_text(name_file), milliwatts, device)
    for hwmon_dir in sorted(glob.glob(os.path.join(drivers, "ina3221", "*", "hwmon", "hwmon*"))):
        device = os.path.basename(os.path.dirname(os.path.dirname(hwmon_dir)))
        for label_file in sorted(glob.glob(os.path.join(hwmon_dir, "in*_label"))):
            channel = re.fullmatch(r"in(\d+)_label", os.path.basename(label_file))
            if channel is None or _read_text(os.path.join(hwmon_dir, f"in{channel[1]}_enable")) == "0":
                continue
            millivolts = _read_number(os.path.join(hwmon_dir, f"in{channel[1]}_input"))
            milliamps = _read_number(os.path.join(hwmon_dir, f"curr{channel[1]}_input"))
            if millivolts is not None and milliamps is not None:
                _add_rail(rails, _read_text(label_file), millivolts * milliamps / 1000, device)
    return rails


def _add_rail(rails: dict[str, float], label: str | None, milliwatts: float | None, device: str) -> None:
    if not label or label == NOT_CONNECTED or milliwatts is None:
        return
    # Two monitors could give a channel the same label; keep both, the second named after its I2C device.
    rails[label if label not in rails else f"{label} ({device})"] = milliwatts


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _read_number(path: str) -> float | None:
    text = _read_text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
