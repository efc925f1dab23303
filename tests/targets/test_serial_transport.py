"""The serial transport over a real pseudo-terminal pair.

The board's side here is a STAND-IN for the STM32 firmware, which is a later issue: a thread on the pty's
master end that speaks the line protocol described in targets/transports/serial.py. Everything on the host's
side is real: pyserial opens the pty's other end as a serial port, and run_job times, checks and types the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import threading
import time
import tty

import pytest

pytest.importorskip("serial")

from edge_deploy.pipeline.errors import DeviceError, DeviceTimeout  # noqa: E402
from edge_deploy.targets.transports.serial import SerialTransport, board_power  # noqa: E402

MODEL = b"\x00model weights as the firmware embeds them\xff" * 64
RUNNER_VERSION = 3
BOARD = {"board": "NUCLEO-H743ZI (stand-in)", "firmware": "stand-in 0.1", "runtime": "stand-in runtime",
         "packages": {"x-cube-ai": "10.1.0"}}
FIGURES = {"runner": "stm32_firmware", "runtime": "X-CUBE-AI 10.1.0", "host": {"machine": "cortex-m7"},
           "threads": 1, "batch": 1, "warmup": 2, "runs": 20, "latency_ms": {"p50": 41.5, "p90": 42.0, "mean": 41.7},
           "memory_mb": {"activations": 0.4}}


class FirmwareStandIn(threading.Thread):
    """Answers the host's requests on the pty master as a flashed board would; `respond` says how."""

    def __init__(self, master_fd: int):
        super().__init__(daemon=True)
        self.master, self.requests, self.finished = master_fd, [], threading.Event()
        self.flashed_sha256 = hashlib.sha256(MODEL).hexdigest()
        self.respond = self.good_result

    def good_result(self, kind: str, nonce: str, payload: dict | None) -> list[str]:
        if kind == "INFO":
            return [f"INFO {nonce} " + json.dumps({**BOARD, "model_sha256": self.flashed_sha256,
                                                   "runner_version": RUNNER_VERSION})]
        return [f"RESULT {nonce} " + json.dumps({**FIGURES, "runner_version": RUNNER_VERSION,
                                                 "model_sha256": self.flashed_sha256})]

    def run(self) -> None:
        pending = b""
        while not self.finished.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                pending += os.read(self.master, 4096)
            except OSError:
                return
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                kind, nonce, *rest = line.decode().split(" ", 2)
                payload = json.loads(rest[0]) if rest else None
                self.requests.append((kind, payload))
                for answer in self.respond(kind, nonce, payload):
                    os.write(self.master, answer.encode() if isinstance(answer, str) else answer)
                    if isinstance(answer, str):
                        os.write(self.master, b"\r\n")

    def stop(self) -> None:
        self.finished.set()
        self.join(5)


@pytest.fixture
def board():
    master, slave = os.openpty()
    tty.setraw(slave)
    stand_in = FirmwareStandIn(master)
    stand_in.port = os.ttyname(slave)
    stand_in.start()
    yield stand_in
    stand_in.stop()
    os.close(slave)
    os.close(master)


@pytest.fixture
def job(tmp_path):
    """A job folder as a target's prepare_job leaves it, and the runner whose version the firmware must be."""
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "model.bin").write_bytes(MODEL)
    (folder / "job.json").write_text(json.dumps({"model": "model.bin", "warmup": 2, "runs": 20, "threads": 1,
                                                 "input": "input.npy"}))
    runner = tmp_path / "stm32_runner.py"
    runner.write_text(f"RUNNER_VERSION = {RUNNER_VERSION}\n")
    return folder, runner


def run(board, job, **settings):
    folder, runner = job
    return SerialTransport("nucleo", board.port, 115200, **settings).run(folder, runner, ("x-cube-ai",), timeout=20)


def test_a_result_line_becomes_the_same_typed_result_as_any_device(board, job):
    result = run(board, job)
    assert result.runtime == "X-CUBE-AI 10.1.0" and result.runner_version == RUNNER_VERSION
    assert result.latency_ms["p50"] == 41.5
    # What the firmware did not report is "not reported", never a number.
    assert result.latency_ms["p99"] is None and result.fps is None and result.load_ms is None
    assert result.memory_mb == {"rss_before_load": None, "peak_rss": None, "activations": 0.4}
    assert result.power == {"status": "unavailable", "reason": "the board reported no power figure"}
    assert result.device["machine"] == "cortex-m7"
    described = result.device["transport"]
    assert described["transport"] == "serial" and described["port"] == board.port
    assert described["board"] == BOARD["board"] and described["packages"] == {"x-cube-ai": "10.1.0"}
    assert set(result.host_timings) == {"connect_s", "upload_s", "run_s", "download_s"}
    # The job line: the host's settings, the artifact's sha256 and the runner version, and no file the board
    # never receives.
    (kind, sent), *_ = board.requests
    assert kind == "JOB"
    assert sent["model_sha256"] == hashlib.sha256(MODEL).hexdigest() and sent["runner_version"] == RUNNER_VERSION
    assert sent["runs"] == 20 and sent["warmup"] == 2 and "files" not in sent and "input" not in sent
    assert result.job == sent


def test_log_noise_around_and_before_the_answer_is_ignored(board, job):
    def noisy(kind, nonce, payload):
        answer = board.good_result(kind, nonce, payload)
        if kind != "JOB":
            return answer
        return ["[boot] clocks 480 MHz", "ERROR in a HAL log line that names no request", b"\xfe\xff\x80\r\n",
                "inference 3/20 ", "[ai] arena 412 kB " + answer[0], "[idle]"]

    board.respond = noisy
    assert run(board, job).latency_ms["p50"] == 41.5


def test_an_error_line_is_a_failed_job_with_the_boards_message(board, job):
    board.respond = lambda kind, nonce, payload: [f"ERROR {nonce} tensor arena too small (needs 412 kB)"]
    with pytest.raises(DeviceError, match=r"^nucleo: the device job failed: tensor arena too small \(needs 412 kB\)$") \
            as info:
        run(board, job)
    assert not isinstance(info.value, DeviceTimeout)


def test_a_stale_answer_to_an_earlier_request_is_never_taken(board, job):
    def stale_first(kind, nonce, payload):
        earlier = json.dumps({**FIGURES, "latency_ms": {"p50": 999.0}, "runner_version": RUNNER_VERSION,
                              "model_sha256": board.flashed_sha256})
        return [f"RESULT {'0' * 16} {earlier}", *board.good_result(kind, nonce, payload)]

    board.respond = stale_first
    assert run(board, job).latency_ms["p50"] == 41.5


def test_only_a_stale_answer_is_no_answer(board, job):
    board.respond = lambda kind, nonce, payload: [f"ERROR {'f' * 16} the previous job's failure"]
    with pytest.raises(DeviceTimeout, match="did not answer within 0.5 s .*1 stale line ignored"):
        run(board, job, timeout_s=0.5)


def test_a_board_that_never_answers_is_a_timeout(board, job):
    board.respond = lambda kind, nonce, payload: []
    started = time.monotonic()
    with pytest.raises(DeviceTimeout, match=r"^nucleo: the board on .* did not answer within 0.5 s \(it printed "
                                            "nothing"):
        run(board, job, timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_a_board_flashed_with_another_model_is_refused(board, job):
    board.flashed_sha256 = hashlib.sha256(b"last week's model").hexdigest()
    with pytest.raises(DeviceError, match="the board runs another model .*flash the firmware built from this "
                                          "artifact"):
        run(board, job)


def test_firmware_of_another_runner_version_is_refused(board, job):
    def older(kind, nonce, payload):
        return [line.replace(f'"runner_version": {RUNNER_VERSION}', '"runner_version": 2')
                for line in board.good_result(kind, nonce, payload)]

    board.respond = older
    with pytest.raises(DeviceError, match="runner version 2, the host expects 3"):
        run(board, job)


def test_a_port_that_does_not_exist_is_one_clear_line(tmp_path, job):
    folder, runner = job
    transport = SerialTransport("nucleo", "/dev/ttyEDGEDEPLOY-missing", 115200)
    with pytest.raises(DeviceError) as info:
        transport.run(folder, runner, timeout=20)
    assert str(info.value).startswith("nucleo: no serial port /dev/ttyEDGEDEPLOY-missing (is the board plugged in?")
    assert "\n" not in str(info.value) and not isinstance(info.value, DeviceTimeout)


def test_a_port_another_program_holds_is_busy_not_silent(board, job):
    import serial

    holder = serial.Serial(board.port, 115200, exclusive=True)
    try:
        with pytest.raises(DeviceError, match=f"serial port {board.port} is busy"):
            run(board, job)
    finally:
        holder.close()
    assert board.requests == []


def test_a_reported_zero_watts_is_not_a_measurement():
    assert board_power({"status": "measured", "average_watts": 0})["status"] == "unavailable"
    assert board_power({"status": "measured", "average_watts": 0.21}) == {"status": "measured",
                                                                          "average_watts": 0.21}
