"""release: the artifact, its post-processing, metrics, a model card and a manifest of sha256 sums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edge_deploy.pipeline.artifacts import Artifact, sha256_tree
from edge_deploy.pipeline.engine import Stage, StageOutput, toolchain_versions
from edge_deploy.pipeline.errors import DeployError, InputError, IntegrityError
from edge_deploy.pipeline.userfiles import is_bundle, read_json, shown, write_failure
from edge_deploy.pipeline.results import AccuracyReport, ModelInfo, QuantizationReport, SpeedReport, reported

MANIFEST = "manifest.json"
TOOLCHAIN = ("edge-deploy", "torch", "ultralytics", "onnx", "onnxslim", "onnxruntime", "pycocotools", "numpy",
             "opencv-python")


class ReleaseStage(Stage):
    name = "release"
    toolchain = TOOLCHAIN
    inputs = ("source", "model_info", "artifact", "verify_report")

    def __init__(self, bundle_name: str, config: dict, calibration: dict | None, pruned: bool = False,
                 quantize_report: bool = False, probed: bool = True, device_files: bool = False):
        self.bundle_name, self.config, self.calibration = bundle_name, config, calibration
        if device_files:
            self.inputs = (*self.inputs, "device_files")
        if probed:
            self.inputs = (*self.inputs, "probe_report")
        if quantize_report:
            self.inputs = (*self.inputs, "quantize_report")
        if pruned:
            self.inputs = (*self.inputs, "prune_history", "prune_plot")

    def settings(self) -> dict:
        return {"bundle": self.bundle_name, "config": self.config, "calibration": self.calibration}

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        bundle = out_dir / self.bundle_name
        shutil.copytree(inputs["artifact"].path, bundle)
        shutil.copyfile(Path(__file__).parents[1] / "detect.py", bundle / "postprocess.py")
        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        verify = AccuracyReport.from_json(json.loads(inputs["verify_report"].path.read_text()))
        probe = (SpeedReport.from_json(json.loads(inputs["probe_report"].path.read_text()))
                 if "probe_report" in inputs else None)
        runtime = json.loads((bundle / "runtime.json").read_text())
        if "device_files" in inputs:
            # Built on the device the probe ran on (a TensorRT engine is tied to that GPU and TensorRT version).
            shutil.copytree(inputs["device_files"].path, bundle / "built_on_device")
        pruning = None
        if "prune_history" in inputs:
            pruning = json.loads(inputs["prune_history"].path.read_text())
            shutil.copyfile(inputs["prune_history"].path, bundle / "prune_history.json")
            shutil.copyfile(inputs["prune_plot"].path, bundle / "prune_history.png")
        quantization = (QuantizationReport.from_json(json.loads(inputs["quantize_report"].path.read_text()))
                        if "quantize_report" in inputs else None)
        metrics = {"accuracy": verify.to_json(), "speed": probe.to_json() if probe else None}
        if quantization:
            metrics["quantization"] = {k: v for k, v in quantization.to_json().items() if k != "sensitivity"}
        (bundle / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (bundle / "MODEL_CARD.md").write_text(model_card(self.bundle_name, info, self.config, self.calibration,
                                                         verify, probe, quantization, pruning,
                                                         runtime.get("device_steps"), built_on_device(bundle)))
        files = {p.relative_to(bundle).as_posix(): sha256_tree(p) for p in sorted(bundle.rglob("*")) if p.is_file()}
        manifest = {
            "bundle": self.bundle_name, "format": 2, "model": info.to_json(),
            "model_source_sha256": inputs["source"].sha256, "target": self.config["target"],
            "precision": self.config["precision"], "files": files, "toolchain": toolchain_versions(TOOLCHAIN),
            "config": self.config, "calibration": self.calibration, "splits": {
                "selection": quantization.selection.to_json() if quantization else None,
                "report": verify.split.to_json()},
            "metrics": metrics,
        }
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return StageOutput({"bundle": bundle}, {"files": len(files) + 1})


def check_bundle(bundle: Path) -> dict:
    """Re-hashes every file a bundle's manifest lists; raises IntegrityError on any difference."""
    bundle = Path(bundle)
    if not bundle.exists():
        raise InputError(f"bundle not found: {shown(bundle)}")
    if not bundle.is_dir():
        raise InputError(f"{shown(bundle)} is a file; a bundle is the folder a build published")
    if not (bundle / MANIFEST).exists():
        raise IntegrityError(f"{shown(bundle)}: no {MANIFEST}, so nothing can be checked (not a bundle, or its "
                             "manifest was removed)")
    try:
        manifest = read_json(bundle / MANIFEST, "bundle manifest")
    except InputError as exc:
        raise IntegrityError(str(exc)) from None
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise IntegrityError(f"{shown(bundle / MANIFEST)}: 'files' must map each file name to its sha256")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() or p.is_symlink()}
    present -= {MANIFEST}
    problems = [f"missing {n}" for n in sorted(set(listed) - present)]
    problems += [f"not in manifest: {n}" for n in sorted(present - set(listed))]
    problems += [f"a link, not a file: {n}" for n in sorted(set(listed) & present) if (bundle / n).is_symlink()]
    problems += [f"sha256 differs: {n}" for n in sorted(set(listed) & present)
                 if not (bundle / n).is_symlink() and sha256_tree(bundle / n) != listed[n]]
    if problems:
        raise IntegrityError(f"{shown(bundle)}: manifest does not check out: {'; '.join(problems)}")
    return manifest


def model_card(name: str, info: ModelInfo, config: dict, calibration: dict | None, verify: AccuracyReport,
               probe: SpeedReport | None, quantization: QuantizationReport | None = None,
               pruning: dict | None = None, device_steps: list[str] | None = None,
               device_files: list[str] | None = None) -> str:
    precision, target = config["precision"], config["target"]
    split = verify.split
    lines = [
        f"# {name}",
        "",
        f"{info.family} detector ({info.params:,} parameters, {len(info.names)} classes: "
        f"{', '.join(info.names)}), input {info.imgsz}x{info.imgsz} RGB, "
        f"built for target `{target}` at {precision.upper()}.",
        "",
        "## Accuracy (COCO mAP by pycocotools on the report split)" if verify.reference.kind == "accuracy" else
        "## Fidelity to the FP32 model (no labels were given)",
        "",
        f"Report split: {split.images} images from `{split.source}` (fingerprint {split.fingerprint[:16]}). "
        "No choice of the build was made on these images.",
        "",
    ]
    if verify.reference.kind == "fidelity":
        lines += ["These are not accuracy figures: each model's detections are scored (mAP50-95 by pycocotools) "
                  f"against the FP32 model's own detections at confidence {config['fidelity']['conf']} or above, "
                  "so FP32 scores itself and a lower number means the deployed model answers differently. `found` "
                  "is the share of the FP32 model's boxes the model finds again (same class, IoU ≥ 0.5).", ""]
    lines += [
        "| model | mAP50 | mAP50-95 | found |",
        "|---|---|---|---|",
        f"| FP32 ONNX (ONNX Runtime) | {verify.reference.map50:.4f} | {verify.reference.map50_95:.4f} | "
        f"{_found(verify.reference)} |",
    ]
    if verify.artifact is not None:
        lines.append(f"| {verify.artifact_label} | {verify.artifact.map50:.4f} | {verify.artifact.map50_95:.4f} | "
                     f"{_found(verify.artifact)} |")
        if verify.fidelity is not None:
            lines += ["", f"Fidelity of {verify.artifact_label} to the FP32 model on the same images: "
                      f"{verify.fidelity.describe()}."]
        lines += ["", f"mAP50-95 drop against FP32: {verify.drop_points:.2f} points "
                  f"(budget {verify.budget_points:.2f}{'' if verify.within_budget else ', missed'}).", ""]
        if precision in ("int4", "w4a8"):
            lines += ["INT4 weights are stored packed (half the bytes of INT8) and dequantized to float by the "
                      "runtime on every run: the saving is size on disk and in memory, not arithmetic. On "
                      "ONNX Runtime's CPU provider this model is slower than FP32; the probe below measures it.", ""]
    else:
        lines += ["", "The artifact is the FP32 ONNX model itself.", ""]
    if verify.original is not None:
        lines += [f"Against the original model before pruning (mAP50-95 {verify.original.map50_95:.4f} on the same "
                  f"images): {verify.total_drop_points:.2f} points lost in all (budget "
                  f"{verify.total_budget_points:.2f}).", ""]
    if device_files:
        lines += ["## Built on the device", "", "`built_on_device/` holds what the probe's device built and sent back "
                  f"({', '.join(device_files)}). It runs on that device's hardware and runtime version only; "
                  "any other device builds its own with the steps below.", ""]
    if device_steps:
        lines += ["## On the device", "", *device_steps, ""]
    if probe is None:
        lines += ["## Speed", "", f"Not measured: the `{target}` artifact becomes runnable only on the device, "
                  "where its engine is built; a timing taken here would describe another machine.", ""]
    else:
        lines += ["## Speed (model inference only, batch 1, on the device named below each row)", "",
                  "| model | runtime | p50 ms | p90 ms | p99 ms | FPS | load ms | peak RSS MB | power |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = [("FP32 ONNX", probe.reference)] + ([(probe.artifact_label, probe.artifact)] if probe.artifact
                                                   else [])
        for label, r in rows:
            cells = [reported(r.latency_ms.get(q)) for q in ("p50", "p90", "p99")]
            cells += [reported(r.fps), reported(r.load_ms), reported(r.memory_mb.get("peak_rss"))]
            lines.append(f"| {label} | {r.runtime} | {' | '.join(cells)} | "
                         f"{r.power_text()} |")
        device = probe.reference.device
        lines += ["", f"Device: {device.get('processor', 'unknown')} ({device.get('cpus', '?')} CPUs, "
                  f"{device.get('machine', '?')}), reached through the `{device['transport']['transport']}` "
                  "transport. Numbers from another machine will differ; run the probe on the device.", ""]
    if pruning:
        lines += ["## Pruning", "",
                  f"Structured channel pruning ({pruning['criterion']}), {pruning['stop']}. Each step is measured "
                  "after its fine-tuning: ONNX Runtime CPU p50 latency at 1 thread, mAP on the selection split.", "",
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
        selection = quantization.selection
        lines += [f"Choice: {quantization.choice}. Candidates were scored on the selection split "
                  f"({selection.images} images from `{selection.source}`), held out of calibration and never "
                  "reported.", ""]
        if quantization.float_units:
            lines += [f"{quantization.unit_kind.capitalize()}s kept float ({len(quantization.float_units)} of "
                      f"{quantization.units}): {', '.join(quantization.float_units)}.", ""]
    lines += ["## Using it", "",
              "`runtime.json` describes the input (letterboxed, RGB, scaled 1/255) and the two raw outputs. "
              "`postprocess.py` (numpy only) decodes them and runs NMS: "
              "`postprocess(box_dist[0], cls_logit[0], imgsz, strides)` gives x1, y1, x2, y2, score, class "
              "in input pixels.", ""]
    return "\n".join(lines)


def built_on_device(bundle: Path) -> list[str]:
    folder = bundle / "built_on_device"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _found(accuracy) -> str:
    return f"{accuracy.matched_boxes:.1%}" if accuracy.matched_boxes is not None else "—"


def publish(bundle: Path, output_dir: Path) -> tuple[Path, bool]:
    """Copies a released bundle to the output folder atomically; returns (path, changed).

    Never writes over something that is not a bundle of ours (a user's file or folder of the same name),
    and on a failed write (a full disk) the earlier bundle stays as it was.
    """
    from edge_deploy.pipeline.artifacts import atomic_dir

    final = Path(output_dir) / bundle.name
    if final.exists() or final.is_symlink():
        if not final.is_dir() or final.is_symlink() or not is_bundle(final):
            raise InputError(f"{shown(final)} exists and is not a bundle; it is left alone: move it away or choose "
                             "another --output")
    existing = final / MANIFEST
    if existing.exists() and existing.read_bytes() == (bundle / MANIFEST).read_bytes():
        try:
            check_bundle(final)
            return final, False
        except DeployError:
            pass  # damaged copy: replace it below
    try:
        with atomic_dir(final) as tmp:
            # File by file, so the first failure (a full disk) surfaces as itself, not as copytree's summary.
            for source in sorted(bundle.rglob("*")):
                copy = tmp / source.relative_to(bundle)
                if source.is_dir():
                    copy.mkdir(parents=True, exist_ok=True)
                else:
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, copy)
    except OSError as exc:
        raise write_failure(exc, final) from None
    return final, True
