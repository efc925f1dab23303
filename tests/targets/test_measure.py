"""targets/runners/measure.py: latency statistics, and the device's facts and state read from fake device trees."""

from __future__ import annotations

import json
import math
import stat
import sys
import time
from pathlib import Path

import pytest

from edge_deploy.targets.runners import measure

ORIN_NANO_COMPATIBLE = "nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00"


def write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """An empty folder as the only place device tools are looked up, so this machine's own tools stay out."""
    folder = tmp_path / "tools"
    folder.mkdir()
    monkeypatch.setattr(measure, "TOOL_PATH", str(folder))

    def add(name: str, script: str) -> None:
        tool = folder / name
        tool.write_text(f"#!{sys.executable}\n{script}")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)

    return add


def test_latency_summary_has_every_statistic():
    summary = measure.latency_summary([4.0, 1.0, 3.0, 2.0])
    assert summary == {"p50": 2.5, "p90": 3.7, "p99": 3.97, "mean": 2.5, "min": 1.0, "max": 4.0,
                       "std": round(math.sqrt(1.25), 3)}
    assert measure.latency_summary([7.0])["std"] == 0.0


def test_jetson_facts(tmp_path, tools):
    write_tree(tmp_path, {
        "proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
        "proc/device-tree/compatible": ORIN_NANO_COMPATIBLE,
        "etc/os-release": 'NAME="Ubuntu"\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n',
        "proc/sys/kernel/osrelease": "5.15.136-tegra\n", "proc/sys/kernel/hostname": "orin-01\n",
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
        "proc/cpuinfo": "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\n"
                        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n",
        "sys/devices/system/cpu/cpufreq/policy0/scaling_governor": "schedutil\n",
    })
    tools("nvpmodel", 'print("NV Fan Mode:quiet\\nNV Power Mode: 15W\\n0")\n')
    facts = measure.host(str(tmp_path))
    assert facts["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert facts["soc"] == "nvidia,tegra234"  # the last compatible entry is the chip itself
    assert facts["os"] == "Ubuntu 22.04.4 LTS" and facts["kernel"] == "5.15.136-tegra"
    assert facts["hostname"] == "orin-01"
    assert facts["processor"] == "ARMv8 Processor rev 1 (v8l)"
    assert facts["vector_extensions"] == "NEON, dot-product, FP16 arithmetic"
    assert facts["power_mode"] == {"source": "nvpmodel", "name": "15W", "id": 0}


def test_the_machine_id_is_published_only_as_a_hash(tmp_path):
    write_tree(tmp_path, {"etc/machine-id": "0123456789abcdef0123456789abcdef\n",
                          "proc/sys/kernel/hostname": "orin-01\n"})
    first = measure.device_id(str(tmp_path))
    assert first.startswith("machine-id:") and len(first) == len("machine-id:") + 16
    assert "0123456789abcdef" not in first
    assert measure.device_id(str(tmp_path)) == first  # stable, so results from one device group together
    (tmp_path / "etc" / "machine-id").write_text("fedcba9876543210fedcba9876543210\n")
    assert measure.device_id(str(tmp_path)) != first
    (tmp_path / "etc" / "machine-id").unlink()
    assert measure.device_id(str(tmp_path)) == "hostname:orin-01"


def test_pc_facts_from_dmi_and_governor_without_nvpmodel(tmp_path, tools):
    write_tree(tmp_path, {
        "sys/class/dmi/id/sys_vendor": "Dell Inc.\n", "sys/class/dmi/id/product_name": "OptiPlex 7090\n",
        "usr/lib/os-release": "PRETTY_NAME='Debian GNU/Linux 12 (bookworm)'\n",
        "proc/cpuinfo": "model name\t: Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz\nflags\t\t: fpu sse2 avx2 fma\n",
        "sys/devices/system/cpu/cpufreq/policy0/scaling_governor": "powersave\n",
        "sys/devices/system/cpu/cpufreq/policy1/scaling_governor": "performance\n",
    })
    facts = measure.host(str(tmp_path))
    assert facts["model"] == "Dell Inc. OptiPlex 7090" and facts["soc"] is None
    assert facts["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert facts["vector_extensions"] == "AVX2"
    assert facts["power_mode"] == {"source": "cpufreq governor", "name": "performance, powersave"}


def test_firmware_placeholders_name_no_product(tmp_path, tools):
    write_tree(tmp_path, {"sys/class/dmi/id/sys_vendor": "To Be Filled By O.E.M.\n",
                          "sys/class/dmi/id/product_name": "To Be Filled By O.E.M.\n"})
    assert measure.board_model(str(tmp_path)) is None
    (tmp_path / "sys/class/dmi/id/product_name").write_text("B450 Board\n")
    assert measure.board_model(str(tmp_path)) == "B450 Board"


def test_an_old_arm_kernel_names_its_soc_in_cpuinfo(tmp_path, tools):
    write_tree(tmp_path, {"proc/cpuinfo": "processor\t: 0\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 3 Model B\n"})
    assert measure.soc(str(tmp_path)) == "BCM2835"


def test_android_facts_come_from_getprop(tmp_path, tools):
    tools("getprop", "import sys\nprint({'ro.product.manufacturer': 'Google', 'ro.product.model': 'Pixel 7', "
                     "'ro.soc.model': 'GS201', 'ro.build.version.release': '14'}.get(sys.argv[1], ''))\n")
    write_tree(tmp_path, {"proc/sys/kernel/osrelease": "5.10.198-android13-4\n"})
    facts = measure.host(str(tmp_path))
    assert (facts["model"], facts["soc"], facts["os"]) == ("Google Pixel 7", "GS201", "Android 14")
    assert facts["id"] is None and facts["power_mode"] is None


def test_an_empty_device_says_nothing_rather_than_guessing(tmp_path, tools):
    facts = measure.host(str(tmp_path))
    for key in ("id", "hostname", "model", "soc", "os", "kernel", "power_mode"):
        assert facts[key] is None, key
    assert facts["vector_extensions"] == "unknown"
    assert measure.device_state(str(tmp_path)) == {"cpu_mhz": None, "devfreq_mhz": None, "temps_c": None}


@pytest.mark.parametrize("text, expected", [
    ("NV Power Mode: MAXN\n0\n", {"name": "MAXN", "id": 0}),
    ("NV Fan Mode:quiet\nNV Power Mode: MODE_15W_2CORE\n3", {"name": "MODE_15W_2CORE", "id": 3}),
    ("NV Power Mode: 7W", {"name": "7W", "id": None}),
    ("nvpmodel: command not found", None),
])
def test_parse_nvpmodel(text, expected):
    assert measure.parse_nvpmodel(text) == expected


def test_a_failing_nvpmodel_falls_back_to_the_governor(tmp_path, tools):
    tools("nvpmodel", "raise SystemExit(1)\n")
    write_tree(tmp_path, {"sys/devices/system/cpu/cpufreq/policy0/scaling_governor": "ondemand\n"})
    assert measure.power_mode(str(tmp_path)) == {"source": "cpufreq governor", "name": "ondemand"}


def test_device_state_reads_clocks_and_temperatures(tmp_path):
    cpus = {f"sys/devices/system/cpu/cpu{n}/cpufreq/scaling_cur_freq": f"{khz}\n"
            for n, khz in ((0, 1510400), (1, 729600), (10, 2201600))}
    write_tree(tmp_path, {
        **cpus,
        "sys/devices/system/cpu/cpu2/online": "0\n",  # offline: no cpufreq folder, no clock
        "sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq": "1510400\n",  # a policy is not a CPU
        "sys/class/thermal/thermal_zone0/type": "cpu-thermal\n", "sys/class/thermal/thermal_zone0/temp": "48468\n",
        "sys/class/thermal/thermal_zone1/type": "gpu-thermal\n", "sys/class/thermal/thermal_zone1/temp": "-256000\n",
        "sys/class/thermal/thermal_zone2/type": "acpitz\n", "sys/class/thermal/thermal_zone2/temp": "27800\n",
        "sys/class/thermal/thermal_zone3/type": "acpitz\n", "sys/class/thermal/thermal_zone3/temp": "29800\n",
        "sys/class/thermal/thermal_zone4/type": "cv0-thermal\n",  # temp unreadable (sensor off): left out
        "sys/class/thermal/cooling_device0/type": "fan\n",
        "sys/class/devfreq/17000000.ga10b/cur_freq": "306000000\n",
    })
    state = measure.device_state(str(tmp_path))
    assert state["cpu_mhz"] == {"cpu0": 1510.4, "cpu1": 729.6, "cpu10": 2201.6}
    assert list(state["cpu_mhz"]) == ["cpu0", "cpu1", "cpu10"]
    # -256 °C is how a powered-off zone reads; the second acpitz is told apart by its zone.
    assert state["temps_c"] == {"cpu-thermal": 48.468, "acpitz": 27.8, "acpitz (thermal_zone3)": 29.8}
    assert state["devfreq_mhz"] == {"17000000.ga10b": 306.0}


def test_echo_job_leaves_out_the_file_hashes():
    job = {"warmup": 3, "runs": 50, "threads": 1, "runner": "runner.py", "files": {"runner.py": "ab12"}}
    assert measure.echo_job(job) == {"warmup": 3, "runs": 50, "threads": 1, "runner": "runner.py"}
    assert "files" in job  # the job itself is untouched


def test_measure_power_without_a_sensor_runs_once_and_says_why(tmp_path):
    calls = []
    result = measure.measure_power(lambda: calls.append(1), 50, {"power_idle_s": 1.0}, root=str(tmp_path))
    assert calls == [1]
    assert result["status"] == "unavailable" and result["reason"].startswith("no power sensor on this device")
    assert "average_watts" not in result


def test_measure_power_with_a_hwmon_sensor(tmp_path):
    write_tree(tmp_path, {"sys/class/hwmon/hwmon0/name": "ina226\n",
                          "sys/class/hwmon/hwmon0/power1_input": "3300000\n"})
    result = measure.measure_power(lambda: time.sleep(0.15), 15,
                                   {"power_idle_s": 0.1, "power_interval_ms": 20}, root=str(tmp_path))
    assert result["status"] == "measured" and result["sensor"] == "hwmon ina226 power1"
    assert result["average_watts"] == 3.3 and result["idle_watts"] == 3.3 and result["interval_ms"] == 20
    assert result["energy_per_inference_mj"] == 0.0 and result["inferences"] == 15


def test_interleaved_takes_blocks_in_turns_and_reverses_the_order_each_round():
    order = []
    timings = measure.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 12, block=5)
    # a a a a a b b b b b | b b b b b a a a a a | a a b b: every model gets its count, the last round cut short.
    assert "".join(order) == "a" * 5 + "b" * 10 + "a" * 7 + "b" * 2
    assert [len(timings["a"]), len(timings["b"])] == [12, 12] and all(ms >= 0 for ms in timings["a"] + timings["b"])


def test_interleaved_times_each_model_in_its_own_list():
    slow, fast = (lambda: time.sleep(0.004)), (lambda: None)
    timings = measure.interleaved({"slow": slow, "fast": fast}, 6, block=2)
    assert min(timings["slow"]) >= 4 > max(timings["fast"])


def test_power_of_each_model_runs_nothing_without_a_sensor(tmp_path):
    calls = []
    result = measure.measure_power_each({"artifact": lambda: calls.append("a"), "reference": lambda: calls.append("r")},
                                        50, 50, {"power_idle_s": 1.0}, root=str(tmp_path))
    assert calls == []
    assert set(result) == {"artifact", "reference"}
    assert all(r["status"] == "unavailable" and r["reason"].startswith("no power sensor") for r in result.values())


def test_power_of_each_model_comes_from_its_own_window(tmp_path):
    write_tree(tmp_path, {"sys/class/hwmon/hwmon0/name": "ina226\n",
                          "sys/class/hwmon/hwmon0/power1_input": "3300000\n"})
    calls = []

    def run(name):
        return lambda: (calls.append(name), time.sleep(0.01))

    result = measure.measure_power_each({"artifact": run("a"), "reference": run("r")}, 15, 15,
                                        {"power_idle_s": 0.05, "power_interval_ms": 20}, root=str(tmp_path))
    assert "".join(calls) == "a" * 15 + "r" * 15
    assert all(r["status"] == "measured" and r["inferences"] == 15 for r in result.values())


def test_write_result_is_whole_json(tmp_path):
    measure.write_result(tmp_path, {"latency_ms": {"p50": 1.0}})
    assert json.loads((tmp_path / "result.json").read_text()) == {"latency_ms": {"p50": 1.0}}
    assert not (tmp_path / ".result.json.tmp").exists()


def test_this_machine_describes_itself_without_inventing():
    facts = measure.host()
    assert facts["cpus"] >= 1 and facts["machine"]
    state = measure.device_state()
    assert set(state) == {"cpu_mhz", "devfreq_mhz", "temps_c"}
    for readings in state.values():
        assert readings is None or (readings and all(isinstance(v, float) for v in readings.values()))
