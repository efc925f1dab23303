"""targets/runners/power.py: every sensor kind read from a sysfs tree laid out in a folder, the sampler's windows,
and the energy per inference computed from known readings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_deploy.targets.runners import power
from edge_deploy.targets.runners.power import (
    PowerMeter,
    Sensor,
    SensorUnusable,
    counter_delta,
    energy_per_inference_mj,
    find_sensor,
    module_milliwatts,
    module_rail,
    module_rails,
    open_battery,
    open_hwmon,
    open_ina3221,
    open_rapl,
    read_ina3221_sysfs,
    summarize,
)

INTERVAL = power.DEFAULT_INTERVAL_S


def write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")


# Jetson INA3221 -------------------------------------------------------------------------------------------------

def test_ina3221_jetpack4_iio_layout(tmp_path):
    # Jetson Nano (JetPack 4): NVIDIA's iio driver, power in milliwatts, rails numbered from 0.
    device = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    write_tree(tmp_path, {f"{device}/rail_name_0": "POM_5V_IN", f"{device}/in_power0_input": "2747",
                          f"{device}/rail_name_1": "POM_5V_GPU", f"{device}/in_power1_input": "0",
                          f"{device}/rail_name_2": "POM_5V_CPU", f"{device}/in_power2_input": "487",
                          f"{device}/in_voltage0_input": "5072", f"{device}/in_current0_input": "541"})
    rails = read_ina3221_sysfs(str(tmp_path))
    assert rails == {"POM_5V_IN": 2747.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 487.0}
    assert module_rail(rails) == "POM_5V_IN"
    sensor = open_ina3221(str(tmp_path), INTERVAL)
    assert sensor.name == "ina3221 POM_5V_IN" and sensor.read() == [pytest.approx(2.747)]


AGX_ORIN_HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
AGX_ORIN_SECOND = "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon7"
AGX_ORIN_TREE = {
    f"{AGX_ORIN_HWMON}/in1_label": "VDD_GPU_SOC", f"{AGX_ORIN_HWMON}/in1_input": "5024",
    f"{AGX_ORIN_HWMON}/curr1_input": "464",
    f"{AGX_ORIN_HWMON}/in2_label": "VDD_CPU_CV", f"{AGX_ORIN_HWMON}/in2_input": "5024",
    f"{AGX_ORIN_HWMON}/curr2_input": "80",
    f"{AGX_ORIN_HWMON}/in3_label": "VIN_SYS_5V0", f"{AGX_ORIN_HWMON}/in3_input": "5000",
    f"{AGX_ORIN_HWMON}/curr3_input": "805",
    # the sum of the shunt voltages has a label but no current of its own
    f"{AGX_ORIN_HWMON}/in7_label": "sum of shunt voltages", f"{AGX_ORIN_HWMON}/in7_input": "1320",
    f"{AGX_ORIN_HWMON}/in4_input": "464",
    f"{AGX_ORIN_SECOND}/in1_label": "NC", f"{AGX_ORIN_SECOND}/in1_input": "0", f"{AGX_ORIN_SECOND}/curr1_input": "0",
    f"{AGX_ORIN_SECOND}/in2_label": "VDDQ_VDD2_1V8AO", f"{AGX_ORIN_SECOND}/in2_input": "5000",
    f"{AGX_ORIN_SECOND}/curr2_input": "60",
    # a disabled channel
    f"{AGX_ORIN_SECOND}/in3_label": "SPARE", f"{AGX_ORIN_SECOND}/in3_enable": "0",
    f"{AGX_ORIN_SECOND}/in3_input": "0", f"{AGX_ORIN_SECOND}/curr3_input": "0",
}


def test_ina3221_jetpack6_hwmon_layout_and_agx_orin_module_power(tmp_path):
    # AGX Orin (JetPack 5/6): the mainline hwmon driver, mV and mA per channel; the hwmon number varies.
    write_tree(tmp_path, AGX_ORIN_TREE)
    rails = read_ina3221_sysfs(str(tmp_path))
    assert rails == {"VDD_GPU_SOC": pytest.approx(5024 * 464 / 1000), "VDD_CPU_CV": pytest.approx(401.92),
                     "VIN_SYS_5V0": pytest.approx(4025.0), "VDDQ_VDD2_1V8AO": pytest.approx(300.0)}
    assert module_rail(rails) == "VIN_SYS_5V0"
    # No input rail on AGX Orin: its GPU+SoC, CPU+CV and 5 V system rails together are the module's draw.
    assert module_rails(rails) == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
    sensor = open_ina3221(str(tmp_path), INTERVAL)
    assert sensor.name == "ina3221 VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"
    assert sensor.read() == [pytest.approx((5024 * 464 + 5024 * 80 + 5000 * 805) / 1e6)]


def test_ina3221_unreadable_channel_is_left_out(tmp_path):
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    write_tree(tmp_path, {f"{hwmon}/in1_label": "VDD_IN", f"{hwmon}/in1_input": "5072",
                          f"{hwmon}/curr1_input": "1064",
                          f"{hwmon}/in2_label": "VDD_SOC", f"{hwmon}/in2_input": "not a number",
                          f"{hwmon}/curr2_input": "288"})
    assert read_ina3221_sysfs(str(tmp_path)) == {"VDD_IN": pytest.approx(5396.608)}


def test_no_ina3221_gives_an_empty_dict_and_no_sensor(tmp_path):
    assert read_ina3221_sysfs(str(tmp_path)) == {}
    assert read_ina3221_sysfs(str(tmp_path / "missing")) == {}
    write_tree(tmp_path, {"sys/bus/i2c/drivers/other/1-0050/name": "eeprom"})
    assert read_ina3221_sysfs(str(tmp_path)) == {}
    assert open_ina3221(str(tmp_path), INTERVAL) is None


def test_ina3221_without_a_module_rail_is_unusable_not_a_guess(tmp_path):
    # AGX Xavier's monitors name GPU, CPU, SOC, ... but no rail carries the whole module.
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon2"
    write_tree(tmp_path, {f"{hwmon}/in1_label": "GPU", f"{hwmon}/in1_input": "19000", f"{hwmon}/curr1_input": "50",
                          f"{hwmon}/in2_label": "CPU", f"{hwmon}/in2_input": "19000", f"{hwmon}/curr2_input": "40"})
    with pytest.raises(SensorUnusable, match=r"INA3221 rails \(CPU, GPU\) include none"):
        open_ina3221(str(tmp_path), INTERVAL)
    sensor, reason = find_sensor(str(tmp_path))
    assert sensor is None and "include none that carries the whole module" in reason


@pytest.mark.parametrize("rails, expected", [
    ({"VDD_IN": 1, "VDD_CPU_GPU_CV": 1, "VDD_SOC": 1}, ("VDD_IN",)),
    ({"VDD_GPU_SOC": 1, "VDD_CPU_CV": 1, "VIN_SYS_5V0": 1, "VDDQ_VDD2_1V8AO": 1},
     ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")),
    ({"POM_5V_IN": 1, "POM_5V_GPU": 1, "POM_5V_CPU": 1}, ("POM_5V_IN",)),  # Jetson Nano, JetPack 4
    ({"GPU": 1, "CPU": 1, "SOC": 1, "CV": 1, "VDDRQ": 1, "SYS5V": 1}, ()),  # AGX Xavier: no input rail
    ({}, ()),
])
def test_module_rails(rails, expected):
    assert module_rails(rails) == expected
    assert module_rail(rails) == (expected[-1] if expected else None)


def test_module_milliwatts_needs_every_rail_of_the_sum():
    assert module_milliwatts({"A": 1.0, "B": 2.5, "C": 9.0}, ("A", "B")) == 3.5
    assert module_milliwatts({"A": 1.0}, ("A", "B")) is None
    assert module_milliwatts({"A": 1.0}, ()) is None


# RAPL -----------------------------------------------------------------------------------------------------------

def rapl_tree(root: Path, energy_uj: int, max_range_uj: int = 1_000_000) -> Path:
    zone = "sys/class/powercap/intel-rapl:0"
    write_tree(root, {f"{zone}/name": "package-0", f"{zone}/energy_uj": str(energy_uj),
                      f"{zone}/max_energy_range_uj": str(max_range_uj),
                      # a subzone (listed flat beside its package, as /sys/class/powercap does) and the platform
                      # zone overlap the package and must not be added to it
                      f"{zone}:0/name": "core", f"{zone}:0/energy_uj": "5", f"{zone}:0/max_energy_range_uj": "1000",
                      "sys/class/powercap/intel-rapl:1/name": "psys",
                      "sys/class/powercap/intel-rapl:1/energy_uj": "7",
                      "sys/class/powercap/intel-rapl:1/max_energy_range_uj": "1000"})
    return root / zone / "energy_uj"


def test_rapl_counts_across_a_wrap(tmp_path):
    energy = rapl_tree(tmp_path, 700_000)
    sensor = open_rapl(str(tmp_path), INTERVAL)
    assert sensor.name == "rapl package-0" and sensor.cumulative
    assert sensor.read() == [0.0]  # the baseline
    energy.write_text("900000\n")
    assert sensor.read() == [pytest.approx(0.2)]
    energy.write_text("100000\n")  # wrapped at 1 J: 0.1 J up to the top, then 0.1 J from zero
    assert sensor.read() == [pytest.approx(0.4)]
    energy.write_text("150000\n")
    assert sensor.read() == [pytest.approx(0.45)]


def test_rapl_adds_the_packages_of_a_two_socket_machine(tmp_path):
    first = rapl_tree(tmp_path, 0)
    second = tmp_path / "sys/class/powercap/intel-rapl:2"
    write_tree(second, {"name": "package-1", "energy_uj": "500", "max_energy_range_uj": "1000000"})
    sensor = open_rapl(str(tmp_path), INTERVAL)
    assert sensor.name == "rapl package-0+package-1" and sensor.read() == [0.0]
    first.write_text("300000\n")
    (second / "energy_uj").write_text("100500\n")
    assert sensor.read() == [pytest.approx(0.4)]


def test_counter_delta():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 100, 1000) == 200
    assert counter_delta(5, 5, 1000) == 0


def test_rapl_readable_by_root_only_is_unusable_with_the_reason(tmp_path, monkeypatch):
    rapl_tree(tmp_path, 1)
    real = power._read_strict

    def refuse_energy(path):
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    # chmod cannot show it: the tests may run as root, who reads any file.
    monkeypatch.setattr(power, "_read_strict", refuse_energy)
    with pytest.raises(SensorUnusable, match="readable by root only"):
        open_rapl(str(tmp_path), INTERVAL)


def test_no_rapl_is_no_sensor(tmp_path):
    assert open_rapl(str(tmp_path), INTERVAL) is None


# hwmon ----------------------------------------------------------------------------------------------------------

def test_hwmon_power_input_in_microwatts(tmp_path):
    write_tree(tmp_path, {"sys/class/hwmon/hwmon0/name": "coretemp", "sys/class/hwmon/hwmon0/temp1_input": "45000",
                          "sys/class/hwmon/hwmon1/name": "ina226", "sys/class/hwmon/hwmon1/power1_input": "2500000",
                          "sys/class/hwmon/hwmon1/power1_label": "VBUS"})
    sensor = open_hwmon(str(tmp_path), INTERVAL)
    assert sensor.name == "hwmon ina226 power1 (VBUS)"
    assert sensor.read() == [2.5]
    assert sensor.note is None  # the only channel: nothing was chosen


def test_hwmon_voltage_times_current_pairs_channel_numbers(tmp_path):
    write_tree(tmp_path, {
        # ina219: in0 is the shunt voltage (no current of its own), in1 x curr1 the bus.
        "sys/class/hwmon/hwmon2/name": "ina219", "sys/class/hwmon/hwmon2/in0_input": "12",
        "sys/class/hwmon/hwmon2/in1_input": "5000", "sys/class/hwmon/hwmon2/curr1_input": "600",
        # an ACPI battery's in0 and curr1 belong to no common channel
        "sys/class/hwmon/hwmon3/name": "BAT0", "sys/class/hwmon/hwmon3/in0_input": "12000",
        "sys/class/hwmon/hwmon3/curr1_input": "900",
    })
    channels = power.hwmon_channels(str(tmp_path))
    assert [c.name for c in channels] == ["hwmon ina219 in1*curr1"]
    sensor = open_hwmon(str(tmp_path), INTERVAL)
    assert sensor.read() == [pytest.approx(3.0)]  # 5000 mV x 600 mA


def test_hwmon_takes_the_largest_channel_and_says_so(tmp_path):
    write_tree(tmp_path, {
        "sys/class/hwmon/hwmon0/name": "ina3221", "sys/class/hwmon/hwmon0/in1_input": "19000",
        "sys/class/hwmon/hwmon0/curr1_input": "900",  # left to the Jetson reader, even though it is the largest
        "sys/class/hwmon/hwmon1/name": "ina226", "sys/class/hwmon/hwmon1/power1_input": "800000",
        "sys/class/hwmon/hwmon10/name": "ina226", "sys/class/hwmon/hwmon10/power1_input": "4200000",
        "sys/class/hwmon/hwmon10/power1_label": "board input",
    })
    sensor = open_hwmon(str(tmp_path), INTERVAL)
    assert sensor.name == "hwmon ina226 power1 (board input)" and sensor.read() == [4.2]
    assert sensor.note == "the largest of 2 hwmon power channels, taken as the board's input"


def test_hwmon_channels_that_cannot_be_read_are_unusable(tmp_path):
    write_tree(tmp_path, {"sys/class/hwmon/hwmon0/name": "ina226", "sys/class/hwmon/hwmon0/power1_input": "busy"})
    with pytest.raises(SensorUnusable, match="could not be read"):
        open_hwmon(str(tmp_path), INTERVAL)


# Battery (phones, laptops) --------------------------------------------------------------------------------------

def battery_tree(root: Path, current: str, voltage: str, status: str = "Discharging", name: str = "battery") -> Path:
    supply = f"sys/class/power_supply/{name}"
    write_tree(root, {f"{supply}/type": "Battery", f"{supply}/status": status, f"{supply}/current_now": current,
                      f"{supply}/voltage_now": voltage,
                      # the charger's own supply is no battery
                      "sys/class/power_supply/usb/type": "USB", "sys/class/power_supply/usb/current_now": "500000",
                      "sys/class/power_supply/usb/voltage_now": "5000000"})
    return root / supply


@pytest.mark.parametrize("current, voltage, units", [
    ("-450000", "3850000", "current read in µA, voltage in µV"),  # the ABI's sign: negative while discharging
    ("450000", "3850000", "current read in µA, voltage in µV"),  # many phones: positive while discharging
    ("-450", "3850", "current read in mA, voltage in mV"),  # drivers that ignore the ABI's units
    ("450", "3850000", "current read in mA, voltage in µV"),
])
def test_android_battery_discharge_in_either_sign_and_unit(tmp_path, current, voltage, units):
    battery_tree(tmp_path, current, voltage)
    sensor = open_battery(str(tmp_path), INTERVAL)
    assert sensor.name == "battery battery (current_now x voltage_now)"
    assert sensor.read() == [pytest.approx(0.45 * 3.85)]
    assert sensor.note.endswith(units)


def test_a_charging_battery_is_unusable_not_a_negative_draw(tmp_path):
    battery_tree(tmp_path, "1200000", "4200000", status="Charging")
    with pytest.raises(SensorUnusable, match="is charging: while a charger feeds the device"):
        open_battery(str(tmp_path), INTERVAL)
    sensor, reason = find_sensor(str(tmp_path))
    assert sensor is None and "the battery (battery) is charging" in reason


def test_a_battery_that_starts_charging_mid_run_spoils_the_measurement(tmp_path):
    supply = battery_tree(tmp_path, "-450000", "3850000")
    sensor = open_battery(str(tmp_path), INTERVAL)
    assert sensor.read() == [pytest.approx(1.7325)]
    (supply / "status").write_text("Charging\n")
    assert sensor.read() == []
    busy = [(0.0, 1.7), (0.1, 1.7), (0.2, 1.7)]
    result = summarize(sensor, busy, busy, 1.0, 10, INTERVAL)
    assert result["status"] == "unavailable" and "went from discharging to charging" in result["reason"]


def test_laptop_battery_power_now_and_peripheral_batteries(tmp_path):
    write_tree(tmp_path, {"sys/class/power_supply/hidpp_battery_0/type": "Battery",
                          "sys/class/power_supply/hidpp_battery_0/scope": "Device",
                          "sys/class/power_supply/hidpp_battery_0/status": "Discharging",
                          "sys/class/power_supply/hidpp_battery_0/power_now": "100000",
                          "sys/class/power_supply/BAT0/type": "Battery",
                          "sys/class/power_supply/BAT0/status": "Discharging",
                          "sys/class/power_supply/BAT0/power_now": "-8500000"})
    sensor = open_battery(str(tmp_path), INTERVAL)
    assert sensor.name == "battery BAT0 (power_now)" and sensor.read() == [8.5]


def test_a_battery_reading_zero_is_unusable(tmp_path):
    battery_tree(tmp_path, "0", "3850000")
    with pytest.raises(SensorUnusable, match="reads a current of 0"):
        open_battery(str(tmp_path), INTERVAL)


# Choosing a sensor ----------------------------------------------------------------------------------------------

def test_the_jetson_rails_come_before_generic_hwmon(tmp_path):
    write_tree(tmp_path, {**AGX_ORIN_TREE, "sys/class/hwmon/hwmon1/name": "ina226",
                          "sys/class/hwmon/hwmon1/power1_input": "9000000"})
    sensor, reason = find_sensor(str(tmp_path))
    assert reason is None and sensor.name.startswith("ina3221 ")


def test_an_unusable_sensor_gives_way_to_a_usable_one(tmp_path):
    battery_tree(tmp_path, "1200000", "4200000", status="Charging")
    write_tree(tmp_path, {"sys/class/hwmon/hwmon0/name": "ina219", "sys/class/hwmon/hwmon0/power1_input": "1000000"})
    sensor, reason = find_sensor(str(tmp_path))
    assert reason is None and sensor.name == "hwmon ina219 power1"


def test_nothing_found_names_what_was_looked_for(tmp_path):
    sensor, reason = find_sensor(str(tmp_path), extra=(("tegrastats", lambda root, interval: None),))
    assert sensor is None
    assert reason == ("no power sensor on this device (looked for: INA3221 rails, RAPL powercap, hwmon power channel, "
                      "discharging battery, tegrastats)")


# Windows, summaries and the meter ------------------------------------------------------------------------------

class Scripted(Sensor):
    def __init__(self, cumulative=False, note=None):
        self.name, self.cumulative, self.note = "scripted", cumulative, note

    def read(self):
        return []


def test_energy_per_inference_from_known_instant_readings():
    idle = [(0.0, 2.0), (0.1, 2.0), (0.2, 2.0)]
    busy = [(1.0, 5.0), (1.1, 6.0)]
    result = summarize(Scripted(), idle, busy, 2.0, 400, 0.1)
    assert result == {"status": "measured", "sensor": "scripted", "average_watts": 5.5, "idle_watts": 2.0,
                      # (5.5 - 2.0) W x 2 s / 400 = 17.5 mJ above idle; 5.5 W x 2 s / 400 = 27.5 mJ in all
                      "energy_per_inference_mj": 17.5, "busy_energy_per_inference_mj": 27.5,
                      "samples": 2, "idle_samples": 3, "interval_ms": 100, "seconds": 2.0, "inferences": 400}


def test_energy_per_inference_from_a_counter():
    # Joules counted since the sensor opened: 6 J over the 2 s idle window, then 16 J over the 2 s busy one.
    idle = [(0.0, 0.0), (1.0, 3.0), (2.0, 6.0)]
    busy = [(2.0, 6.0), (2.5, 10.0), (4.0, 22.0)]
    result = summarize(Scripted(cumulative=True, note="whole CPU package"), idle, busy, 2.0, 100, 0.1)
    assert result["average_watts"] == 8.0 and result["idle_watts"] == 3.0
    assert result["energy_per_inference_mj"] == 100.0  # (8 - 3) W x 2 s / 100
    assert result["busy_energy_per_inference_mj"] == 160.0
    assert result["samples"] == 2 and result["idle_samples"] == 2 and result["note"] == "whole CPU package"


def test_too_few_readings_are_unavailable_not_zero():
    result = summarize(Scripted(), [(0.0, 2.0)], [(1.0, 5.0)], 0.05, 10, 0.1)
    assert result == {"status": "unavailable", "reason": "too few power readings during the timed runs (1 in 0.05 s "
                                                         "from scripted, one per 100 ms): time more runs"}
    assert summarize(Scripted(cumulative=True), [], [(1.0, 5.0)], 0.05, 10, 0.1)["status"] == "unavailable"


def test_without_an_idle_window_the_energy_above_idle_is_left_out():
    result = summarize(Scripted(), [], [(1.0, 4.0), (1.1, 4.0)], 1.0, 50, 0.1)
    assert result["average_watts"] == 4.0 and result["idle_watts"] is None
    assert result["energy_per_inference_mj"] is None and result["busy_energy_per_inference_mj"] == 80.0
    assert "no idle window" in result["note"]


def test_a_negative_difference_is_kept_and_explained():
    result = summarize(Scripted(), [(0.0, 3.0), (0.1, 3.0)], [(1.0, 2.5), (1.1, 2.5)], 1.0, 10, 0.1)
    assert result["energy_per_inference_mj"] == -50.0
    assert "within the sensor's noise" in result["note"]


@pytest.mark.parametrize("seconds, inferences", [(0.0, 10), (-1.0, 10), (1.0, 0), (1.0, True), (1.0, 2.5)])
def test_energy_per_inference_refuses_empty_runs(seconds, inferences):
    with pytest.raises(ValueError):
        energy_per_inference_mj(5.0, seconds, inferences)


class LoadFollowing(Sensor):
    """2 W while idle, 5 W once the timed runs have begun: what a real sensor shows, with known values."""

    name = "load-following"

    def __init__(self):
        self.busy = False
        self.closed = False

    def read(self):
        return [5.0 if self.busy else 2.0]

    def close(self):
        self.closed = True


def test_the_meter_samples_idle_then_busy_in_a_thread(tmp_path):
    sensor = LoadFollowing()

    def timed_runs():
        sensor.busy = True
        time.sleep(0.3)

    # An empty root: none of the built-in sensors exist, so the scripted one is chosen.
    result = power.measure(timed_runs, 30, idle_s=0.2, interval_s=0.02, root=str(tmp_path),
                           extra=(("load-following", lambda root, interval: sensor),))
    assert result["status"] == "measured" and result["sensor"] == "load-following"
    assert result["average_watts"] == 5.0 and result["idle_watts"] == 2.0
    assert result["samples"] >= 5 and result["idle_samples"] >= 4  # one every 20 ms, plus the window edges
    assert 0.3 <= result["seconds"] < 1.0
    # Both figures are rounded (seconds to the µs, energy to 0.1 µJ): the tolerance covers the two roundings.
    assert result["energy_per_inference_mj"] == pytest.approx(3.0 * result["seconds"] / 30 * 1000, abs=5e-4)
    assert sensor.closed


def test_a_meter_without_a_sensor_wastes_no_idle_time(tmp_path):
    calls = []
    started = time.perf_counter()
    result = power.measure(lambda: calls.append(1), 10, idle_s=5.0, root=str(tmp_path))
    assert time.perf_counter() - started < 1.0
    assert calls == [1]
    assert result == {"status": "unavailable", "reason": "no power sensor on this device (looked for: INA3221 rails, "
                                                         "RAPL powercap, hwmon power channel, discharging battery)"}


def test_on_this_machine_power_is_unavailable_with_a_reason():
    """This machine has no power sensor (no RAPL, hwmon or battery): the result says so, never 0."""
    sensor, reason = find_sensor()
    if sensor is not None:
        sensor.close()
        pytest.skip(f"this machine has a power sensor ({sensor.name})")
    result = PowerMeter.find().report(100)
    assert result == {"status": "unavailable", "reason": reason}
    assert reason.startswith("no power sensor on this device") or "RAPL" in reason or "battery" in reason


@pytest.mark.parametrize("job, expected", [
    ({}, (power.DEFAULT_IDLE_S, power.DEFAULT_INTERVAL_S)),
    ({"power_idle_s": 0, "power_interval_ms": 50}, (0.0, 0.05)),
])
def test_job_settings(job, expected):
    assert power.job_settings(job) == expected


@pytest.mark.parametrize("job", [{"power_idle_s": -1}, {"power_interval_ms": 0}])
def test_job_settings_refuse_nonsense(job):
    with pytest.raises(ValueError):
        power.job_settings(job)
