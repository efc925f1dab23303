"""Power drawn on the device while a model runs, measured the same way by every runner.

Standard library only, Python 3.8+: this file travels with every device job (as `power.py`, beside the runner)
and is imported there as a top-level module.

Sensors, tried in this order (the first one that can be read is used):
  * the Jetson INA3221 rails in sysfs, read as the whole module's draw;
  * Linux powercap RAPL, the x86 package energy counters;
  * Linux hwmon power channels: power*_input (µW), or in*_input (mV) x curr*_input (mA) of one channel;
  * a discharging battery in /sys/class/power_supply (phones, laptops);
  * what the runner adds (the Jetson runner adds tegrastats).
Every path is read under a root (`root` arguments, else ROOT), so tests can lay out a fake device in a folder.

A PowerMeter reads the sensor for a short idle window before the timed runs and from a thread during them.
Energy per inference is (busy - idle power) x time / inferences. Without a readable sensor the result is
{"status": "unavailable", "reason": ...}: never 0, which would read as a measurement.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time

ROOT = "/"
DEFAULT_IDLE_S = 1.5
DEFAULT_INTERVAL_S = 0.1
# An average of fewer instantaneous readings than this says more about when they fell than about the load.
MIN_INSTANT_READINGS = 2

# Rails that measure a Jetson module's whole input: VDD_IN on Orin NX/Nano, Xavier NX and TX2, POM_5V_IN on the
# Jetson Nano (JetPack 4).
MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# AGX Orin has no input rail. VIN_SYS_5V0 is its 5 V system supply, which NVIDIA describes as feeding the I/O;
# GPU/SoC and CPU/CV power arrive on VDD_GPU_SOC and VDD_CPU_CV, beside it rather than through it.
AGX_ORIN_SYSTEM_RAIL = "VIN_SYS_5V0"
# So on AGX Orin these three together are the module's draw (the system rail alone barely moves with inference).
RAILS_SUMMED_WITHOUT_INPUT_RAIL = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
# The INA3221 channels a board leaves unconnected are labelled NC, several per board.
NOT_CONNECTED = "NC"
# The Jetson reader judges which INA3221 rail is the module's; the generic hwmon reader would take any of them.
HWMON_CHIPS_LEFT_TO_THE_JETSON_READER = ("ina3221",)

# The power_supply ABI says µA and µV, yet some phones' drivers report mA and mV. A running device draws well over
# 10 mA, from a battery of more than 0.1 V, so a magnitude under these marks can only be in the larger unit.
SMALLEST_MICROAMPS = 10000
SMALLEST_MICROVOLTS = 100000


class SensorUnusable(Exception):
    """A sensor is there but cannot measure here (permissions, a charging battery); the message says why."""


class Sensor:
    """One source of power readings.

    `read()` returns what is new since the previous call: watts for instantaneous sensors (zero or more
    readings), or, for counters (`cumulative`), the joules counted since the sensor was opened. A sensor that
    learns mid-run that its readings stopped meaning the device's draw sets `problem`.
    """

    name = "sensor"
    cumulative = False
    note: str | None = None
    problem: str | None = None

    def read(self) -> list:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _path(root: str | None, *parts: str) -> str:
    return os.path.join(root or ROOT, *parts)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_number(path: str) -> float | None:
    text = _read_text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _read_strict(path: str) -> float:
    """A number from sysfs, letting the caller see why it could not be read (PermissionError above all)."""
    with open(path) as handle:
        return float(handle.read().strip())


def _numbered(paths: list, pattern: str) -> list:
    """Paths whose base name matches `pattern` (with one number group), ordered by that number, not as text."""
    found = []
    for path in paths:
        match = re.fullmatch(pattern, os.path.basename(path))
        if match:
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


# Jetson INA3221 rails ------------------------------------------------------------------------------------------

def read_ina3221_sysfs(root: str | None = None) -> dict:
    """Each INA3221 rail's power now, {label: milliwatts}, from sysfs under `root`; {} where there is none.

    JetPack 4 has NVIDIA's iio driver (bus/i2c/drivers/ina3221x/*/iio:device*/: rail_name_N, in_powerN_input
    in mW); JetPack 5 and 6 have the mainline hwmon driver (bus/i2c/drivers/ina3221/*/hwmon/hwmonK/: inN_label,
    inN_input in mV, currN_input in mA), whose hwmon number differs from boot to boot. Channels that cannot be
    read (disabled, or the driver says no data) are left out, as are NC channels and hwmon's in7, the sum of the
    shunt voltages, which has no current of its own.
    """
    drivers = glob.escape(_path(root, "sys", "bus", "i2c", "drivers"))
    rails: dict = {}
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


def _add_rail(rails: dict, label: str | None, milliwatts: float | None, device: str) -> None:
    if not label or label == NOT_CONNECTED or milliwatts is None:
        return
    # Two monitors could give a channel the same label; keep both, the second named after its I2C device.
    rails[label if label not in rails else f"{label} ({device})"] = milliwatts


def module_rail(rails: dict) -> str | None:
    """The rail to read for the whole module's power, given rails keyed by name: VDD_IN (POM_5V_IN on a Jetson
    Nano) where it exists; on AGX Orin, which has no input rail, VIN_SYS_5V0; otherwise None.

    VIN_SYS_5V0 is a stand-in, not the module's input: see module_rails for what is summed with it.
    """
    for name in MODULE_INPUT_RAILS:
        if name in rails:
            return name
    if AGX_ORIN_SYSTEM_RAIL in rails:
        return AGX_ORIN_SYSTEM_RAIL
    return None


def module_rails(rails: dict) -> tuple:
    """The rails whose sum is the module's draw: the input rail alone, or AGX Orin's three; () when unknown."""
    rail = module_rail(rails)
    if rail == AGX_ORIN_SYSTEM_RAIL:
        return tuple(name for name in RAILS_SUMMED_WITHOUT_INPUT_RAIL if name in rails)
    return (rail,) if rail else ()


def module_milliwatts(rails: dict, names: tuple) -> float | None:
    """The sum of `names` in one reading of rails ({name: mW}); None when the reading lacks one of them."""
    if not names or any(name not in rails for name in names):
        return None
    return sum(rails[name] for name in names)


class Ina3221Rails(Sensor):
    def __init__(self, root: str | None, rails: tuple):
        self.root, self.rails = root, rails
        self.name = "ina3221 " + "+".join(rails)

    def read(self) -> list:
        milliwatts = module_milliwatts(read_ina3221_sysfs(self.root), self.rails)
        return [] if milliwatts is None else [milliwatts / 1000]


def open_ina3221(root: str | None, interval_s: float) -> Sensor | None:
    rails = read_ina3221_sysfs(root)
    if not rails:
        return None
    chosen = module_rails(rails)
    if not chosen:
        raise SensorUnusable(f"the INA3221 rails ({', '.join(sorted(rails))}) include none that carries the whole "
                             "module's power")
    return Ina3221Rails(root, chosen)


# RAPL ----------------------------------------------------------------------------------------------------------

def counter_delta(before: int, after: int, max_range: int) -> int:
    """What an energy counter counted between two readings, across one wrap at `max_range` back to 0.

    The sampler reads far more often than a RAPL counter can wrap (minutes even at hundreds of watts), so two
    readings are never more than one wrap apart.
    """
    if after >= before:
        return after - before
    return max_range - before + after


class RaplEnergy(Sensor):
    cumulative = True
    note = "whole CPU package, not the model alone"

    def __init__(self, zones: list):
        self.zones = zones  # [(name, energy_uj path, max_energy_range_uj)]
        self.name = "rapl " + "+".join(name for name, _, _ in zones)
        self._last: list = [None] * len(zones)
        self._joules = 0.0

    def read(self) -> list:
        # Every zone is read before any is counted: a zone that fails to read then costs this reading only.
        counters = [int(_read_strict(energy_file)) for _, energy_file, _ in self.zones]
        for index, ((_, _, max_range), now) in enumerate(zip(self.zones, counters)):
            if self._last[index] is not None:
                self._joules += counter_delta(self._last[index], now, max_range) / 1e6
            self._last[index] = now
        return [self._joules]


def open_rapl(root: str | None, interval_s: float) -> Sensor | None:
    """The top-level package zones (intel-rapl:N, named package-N; AMD's share the name). Their subzones (core,
    uncore, dram) and psys overlap them, so they are not added."""
    zones = []
    for zone in _numbered(glob.glob(_path(root, "sys", "class", "powercap", "intel-rapl:*")), r"intel-rapl:(\d+)"):
        name = _read_text(os.path.join(zone, "name")) or os.path.basename(zone)
        if name.startswith("package"):
            zones.append((name, os.path.join(zone, "energy_uj"), os.path.join(zone, "max_energy_range_uj")))
    if not zones:
        return None
    try:
        opened = [(name, energy, int(_read_strict(max_range))) for name, energy, max_range in zones]
        for _, energy, _ in opened:
            _read_strict(energy)
    except PermissionError:
        raise SensorUnusable("RAPL powercap is present but its energy counters are readable by root only (Linux "
                             "restricts energy_uj since CVE-2020-8694): run the job as root to measure power") from None
    except (OSError, ValueError) as exc:
        raise SensorUnusable(f"RAPL powercap is present but unreadable ({exc.__class__.__name__})") from None
    return RaplEnergy(opened)


# hwmon ---------------------------------------------------------------------------------------------------------

class HwmonChannel(Sensor):
    def __init__(self, chip: str, channel: str, label: str | None, files: tuple):
        self.files = files  # (power µW,) or (voltage mV, current mA)
        self.name = f"hwmon {chip} {channel}" + (f" ({label})" if label else "")

    def read(self) -> list:
        values = [_read_number(path) for path in self.files]
        if any(value is None for value in values):
            return []
        if len(values) == 1:
            return [values[0] / 1e6]
        return [values[0] * values[1] / 1e6]  # mV x mA = µW


def hwmon_channels(root: str | None) -> list:
    """Every hwmon channel that reports power, or voltage and current of the same channel number."""
    channels = []
    for device in _numbered(glob.glob(_path(root, "sys", "class", "hwmon", "hwmon*")), r"hwmon(\d+)"):
        chip = _read_text(os.path.join(device, "name")) or os.path.basename(device)
        if chip in HWMON_CHIPS_LEFT_TO_THE_JETSON_READER:
            continue
        with_power = set()
        for power_file in _numbered(glob.glob(os.path.join(device, "power*_input")), r"power(\d+)_input"):
            number = re.fullmatch(r"power(\d+)_input", os.path.basename(power_file))[1]
            with_power.add(number)
            label = _read_text(os.path.join(device, f"power{number}_label"))
            channels.append(HwmonChannel(chip, "power" + number, label, (power_file,)))
        # Channel numbers pair a voltage with its current (ina2xx, ina3221); a battery's in0 and curr1 do not pair.
        for current_file in _numbered(glob.glob(os.path.join(device, "curr*_input")), r"curr(\d+)_input"):
            number = re.fullmatch(r"curr(\d+)_input", os.path.basename(current_file))[1]
            voltage_file = os.path.join(device, f"in{number}_input")
            if number in with_power or not os.path.exists(voltage_file):
                continue
            label = (_read_text(os.path.join(device, f"in{number}_label"))
                     or _read_text(os.path.join(device, f"curr{number}_label")))
            channels.append(HwmonChannel(chip, f"in{number}*curr{number}", label, (voltage_file, current_file)))
    return channels


def open_hwmon(root: str | None, interval_s: float) -> Sensor | None:
    channels = hwmon_channels(root)
    if not channels:
        return None
    readings = []
    for channel in channels:
        watts = channel.read()
        if watts:
            readings.append((watts[0], channel))
    if not readings:
        raise SensorUnusable(f"hwmon power channels ({', '.join(c.name for c in channels)}) could not be read")
    # A board's input carries at least as much as any rail it feeds, so the largest channel is the closest to the
    # whole board's draw; the note says the choice was made this way.
    _, chosen = max(readings, key=lambda reading: reading[0])
    if len(channels) > 1:
        chosen.note = f"the largest of {len(channels)} hwmon power channels, taken as the board's input"
    return chosen


# Battery (phones, laptops) -------------------------------------------------------------------------------------

class BatteryPower(Sensor):
    note = "battery discharge: the whole device, screen and radios included; fuel gauges refresh about once a second"

    def __init__(self, supply: str):
        self.supply_name = os.path.basename(supply)
        self.status_file = os.path.join(supply, "status")
        self.power_file = os.path.join(supply, "power_now")
        self.current_file = os.path.join(supply, "current_now")
        self.voltage_file = os.path.join(supply, "voltage_now")
        self.uses_power_now = os.path.exists(self.power_file)
        self.amps_per_unit = 1e-6
        self.volts_per_unit = 1e-6
        source = "power_now" if self.uses_power_now else "current_now x voltage_now"
        self.name = f"battery {self.supply_name} ({source})"

    def readable(self) -> bool:
        return self.uses_power_now or (os.path.exists(self.current_file) and os.path.exists(self.voltage_file))

    def infer_units(self) -> None:
        """Settles µA or mA, µV or mV from one reading; lets PermissionError through where the files are not ours."""
        if self.uses_power_now:
            _read_strict(self.power_file)
            return
        current, voltage = abs(_read_strict(self.current_file)), abs(_read_strict(self.voltage_file))
        if current == 0 or voltage == 0:
            which = "current" if current == 0 else "voltage"
            raise SensorUnusable(f"the battery ({self.supply_name}) reads a {which} of 0: its fuel gauge does not "
                                 "report the draw")
        if current < SMALLEST_MICROAMPS:
            self.amps_per_unit = 1e-3
        if voltage < SMALLEST_MICROVOLTS:
            self.volts_per_unit = 1e-3
        amps = "mA" if self.amps_per_unit == 1e-3 else "µA"
        volts = "mV" if self.volts_per_unit == 1e-3 else "µV"
        self.note = f"{BatteryPower.note}; current read in {amps}, voltage in {volts}"

    def read(self) -> list:
        status = _read_text(self.status_file)
        if status is not None and status != "Discharging":
            self.problem = (f"the battery went from discharging to {status.lower()} during the measurement (a "
                            "charger was connected?)")
            return []
        # Phones disagree on the sign of a discharge (the ABI says negative, many report positive); the status
        # above already says the current flows out of the battery, so only its size counts.
        if self.uses_power_now:
            microwatts = _read_number(self.power_file)
            return [] if microwatts is None else [abs(microwatts) / 1e6]
        current, voltage = _read_number(self.current_file), _read_number(self.voltage_file)
        if current is None or voltage is None:
            return []
        return [abs(current) * self.amps_per_unit * abs(voltage) * self.volts_per_unit]


def open_battery(root: str | None, interval_s: float) -> Sensor | None:
    for supply in sorted(glob.glob(_path(root, "sys", "class", "power_supply", "*"))):
        # A peripheral's battery (scope Device: a mouse, a stylus) says nothing of this device's draw.
        kind, scope = _read_text(os.path.join(supply, "type")), _read_text(os.path.join(supply, "scope"))
        if kind != "Battery" or scope == "Device":
            continue
        sensor = BatteryPower(supply)
        if not sensor.readable():
            continue
        status = _read_text(sensor.status_file)
        if status is not None and status != "Discharging":
            raise SensorUnusable(f"the battery ({sensor.supply_name}) is {status.lower()}: while a charger feeds the "
                                 "device, the battery's current is not the device's draw; run unplugged (e.g. adb "
                                 "over Wi-Fi) to measure")
        try:
            sensor.infer_units()
        except PermissionError:
            raise SensorUnusable(f"the battery ({sensor.supply_name}) is present but its readings are not readable "
                                 "by this user") from None
        except (OSError, ValueError) as exc:
            raise SensorUnusable(f"the battery ({sensor.supply_name}) is present but unreadable "
                                 f"({exc.__class__.__name__})") from None
        return sensor
    return None


# Choosing a sensor ---------------------------------------------------------------------------------------------

OPENERS = (("INA3221 rails", open_ina3221), ("RAPL powercap", open_rapl), ("hwmon power channel", open_hwmon),
           ("discharging battery", open_battery))


def find_sensor(root: str | None = None, interval_s: float = DEFAULT_INTERVAL_S, extra: tuple = ()) -> tuple:
    """(sensor, None), or (None, why there is none). `extra` adds (what, opener) pairs after the built-in ones."""
    problems = []
    for _, opener in (*OPENERS, *extra):
        try:
            sensor = opener(root, interval_s)
        except SensorUnusable as exc:
            problems.append(str(exc))
            continue
        if sensor is not None:
            return sensor, None
    if problems:
        return None, "; ".join(problems)
    looked_for = ", ".join(what for what, _ in (*OPENERS, *extra))
    return None, f"no power sensor on this device (looked for: {looked_for})"


class Sampler:
    """Reads a sensor every `interval_s` in a thread, and on demand at the edges of each window."""

    def __init__(self, sensor: Sensor, interval_s: float):
        self.sensor, self.interval_s = sensor, interval_s
        self._readings: list = []  # (monotonic seconds, value)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = None

    def start(self) -> None:
        self._record()  # a counter's first reading is the baseline the first window counts from
        self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._record()

    def _record(self) -> None:
        with self._lock:
            now = time.monotonic()
            try:
                values = self.sensor.read()
            except (OSError, ValueError):
                values = []  # a driver that refuses one reading (EAGAIN, ENODATA) costs that reading, not the run
            self._readings.extend((now, value) for value in values)

    def window(self) -> list:
        """The readings since the previous window, ending with one taken now. A counter's next window starts
        from the reading that ends this one, so no energy falls between two windows."""
        self._record()
        with self._lock:
            taken = self._readings
            self._readings = taken[-1:] if self.sensor.cumulative else []
        return taken

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 5 * self.interval_s))


def window_watts(readings: list, cumulative: bool) -> tuple:
    """(mean watts, how many readings it rests on) of one window; (None, n) when it cannot be told."""
    if cumulative:
        if len(readings) < 2:
            return None, 0
        (start, joules_start), (end, joules_end) = readings[0], readings[-1]
        if end <= start:
            return None, 0
        return (joules_end - joules_start) / (end - start), len(readings) - 1
    if not readings:
        return None, 0
    return sum(value for _, value in readings) / len(readings), len(readings)


def energy_per_inference_mj(watts: float, seconds: float, inferences: int) -> float:
    """Watts held for `seconds`, shared by `inferences` (W x s = J; in millijoules)."""
    if not seconds > 0:
        raise ValueError(f"the timed runs must last a positive number of seconds, not {seconds!r}")
    if isinstance(inferences, bool) or not isinstance(inferences, int) or inferences < 1:
        raise ValueError(f"inferences must be a positive integer, not {inferences!r}")
    return watts * seconds / inferences * 1000


def summarize(sensor: Sensor, idle: list, busy: list, seconds: float | None, inferences: int | None,
              interval_s: float) -> dict:
    """The power result of one measurement from its idle and busy windows (readings as Sampler.window gives)."""
    if sensor.problem:
        return {"status": "unavailable", "reason": f"{sensor.name}: {sensor.problem}"}
    busy_watts, busy_count = window_watts(busy, sensor.cumulative)
    enough = 1 if sensor.cumulative else MIN_INSTANT_READINGS
    if busy_watts is None or busy_count < enough:
        lasted = f" in {seconds:.2f} s" if seconds else ""
        return {"status": "unavailable",
                "reason": f"too few power readings during the timed runs ({busy_count}{lasted} from {sensor.name}, one "
                          f"per {round(interval_s * 1000)} ms): time more runs"}
    idle_watts, idle_count = window_watts(idle, sensor.cumulative)
    result = {"status": "measured", "sensor": sensor.name, "average_watts": round(busy_watts, 3),
              "idle_watts": round(idle_watts, 3) if idle_watts is not None else None,
              "energy_per_inference_mj": None, "busy_energy_per_inference_mj": None,
              "samples": busy_count, "idle_samples": idle_count, "interval_ms": round(interval_s * 1000),
              "seconds": round(seconds, 6) if seconds else None, "inferences": inferences}
    if inferences and seconds:
        result["busy_energy_per_inference_mj"] = round(energy_per_inference_mj(busy_watts, seconds, inferences), 4)
        if idle_watts is not None:
            # A negative difference is kept: it says the idle reading was noisier than the workload, which a clamp
            # to zero would hide.
            result["energy_per_inference_mj"] = round(
                energy_per_inference_mj(busy_watts - idle_watts, seconds, inferences), 4)
    notes = [sensor.note] if sensor.note else []
    if idle_watts is None:
        notes.append("no idle window, so no energy above idle")
    elif idle_watts > busy_watts:
        notes.append("idle read above busy: the difference is within the sensor's noise")
    if notes:
        result["note"] = "; ".join(notes)
    return result


class PowerMeter:
    """One measurement: `measure_idle`, then `start` and `stop` around the timed runs, then `report`.
    Without a sensor every step does nothing (and costs no idle time) and the report says why."""

    def __init__(self, sensor: Sensor | None, reason: str | None = None, interval_s: float = DEFAULT_INTERVAL_S):
        self.sensor, self.reason, self.interval_s = sensor, reason, interval_s
        self._sampler = Sampler(sensor, interval_s) if sensor is not None else None
        self._sampling = False
        self._idle: list = []
        self._busy: list = []
        self._busy_started = None
        self._busy_s = None

    @classmethod
    def find(cls, root: str | None = None, interval_s: float = DEFAULT_INTERVAL_S, extra: tuple = ()) -> PowerMeter:
        sensor, reason = find_sensor(root, interval_s, extra)
        return cls(sensor, reason, interval_s)

    def _ensure_sampling(self) -> None:
        if self._sampler is not None and not self._sampling:
            self._sampler.start()
            self._sampling = True

    def measure_idle(self, seconds: float) -> None:
        if self._sampler is None or seconds <= 0:
            return
        self._ensure_sampling()
        self._sampler.window()
        time.sleep(seconds)
        self._idle = self._sampler.window()

    def start(self) -> None:
        if self._sampler is not None:
            self._ensure_sampling()
            self._sampler.window()  # what fell between the idle window and now belongs to neither
        self._busy_started = time.perf_counter()

    def stop(self) -> None:
        self._busy_s = time.perf_counter() - self._busy_started
        if self._sampler is not None:
            self._busy = self._sampler.window()

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        if self.sensor is not None:
            self.sensor.close()

    def report(self, inferences: int | None, seconds: float | None = None) -> dict:
        """`seconds` is the time the inferences took where the runner knows it better than the busy window (a
        tool that also loads an engine); `inferences` None leaves out the energy per inference."""
        if self.sensor is None:
            return {"status": "unavailable", "reason": self.reason}
        return summarize(self.sensor, self._idle, self._busy, seconds if seconds is not None else self._busy_s,
                         inferences, self.interval_s)


def job_settings(job: dict) -> tuple:
    """(idle window seconds, sampling interval seconds) from a job's `power_idle_s` and `power_interval_ms`."""
    idle_s = float(job.get("power_idle_s", DEFAULT_IDLE_S))
    interval_s = float(job.get("power_interval_ms", DEFAULT_INTERVAL_S * 1000)) / 1000
    if idle_s < 0 or not interval_s > 0:
        raise ValueError(f"power_idle_s must be 0 or more and power_interval_ms more than 0, not "
                         f"{job.get('power_idle_s')!r} and {job.get('power_interval_ms')!r}")
    return idle_s, interval_s


def measure(run, inferences: int | None, idle_s: float = DEFAULT_IDLE_S, interval_s: float = DEFAULT_INTERVAL_S,
            root: str | None = None, extra: tuple = ()) -> dict:
    """Calls `run()` (the timed runs) between an idle window and the end of sampling; returns the power result."""
    meter = PowerMeter.find(root, interval_s, extra)
    try:
        meter.measure_idle(idle_s)
        meter.start()
        run()
        meter.stop()
    finally:
        meter.close()
    return meter.report(inferences)
