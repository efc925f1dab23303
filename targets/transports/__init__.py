"""Where a device job runs, kept apart from what it does.

A job is a folder: the artifact, `job.json`, `input.npy`. A transport puts the
target's runner script and the shared `measure.py` beside them, runs one
command where the device is, and brings back `result.json` (written atomically
by the runner) as a typed ProbeResult that records the device and the runtime
version it reports. Transports: `local` (this machine) and `qemu` (a real
aarch64 build of the runtime under qemu-user) now; ssh, adb and serial go
behind the same interface.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

from edge_deploy.pipeline.errors import DeviceError, DeviceTimeout
from edge_deploy.pipeline.results import ProbeResult

MEASURE = Path(__file__).parents[1] / "runners" / "measure.py"
DEFAULT_TIMEOUT = 900


class Transport:
    kind: ClassVar[str]

    def describe(self, packages: tuple[str, ...]) -> dict:
        """The device and the versions of `packages` there: what probe cache keys and reports record."""
        raise NotImplementedError

    def command(self, job_dir: Path, runner_name: str) -> tuple[list[str], dict | None]:
        """The command (and environment, None to inherit) that runs the runner on the job folder."""
        raise NotImplementedError

    def run(self, job_dir: Path, runner: Path, packages: tuple[str, ...] = (),
            timeout: float = DEFAULT_TIMEOUT, support: tuple[Path, ...] = ()) -> ProbeResult:
        job_dir = Path(job_dir).resolve()
        for source in (runner, MEASURE, *support):
            shutil.copyfile(source, job_dir / Path(source).name)
        (job_dir / "result.json").unlink(missing_ok=True)
        command, env = self.command(job_dir, Path(runner).name)
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=job_dir)
        except subprocess.TimeoutExpired:
            raise DeviceTimeout(f"{self.kind}: the job ran past {timeout:.0f} s and was stopped") from None
        except OSError as exc:
            raise DeviceError(f"{self.kind}: cannot start the job ({exc.strerror or exc})") from None
        result = job_dir / "result.json"
        if done.returncode != 0 or not result.exists():
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}, no output"])[-1]
            raise DeviceError(f"{self.kind}: the device job failed: {last}")
        return ProbeResult.from_runner(json.loads(result.read_text()), self.describe(packages))
