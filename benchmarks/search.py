"""`deploy search` against a hand-picked build, and the same search on 1 and on 2 Ray workers.

1. The hand-picked configuration (the README's best row for the target: INT8 at 160 px for `cpu`, 50 % bn_scale
   pruning with 12 epochs + INT8 for `arm`) is built and probed now, on this machine, so both sides are timed in
   the same conditions.
2. `deploy search` runs on the embedded model with a wall-time budget; its fastest trial within the mAP budget is
   set against the hand-picked build: latency ratio (both compiled artifacts timed side by side at one thread,
   interleaved and repeated; each build's own probe p50 is shown beside, taken minutes apart) and mAP50-95
   (report split, 200 images).
3. The same search (a fixed space, no time budget) from an empty cache with 1 worker of 2 CPUs and with 2 workers
   of 1 CPU each: the wall-time ratio. This machine has 2 cores, so 2 workers can at best halve the time, and
   only where trials do not wait for each other's shared stages.

    .venv/bin/python benchmarks/search.py --target cpu --time-budget 900 [--skip-workers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPLOY = Path(sys.executable).parent / "deploy"
HAND_PICKED = {
    "cpu": ["--precision", "int8"],
    "arm": ["--precision", "int8", "--prune", "0.5", "--prune-epochs", "12"],
}


def run(args: list[str], home: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "DEPLOY_HOME": str(home)}
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run([str(DEPLOY), *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode not in (0, 4):
        sys.exit(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr.strip()}")
    return done, seconds


def hand_picked(target: str, home: Path, out: Path) -> dict:
    done, seconds = run(["build", "--target", target, *HAND_PICKED[target], "--json", "--output", str(out)], home,
                        out)
    record = json.loads(done.stdout)
    stages = {s["stage"]: s for s in record["stages"]}
    verify, probe = stages["verify"]["metrics"], stages["probe"]["metrics"]
    artifact = verify["artifact"] or verify["reference"]
    timing = probe["artifact"] or probe["reference"]
    return {"map50_95": artifact["map50_95"], "p50_ms": timing["latency_ms"]["p50"], "seconds": seconds,
            "contended": probe.get("contended"), "record": record}


def interleaved_ratio(target: str, picked: dict, best_record: dict, best_spec: dict, repeats: int) -> list[float]:
    """The hand-picked and the search's best artifact timed side by side at one thread, repeated: how much faster
    the search's is in each repeat (above 1: faster). Their probes ran minutes apart and are not comparable."""
    from interleave import ratios, repeated_p50s

    import numpy as np

    def runner(record: dict, precision: str, imgsz: int):
        folder = Path({s["stage"]: s for s in record["stages"]}["compile"]["artifacts"]["artifact"]["path"])
        tensor = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
        if target == "cpu":
            from edge_deploy.calibration.onnxrt import ort_infer

            infer = ort_infer(folder / "model.onnx", 1)
            return lambda: infer(tensor)
        from edge_deploy.targets.arm import ncnn_net
        from edge_deploy.targets.arm import runner as ncnn_probe

        net = ncnn_net(folder, precision, threads=1)
        return lambda: ncnn_probe.run_once(net, tensor[0], ["out0", "out1"])

    # Both hand-picked configurations are INT8 at the build's default 160 px (HAND_PICKED).
    runs = {"hand-picked": runner(picked["record"], "int8", 160),
            "search": runner(best_record, best_spec["precision"], best_spec["imgsz"])}
    p50s = repeated_p50s(runs, repeats, rounds=20, block=10, warmup=10)
    return ratios(p50s, "hand-picked", "search")


def search(target: str, home: Path, out: Path, space: list[str], extra: list[str]) -> tuple[dict, float]:
    done, seconds = run(["search", "--target", target, *space, *extra, "--json", "--output", str(out)], home, out)
    return json.loads(done.stdout), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="cpu", choices=sorted(HAND_PICKED))
    parser.add_argument("--time-budget", type=float, default=900)
    parser.add_argument("--sizes", default="128,160")
    parser.add_argument("--precisions", default="int8,fp32")
    parser.add_argument("--prune-ratios", default="0,0.5")
    parser.add_argument("--epochs", default="2,6")
    parser.add_argument("--workers", type=int, default=1,
                        help="trials at once in the budgeted search (1: no trial's probe shares the CPU with another)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the interleaved timing (>= 3)")
    parser.add_argument("--skip-workers", action="store_true", help="only the search against the hand-picked build")
    parser.add_argument("--only-workers", action="store_true", help="only the 1- against 2-worker wall time")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one); an earlier run's "
                                                  "folder reuses its cache")
    args = parser.parse_args()
    space = ["--sizes", args.sizes, "--precisions", args.precisions, "--prune-ratios", args.prune_ratios,
             "--epochs", args.epochs, "--max-map-drop", "1.0", "--accept-drop"]
    work = args.work or Path(tempfile.mkdtemp(prefix="search-bench-"))
    from edge_deploy.targets.runners.measure import cpu_name, vector_extensions

    from interleave import load_average

    print(f"host: {cpu_name()} ({vector_extensions()}), {os.cpu_count()} CPUs; load average "
          f"{load_average()}; target {args.target}; space {' '.join(space[:-3])}; "
          f"work folder {work}", flush=True)

    if not args.only_workers:
        compare(args, work, space)
    if not args.skip_workers:
        workers(args, work, space)


def compare(args, work: Path, space: list[str]) -> None:
    home = work / "home"
    picked = hand_picked(args.target, home, work)
    print(f"hand-picked ({' '.join(HAND_PICKED[args.target])}, 160 px): mAP50-95 {picked['map50_95']:.4f}, "
          f"p50 {picked['p50_ms']:.2f} ms{' (probe saw a busy machine)' if picked['contended'] else ''}; "
          f"built in {picked['seconds']:.0f} s", flush=True)
    summary, seconds = search(args.target, home, work / "budgeted", space,
                              ["--time-budget", str(args.time_budget), "--workers", str(args.workers)])
    trials = {t["key"]: t for t in summary["trials"]}
    best = trials.get(summary["best_under_budget"])
    print(f"search, {args.time_budget:.0f} s budget, {args.workers} worker(s): {len(trials)} trials ({summary['executed']} run) in "
          f"{seconds:.0f} s, stopped by {summary['stopped_by'] or 'nothing (space done)'}", flush=True)
    print("\n| model | mAP50-95 (report) | drop vs search baseline (pts, report) | probe p50 ms | "
          "speed vs hand-picked, interleaved, median [min-max] |\n|---|---|---|---|---|")
    print(f"| hand-picked | {picked['map50_95']:.4f} | - | {picked['p50_ms']:.2f} | 1.00x |")
    if best:
        s = best["spec"]
        name = f"{s['imgsz']}px" + (f" prune {s['prune_ratio']:g} {s['epochs']}ep" if s["prune_ratio"] else "") + \
            f" {s['precision']}"
        record = json.loads(Path(best["build_record"]).read_text())
        from interleave import spread

        speed = spread(interleaved_ratio(args.target, picked, record, s, args.repeats))
        # chosen on the selection split; its report-split figures are what compare with the hand-picked row
        print(f"| search best within 1.0 pt: {name} | {best['report_map50_95']:.4f} | {best['report_drop_points']:.2f} | "
              f"{best['p50_ms']:.2f}{' (busy)' if best['contended'] else ''} | {speed} |")
    else:
        print("| search: no trial within 1.0 pt | - | - | - | - |")
    print("\nfront:", flush=True)
    for key in summary["front"]:
        t = trials[key]
        print(f"  {t['spec']} mAP50-95 selection {t['map50_95']:.4f} (drop {t['drop_points']:.2f}), report "
              f"{t['report_map50_95']:.4f} (drop {t['report_drop_points']:.2f}), p50 {t['p50_ms']:.2f} ms",
              flush=True)


def workers(args, work: Path, space: list[str]) -> None:
    walls = {}
    for workers, cpus in ((1, 2), (2, 1)):
        summary, seconds = search(args.target, work / f"home-{workers}w", work / f"workers-{workers}", space,
                                  ["--workers", str(workers), "--cpus-per-trial", str(cpus)])
        walls[workers] = seconds
        print(f"{workers} worker(s) x {cpus} CPU(s), empty cache: {len(summary['trials'])} trials in {seconds:.0f} s",
              flush=True)
    print(f"wall time, 1 worker / 2 workers: {walls[1] / walls[2]:.2f}x (2 cores: at most 2x)")


if __name__ == "__main__":
    main()
