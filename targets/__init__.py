"""Target registry. Entries are "module:Class" strings so that listing targets imports no toolchain."""

from __future__ import annotations

import difflib
import importlib

from edge_deploy.pipeline.errors import ConfigError

TARGETS: dict[str, str] = {
    "cpu": "edge_deploy.targets.cpu:OnnxRuntimeCpu",
    "arm": "edge_deploy.targets.arm:NcnnArm",
    "jetson": "edge_deploy.targets.jetson:TensorRtJetson",
    "stm32": "edge_deploy.targets.stm32:TfliteMicroStm32",
}


def load_target(name: str):
    """The target class registered under `name`; a ConfigError naming the closest match otherwise."""
    if name not in TARGETS:
        close = difflib.get_close_matches(name, list(TARGETS), n=1, cutoff=0.4)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown target '{name}'{hint}; known targets: {', '.join(sorted(TARGETS))}")
    module_name, class_name = TARGETS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
