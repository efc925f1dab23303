"""The local results store and `deploy results`: nothing that arrived is lost, and a slower build shows."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_deploy.pipeline.cli import main
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.results import ProbeResult
from edge_deploy.pipeline.resultstore import (SCHEMA_VERSION, STORE_NAME, ResultStore, default_store,
                                              p50_changes)

REPO = Path(__file__).resolve().parents[2]
OLD_INT8 = "3f9a1c2e7b5d4a6f8e0c1b2a3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a"
NEW_INT8 = "c07e55a1d2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d"
FP32 = "7d1e2f3a4b5c6d7e8f9001122334455667788990aabbccddeeff001122334455"
BUNDLE = "yolov8n-320-arm-int8"


def probe_result(p50: float | None = 41.27, *, started_at: str = "2026-01-05T09:14:02Z", fps: float | None = 23.9,
                 power: dict | None = None, runtime: str = "ncnn 1.0.20261020", seed: int = 0) -> ProbeResult:
    """What the arm runner returns from a Raspberry Pi 5 over SSH, in the shape the transport builds."""
    rng = random.Random(seed)
    base = p50 if p50 is not None else 40.0
    samples = [round(base * (1 + rng.gauss(0, 0.02)), 3) for _ in range(200)]
    latency = {"p50": p50, "p90": None if p50 is None else round(p50 * 1.06, 3),
               "p99": None if p50 is None else round(p50 * 1.15, 3), "mean": round(sum(samples) / len(samples), 3),
               "min": min(samples), "max": max(samples), "std": 0.81}
    data = {"runner": "ncnn_runner.py", "runner_version": 3, "runtime": runtime,
            "host": {"machine": "aarch64", "processor": "Cortex-A76", "cpus": 4,
                     "vector_extensions": "NEON, dot-product, FP16 arithmetic", "os": "Debian 12",
                     "clocks_mhz": {"cpu": 2400}},
            "threads": 4, "batch": 1, "warmup": 20, "runs": 200, "load_ms": 38.4, "latency_ms": latency,
            "fps": fps, "memory_mb": {"rss_after_load": 61.2, "peak_rss": 74.9},
            "power": power or {"status": "unavailable", "reason": "no power sensor found (no RAPL powercap)"},
            "first_inference_ms": 95.1, "samples_ms": samples,
            "job": {"warmup": 20, "runs": 200, "threads": 4}, "vulkan": False}
    transport = {"transport": "ssh", "host": "rpi5.lab", "packages": {"ncnn": "1.0.20261020", "numpy": "1.26.4"}}
    return ProbeResult.from_runner(data, transport,
                                   host_timings={"connect_s": 0.412, "upload_s": 1.873, "run_s": 14.02,
                                                 "download_s": 0.051},
                                   started_at=started_at, finished_at=started_at[:-3] + "31Z")


def add(store: ResultStore, result: ProbeResult, *, device: str = "rpi5", sha: str = NEW_INT8,
        bundle: str | None = BUNDLE, role: str = "artifact", precision: str = "int8") -> int:
    return store.add(result, device=device, artifact_sha256=sha, artifact_label=f"{precision.upper()} on arm",
                     target="arm", precision=precision, bundle=bundle, role=role)


# ---- the store ----

def test_a_result_comes_back_whole_with_its_columns(tmp_path):
    store = default_store(tmp_path)
    assert store.path == tmp_path / STORE_NAME
    result = probe_result(power={"status": "measured", "sensor": "ina219", "average_watts": 6.41})
    config = {"target": "arm", "precision": "int8", "probe": {"runs": 200, "threads": 4}}
    row = store.add(result, device="rpi5", artifact_sha256=NEW_INT8.upper(), artifact_label="INT8 on arm",
                    target="arm", precision="int8", bundle=BUNDLE, config=config)
    [stored] = store.query()
    assert stored.id == row
    assert stored.result == result  # samples, device, runtime versions, host timings: everything
    assert stored.result.samples_ms == result.samples_ms and len(stored.result.samples_ms) == 200
    assert stored.config == config
    assert (stored.device, stored.artifact_sha256, stored.bundle, stored.role) == ("rpi5", NEW_INT8, BUNDLE,
                                                                                   "artifact")
    assert (stored.target, stored.precision, stored.runtime) == ("arm", "int8", "ncnn 1.0.20261020")
    assert (stored.p50_ms, stored.p90_ms, stored.fps, stored.watts) == (41.27, 43.746, 23.9, 6.41)
    assert stored.started_at == "2026-01-05T09:14:02Z" and stored.power_text() == "6.41 W"


def test_figures_not_reported_stay_none_and_power_says_which(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    add(store, probe_result(p50=None, fps=None))
    add(store, probe_result(power={"status": "measured", "average_watts": None}, started_at="2026-01-06T00:00:00Z"))
    first, second = store.query()
    assert (first.p50_ms, first.p90_ms, first.fps, first.watts) == (None, None, None, None)
    assert first.power_text() == "unavailable"
    assert second.power_text() == "not reported"


def test_results_outlive_the_store_object_and_are_never_replaced(tmp_path):
    path = tmp_path / "home" / "results.sqlite"  # the folder does not exist yet
    same = probe_result()
    add(ResultStore(path), same)
    add(ResultStore(path), same)  # the same measurement twice is two rows, never an update
    reopened = ResultStore(path).query()
    assert [r.id for r in reopened] == [1, 2] and all(r.result == same for r in reopened)


def test_a_process_killed_right_after_add_keeps_the_result(tmp_path):
    path = tmp_path / "results.sqlite"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from tests.pipeline.test_resultstore import add, probe_result\n"
              "from edge_deploy.pipeline.resultstore import ResultStore\n"
              f"add(ResultStore({str(path)!r}), probe_result(p50=12.5))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert [r.p50_ms for r in ResultStore(path).query()] == [12.5]


def test_twenty_jobs_finishing_at_once_in_threads_lose_nothing(tmp_path):
    path = tmp_path / "results.sqlite"

    def finish(job: int) -> int:
        return add(ResultStore(path), probe_result(p50=10.0 + job, seed=job), device=f"board-{job % 5}")

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(finish, range(60)))
    stored = ResultStore(path).query()
    assert len(set(ids)) == 60 and sorted(ids) == sorted(r.id for r in stored)
    assert sorted(r.p50_ms for r in stored) == [10.0 + job for job in range(60)]
    assert all(r.result == probe_result(p50=r.p50_ms, seed=int(r.p50_ms - 10)) for r in stored)


def test_asyncio_tasks_finishing_together_lose_nothing(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")

    async def job(number: int) -> int:
        await asyncio.sleep(0)
        # Off the event loop, as a device job's coroutine would do it: a busy store never stalls the other jobs.
        return await asyncio.to_thread(add, store, probe_result(p50=5.0 + number), device=f"board-{number}")

    async def all_jobs() -> list[int]:
        return await asyncio.gather(*(job(n) for n in range(20)))

    ids = asyncio.run(all_jobs())
    assert sorted(ids) == list(range(1, 21))
    assert sorted(r.device for r in store.query()) == sorted(f"board-{n}" for n in range(20))


def test_two_processes_adding_at_once_to_a_new_store_lose_nothing(tmp_path):
    path = tmp_path / "results.sqlite"  # neither process finds a store: both race to create it too
    start = time.time() + 2.0
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
              "from concurrent.futures import ThreadPoolExecutor\n"
              "from tests.pipeline.test_resultstore import add, probe_result\n"
              "from edge_deploy.pipeline.resultstore import ResultStore\n"
              "name = sys.argv[1]\n"
              f"time.sleep(max(0.0, {start} - time.time()))\n"
              "with ThreadPoolExecutor(10) as pool:\n"
              f"    list(pool.map(lambda n: add(ResultStore({str(path)!r}), probe_result(p50=n + 1.0), "
              "device=name), range(40)))\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, name], stderr=subprocess.PIPE, text=True)
               for name in ("proc-a", "proc-b")]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr
    stored = ResultStore(path).query()
    for name in ("proc-a", "proc-b"):
        assert sorted(r.p50_ms for r in stored if r.device == name) == [n + 1.0 for n in range(40)]
    assert len({r.id for r in stored}) == 80
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_queries_filter_by_device_artifact_prefix_bundle_and_time(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    add(store, probe_result(started_at="2026-01-05T09:00:00Z"), sha=OLD_INT8)
    add(store, probe_result(started_at="2026-01-05T09:01:00Z"), sha=FP32, role="reference", precision="fp32")
    add(store, probe_result(started_at="2026-01-12T09:00:00Z"), sha=NEW_INT8)
    add(store, probe_result(started_at="2026-01-12T10:00:00Z"), sha=NEW_INT8, device="orin-nano")
    add(store, probe_result(started_at="2026-01-13T10:00:00Z"), sha=NEW_INT8, bundle="yolov8n-320-arm-fp16")

    def ids(**filters) -> list[int]:
        return [r.id for r in store.query(**filters)]

    assert ids() == [1, 2, 3, 4, 5]
    assert ids(device="orin-nano") == [4]
    assert ids(artifact="c07e") == [3, 4, 5] and ids(artifact=NEW_INT8) == [3, 4, 5]
    assert ids(artifact="C07E55A1") == [3, 4, 5]  # as copied from a listing in capitals
    assert ids(artifact="3f9a1c2e7b5d") == [1] and ids(artifact="0000") == []
    assert ids(bundle="yolov8n-320-arm-fp16") == [5]
    assert ids(since="2026-01-12T09:30:00Z") == [4, 5]
    assert ids(since=datetime(2026, 1, 12, 10, 0, tzinfo=timezone.utc)) == [4, 5]
    assert ids(device="rpi5", bundle=BUNDLE, artifact="c0") == [3]
    with pytest.raises(InputError, match="'c07e%' is not the start of a sha256"):
        store.query(artifact="c07e%")  # no SQL wildcard slips through


def test_results_are_ordered_by_when_the_job_started_not_when_they_were_stored(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    add(store, probe_result(p50=20.0, started_at="2026-02-01T12:00:00Z"))
    add(store, probe_result(p50=10.0, started_at="2026-02-01T11:00:00+01:00"))  # 10:00 UTC: earlier
    assert [r.p50_ms for r in store.query()] == [10.0, 20.0]
    assert store.query()[0].started_at == "2026-02-01T10:00:00Z"


def test_failed_attempts_are_kept_apart_from_measurements(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    add(store, probe_result())
    store.add_failure(device="orin-nano", artifact_sha256=NEW_INT8, bundle=BUNDLE,
                      error="orin-nano: the device did not answer within 930 s")
    assert [r.device for r in store.query()] == ["rpi5"]
    [failure] = store.failures(artifact="c07e")
    assert failure.device == "orin-nano" and failure.error.endswith("within 930 s")
    assert store.failures(device="rpi5") == []


def test_listing_a_store_that_does_not_exist_creates_nothing(tmp_path):
    store = ResultStore(tmp_path / "nowhere" / "results.sqlite")
    assert store.query() == [] and store.failures() == []
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("content", [b"these are not the results you are looking for\n" * 40,
                                     b"SQLite format 3\0" + bytes(range(256)) * 8])
def test_a_store_that_is_not_a_database_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "results.sqlite"
    path.write_bytes(content)
    for attempt in (lambda store: store.query(), lambda store: add(store, probe_result())):
        with pytest.raises(InputError) as info:
            attempt(ResultStore(path))
        message = str(info.value)
        assert str(path) in message and "\n" not in message and "damaged or not an SQLite file" in message
    assert path.read_bytes() == content  # a user's file is never rewritten


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE photos (name TEXT)")
    with pytest.raises(InputError, match="not an edge-deploy results store"):
        add(ResultStore(path), probe_result())
    with sqlite3.connect(path) as connection:
        tables = {n for (n,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"photos"}


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    add(ResultStore(path), probe_result())
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(InputError, match=f"newer edge-deploy \\(schema {SCHEMA_VERSION + 1}"):
        ResultStore(path).query()


def test_p50_change_is_against_the_same_device_bundle_and_role(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    old = add(store, probe_result(p50=40.0, started_at="2026-01-05T09:00:00Z"), sha=OLD_INT8)
    ref = add(store, probe_result(p50=90.0, started_at="2026-01-05T09:01:00Z"), sha=FP32, role="reference")
    other = add(store, probe_result(p50=25.0, started_at="2026-01-08T09:00:00Z"), device="orin-nano")
    silent = add(store, probe_result(p50=None, started_at="2026-01-10T09:00:00Z"), sha=OLD_INT8)
    new = add(store, probe_result(p50=43.2, started_at="2026-01-12T09:00:00Z"), sha=NEW_INT8)
    changes = p50_changes(store.query())
    assert changes[old] is None and changes[ref] is None and changes[other] is None and changes[silent] is None
    # Against the last result that had a p50, on the same board: neither the reference nor the other board.
    assert changes[new] == pytest.approx(8.0)


# ---- deploy results ----

def deploy_results(home: Path, *args: str):
    return CliRunner().invoke(main, ["results", *args], env={"DEPLOY_HOME": str(home), "COLUMNS": "200"})


@pytest.fixture
def history(tmp_path) -> Path:
    """A week of builds: the same bundle on a Pi 5 got 8 % slower; a Jetson measured once without a p50."""
    home = tmp_path / "home"
    store = default_store(home)
    add(store, probe_result(p50=40.0, started_at="2026-01-05T09:00:00Z"), sha=OLD_INT8)
    add(store, probe_result(p50=90.0, started_at="2026-01-05T09:01:00Z", runtime="onnxruntime 1.31.1"), sha=FP32,
        role="reference", precision="fp32")
    add(store, probe_result(p50=43.2, started_at="2026-01-12T09:00:00Z",
                            power={"status": "measured", "sensor": "ina219", "average_watts": 6.41}), sha=NEW_INT8)
    add(store, probe_result(p50=None, fps=None, started_at="2026-01-12T10:00:00Z", runtime="TensorRT 8.6.2"),
        sha=NEW_INT8, device="orin-nano")
    store.add_failure(device="orin-nano", artifact_sha256=NEW_INT8, bundle=BUNDLE,
                      error="orin-nano: the device did not answer within 930 s")
    return home


def test_the_listing_shows_a_build_that_ran_slower_on_the_same_board(history):
    done = deploy_results(history)
    assert done.exit_code == 0, done.output
    out = done.stdout
    assert out.index("orin-nano") < out.index("rpi5")  # one table per device
    rpi = out[out.index("rpi5"):]
    rows = [line for line in rpi.splitlines() if "2026-01-" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["2026-01-05 09:00:00", "2026-01-05 09:01:00",
                                                            "2026-01-12 09:00:00"]
    first, reference, latest = rows
    assert OLD_INT8[:12] in first and "40.00" in first and "first" in first and "unavailable" in first
    assert f"{BUNDLE} (reference)" in reference and "first" in reference  # never compared with the INT8 build
    assert NEW_INT8[:12] in latest and "43.20" in latest and "+8.0 %" in latest and "6.41 W" in latest
    jetson = out[:out.index("rpi5")]
    assert "TensorRT 8.6.2" in jetson and jetson.count("not reported") >= 4
    assert "failed attempts" in jetson and "did not answer within 930 s" in jetson


def test_the_json_listing_has_every_result_whole_and_its_change(history):
    done = deploy_results(history, "--json")
    assert done.exit_code == 0, done.output
    listing = json.loads(done.stdout)
    assert listing["store"] == str(history / STORE_NAME)
    by_sha = {(r["artifact_sha256"], r["device"]): r for r in listing["results"]}
    latest = by_sha[(NEW_INT8, "rpi5")]
    assert latest["p50_change_percent"] == pytest.approx(8.0) and latest["power"] == "6.41 W"
    assert len(latest["result"]["samples_ms"]) == 200 and latest["result"]["device"]["transport"]["host"] == "rpi5.lab"
    assert by_sha[(FP32, "rpi5")]["p50_change_percent"] is None
    assert by_sha[(NEW_INT8, "orin-nano")]["p50_ms"] is None
    assert [f["device"] for f in listing["failures"]] == ["orin-nano"]


def test_filtering_by_the_new_artifact_still_compares_with_the_previous_build(history):
    done = deploy_results(history, "--artifact", NEW_INT8[:8], "--device", "rpi5", "--json")
    listing = json.loads(done.stdout)
    [only] = listing["results"]
    assert only["artifact_sha256"] == NEW_INT8 and only["p50_change_percent"] == pytest.approx(8.0)
    table = deploy_results(history, "--artifact", NEW_INT8[:8], "--device", "rpi5").stdout
    assert "+8.0 %" in table and OLD_INT8[:12] not in table


def test_an_empty_store_is_a_one_line_note(tmp_path):
    home = tmp_path / "fresh"
    done = deploy_results(home)
    assert done.exit_code == 0 and done.stdout.strip().count("\n") == 0
    assert done.stdout.startswith("no probe results stored yet")
    assert not home.exists()
    filtered = deploy_results(home, "--bundle", BUNDLE)
    assert filtered.exit_code == 0 and f"no stored probe results match --bundle {BUNDLE}" in filtered.stdout
    assert json.loads(deploy_results(home, "--json").stdout)["results"] == []


def test_a_damaged_store_is_one_error_line_and_exit_2(tmp_path):
    (tmp_path / STORE_NAME).write_bytes(os.urandom(4096))
    done = deploy_results(tmp_path)
    assert done.exit_code == 2
    assert done.stderr.startswith(f"error: results store {tmp_path / STORE_NAME} is damaged")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.output


def test_a_bad_artifact_prefix_is_one_error_line(history):
    done = deploy_results(history, "--artifact", "build-7")
    assert done.exit_code == 2 and done.stderr == "error: 'build-7' is not the start of a sha256 (hex digits 0-9, " \
                                                  "a-f)\n"
