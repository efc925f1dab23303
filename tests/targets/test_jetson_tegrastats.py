"""targets/jetson/tegrastats.py: real tegrastats lines parsed, and the tool run as a power sensor."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from edge_deploy.targets.jetson import tegrastats
from edge_deploy.targets.jetson.tegrastats import parse_tegrastats
from edge_deploy.targets.runners import power

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
    assert power.module_rail(tegrastats.rails_now(parsed)) == "VIN_SYS_5V0"


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
    assert power.module_rail(tegrastats.rails_now(first)) == "VDD_IN"
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
    assert power.module_rail(tegrastats.rails_now(parsed)) == "VDD_IN"


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


STAND_IN = """#!{python}
# A stand-in for tegrastats (no Jetson here): prints the lines of a sample file at the asked interval.
import sys, time
interval = int(sys.argv[sys.argv.index("--interval") + 1]) / 1000
lines = [l for l in open({sample!r}).read().splitlines() if l.strip()]
while True:
    for line in lines:
        print(line, flush=True)
        time.sleep(interval)
"""


def stand_in(tmp_path: Path, monkeypatch, sample: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "tegrastats"
    tool.write_text(STAND_IN.format(python=sys.executable, sample=str(sample)))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_tegrastats_sensor_reads_the_module_rail(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, SAMPLES / "orin-nano-jp6-idle.txt")
    sensor = tegrastats.open_tegrastats(None, 0.02)
    try:
        assert sensor.name == "tegrastats VDD_IN"
        time.sleep(0.2)
        readings = sensor.read()
        # Both lines of the sample read VDD_IN 4761 mW now.
        assert len(readings) >= 3 and set(readings) == {4.761}
    finally:
        sensor.close()
    assert sensor._process.poll() is not None  # the tool does not outlive the job


def test_tegrastats_sensor_sums_agx_orins_rails(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, SAMPLES / "agx-orin-jp6.txt")
    sensor = tegrastats.open_tegrastats(None, 0.02)
    try:
        assert sensor.name == "tegrastats VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"
        time.sleep(0.1)
        readings = sensor.read()
        assert readings and readings == [pytest.approx((2340 + 390 + 4025) / 1000)] * len(readings)
    finally:
        sensor.close()


def test_tegrastats_through_the_meter_gives_energy_per_inference(tmp_path, monkeypatch):
    # An empty root hides every sysfs sensor, so the meter falls back to tegrastats as the Jetson runner's does.
    stand_in(tmp_path, monkeypatch, SAMPLES / "orin-nano-jp6-idle.txt")
    result = power.measure(lambda: time.sleep(0.2), 20, idle_s=0.2, interval_s=0.02, root=str(tmp_path / "root"),
                           extra=(tegrastats.OPENER,))
    assert result["status"] == "measured" and result["sensor"] == "tegrastats VDD_IN"
    assert result["average_watts"] == 4.761 and result["idle_watts"] == 4.761
    assert result["energy_per_inference_mj"] == 0.0  # the replayed load never changes: nothing above idle
    # Both figures are rounded (seconds to the µs, energy to 0.1 µJ): the tolerance covers the two roundings.
    assert result["busy_energy_per_inference_mj"] == pytest.approx(4.761 * result["seconds"] / 20 * 1000, abs=5e-4)


def test_tegrastats_without_a_module_rail_is_unusable(tmp_path, monkeypatch):
    # A line with rails but none for the whole module (AGX Xavier's names).
    sample = tmp_path / "xavier.txt"
    sample.write_text("RAM 2000/31920MB (lfb 3x4MB) GPU 1234/1234 CPU 2468/2468 SOC 1851/1851 CV 0/0 VDDRQ 308/308 "
                      "SYS5V 3511/3511\n")
    stand_in(tmp_path, monkeypatch, sample)
    with pytest.raises(power.SensorUnusable, match="no rail that carries the whole module's power"):
        tegrastats.open_tegrastats(None, 0.02)


def test_no_tegrastats_is_no_sensor(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tegrastats.open_tegrastats(None, 0.1) is None
