"""The firmware's side of the serial protocol (serial_probe.c), compiled for Cortex-M4 and run on an emulated
board whose UART0 is a pseudo-terminal, against the host's real serial transport.

TFLM cannot be built here, so the board's inference is the generated decode + NMS (detector.c) on a fixed
output: what is checked is the protocol (answers, nonces, model check, errors, the result schema), never the
emulated timings, which describe qemu, not a board.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from edge_deploy.pipeline.errors import DeviceError
from edge_deploy.targets.stm32 import emulate, serial_probe
from edge_deploy.targets.stm32.runner import RUNNER_VERSION
from edge_deploy.targets.transports.serial import SerialTransport
from tests.targets import test_stm32_csource as csource_tests
from tests.targets.test_stm32_csource import PLACEHOLDER, generate, require_toolchain

outputs = csource_tests.outputs  # the fixture: a real model output's quantization, which the sources are built for


@pytest.fixture(scope="module")
def board_elf(model_info, outputs, tmp_path_factory):
    require_toolchain(run=True)
    sources = tmp_path_factory.mktemp("csrc-serial")
    generate(sources, model_info, outputs, tmp_path_factory)
    return emulate.build_serial_board(sources, tmp_path_factory.mktemp("serial-board"))


@pytest.fixture
def board(board_elf):
    with emulate.SerialBoard(board_elf) as running:
        yield running


def job_folder(tmp_path, model: bytes, **settings):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "model.tflite").write_bytes(model)
    (folder / "job.json").write_text(json.dumps({"model": "model.tflite", "warmup": 2, "runs": 12, **settings}))
    runner = tmp_path / "runner.py"
    runner.write_text(f"RUNNER_VERSION = {RUNNER_VERSION}\n")
    return folder, runner


def test_the_board_answers_info_with_the_model_it_was_built_from(board):
    facts = SerialTransport("nucleo", board.port).describe(("tflite-micro",))
    assert facts["model_sha256"] == hashlib.sha256(PLACEHOLDER).hexdigest()
    assert facts["runner_version"] == RUNNER_VERSION
    assert facts["board"] == "qemu mps2 (emulated)"
    assert facts["packages"] == {"tflite-micro": "not reported"}


def test_a_job_is_timed_on_the_board_and_comes_back_as_a_typed_result(board, tmp_path):
    folder, runner = job_folder(tmp_path, PLACEHOLDER)
    result = SerialTransport("nucleo", board.port).run(folder, runner, timeout=60)
    assert result.runs == 12 and result.warmup == 2
    assert len(result.samples_ms) == 12
    ordered = sorted(result.samples_ms)
    # The board's percentiles follow the same rule as every runner's (closest ranks, interpolated).
    assert result.latency_ms["min"] == ordered[0] and result.latency_ms["max"] == ordered[-1]
    assert ordered[5] <= result.latency_ms["p50"] <= ordered[6]
    assert result.latency_ms["p50"] <= result.latency_ms["p90"] <= result.latency_ms["p99"]
    assert result.power["status"] == "unavailable"
    assert result.latency_ms["p50"] > 0  # the decode takes emulated time; a zero would mean no clock was read


def test_a_board_flashed_with_another_model_is_refused_in_one_line(board, tmp_path):
    folder, runner = job_folder(tmp_path, PLACEHOLDER + b"changed")
    with pytest.raises(DeviceError) as caught:
        SerialTransport("nucleo", board.port).run(folder, runner, timeout=60)
    message = str(caught.value)
    assert "another model" in message and hashlib.sha256(PLACEHOLDER).hexdigest() in message
    assert "\n" not in message


def test_more_runs_than_the_firmware_can_hold_is_refused_with_its_limit(board, tmp_path):
    folder, runner = job_folder(tmp_path, PLACEHOLDER, runs=serial_probe.MAX_RUNS + 1)
    with pytest.raises(DeviceError, match=f"{serial_probe.MAX_RUNS + 1} runs; this firmware times 1 to "
                                          f"{serial_probe.MAX_RUNS}"):
        SerialTransport("nucleo", board.port).run(folder, runner, timeout=60)


def test_the_board_keeps_answering_after_noise_and_a_line_too_long(board, tmp_path):
    import serial

    with serial.Serial(board.port, 115200, timeout=0.2) as link:
        link.write(b"garbage before a reset\n" + b"x" * (serial_probe.LINE_BYTES + 10) + b"\nJOB nothex\n")
        link.flush()
    folder, runner = job_folder(tmp_path, PLACEHOLDER, runs=3)
    assert SerialTransport("nucleo", board.port).run(folder, runner, timeout=60).runs == 3
