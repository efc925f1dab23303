"""Runs a device runner on a real aarch64 build of its runtime, under qemu-user.

scripts/setup_aarch64.sh prepares an arm64 Debian Python 3.11 with PyPI's
aarch64 ncnn and numpy wheels. Emulation is some hundred times slower than
hardware: what it shows is that the ARM kernels compute the same outputs, never
how fast a device is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pipeline.errors import ToolchainMissing

RUNNERS = Path(__file__).parent / "runners"
# Without FP16 arithmetic ncnn takes its FP32 ARM kernels; with it (ARMv8.2), its FP16 ones.
CPUS = {"fp32-kernels": "cortex-a53", "fp16-kernels": "cortex-a76"}


def default_rootfs() -> Path:
    return Path(os.environ.get("EDGE_DEPLOY_AARCH64", Path(__file__).parents[1] / ".deploy" / "aarch64"))


def available(rootfs: Path | None = None) -> str | None:
    """None when aarch64 runs are possible here, else the reason they are not."""
    rootfs = rootfs or default_rootfs()
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed (apt-get install qemu-user-static)"
    if not (rootfs / ".ready").exists():
        return f"no aarch64 Python at {rootfs} (run scripts/setup_aarch64.sh {rootfs})"
    return None


def run_runner(runner: str, job_dir: Path, cpu: str, rootfs: Path | None = None, timeout: int = 900) -> None:
    """Runs targets/runners/<runner>.py on JOB_DIR with aarch64 Python; result.json lands in JOB_DIR."""
    rootfs = rootfs or default_rootfs()
    reason = available(rootfs)
    if reason:
        raise ToolchainMissing(f"aarch64 run impossible: {reason}")
    for name in (f"{runner}.py", "measure.py"):
        shutil.copyfile(RUNNERS / name, job_dir / name)
    sysroot = rootfs / "root"  # the extracted arm64 Debian packages; `site` holds the wheels
    env = {"PYTHONPATH": str(rootfs / "site"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["qemu-aarch64-static", "-cpu", cpu, "-L", str(sysroot), str(sysroot / "usr/bin/python3.11"),
         str(job_dir / f"{runner}.py"), str(job_dir)], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolchainMissing(f"aarch64 runner failed: {last}")
