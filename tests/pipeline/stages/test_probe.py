"""The probe's hold on this machine: builds timing here at once (a search's parallel trials) take turns, with real
processes, a real flock and real device jobs."""

from __future__ import annotations

import asyncio
import fcntl
import json
import multiprocessing
import socket
import textwrap
import time
from pathlib import Path

from edge_deploy.pipeline.errors import DeviceError
from edge_deploy.pipeline.stages.probe import held_job, round_speedups
from edge_deploy.targets.transports import run_job
from edge_deploy.targets.transports.inventory import LOCAL, device_lock
from edge_deploy.targets.transports.local import LocalTransport
from tests.targets.test_transports import RESULT

# The timed section spins on a core, as a runtime's warm runs do; its wall-clock bounds travel back in the result.
RUNNER = """
import json, sys, time
from pathlib import Path

import measure

job = Path(sys.argv[1])
settings = json.loads((job / "job.json").read_text())
started = time.time()
end = time.perf_counter() + settings["spin_s"]
while time.perf_counter() < end:
    pass
finished = time.time()
if settings["fail"]:
    sys.exit("the runtime crashed mid-run")
measure.write_result(job, {**RESULT, "timed": [started, finished]})
"""


def _probe(home: str, folder: str, spin_s: float, fail: bool, ready, start, results, linger_s: float = 0.0) -> None:
    """One probe in its own process, under the lock the build's probe stage holds (`local`, this machine)."""
    job = Path(folder)
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"spin_s": spin_s, "fail": fail}))
    runner = job.parent / f"{job.name}-runner.py"
    runner.write_text(textwrap.dedent(RUNNER).replace("**RESULT", f"**{RESULT!r}"))
    transport = LocalTransport(LOCAL)
    ready.wait()  # every process is up (imports take seconds on a busy machine) before any of them probes
    start.wait()
    try:
        result = asyncio.run(held_job(lambda device: device_lock(Path(home), device, wait_s=120), transport.label,
                                      lambda: run_job(transport, job, runner)))
        results.put(("done", result.extra["timed"], result.host_timings["lock_wait_s"]))
    except DeviceError as exc:
        results.put(("failed", str(exc), time.time()))
    # Still alive: whatever frees the lock now is the probe letting go, not the kernel reaping a dead process.
    time.sleep(linger_s)


def _spawn(*args, **kwargs):
    process = multiprocessing.get_context("spawn").Process(target=_probe, args=args, kwargs=kwargs)
    process.start()
    return process


def _lock(home: Path) -> Path:
    return home / "locks" / f"local-{socket.gethostname()}.lock"


def test_two_probes_on_this_machine_time_one_after_the_other(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, start, results = context.Barrier(3), context.Event(), context.Queue()
    processes = [_spawn(str(tmp_path / "home"), str(tmp_path / f"job-{i}"), 1.5, False, ready, start, results)
                 for i in range(2)]
    ready.wait(timeout=120)
    start.set()  # both ask for the lock at once
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [o[0] for o in outcomes] == ["done", "done"], outcomes
    first, second = sorted(outcomes, key=lambda o: o[1][0])
    # The second timed section started only once the first had finished, and its result says how long it waited.
    assert first[1][1] <= second[1][0], (first, second)
    assert first[2] < 1.0 and second[2] >= 1.0, (first[2], second[2])
    assert _lock(tmp_path / "home").is_file()


def test_a_failed_probe_lets_go_of_the_lock(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, first_start, second_start, results = context.Barrier(3), context.Event(), context.Event(), context.Queue()
    home = tmp_path / "home"
    failing = _spawn(str(home), str(tmp_path / "job-fails"), 1.5, True, ready, first_start, results, linger_s=20)
    waiting = _spawn(str(home), str(tmp_path / "job-waits"), 0.2, False, ready, second_start, results)
    ready.wait(timeout=120)
    first_start.set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (_lock(home).is_file() and _lock(home).read_text().strip()):
        time.sleep(0.05)
    assert _lock(home).read_text().split() == ["pid", str(failing.pid)]
    second_start.set()  # asks while the failing probe holds the lock
    outcomes = {o[0]: o for o in (results.get(timeout=120), results.get(timeout=120))}
    waiting.join(timeout=60)
    assert "the runtime crashed mid-run" in outcomes["failed"][1]
    failed_at, (started, _), waited = outcomes["failed"][2], outcomes["done"][1], outcomes["done"][2]
    # It got the lock when the probe failed, while that process was still alive (it lingers 20 s).
    assert waited > 0.5 and started < failed_at + 10 and failing.is_alive()
    with open(_lock(home), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises BlockingIOError if anything held it
    failing.terminate()
    failing.join(timeout=30)


def test_each_round_of_a_timing_in_turns_gives_its_own_speed_up():
    # Three rounds of two runs: the machine slowed both models in the second round, and the ratio held.
    fp32, int8 = [10.0, 10.0, 20.0, 20.0, 9.0, 11.0], [5.0, 5.0, 10.0, 10.0, 4.0, 6.0]
    assert round_speedups(fp32, int8, 2) == {"rounds": 3, "runs_per_round": 2, "median": 2.0, "min": 2.0, "max": 2.0}
    # A round where only the artifact was slowed shows in the spread, not in the median.
    assert round_speedups(fp32, [5.0, 5.0, 20.0, 20.0, 4.0, 6.0], 2) == \
        {"rounds": 3, "runs_per_round": 2, "median": 2.0, "min": 1.0, "max": 2.0}
    assert round_speedups(fp32, int8[:4], 2) is None and round_speedups(fp32, int8, None) is None
