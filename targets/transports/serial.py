"""An STM32 board on a UART (pyserial): the `serial` transport.

The board's firmware holds the model, so nothing travels as files: the host sends one line naming the job's
settings and the sha256 of the artifact the firmware must have been built from, and the board answers with
one line of result JSON. The line protocol, one message per line, UTF-8:

    host -> board   JOB <nonce> {json}        run the flashed model with these settings
                    INFO <nonce>              say what you are
    board -> host   RESULT <nonce> {json}     the job's result, in the runner schema, plus model_sha256
                    ERROR <nonce> message     the job (or INFO) failed; the message is one line
                    INFO <nonce> {json}       board, firmware, runtime, model_sha256, runner_version, packages
                    anything else             the firmware's log output: ignored

The nonce is fresh for every request, so an answer to an earlier request (one the host stopped waiting for,
still in the board's UART buffer) is never taken for this one's. A message may follow log output on the same
line: firmware printf's without a newline are common.

A job's folder names its artifact in job.json's `model`; launch.py's checks happen here instead: the board's
answer must name that artifact's sha256 and the runner version the host expects. The result is written into
the job folder the way a runner writes it, so `run_job` times, maps and types it like any other device's.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import secrets
import threading
import time
from pathlib import Path

from edge_deploy.pipeline.errors import DeviceError, DeviceTimeout, ToolchainMissing
from edge_deploy.targets.runners.measure import write_result
from edge_deploy.targets.transports import ConnectionDropped, Execution, Session, Transport

# launch.py's code for a measurement that failed: run_job shows the board's message with it.
EXIT_FAILED = 1
# A board has no clock shared with ours: past the job's own time limit it gets this long to answer.
ANSWER_MARGIN_S = 5.0
INFO_TIMEOUT_S = 5.0
# How often the reading thread looks up from the port, so a cancelled job stops it promptly.
POLL_S = 0.1
# A line longer than this is not an answer of ours (a firmware dumping memory); it is dropped.
MAX_LINE_BYTES = 1 << 20
NONCE_HEX = 16
ANSWER = re.compile(rf"\b(RESULT|ERROR|INFO) ([0-9a-f]{{{NONCE_HEX}}})(?: (.*))?$")
# Files the board never receives: naming them in the job line would claim otherwise.
NOT_SENT = ("files", "input")


def _pyserial():
    try:
        import serial
    except ImportError:
        raise ToolchainMissing("serial devices need pyserial: pip install 'edge-deploy[serial]'") from None
    return serial


class Heard:
    """What the board said besides the answer: the timeout message names it, since it tells why."""

    def __init__(self):
        self.last_line, self.stale, self.garbled = "", 0, False

    def line(self, text: str) -> None:
        if "\ufffd" in text:
            self.garbled = True
        elif text:
            self.last_line = text[:120]

    def silence(self, port: str, baud: int) -> str:
        if self.stale:
            return f"it answered only earlier requests ({self.stale} stale line{'s' * (self.stale > 1)} ignored)"
        if self.last_line:
            return f"the last line it printed: {self.last_line!r}"
        if self.garbled:
            return f"it printed only unreadable bytes: is {baud} baud the firmware's rate?"
        return f"it printed nothing: is the firmware running, and is {port} its port?"


class BoardLink:
    """One open UART to the board; `ask` sends a request and waits for the answer carrying its nonce."""

    def __init__(self, label: str, port: str, baud: int):
        serial = _pyserial()
        self.label, self.port_name, self.baud = label, port, baud
        try:
            # exclusive: a second program reading the same UART would steal half of the board's answer.
            self.port = serial.Serial(port, baud, timeout=POLL_S, write_timeout=5, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(f"{label}: {open_failure(port, baud, exc)}") from None

    def ask(self, kind: str, payload: dict | None, wait_s: float, stop: threading.Event) -> tuple[str, str]:
        """(answer kind, the rest of its line); DeviceTimeout when the board stays silent for wait_s."""
        serial = _pyserial()
        nonce = secrets.token_hex(NONCE_HEX // 2)
        request = f"{kind} {nonce}" + ("" if payload is None else " " + json.dumps(payload, separators=(",", ":")))
        heard, pending = Heard(), bytearray()
        try:
            self.port.reset_input_buffer()
            self.port.write(request.encode() + b"\n")
            self.port.flush()
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not stop.is_set():
                pending += self.port.read(self.port.in_waiting or 1)
                while b"\n" in pending:
                    raw, _, rest = pending.partition(b"\n")
                    pending = bytearray(rest)
                    answer = self._answer(raw.decode("utf-8", errors="replace").strip(), kind, nonce, heard)
                    if answer is not None:
                        return answer
                if len(pending) > MAX_LINE_BYTES:
                    pending.clear()
        except (serial.SerialException, OSError) as exc:
            raise ConnectionDropped(f"{self.label}: the serial link on {self.port_name} broke ({exc})") from None
        heard.line(pending.decode("utf-8", errors="replace").strip())  # a last line with no newline yet
        raise DeviceTimeout(f"{self.label}: the board on {self.port_name} did not answer within {wait_s:g} s "
                            f"({heard.silence(self.port_name, self.baud)})")

    @staticmethod
    def _answer(line: str, asked: str, nonce: str, heard: Heard) -> tuple[str, str] | None:
        found = ANSWER.search(line)
        if found is None:
            heard.line(line)
            return None
        answer, their_nonce, rest = found[1], found[2], (found[3] or "").strip()
        if their_nonce != nonce:
            heard.stale += 1
            return None
        # A firmware that echoes its input sends our own `INFO <nonce>` back: an answer to INFO carries JSON.
        wanted = ("RESULT", "ERROR") if asked == "JOB" else ("INFO", "ERROR")
        if answer not in wanted or (answer == "INFO" and not rest):
            heard.line(line)
            return None
        return answer, rest

    def close(self) -> None:
        try:
            self.port.close()
        except OSError:
            pass


def open_failure(port: str, baud: int, exc: Exception) -> str:
    """Why a port did not open, in one line that says what to do."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOENT:
        return f"no serial port {port} (is the board plugged in? ls /dev/serial/by-id lists the boards attached)"
    if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in text:
        return (f"serial port {port} is busy: another program holds it (a serial monitor, an IDE's console, "
                "another deploy run); close it and run again")
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to open {port} (add your user to the dialout group, then log in again)"
    if "configure port" in text:
        return f"{port} is not a serial port"
    if isinstance(exc, ValueError):
        return f"cannot use {port} at {baud} baud ({text})"
    detail = getattr(exc, "strerror", None) or (text.splitlines() or [type(exc).__name__])[0]
    return f"cannot open serial port {port} ({detail})"


def job_request(job: dict, label: str) -> dict:
    """The job line's settings: what the host asked for, the artifact's sha256 and the runner version."""
    model = job.get("model")
    files = job.get("files") or {}
    if not isinstance(model, str) or model not in files:
        raise DeviceError(f"{label}: the job names no model file (job.json `model`), so the board's firmware "
                          "cannot be checked against the artifact")
    request = {k: v for k, v in job.items() if k not in NOT_SENT}
    request["model_sha256"] = files[model]
    return request


def board_result(answer: str, request: dict, label: str) -> dict:
    """The board's RESULT as a runner's result.json: checked against the job, unreported figures None."""
    try:
        data = json.loads(answer)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise DeviceError(f"{label}: the board's RESULT is not a JSON object")
    ran = data.get("model_sha256")
    if not isinstance(ran, str):
        raise DeviceError(f"{label}: the board's result does not say which model it ran (model_sha256); flash "
                          "firmware that speaks this protocol")
    if ran.lower() != request["model_sha256"]:
        raise DeviceError(f"{label}: the board runs another model (sha256 {ran[:12]}…, this artifact's "
                          f"{request['model_sha256'][:12]}…): flash the firmware built from this artifact, then "
                          "run again")
    expected = request.get("runner_version")
    if expected is not None and data.get("runner_version") != expected:
        raise DeviceError(f"{label}: the board's firmware is runner version {data.get('runner_version')}, the host "
                          f"expects {expected}: flash firmware built with this version of edge-deploy")
    missing = [k for k in ("runtime", "latency_ms") if k not in data]
    if missing or not isinstance(data.get("latency_ms"), dict):
        raise DeviceError(f"{label}: the board's result lacks {', '.join(missing) or 'latency_ms as an object'}")
    result = {"runner": "firmware", "runner_version": None, "threads": None, "batch": None, "warmup": None,
              "runs": None, "load_ms": None, "fps": None, **data}
    result["latency_ms"] = {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None,
                            **data["latency_ms"]}
    memory = data.get("memory_mb")
    result["memory_mb"] = {"rss_before_load": None, "peak_rss": None, **(memory if isinstance(memory, dict) else {})}
    result["power"] = board_power(data.get("power"))
    result["job"] = request
    result["input"] = "the firmware's own: nothing but the job line reaches the board"
    return result


def board_power(reported) -> dict:
    """The board's power report when it is a measurement; 'unavailable' with the reason otherwise, never 0."""
    if reported is None:
        return {"status": "unavailable", "reason": "the board reported no power figure"}
    if not isinstance(reported, dict) or reported.get("status") not in ("measured", "unavailable"):
        return {"status": "unavailable", "reason": "the board's power report is not in the result schema"}
    if reported["status"] == "unavailable":
        return {**reported, "reason": str(reported.get("reason") or "the board gave no reason")}
    watts = reported.get("average_watts")
    if isinstance(watts, bool) or not isinstance(watts, (int, float)) or not watts > 0:
        return {"status": "unavailable", "reason": f"the board reported {watts!r} W, which is not a measurement"}
    return reported


class SerialTransport(Transport):
    kind = "serial"
    runs_python_runners = False

    def __init__(self, name: str, port: str, baud: int = 115200, timeout_s: float | None = None):
        """timeout_s: how long to wait for the board's answer; None: the job's own time limit and a margin."""
        _pyserial()
        self.name, self.port, self.baud, self.timeout_s = name, str(port), int(baud), timeout_s

    def python(self) -> list[str]:
        return []  # the firmware is the runner: the session speaks the line protocol instead of running argv

    def link(self) -> BoardLink:
        return BoardLink(self.label, self.port, self.baud)

    async def open(self) -> Session:
        return SerialSession(self, await asyncio.to_thread(self.link))

    def describe(self, packages: tuple[str, ...]) -> dict:
        link = self.link()
        try:
            wait_s = min(self.timeout_s, INFO_TIMEOUT_S) if self.timeout_s is not None else INFO_TIMEOUT_S
            kind, answer = link.ask("INFO", None, wait_s, threading.Event())
        finally:
            link.close()
        if kind == "ERROR":
            raise DeviceError(f"{self.label}: the board would not say what it is: {answer}")
        try:
            facts = json.loads(answer)
        except ValueError:
            facts = None
        if not isinstance(facts, dict):
            raise DeviceError(f"{self.label}: the board's INFO is not a JSON object")
        versions = facts.pop("packages", None)
        versions = versions if isinstance(versions, dict) else {}
        return {"transport": self.kind, "device": self.name, "port": self.port, "baud": self.baud, **facts,
                "packages": {p: str(versions.get(p, "not reported")) for p in packages}}

    async def adescribe(self, packages: tuple[str, ...]) -> dict:
        return await asyncio.to_thread(self.describe, packages)


class SerialSession(Session):
    """The job folder stays on the host: the board gets one line and its answer becomes result.json there."""

    def __init__(self, transport: SerialTransport, link: BoardLink):
        self.transport, self.link = transport, link

    async def push(self, job_dir: Path) -> str:
        return str(job_dir)

    async def execute(self, argv: list[str], remote_dir: str, timeout: float) -> Execution:
        job_dir = Path(remote_dir)
        label = self.transport.label
        request = job_request(json.loads((job_dir / "job.json").read_text()), label)
        wait_s = self.transport.timeout_s if self.transport.timeout_s is not None else timeout + ANSWER_MARGIN_S
        stop = threading.Event()
        try:
            kind, answer = await asyncio.to_thread(self.link.ask, "JOB", request, wait_s, stop)
        except asyncio.CancelledError:
            stop.set()
            raise
        if kind == "ERROR":
            return Execution(EXIT_FAILED, answer or "the board reported an error without a message")
        write_result(job_dir, board_result(answer, request, label))
        return Execution(0, "")

    async def pull(self, remote_dir: str, names: list[str], job_dir: Path) -> None:
        pass  # execute wrote result.json into the job folder; the board keeps no files to bring back

    async def clean(self, remote_dir: str) -> None:
        pass  # nothing was put on the board

    async def close(self) -> None:
        self.link.close()
