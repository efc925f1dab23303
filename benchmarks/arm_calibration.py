"""The arm target's activation statistics, old tap against the sampled one, on the build's own calibration images.

    DEPLOY_HOME=/tmp/h .venv/bin/python benchmarks/arm_calibration.py --imgsz 640 --images 200 --rounds 2

The old tap (every value of every convolution input, one inference per image per pass of collect_statistics) is
reproduced here as it was, so both run in one process on the same images, alternating, each round's order swapped.
Per round: seconds inside the tap (inference, sampling) and the rest of collect_statistics (min/max, histograms),
with the load average; then the per-layer INT8 input scales (127 / threshold) of both, for MinMax and Entropy, and
whether two runs of the sampled tap give the same scales and byte-identical INT8 .param/.bin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from embedded import calibration_images, exported_embedded

from edge_deploy.calibration.preprocess import load_tensor
from edge_deploy.calibration.ranges import collect_statistics, ranges_for
from edge_deploy.pipeline.stages.quantize import batched
from edge_deploy.targets.arm import NcnnArm, runner


def old_tap(backend):
    """The tap as targets/arm had it before sampling: full tensors, stacked per batch."""
    net = runner.open_net(backend.fp32_dir, {"param": "model.ncnn.param", "bin": "model.ncnn.bin",
                                              "precision": "fp32", "threads": None})
    blobs = list(dict.fromkeys(layer.bottoms[0] for layer in backend.convs))

    def tap(batch):
        per_image = [runner.run_once(net, image, blobs) for image in batch]
        return {blob: np.stack([values[i] for values in per_image]) for i, blob in enumerate(blobs)}

    return tap


def timed(tap):
    spent = [0.0]

    def wrapped(batch):
        started = time.perf_counter()
        out = tap(batch)
        spent[0] += time.perf_counter() - started
        return out

    return wrapped, spent


def scales(stats, method):
    return {n: 127.0 / max(abs(lo), abs(hi)) for n, (lo, hi) in ranges_for(stats, method, symmetric=True).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    home = Path(os.environ.get("DEPLOY_HOME", ".deploy"))
    onnx_path, info, data = exported_embedded(home, args.imgsz)
    files, pre = calibration_images(data, info.imgsz, args.images)
    batches = batched([load_tensor(p, pre)[0] for p in files])
    work = Path(tempfile.mkdtemp(prefix=f"arm-calib-{os.getpid()}-"))
    try:
        backend = NcnnArm().quant_backend("int8", onnx_path, info, work / "backend",
                                          {"calibration_batches": batches})
        rows, stats = [], {}
        from edge_deploy.targets.runners.measure import cpu_name, vector_extensions

        print(json.dumps({"host": f"{cpu_name()} ({vector_extensions()})", "cpus": os.cpu_count(),
                          "imgsz": info.imgsz, "images": len(files)}), flush=True)
        for r in range(args.rounds):
            for kind in (("old", "new") if r % 2 == 0 else ("new", "old")):
                tap, spent = timed(old_tap(backend) if kind == "old" else backend.tap())
                load = os.getloadavg()[0]
                started = time.perf_counter()
                stats[kind] = collect_statistics(tap, batches)
                total = time.perf_counter() - started
                rows.append({"round": r, "tap": kind, "seconds": round(total, 1), "in_tap": round(spent[0], 1),
                             "statistics": round(total - spent[0], 1), "load_before": round(load, 2),
                             "load_after": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), flush=True)
        again = collect_statistics(backend.tap(), batches)
        comparison = {}
        for method in ("minmax", "entropy"):
            old, new = scales(stats["old"], method), scales(stats["new"], method)
            rel = {n: abs(new[n] - old[n]) / old[n] for n in old}
            worst = max(rel, key=rel.get)
            comparison[method] = {"max_rel_diff": rel[worst], "layer_blob": worst,
                                  "median_rel_diff": float(np.median(list(rel.values()))),
                                  "repeat_identical": scales(again, method) == new}
        built = []
        for i, s in enumerate((stats["new"], again)):
            out = backend.build(ranges_for(s, "entropy", symmetric=True), [], work / f"int8-{i}")
            built.append([(out / f).read_bytes() for f in ("model.ncnn.param", "model.ncnn.bin")])
        comparison["int8_files_identical"] = built[0] == built[1]
        print(json.dumps(comparison, indent=1))
        if args.json:
            args.json.write_text(json.dumps({"imgsz": info.imgsz, "images": len(files), "rows": rows,
                                             "scales": comparison}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
