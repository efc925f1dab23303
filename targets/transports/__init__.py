"""Where a device job runs, kept apart from what it does.

A job is a folder: the artifact, `job.json`, `input.npy`. The host adds the target's runner, the shared
device-side modules (launch.py, measure.py, power.py) and the runner's support modules, and lists every file
with its sha256 in job.json. A transport opens a session to the device, pushes the folder, runs one command
(`timeout`-bounded: launch.py checks the hashes, then runs the runner), pulls back `result.json` (written
atomically on the device) and whatever files the result names, and removes the folder from the device. The
result comes back as one typed ProbeResult, with the device, the runtime version it reports and the host's
connect/upload/run/download times.

Transports: `local` (this machine), `qemu` (a real aarch64 runtime under qemu-user), `ssh`, `adb`, `serial`
and `labgrid` (a place from a lab coordinator, reached over our own pinned-key SSH). Every one goes through
`run_job` here, so exit codes, timeouts and retries mean the same everywhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from edge_deploy.pipeline.artifacts import sha256_file
from edge_deploy.pipeline.errors import DeviceError, DeviceTimeout
from edge_deploy.pipeline.results import ProbeResult

RUNNERS = Path(__file__).parents[1] / "runners"
LAUNCH = RUNNERS / "launch.py"
# Sent with every job: the entry point and what every runner measures the same way.
SHARED = (LAUNCH, RUNNERS / "measure.py", RUNNERS / "power.py")
DEFAULT_TIMEOUT = 900
# How long past the device-side `timeout` the host waits for an answer before calling the device silent.
GRACE_S = 30
# launch.py's exit codes, and coreutils timeout's.
EXIT_DAMAGED, EXIT_NO_RUNTIME, EXIT_TIMEOUT, EXIT_KILLED = 65, 69, 124, 137


class ConnectionDropped(DeviceError):
    """The link to the device broke (refused, reset, closed): a job may be tried again on a new session."""


@dataclass
class Execution:
    returncode: int
    stderr: str


class Session:
    """One open connection to a device. Local transports implement it on this machine's file system."""

    async def push(self, job_dir: Path) -> str:
        """Copies the job folder to the device; returns the folder's path there."""
        raise NotImplementedError

    async def execute(self, argv: list[str], remote_dir: str, timeout: float) -> Execution:
        """Runs argv (never through a shell unquoted) in remote_dir on the device."""
        raise NotImplementedError

    async def pull(self, remote_dir: str, names: list[str], job_dir: Path) -> None:
        """Brings files of the device's job folder back into job_dir (each written whole or not at all)."""
        raise NotImplementedError

    async def clean(self, remote_dir: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class Transport:
    kind: ClassVar[str]
    name: str = ""  # the device's name in the inventory; the kind for unnamed transports
    # Attempts per job when the connection drops (a failed measurement or a timeout is never retried).
    attempts: int = 3
    backoff_s: float = 1.0
    # Whether the device runs the Python runners (a phone over adb runs benchncnn, a board over serial its
    # firmware): where it does not, the FP32 reference of a build is timed on this machine instead.
    runs_python_runners: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return self.name or self.kind

    def describe(self, packages: tuple[str, ...]) -> dict:
        """The device and the versions of `packages` there: what probe cache keys and reports record."""
        raise NotImplementedError

    async def adescribe(self, packages: tuple[str, ...]) -> dict:
        """describe() from inside the event loop that runs jobs (remote transports ask the device)."""
        return self.describe(packages)

    def python(self) -> list[str]:
        """The interpreter that runs launch.py on the device, as argv."""
        raise NotImplementedError

    async def open(self) -> Session:
        raise NotImplementedError

    def run(self, job_dir: Path, runner: Path, packages: tuple[str, ...] = (),
            timeout: float = DEFAULT_TIMEOUT, support: tuple[Path, ...] = ()) -> ProbeResult:
        return asyncio.run(run_job(self, job_dir, runner, packages, timeout, support))


def runner_version(runner: Path) -> int | None:
    """RUNNER_VERSION read from the runner's source: the host never imports a device-side script."""
    found = re.search(r"^RUNNER_VERSION\s*=\s*(\d+)", Path(runner).read_text(), re.MULTILINE)
    return int(found[1]) if found else None


def stage_job(job_dir: Path, runner: Path, support: tuple[Path, ...], timeout: float) -> dict:
    """Adds the runner and shared modules to the folder and lists every file's sha256 in job.json."""
    for source in (runner, *SHARED, *support):
        shutil.copyfile(source, job_dir / Path(source).name)
    for stale in ("result.json", ".result.json.tmp"):
        (job_dir / stale).unlink(missing_ok=True)
    job_file = job_dir / "job.json"
    job = json.loads(job_file.read_text()) if job_file.exists() else {}
    files = {p.name: sha256_file(p) for p in sorted(job_dir.iterdir()) if p.is_file() and p.name != "job.json"}
    job.update({"runner": Path(runner).name, "runner_version": runner_version(runner), "files": files,
                "timeout_s": timeout})
    job_file.write_text(json.dumps(job, indent=1))
    return job


def _quiet(phase: str) -> None:
    pass


async def run_job(transport: Transport, job_dir: Path, runner: Path, packages: tuple[str, ...] = (),
                  timeout: float = DEFAULT_TIMEOUT, support: tuple[Path, ...] = (),
                  on_phase: Callable[[str], None] = _quiet) -> ProbeResult:
    """One device job, start to finish; retried on a new session when the connection drops.

    A retry runs the whole job again in a fresh folder on the device: a measurement cut off halfway is
    never stitched to another.
    """
    job_dir = Path(job_dir).resolve()
    job = stage_job(job_dir, Path(runner), support, timeout)
    for attempt in range(1, transport.attempts + 1):
        try:
            return await _attempt(transport, job_dir, job, packages, timeout, on_phase)
        except ConnectionDropped as exc:
            if attempt == transport.attempts:
                raise DeviceError(f"{exc} (gave up after {attempt} attempts)") from None
            pause = transport.backoff_s * 2 ** (attempt - 1)
            on_phase(f"retrying in {pause:.0f} s: {exc}")
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


async def _attempt(transport: Transport, job_dir: Path, job: dict, packages: tuple[str, ...],
                   timeout: float, on_phase: Callable[[str], None]) -> ProbeResult:
    label = transport.label
    times, started = {}, time.time()
    t = time.perf_counter()
    on_phase("connecting")
    session = await transport.open()
    times["connect_s"] = time.perf_counter() - t
    remote = None
    try:
        t = time.perf_counter()
        on_phase("uploading")
        remote = await session.push(job_dir)
        times["upload_s"] = time.perf_counter() - t
        argv = ["timeout", "-k", "5", str(int(timeout)), *transport.python(), f"{remote}/launch.py", remote]
        t = time.perf_counter()
        on_phase("running")
        try:
            done = await asyncio.wait_for(session.execute(argv, remote, timeout), timeout + GRACE_S)
        except asyncio.TimeoutError:
            raise DeviceTimeout(f"{label}: the device did not answer within {timeout + GRACE_S:.0f} s") from None
        times["run_s"] = time.perf_counter() - t
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}, no output"])[-1]
        last = last.removeprefix("error: ")
        if done.returncode in (EXIT_TIMEOUT, EXIT_KILLED):
            raise DeviceTimeout(f"{label}: the job ran past {timeout:.0f} s and was stopped")
        if done.returncode == EXIT_DAMAGED:
            raise DeviceError(f"{label}: the job arrived damaged: {last}")
        if done.returncode == EXIT_NO_RUNTIME:
            raise DeviceError(f"{label}: the device cannot run this artifact: {last}")
        if done.returncode != 0:
            raise DeviceError(f"{label}: the device job failed: {last}")
        t = time.perf_counter()
        on_phase("downloading")
        await session.pull(remote, ["result.json"], job_dir)
        data = _read_result(job_dir, label)
        wanted = [n for n in data.get("bring_back", []) if isinstance(n, str) and "/" not in n]
        if wanted:
            await session.pull(remote, wanted, job_dir)
        times["download_s"] = time.perf_counter() - t
    finally:
        try:
            if remote is not None:
                await session.clean(remote)
        except (ConnectionDropped, OSError):
            pass  # the result is already here; a folder left on a device that dropped is no loss
        await session.close()
    times = {k: round(v, 3) for k, v in times.items()}
    return ProbeResult.from_runner(data, await transport.adescribe(packages), host_timings=times,
                                   started_at=_iso(started), finished_at=_iso(time.time()))


def _read_result(job_dir: Path, label: str) -> dict:
    try:
        return json.loads((job_dir / "result.json").read_text())
    except FileNotFoundError:
        raise DeviceError(f"{label}: the device job wrote no result.json") from None
    except ValueError:
        raise DeviceError(f"{label}: result.json from the device is not JSON") from None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class LocalSession(Session):
    """A job folder on this machine's file system, run by a local process (this machine or an emulator)."""

    def __init__(self, env: dict | None = None, prefix: list[str] | None = None):
        self.env, self.prefix = env, prefix or []

    async def push(self, job_dir: Path) -> str:
        return str(job_dir)

    async def execute(self, argv: list[str], remote_dir: str, timeout: float) -> Execution:
        # The emulator (if any) runs the interpreter; coreutils' timeout stays outside it.
        try:
            process = await asyncio.create_subprocess_exec(*argv, env=self.env, cwd=remote_dir,
                                                           stdout=asyncio.subprocess.DEVNULL,
                                                           stderr=asyncio.subprocess.PIPE,
                                                           start_new_session=True)
        except OSError as exc:
            raise DeviceError(f"cannot start the job ({exc.strerror or exc})") from None
        try:
            _, stderr = await process.communicate()
        except asyncio.CancelledError:
            _kill_group(process)
            raise
        return Execution(process.returncode, stderr.decode(errors="replace"))

    async def pull(self, remote_dir: str, names: list[str], job_dir: Path) -> None:
        pass  # already where the host reads it

    async def clean(self, remote_dir: str) -> None:
        pass  # the folder is the host's own; the probe stage removes it


def _kill_group(process) -> None:
    import os
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
