"""The entry point of every device job: `python3 launch.py JOB_DIR`. Standard library only, Python 3.8+.

It runs before the runner and trusts nothing that travelled: every file job.json lists (the runner, its
support modules, the artifact, the input) must match its sha256, and the runner must be the version the host
expects. Then it runs the runner in this process. Its exit code tells the host what went wrong, because a
failed measurement, a damaged upload, a missing runtime and a timeout call for different answers.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import sys
from pathlib import Path

# 0: result.json written. The host maps the others; `timeout` (coreutils) adds 124 and, with -k, 137.
EXIT_FAILED = 1  # the measurement itself failed (the runner's message is the last line on stderr)
EXIT_DAMAGED = 65  # a file of the job does not match its hash, or the runner is not the expected version
EXIT_NO_RUNTIME = 69  # the device lacks a package the runner imports


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(job_dir: Path, job: dict) -> str | None:
    """None when every listed file is present and whole; else what is wrong, in one line."""
    files = job.get("files")
    if not isinstance(files, dict) or job.get("runner") not in files:
        return "job.json lists no files or no runner"
    for name, expected in sorted(files.items()):
        path = job_dir / name
        if not path.is_file():
            return f"{name} is missing on the device"
        if sha256(path) != expected:
            return f"{name} does not match its sha256 (damaged in transfer or changed on the device)"
    return None


def fail(code: int, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(job_dir: Path) -> None:
    try:
        job = json.loads((job_dir / "job.json").read_text())
    except (OSError, ValueError) as exc:
        fail(EXIT_DAMAGED, f"job.json unreadable ({exc.__class__.__name__})")
    problem = check(job_dir, job)
    if problem:
        fail(EXIT_DAMAGED, problem)
    sys.path.insert(0, str(job_dir))  # the runner imports measure.py and its support modules from beside it
    sys.argv = [str(job_dir / job["runner"]), str(job_dir)]
    try:
        runpy.run_path(str(job_dir / job["runner"]), run_name="__main__")
    except ImportError as exc:
        fail(EXIT_NO_RUNTIME, f"the device lacks {exc.name or 'a module'} ({exc})")
    except SystemExit:
        raise
    except Exception as exc:  # the runner's own failure; one line for the host to show
        first = str(exc).splitlines()[0] if str(exc) else ""
        fail(EXIT_FAILED, f"{exc.__class__.__name__}: {first}")
    if not (job_dir / "result.json").is_file():
        fail(EXIT_FAILED, "the runner finished without writing result.json")
    expected = job.get("runner_version")
    reported = json.loads((job_dir / "result.json").read_text()).get("runner_version")
    if expected is not None and reported != expected:
        (job_dir / "result.json").unlink()
        fail(EXIT_DAMAGED, f"runner version {reported} ran where the host expects {expected}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
