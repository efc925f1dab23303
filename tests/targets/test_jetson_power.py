from pathlib import Path

import pytest

from edge_deploy.targets.jetson.power import energy_per_inference, module_rail, parse_tegrastats, read_ina3221_sysfs

SAMPLES = Path(__file__).parents[1] / "samples" / "tegrastats"


def sample_lines(name: str) -> list[str]:
    return (SAMPLES / name).read_text().splitlines()


def test_agx_orin_jetpack6_sample():
    [line] = sample_lines("agx-orin-jp6.txt")
    parsed = parse_tegrastats(line)
    assert parsed["timestamp"] == "04-11-2025 10:36:27"
    assert parsed["ram_mb"] == (4321.0, 62801.0)
    # GR3D_FREQ 0%@[0,0]: one clock per GPC, both 0 MHz while the GPU idles.
    assert parsed["gpu_load_percent"] == 0.0
    assert parsed["gpu_freq_mhz"] == 0.0
    # No VDD_IN on AGX Orin; the two "NC 0mW/0mW" channels are not connected and left out.
    assert parsed["rails_mw"] == {"VDD_GPU_SOC": {"now": 2340.0, "avg": 2340.0},
                                  "VDD_CPU_CV": {"now": 390.0, "avg": 390.0},
                                  "VIN_SYS_5V0": {"now": 4025.0, "avg": 4025.0},
                                  "VDDQ_VDD2_1V8AO": {"now": 301.0, "avg": 301.0}}
    # CV0, CV1, CV2 and GPU read -256C (powered off) and are left out.
    assert parsed["temps_c"] == {"CPU": 44.562, "Tboard": 32.0, "SOC2": 40.093, "Tdiode": 33.0, "SOC0": 41.093,
                                 "tj": 44.343, "SOC1": 41.25}
    assert module_rail(parsed["rails_mw"]) == "VIN_SYS_5V0"


def test_orin_nano_jetpack6_idle_sample():
    first, second = (parse_tegrastats(line) for line in sample_lines("orin-nano-jp6-idle.txt"))
    assert first["timestamp"] == "04-27-2026 14:59:41"
    assert first["ram_mb"] == (775.0, 7620.0)
    # "GR3D_FREQ 0%": a load with no clock.
    assert first["gpu_load_percent"] == 0.0
    assert first["gpu_freq_mhz"] is None
    assert first["rails_mw"] == {"VDD_IN": {"now": 4761.0, "avg": 4778.0},
                                 "VDD_CPU_GPU_CV": {"now": 515.0, "avg": 501.0},
                                 "VDD_SOC": {"now": 1428.0, "avg": 1428.0}}
    # This release names its sensors in lower case.
    assert first["temps_c"] == {"cpu": 48.468, "soc2": 47.531, "soc0": 48.062, "gpu": 48.562, "tj": 49.156,
                                "soc1": 49.156}
    assert module_rail(first["rails_mw"]) == "VDD_IN"
    assert second["timestamp"] == "04-27-2026 14:59:42"
    assert second["rails_mw"]["VDD_IN"] == {"now": 4761.0, "avg": 4777.0}
    assert second["rails_mw"]["VDD_CPU_GPU_CV"] == {"now": 515.0, "avg": 502.0}
    assert second["temps_c"]["soc0"] == 48.0
    assert second["temps_c"]["tj"] == 49.218


def test_tx2_l4t28_sample_without_units_or_timestamp():
    [line] = sample_lines("tx2-l4t28.txt")
    parsed = parse_tegrastats(line)
    assert parsed["timestamp"] is None
    assert parsed["ram_mb"] == (1685.0, 7854.0)
    assert parsed["gpu_load_percent"] == 0.0
    assert parsed["gpu_freq_mhz"] == 140.0
    # "VDD_IN 1931/1931": milliwatts without the unit; SWAP 278/8192MB is no rail.
    assert parsed["rails_mw"] == {"VDD_IN": {"now": 1931.0, "avg": 1931.0}, "VDD_CPU": {"now": 231.0, "avg": 231.0},
                                  "VDD_GPU": {"now": 154.0, "avg": 154.0}, "VDD_SOC": {"now": 385.0, "avg": 385.0},
                                  "VDD_WIFI": {"now": 38.0, "avg": 38.0}, "VDD_DDR": {"now": 326.0, "avg": 326.0}}
    assert parsed["temps_c"] == {"BCPU": 41.0, "MCPU": 41.0, "GPU": 39.0, "PLL": 41.0, "Tboard": 37.0,
                                 "Tdiode": 37.25, "PMIC": 100.0, "thermal": 39.9}
    assert module_rail(parsed["rails_mw"]) == "VDD_IN"


@pytest.mark.parametrize("field, load, clock", [
    ("GR3D_FREQ 0%@[305]", 0.0, 305.0),
    ("GR3D_FREQ 45%@[1300,1300]", 45.0, 1300.0),
    ("GR3D_FREQ 0%@1300", 0.0, 1300.0),
    ("GR3D_FREQ 12%", 12.0, None),
    ("GR3D_FREQ @[1000,1000,1000]", None, 1000.0),
])
def test_gpu_load_and_clock_forms(field, load, clock):
    parsed = parse_tegrastats(f"RAM 2000/7620MB (lfb 3x4MB) EMC_FREQ 5%@2133 {field} VIC_FREQ 729 APE 174")
    assert parsed["gpu_load_percent"] == load
    assert parsed["gpu_freq_mhz"] == clock
    assert parsed["rails_mw"] == {}


def test_a_sensor_reading_minus_256_is_off():
    parsed = parse_tegrastats("RAM 775/7620MB (lfb 3x4MB) CPU@45.5C GPU@-256C CV0@-256C soc0@48C")
    assert parsed["temps_c"] == {"CPU": 45.5, "soc0": 48.0}
    assert "GPU" not in parsed["temps_c"]


def test_a_line_with_nothing_known_gives_empty_fields():
    assert parse_tegrastats("tegrastats: unexpected output") == {
        "timestamp": None, "ram_mb": None, "gpu_load_percent": None, "gpu_freq_mhz": None, "rails_mw": {},
        "temps_c": {}}


@pytest.mark.parametrize("rails, expected", [
    ({"VDD_IN": 1, "VDD_CPU_GPU_CV": 1, "VDD_SOC": 1}, "VDD_IN"),
    ({"VDD_GPU_SOC": 1, "VDD_CPU_CV": 1, "VIN_SYS_5V0": 1, "VDDQ_VDD2_1V8AO": 1}, "VIN_SYS_5V0"),
    ({"POM_5V_IN": 1, "POM_5V_GPU": 1, "POM_5V_CPU": 1}, "POM_5V_IN"),  # Jetson Nano, JetPack 4
    ({"GPU": 1, "CPU": 1, "SOC": 1, "CV": 1, "VDDRQ": 1, "SYS5V": 1}, None),  # AGX Xavier: no input rail
    ({}, None),
])
def test_module_rail(rails, expected):
    assert module_rail(rails) == expected


def test_energy_per_inference():
    energy = energy_per_inference([5000.0, 5200.0], [3000.0, 3100.0, 2900.0], 2.0, 400, rail="VDD_IN")
    assert energy == {"rail": "VDD_IN", "busy_mw": 5100.0, "idle_mw": 3000.0, "delta_mw": 2100.0, "seconds": 2.0,
                      "inferences": 400, "energy_per_inference_mj": pytest.approx(10.5),
                      "busy_energy_per_inference_mj": pytest.approx(25.5)}
    assert "rail" not in energy_per_inference([10.0], [5.0], 1.0, 1)


@pytest.mark.parametrize("args", [
    ([], [3000.0], 1.0, 10),
    ([5000.0], [], 1.0, 10),
    ([5000.0], [3000.0], 0.0, 10),
    ([5000.0], [3000.0], 1.0, 0),
])
def test_energy_per_inference_refuses_missing_samples_or_empty_runs(args):
    with pytest.raises(ValueError):
        energy_per_inference(*args)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")


def test_ina3221_jetpack4_iio_layout(tmp_path):
    # Jetson Nano (JetPack 4): NVIDIA's iio driver, power in milliwatts, rails numbered from 0.
    device = "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    write_tree(tmp_path, {f"{device}/rail_name_0": "POM_5V_IN", f"{device}/in_power0_input": "2747",
                          f"{device}/rail_name_1": "POM_5V_GPU", f"{device}/in_power1_input": "0",
                          f"{device}/rail_name_2": "POM_5V_CPU", f"{device}/in_power2_input": "487",
                          f"{device}/in_voltage0_input": "5072", f"{device}/in_current0_input": "541"})
    rails = read_ina3221_sysfs(str(tmp_path))
    assert rails == {"POM_5V_IN": 2747.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 487.0}
    assert module_rail(rails) == "POM_5V_IN"


def test_ina3221_jetpack6_hwmon_layout(tmp_path):
    # AGX Orin (JetPack 5/6): the mainline hwmon driver, mV and mA per channel; the hwmon number varies.
    first = "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    second = "bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon7"
    write_tree(tmp_path, {
        f"{first}/in1_label": "VDD_GPU_SOC", f"{first}/in1_input": "5024", f"{first}/curr1_input": "464",
        f"{first}/in2_label": "VDD_CPU_CV", f"{first}/in2_input": "5024", f"{first}/curr2_input": "80",
        f"{first}/in3_label": "VIN_SYS_5V0", f"{first}/in3_input": "5000", f"{first}/curr3_input": "805",
        # the sum of the shunt voltages has a label but no current of its own
        f"{first}/in7_label": "sum of shunt voltages", f"{first}/in7_input": "1320",
        f"{first}/in4_input": "464",
        f"{second}/in1_label": "NC", f"{second}/in1_input": "0", f"{second}/curr1_input": "0",
        f"{second}/in2_label": "VDDQ_VDD2_1V8AO", f"{second}/in2_input": "5000", f"{second}/curr2_input": "60",
        # a disabled channel
        f"{second}/in3_label": "SPARE", f"{second}/in3_enable": "0", f"{second}/in3_input": "0",
        f"{second}/curr3_input": "0",
    })
    rails = read_ina3221_sysfs(str(tmp_path))
    assert rails == {"VDD_GPU_SOC": pytest.approx(5024 * 464 / 1000), "VDD_CPU_CV": pytest.approx(401.92),
                     "VIN_SYS_5V0": pytest.approx(4025.0), "VDDQ_VDD2_1V8AO": pytest.approx(300.0)}
    assert module_rail(rails) == "VIN_SYS_5V0"


def test_ina3221_unreadable_channel_is_left_out(tmp_path):
    hwmon = "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    write_tree(tmp_path, {f"{hwmon}/in1_label": "VDD_IN", f"{hwmon}/in1_input": "5072",
                          f"{hwmon}/curr1_input": "1064",
                          f"{hwmon}/in2_label": "VDD_SOC", f"{hwmon}/in2_input": "not a number",
                          f"{hwmon}/curr2_input": "288"})
    assert read_ina3221_sysfs(str(tmp_path)) == {"VDD_IN": pytest.approx(5396.608)}


def test_no_ina3221_gives_an_empty_dict(tmp_path):
    assert read_ina3221_sysfs(str(tmp_path)) == {}
    assert read_ina3221_sysfs(str(tmp_path / "missing")) == {}
    write_tree(tmp_path, {"bus/i2c/drivers/other/1-0050/name": "eeprom"})
    assert read_ina3221_sysfs(str(tmp_path)) == {}
