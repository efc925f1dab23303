"""A real aarch64 build of a device runtime, run under qemu-user: the `qemu` transport.

scripts/setup_aarch64.sh prepares an arm64 Debian Python 3.11 with PyPI's
aarch64 ncnn and numpy wheels. Emulation is some hundred times slower than
hardware: what it shows is that the ARM kernels compute the same outputs, never
how fast a device is, so its timings are never reported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edge_deploy.pipeline.errors import ToolchainMissing
from edge_deploy.targets.transports import LocalSession, Session, Transport

# Without FP16 arithmetic ncnn takes its FP32 ARM kernels; with it (ARMv8.2), its FP16 ones.
CPUS = {"fp32-kernels": "cortex-a53", "fp16-kernels": "cortex-a76"}


def default_rootfs() -> Path:
    return Path(os.environ.get("EDGE_DEPLOY_AARCH64", Path(__file__).parents[2] / ".deploy" / "aarch64"))


def available(rootfs: Path | None = None) -> str | None:
    """None when aarch64 runs are possible here, else the reason they are not."""
    rootfs = rootfs or default_rootfs()
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed (apt-get install qemu-user-static)"
    if not (rootfs / ".ready").exists():
        return f"no aarch64 Python at {rootfs} (run scripts/setup_aarch64.sh {rootfs})"
    return None


class QemuUserTransport(Transport):
    kind = "qemu"

    def __init__(self, cpu: str = "cortex-a53", rootfs: Path | None = None):
        self.cpu, self.rootfs = cpu, Path(rootfs or default_rootfs())
        reason = available(self.rootfs)
        if reason:
            raise ToolchainMissing(f"aarch64 run impossible: {reason}")

    def describe(self, packages: tuple[str, ...]) -> dict:
        # The versions are the wheels unpacked into the emulated Python, not the host's packages.
        installed = {}
        for info in (self.rootfs / "site").glob("*.dist-info"):
            name, _, version = info.name[: -len(".dist-info")].partition("-")
            installed[name.lower().replace("_", "-")] = version
        return {"transport": self.kind, "machine": "aarch64", "cpu": self.cpu, "emulated": True,
                "packages": {p: installed.get(p, "not installed") for p in packages}}

    def python(self) -> list[str]:
        sysroot = self.rootfs / "root"  # the extracted arm64 Debian packages; `site` holds the wheels
        return ["qemu-aarch64-static", "-cpu", self.cpu, "-L", str(sysroot), str(sysroot / "usr/bin/python3.11")]

    async def open(self) -> Session:
        return LocalSession(env={"PYTHONPATH": str(self.rootfs / "site"), "PATH": "/usr/bin:/bin",
                                 "OMP_NUM_THREADS": "1"})
