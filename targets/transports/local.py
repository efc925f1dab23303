"""This machine, through the same job protocol as any device."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from edge_deploy.pipeline.engine import toolchain_versions
from edge_deploy.targets.transports import Transport


class LocalTransport(Transport):
    kind = "local"

    def describe(self, packages: tuple[str, ...]) -> dict:
        return {"transport": self.kind, "machine": platform.machine(), "python": platform.python_version(),
                "packages": toolchain_versions(packages)}

    def command(self, job_dir: Path, runner_name: str):
        # A fresh process, so memory figures are the runtime's alone.
        return [sys.executable, str(job_dir / runner_name), str(job_dir)], None
