"""release: the artifact, its post-processing, metrics, a model card and a manifest of sha256 sums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.artifacts import Artifact, sha256_tree
from pipeline.engine import Stage, StageOutput, toolchain_versions
from pipeline.errors import DeployError

MANIFEST = "manifest.json"
TOOLCHAIN = ("edge-deploy", "torch", "ultralytics", "onnx", "onnxslim", "onnxruntime", "pycocotools", "numpy",
             "opencv-python")


class ReleaseStage(Stage):
    name = "release"
    version = 5
    toolchain = TOOLCHAIN
    inputs = ("model_info", "artifact", "verify_report", "probe_report")

    def __init__(self, bundle_name: str, config: dict, calibration: dict | None, validation: dict,
                 pruned: bool = False, quantize_report: bool = False):
        self.bundle_name, self.config, self.calibration, self.validation = bundle_name, config, calibration, validation
        if quantize_report:
            self.inputs = (*self.inputs, "quantize_report")
        if pruned:
            self.inputs = (*self.inputs, "prune_history", "prune_plot")

    def settings(self) -> dict:
        return {"bundle": self.bundle_name, "config": self.config, "calibration": self.calibration,
                "validation": self.validation}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        bundle = out_dir / self.bundle_name
        shutil.copytree(inputs["artifact"].path, bundle)
        shutil.copyfile(Path(__file__).parents[1] / "detect.py", bundle / "postprocess.py")
        info = json.loads(inputs["model_info"].path.read_text())
        verify = json.loads(inputs["verify_report"].path.read_text())
        probe = json.loads(inputs["probe_report"].path.read_text())
        pruning = None
        if "prune_history" in inputs:
            pruning = json.loads(inputs["prune_history"].path.read_text())
            shutil.copyfile(inputs["prune_history"].path, bundle / "prune_history.json")
            shutil.copyfile(inputs["prune_plot"].path, bundle / "prune_history.png")
        quantization = (json.loads(inputs["quantize_report"].path.read_text())
                        if "quantize_report" in inputs else None)
        metrics = {"accuracy": verify, "speed": probe}
        if quantization:
            metrics["quantization"] = {k: quantization[k] for k in ("choice", "method", "drop_points", "float_nodes",
                                                                    "selection_set", "trials")}
        (bundle / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (bundle / "MODEL_CARD.md").write_text(model_card(self.bundle_name, info, self.config, self.calibration,
                                                         self.validation, verify, probe, quantization, pruning))
        files = {p.relative_to(bundle).as_posix(): sha256_tree(p) for p in sorted(bundle.rglob("*")) if p.is_file()}
        manifest = {
            "bundle": self.bundle_name, "format": 1, "model": info, "target": self.config["target"],
            "precision": self.config["precision"], "files": files, "toolchain": toolchain_versions(TOOLCHAIN),
            "config": self.config, "calibration": self.calibration, "validation": self.validation,
            "metrics": metrics,
        }
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return StageOutput({"bundle": bundle}, {"files": len(files) + 1})


def check_bundle(bundle: Path) -> dict:
    """Re-hashes every file a bundle's manifest lists; raises DeployError on any difference."""
    manifest_path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise DeployError(f"{bundle}: no readable manifest ({exc.__class__.__name__})") from None
    present = {p.relative_to(bundle).as_posix() for p in Path(bundle).rglob("*") if p.is_file()} - {MANIFEST}
    problems = [f"missing {n}" for n in sorted(set(listed) - present)]
    problems += [f"not in manifest: {n}" for n in sorted(present - set(listed))]
    problems += [f"sha256 differs: {n}" for n in sorted(set(listed) & present)
                 if sha256_tree(Path(bundle) / n) != listed[n]]
    if problems:
        raise DeployError(f"{bundle}: manifest does not check out: {'; '.join(problems)}")
    return manifest


def model_card(name: str, info: dict, config: dict, calibration: dict | None, validation: dict, verify: dict,
               probe: dict, quantization: dict | None = None, pruning: dict | None = None) -> str:
    precision, target = config["precision"], config["target"]
    label = f"{precision}_{target}"
    lines = [
        f"# {name}",
        "",
        f"{info['family']} detector ({info['params']:,} parameters, {len(info['names'])} classes: "
        f"{', '.join(info['names'])}), input {info['imgsz']}x{info['imgsz']} RGB, "
        f"built for target `{target}` at {precision.upper()}.",
        "",
        "## Accuracy (COCO mAP by pycocotools on the validation split)",
        "",
        f"Validation set: {validation['images']} images from `{validation['source']}` "
        f"(fingerprint {validation['fingerprint'][:16]}).",
        "",
        "| model | mAP50 | mAP50-95 |",
        "|---|---|---|",
    ]
    for key in ("fp32_onnx", label):
        if key in verify:
            lines.append(f"| {key} | {verify[key]['map50']:.4f} | {verify[key]['map50_95']:.4f} |")
    if label in verify:
        lines += ["", f"mAP50-95 drop against FP32: {verify['map50_95_drop_points']:.2f} points.", ""]
        if precision in ("int4", "w4a8"):
            lines += ["INT4 weights are stored packed (half the bytes of INT8) and dequantized to float by the "
                      "runtime on every run: the saving is size on disk and in memory, not arithmetic. On "
                      "ONNX Runtime's CPU provider this model is slower than FP32; the probe below measures it.", ""]
    else:
        lines += ["", "The artifact is the FP32 ONNX model itself.", ""]
    lines += ["## Speed (measured on the build host, model inference only, batch 1)", "",
              "| model | p50 ms | p90 ms | p99 ms | FPS | load ms | peak RSS MB | power |",
              "|---|---|---|---|---|---|---|---|"]
    for key in ("fp32_onnx", label):
        if key in probe:
            r = probe[key]
            power = (f"{r['power']['average_watts']} W" if r["power"]["status"] == "measured"
                     else "unavailable")
            lines.append(f"| {key} | {r['latency_ms']['p50']} | {r['latency_ms']['p90']} | {r['latency_ms']['p99']}"
                         f" | {r['fps']} | {r['load_ms']} | {r['memory_mb']['peak_rss']} | {power} |")
    host = probe["fp32_onnx"]["host"]
    lines += ["", f"Host: {host['processor']} ({host['cpus']} CPUs). Numbers from another machine will differ;"
              " run the probe on the device.", ""]
    if pruning:
        lines += ["## Pruning", "",
                  f"Structured channel pruning ({pruning['criterion']}), {pruning['stop']}. Each step is measured "
                  "after its fine-tuning: ONNX Runtime CPU p50 latency at 1 thread, mAP on the validation split.", "",
                  "| step | params | MACs | MACs ratio | p50 ms | mAP50-95 | fine-tuned |", "|---|---|---|---|---|---|---|"]
        for row in pruning["steps"]:
            lines.append(f"| {row['step']} | {row['params']:,} | {row['macs']:,} | {row['macs_ratio']}x | "
                         f"{row['latency_ms']} | {row['map50_95']:.4f} | {'yes' if row['fine_tuned'] else 'no'} |")
        lines += ["", "![pruning history](prune_history.png)", ""]
    if calibration:
        lines += ["## Quantization", "",
                  f"Calibration: {calibration['images']} images from `{calibration['source']}`, fingerprint "
                  f"{calibration['fingerprint'][:16]}.", ""]
    if quantization:
        lines += [f"Choice: {quantization['choice']}. Candidates were scored on {quantization['selection_set']},"
                  " the split the accuracy table reports.", ""]
        if quantization["float_nodes"]:
            lines += [f"Nodes kept float: {', '.join(quantization['float_nodes'])}.", ""]
    lines += ["## Using it", "",
              "`runtime.json` describes the input (letterboxed, RGB, scaled 1/255) and the two raw outputs. "
              "`postprocess.py` (numpy only) decodes them and runs NMS: "
              "`postprocess(box_dist[0], cls_logit[0], imgsz, strides)` gives x1, y1, x2, y2, score, class "
              "in input pixels.", ""]
    return "\n".join(lines)


def publish(bundle: Path, output_dir: Path) -> tuple[Path, bool]:
    """Copies a released bundle to the output folder atomically; returns (path, changed)."""
    from pipeline.artifacts import atomic_dir

    final = Path(output_dir) / bundle.name
    existing = final / MANIFEST
    if existing.exists() and existing.read_bytes() == (bundle / MANIFEST).read_bytes():
        try:
            check_bundle(final)
            return final, False
        except DeployError:
            pass  # damaged copy: replace it below
    with atomic_dir(final) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
    return final, True
