"""The human summary of a build: what ran, what was cached, the numbers that matter."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


def _models(metrics: dict) -> dict[str, dict]:
    """The per-model entries of a verify or probe result (the rest are comparisons)."""
    return {k: v for k, v in metrics.items() if isinstance(v, dict)}


def _key_metrics(name: str, metrics: dict, precision: str, target: str) -> str:
    label = f"{precision}_{target}"
    if name == "load":
        return f"{metrics['family']}, {metrics['params']:,} params, imgsz {metrics['imgsz']}"
    if name == "prune":
        return (f"{metrics['criterion']}, {metrics['steps']} steps: {metrics['macs_ratio']}x fewer MACs, "
                f"{metrics['params_ratio']}x fewer params, {metrics['latency_ratio']}x faster (ORT CPU); mAP50-95 "
                f"{metrics['map50_95_before']:.4f} -> {metrics['map50_95']:.4f}; {metrics['stop']}")
    if name == "export":
        return f"opset {metrics['opset']}, {metrics['nodes']} nodes, max rel err {metrics['max_rel_error']:.1e}"
    if name == "quantize":
        sqnr = ", ".join(f"{k} {v} dB" for k, v in metrics["sqnr_db"].items())
        return (f"{metrics['choice']}; {metrics['calibration_images']} calib images, "
                f"drop {metrics['drop_points']:.2f} pts, SQNR {sqnr}")
    if name == "compile":
        text = f"{metrics['size_bytes'] / 2**20:.2f} MiB, max rel err vs parent {metrics['max_rel_error_vs_parent']:.1e}"
        quantization = metrics.get("quantization")
        if quantization:
            text += (f"; INT8 {quantization['method']} chosen by {quantization['chosen_by']}, "
                     f"{len(quantization['float_layers'])} of {quantization['layers']} convolutions kept FP32")
        return text
    if name == "verify":
        parts = [f"FP32 mAP50-95 {metrics['fp32_onnx']['map50_95']:.4f}"]
        if label in metrics:
            parts.append(f"{precision.upper()} {metrics[label]['map50_95']:.4f}, "
                         f"drop {metrics['map50_95_drop_points']:.2f} pts")
        return ", ".join(parts)
    if name == "probe":
        parts = [f"{k.split('_')[0].upper()} p50 {v['latency_ms']['p50']} ms ({v['fps']} FPS)"
                 for k, v in _models(metrics).items()]
        if "speedup_vs_fp32_p50" in metrics:
            parts.append(f"{metrics['speedup_vs_fp32_p50']}x")
        return ", ".join(parts)
    if name == "release":
        return f"{metrics['files']} files"
    return ""


def render_summary(result, config) -> None:
    # Piped output would wrap at 80 columns; a log file reads better unwrapped.
    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table("stage", "time", "cache", "key metrics")
    for record in result.records:
        table.add_row(record.name, f"{record.seconds:.2f} s", "hit" if record.cache_hit else "ran",
                      _key_metrics(record.name, record.metrics, config.precision, config.target))
    console.print(table)
    verify = result.metrics("verify")
    probe = result.metrics("probe")
    for key, accuracy in _models(verify).items():
        speed = probe[key]
        latency, power = speed["latency_ms"], speed["power"]
        power_text = f"{power['average_watts']} W" if power["status"] == "measured" else "power unavailable"
        console.print(f"{key:>12}: mAP50 {accuracy['map50']:.4f}  mAP50-95 {accuracy['map50_95']:.4f}  "
                      f"latency p50/p90/p99 {latency['p50']}/{latency['p90']}/{latency['p99']} ms  {power_text}")
    state = "published" if result.bundle_changed else "unchanged"
    console.print(f"bundle ({state}): [bold]{result.bundle}[/]   build record: {result.record_path}")
