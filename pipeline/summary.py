"""The human summary of a build: what ran, what was cached, the numbers that matter, and where they come from."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_deploy.pipeline.results import (FP32_ONNX, AccuracyReport, CompileReport, QuantizationReport,
                                          ReferenceAccuracy, SpeedReport, UNSURE_FRACTION, reported)


def _key_metrics(name: str, metrics: dict) -> str:
    name = name.removesuffix("-original")  # the unpruned model's export and reference read like the others
    if name == "load":
        return f"{metrics['family']}, {metrics['params']:,} params, imgsz {metrics['imgsz']}"
    if name == "prune":
        return (f"{metrics['criterion']}, {metrics['steps']} steps: {metrics['macs_ratio']}x fewer MACs, "
                f"{metrics['params_ratio']}x fewer params, {metrics['latency_ratio']}x faster (ORT CPU); mAP50-95 "
                f"{metrics['map50_95_before']:.4f} -> {metrics['map50_95']:.4f} (selection split); {metrics['stop']}")
    if name == "export":
        return f"opset {metrics['opset']}, {metrics['nodes']} nodes, max rel err {metrics['max_rel_error']:.1e}"
    if name == "reference":
        ref = ReferenceAccuracy.from_json(metrics)
        floor = ref.selection_jitter_floor
        return (f"FP32 mAP50-95 {ref.selection.map50_95:.4f} on {ref.selection_split.images} selection images, "
                f"{ref.report.map50_95:.4f} on {ref.report_split.images} report images"
                + (f"; with its class logits jittered by N(0, {floor['sigma']:g}) it loses "
                   f"{floor['drop_points']:.2f} fidelity points on the selection images" if floor else ""))
    if name == "quantize":
        q = QuantizationReport.from_json(metrics)
        # The chosen candidate's own trial carries its interval.
        chosen = [t for t in q.trials if t.get("method") == q.method and t.get("float_units") == q.float_units]
        interval = _interval(chosen[-1].get("drop_interval")) if chosen else ""
        return (f"{q.choice}; {q.calibration_images} calib images, drop {q.drop_points:.2f} pts{interval} on the "
                f"selection split; {len(q.float_units)} of {q.units} {q.unit_kind}s float")
    if name == "compile":
        c = CompileReport.from_json(metrics)
        return f"{c.size_bytes / 2**20:.2f} MiB; {c.check} {c.check_value:g} on {c.check_images} images"
    if name == "verify":
        v = AccuracyReport.from_json(metrics)
        parts = [f"FP32 {v.reference.describe()}"]
        if v.artifact is not None:
            parts.append(f"{v.artifact_label} {v.artifact.describe()}, drop {v.drop_points:.2f} pts"
                         f"{_interval(v.drop_interval)}")
        if v.fidelity is not None:
            parts.append(f"{v.fidelity.describe()}")
        if v.total_drop_points is not None:
            parts.append(f"{v.total_drop_points:.2f} pts{_interval(v.total_drop_interval)} below the unpruned model "
                         f"(budget {v.total_budget_points:.2f})")
        return ", ".join(parts) + f" ({v.split.images} report images)"
    if name == "probe":
        p = SpeedReport.from_json(metrics)
        rows = [("FP32", p.reference)] + ([(p.artifact_label, p.artifact)] if p.artifact else [])
        parts = [f"{label} p50 {reported(r.latency_ms.get('p50'), ' ms')} ({reported(r.fps)} FPS, {r.runtime})"
                 for label, r in rows]
        if p.speedup_p50 is not None:
            parts.append(f"{p.speedup_p50}x" + (", timed in turns" if p.in_turns else ""))
        return ", ".join(parts)
    if name == "release":
        return f"{metrics['files']} files"
    return ""


def _interval(interval) -> str:
    return "" if not interval else f" (95% {interval[0]:.2f}..{interval[1]:.2f})"


def _interval_bounds(interval) -> str:
    return "not computed" if not interval else f"{interval[0]:.2f}..{interval[1]:.2f}"


def render_summary(result, config) -> None:
    # Piped output would wrap at 80 columns; a log file reads better unwrapped.
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table("stage", "time", "cache", "key metrics")
    for record in result.records:
        table.add_row(record.name, f"{record.seconds:.2f} s", "hit" if record.cache_hit else "ran",
                      _key_metrics(record.name, record.metrics))
    console.print(table)
    verify = AccuracyReport.from_json(result.metrics("verify"))
    probe = result.speed
    # A target timed against its own FP32 build shows that build's speed on a line of its own: its accuracy is
    # not the FP32 ONNX's, which alone was scored.
    own_fp32 = probe is not None and probe.reference_label != FP32_ONNX
    rows = [(FP32_ONNX, verify.reference, probe.reference if probe and not own_fp32 else None)]
    if own_fp32:
        rows.append((probe.reference_label, None, probe.reference))
    if verify.artifact is not None:
        rows.append((verify.artifact_label, verify.artifact, probe.artifact if probe else None))
    for label, accuracy, speed in rows:
        if speed is None:
            timing = ("latency: see the next line" if own_fp32 else
                      "latency not measured here (the engine is built and timed on the device)")
        else:
            latency = speed.latency_ms
            timing = (f"latency p50/p90/p99 {'/'.join(reported(latency.get(q)) for q in ('p50', 'p90', 'p99'))} ms  "
                      f"power {speed.power_text()}")
        if accuracy is None:
            console.print(f"{label:>14}: {timing}")
            continue
        kind = "fidelity " if accuracy.kind == "fidelity" else ""
        console.print(f"{label:>14}: {kind}mAP50 {accuracy.map50:.4f}  {kind}mAP50-95 {accuracy.map50_95:.4f}"
                      f"{accuracy.interval_text()}  {timing}")
    if probe is not None and probe.speedup_p50 is not None:
        console.print(f"{'speed':>14}: {probe.speedup_text()}")
    if verify.artifact is not None:
        kind = "fidelity " if verify.artifact.kind == "fidelity" else ""
        console.print(f"{'drop':>14}: {verify.drop_points:.2f} {kind}mAP50-95 points, 95% interval "
                      f"{_interval_bounds(verify.drop_interval)} (paired bootstrap over the {verify.split.images} "
                      f"report images), budget {verify.budget_points:.2f}")
    # A verify that ran warned as it ran; a cached one did not, so its flags are repeated here.
    if any(r.name == "verify" and r.cache_hit for r in result.records):
        for flag in verify.flags:
            console.print(f"[yellow]warning:[/] {escape('verify: ' + flag['message'])}", soft_wrap=True)
    if verify.reference.kind == "fidelity":
        conf = ReferenceAccuracy.from_json(result.metrics('reference')).fidelity_conf
        console.print(f"no labels: fidelity = mAP against the FP32 model's own detections (conf >= {conf:g}; "
                      f"{conf * UNSURE_FRACTION:g}-{conf:g} and boxes at NMS's edge ignored, a near-tie taken as the "
                      "box it tied with), not accuracy; on "
                      f"the {verify.split.describe()}; choices made on a held-out selection split")
    else:
        console.print(f"accuracy on the {verify.split.describe()}; choices made on a held-out selection split")
    state = "published" if result.bundle_changed else "unchanged"
    console.print(f"bundle ({state}): [bold]{result.bundle}[/]   build record: {result.record_path}")
