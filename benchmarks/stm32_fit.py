"""stm32: what the embedded detector needs on a microcontroller, and whether it fits, per input size and pruning.

Each row is an ordinary `stm32` build (cached stages are reused). A model whose parameters alone exceed every
chip's flash stops right after load; the row then says so and carries only the parameter count. For the others:
FP32 and INT8 (TFLM) mAP50-95 on the report split, the measured arena, the .tflite size and the fit per chip.

    .venv/bin/python benchmarks/stm32_fit.py [--sizes 160] [--prune 0 0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edge_deploy.pipeline.build import run_build
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.errors import ConfigError
from edge_deploy.targets.runners.measure import cpu_name, vector_extensions


def one(imgsz: int, prune: float, home: Path, out: Path) -> str:
    settings = {"target": "stm32", "imgsz": imgsz, "output": out}
    if prune:
        settings["prune"] = {"ratio": prune}
    label = f"| {'pruned ' + str(prune) if prune else 'unpruned'} | {imgsz} |"
    try:
        result = run_build(BuildConfig(**settings), home)
    except ConfigError as exc:
        return f"{label} — | — | — | — | — | none: {exc} |"
    verify, compile_ = result.metrics("verify"), result.metrics("compile")
    notes = compile_["notes"]
    fits = ", ".join(name for name, f in notes["fits"].items() if f["fits"]) or "none"
    return (f"{label} {verify['reference']['map50_95']:.4f} | {verify['artifact']['map50_95']:.4f} | "
            f"{verify['drop_points']:.2f} | {notes['arena_bytes']:,} B | {notes['flash_model_bytes']:,} B | {fits} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[160])
    parser.add_argument("--prune", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--home", type=Path, default=Path(".deploy"))
    parser.add_argument("--output", type=Path, default=Path(".deploy/bench-stm32"))
    args = parser.parse_args()
    started = time.time()
    print(f"host: {cpu_name()} ({vector_extensions()}); {time.strftime('%Y-%m-%d')}")
    print("| model | imgsz | FP32 mAP50-95 | INT8 (TFLM) | drop | arena | flash (.tflite) | fits |")
    print("|---|---|---|---|---|---|---|---|")
    for prune in args.prune:
        for imgsz in args.sizes:
            print(one(imgsz, prune, args.home, args.output), flush=True)
    print(json.dumps({"seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
