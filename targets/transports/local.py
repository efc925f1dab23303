"""This machine, through the same job protocol as any device."""

from __future__ import annotations

import platform
import sys

from edge_deploy.pipeline.engine import toolchain_versions
from edge_deploy.targets.transports import LocalSession, Session, Transport


class LocalTransport(Transport):
    kind = "local"

    def __init__(self, name: str = ""):
        self.name = name

    def describe(self, packages: tuple[str, ...]) -> dict:
        return {"transport": self.kind, "machine": platform.machine(), "python": platform.python_version(),
                "packages": toolchain_versions(packages)}

    def python(self) -> list[str]:
        # A fresh process, so memory figures are the runtime's alone.
        return [sys.executable]

    async def open(self) -> Session:
        return LocalSession()
