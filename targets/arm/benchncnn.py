"""Parses the output of ncnn's `benchncnn`, so users can set our probe beside ncnn's own benchmark."""

from __future__ import annotations

import re

from edge_deploy.pipeline.errors import InputError

_SETTING = re.compile(r"^(loop_count|num_threads|powersave|gpu_device|cooling_down)\s*=\s*(-?\d+)\s*$")
_RESULT = re.compile(r"^\s*(\S+)\s+min\s*=\s*([\d.]+)\s+max\s*=\s*([\d.]+)\s+avg\s*=\s*([\d.]+)\s*$")


def parse_benchncnn(text: str) -> dict:
    """{'settings': {...}, 'models': {name: {'min_ms', 'max_ms', 'avg_ms'}}}; other lines are ignored."""
    settings, models = {}, {}
    for line in text.splitlines():
        if match := _SETTING.match(line.strip()):
            settings[match[1]] = int(match[2])
        elif match := _RESULT.match(line):
            models[match[1]] = {"min_ms": float(match[2]), "max_ms": float(match[3]), "avg_ms": float(match[4])}
    if not models:
        raise InputError("no benchncnn result lines ('<model>  min = … max = … avg = …') found")
    return {"settings": settings, "models": models}
