"""release: the artifact, its post-processing, metrics, a model card (README.md), the build report and a manifest
of sha256 sums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edge_deploy.pipeline.artifacts import Artifact, sha256_tree
from edge_deploy.pipeline.engine import Stage, StageOutput, toolchain_versions
from edge_deploy.pipeline.errors import DeployError, InputError, IntegrityError
from edge_deploy.pipeline.userfiles import is_bundle, read_json, shown, write_failure
from edge_deploy.pipeline.report import ReportInputs, near_tie_rule, render_html, render_markdown
from edge_deploy.pipeline.results import (AccuracyReport, ModelInfo, QuantizationReport, ReferenceAccuracy,
                                          SpeedReport, UNSURE_FRACTION, UNSURE_NMS_MARGIN, reported)

MANIFEST = "manifest.json"
MODEL_CARD = "README.md"
REPORT_HTML, REPORT_MD = "report.html", "report.md"
TOOLCHAIN = ("edge-deploy", "torch", "ultralytics", "onnx", "onnxslim", "onnxruntime", "pycocotools", "numpy",
             "opencv-python")


class ReleaseStage(Stage):
    name = "release"
    toolchain = TOOLCHAIN
    inputs = ("source", "model_info", "artifact", "verify_report", "reference")
    wants_timeline = True

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
        (bundle / MODEL_CARD).write_text(model_card(self.bundle_name, info, self.config, self.calibration,
                                                    verify, probe, quantization, pruning,
                                                    runtime.get("device_steps"), built_on_device(bundle), runtime,
                                                    guides(bundle)))
        toolchain = toolchain_versions(TOOLCHAIN)
        reference = ReferenceAccuracy.from_json(json.loads(inputs["reference"].path.read_text()))
        report = ReportInputs(self.bundle_name, info, self.config, self.calibration, toolchain, verify, probe,
                              quantization, reference.selection if quantization else None, pruning,
                              tuple(self.timeline))
        (bundle / REPORT_HTML).write_text(render_html(report))
        (bundle / REPORT_MD).write_text(render_markdown(report))
        files = {p.relative_to(bundle).as_posix(): sha256_tree(p) for p in sorted(bundle.rglob("*")) if p.is_file()}
        manifest = {
            "bundle": self.bundle_name, "format": 2, "model": info.to_json(),
            "model_source_sha256": inputs["source"].sha256, "target": self.config["target"],
            "precision": self.config["precision"], "files": files, "toolchain": toolchain,
            "config": self.config, "calibration": self.calibration, "splits": {
                "selection": quantization.selection.to_json() if quantization else None,
                "report": verify.split.to_json()},
            "metrics": metrics,
        }
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return StageOutput({"bundle": bundle}, {"files": len(files) + 1})


def _interval(interval: list | None, form: str) -> str:
    return "not computed" if interval is None else f"{interval[0]:{form}}..{interval[1]:{form}}"


def _drop_interval(interval: list | None, verify: AccuracyReport) -> str:
    if interval is None:
        return ""
    settings = verify.bootstrap or {}
    how = f", {settings['resamples']} resamples" if settings.get("resamples") else ""
    if settings.get("drawing_an_object"):
        how += f", {settings['drawing_an_object']} of which draw an object (the others have no mAP)"
    return (f" (95% interval {interval[0]:.2f}..{interval[1]:.2f}: paired bootstrap over the {verify.split.images} "
            f"report images{how})")


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
               device_files: list[str] | None = None, runtime: dict | None = None,
               guides: list[str] | None = None) -> str:
    """The bundle's README.md: what the model is, how to load it, its numbers and the images they come from, its
    limits."""
    precision, target = config["precision"], config["target"]
    split = verify.split
    runtime = runtime or {}
    artifact_files = sorted((runtime.get("files") or {}).values())
    lines = [
        f"# {name}",
        "",
        f"{info.family} object detector ({info.params:,} parameters, {len(info.names)} classes: "
        f"{', '.join(info.names)}), input {info.imgsz}x{info.imgsz} RGB, "
        f"built for target `{target}` at {precision.upper()}"
        f"{' after structured pruning' if pruning else ''} from `{info.source}` by edge-deploy.",
        "",
        f"Files: the model ({', '.join(f'`{f}`' for f in artifact_files) or 'see `runtime.json`'}), "
        "`runtime.json` (its input and outputs), `postprocess.py` (decode and NMS, numpy only), `metrics.json`, "
        "`report.html` (the build report: stage timeline, accuracy per artifact, latency distributions, pruning "
        "and quantization plots; one file that opens offline in any browser), `report.md` (its numbers as "
        "tables) and `manifest.json` (the sha256 of every file; `deploy check FOLDER` re-hashes them).",
        "",
    ]
    lines += _loading(runtime, info, device_steps, guides or [])
    lines += [
        "## Accuracy (COCO mAP by pycocotools on the report split)" if verify.reference.kind == "accuracy" else
        "## Fidelity to the FP32 model (no labels were given)",
        "",
        f"Report split: {split.images} images from `{split.source}` (fingerprint {split.fingerprint[:16]}). "
        "No choice of the build was made on these images. The models were scored on the build machine.",
        "",
    ]
    if verify.reference.kind == "fidelity":
        lines += ["These are not accuracy figures: each model's detections are scored (mAP50-95 by pycocotools) "
                  f"against the FP32 model's own detections at confidence {config['fidelity']['conf']} or above, "
                  "so FP32 scores itself and a lower number means the deployed model answers differently. Its "
                  f"detections from {UNSURE_FRACTION:g} of that confidence up to it, and those NMS keeps or drops only "
                  f"within {UNSURE_NMS_MARGIN:g} of its IoU, are neither required nor counted wrong; "
                  f"{near_tie_rule(verify.artifact)}. `found` is the share of the FP32 model's confident boxes the "
                  "model finds again at the same confidence (same class, IoU ≥ 0.5), with how far the found boxes' "
                  "sides are from FP32's on average, in image pixels.", ""]
    lines += [
        "| model | mAP50 | mAP50-95 | its 95% interval | found |",
        "|---|---|---|---|---|",
        f"| FP32 ONNX (ONNX Runtime) | {verify.reference.map50:.4f} | {verify.reference.map50_95:.4f} | "
        f"{_interval(verify.reference.map50_95_interval, '.4f')} | {_found(verify.reference)} |",
    ]
    if verify.artifact is not None:
        lines.append(f"| {verify.artifact_label} | {verify.artifact.map50:.4f} | {verify.artifact.map50_95:.4f} | "
                     f"{_interval(verify.artifact.map50_95_interval, '.4f')} | {_found(verify.artifact)} |")
        if verify.fidelity is not None:
            lines += ["", f"Fidelity of {verify.artifact_label} to the FP32 model on the same images: "
                      f"{verify.fidelity.describe()}."]
        lines += ["", f"mAP50-95 drop against FP32: {verify.drop_points:.2f} points"
                  f"{_drop_interval(verify.drop_interval, verify)} "
                  f"(budget {verify.budget_points:.2f}{'' if verify.within_budget else ', missed'}).", ""]
        if precision in ("int4", "w4a8"):
            lines += ["INT4 weights are stored packed (half the bytes of INT8) and dequantized to float by the "
                      "runtime on every run: the saving is size on disk and in memory, not arithmetic. On "
                      "ONNX Runtime's CPU provider this model is slower than FP32; the probe below measures it.", ""]
    else:
        lines += ["", "The artifact is the FP32 ONNX model itself.", ""]
    if verify.original is not None:
        lines += [f"Against the original model before pruning (mAP50-95 {verify.original.map50_95:.4f} on the same "
                  f"images): {verify.total_drop_points:.2f} points lost in all"
                  f"{_drop_interval(verify.total_drop_interval, verify)} (budget "
                  f"{verify.total_budget_points:.2f}).", ""]
    if verify.threads is not None:
        lines += [f"Scored with {verify.threads} runtime thread{'s' * (verify.threads != 1)} (accuracy does not "
                  "depend on the thread count; one gives the same numbers on every machine).", ""]
    if verify.flags:
        lines += ["### Warnings about these figures", "", *[f"- {flag['message']}" for flag in verify.flags], ""]
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
        rows = [(probe.reference_label, probe.reference)] + ([(probe.artifact_label, probe.artifact)]
                                                             if probe.artifact else [])
        for label, r in rows:
            cells = [reported(r.latency_ms.get(q)) for q in ("p50", "p90", "p99")]
            cells += [reported(r.fps), reported(r.load_ms), reported(r.memory_mb.get("peak_rss"))]
            lines.append(f"| {label} | {r.runtime} | {' | '.join(cells)} | "
                         f"{r.power_text()} |")
        device = probe.reference.device
        timed = probe.artifact or probe.reference
        lines += ["", f"Device: {device.get('processor', 'unknown')} ({device.get('cpus', '?')} CPUs, "
                  f"{device.get('machine', '?')}), reached through the `{device['transport']['transport']}` "
                  f"transport. Timed on one real image of the report split, preprocessed as above: {timed.runs} "
                  f"runs after {warmup_text(timed)}. Numbers from another machine will differ; run the probe on "
                  "the device.", ""]
        if probe.speedup_p50 is not None:
            lines += [f"{probe.speedup_text()}.", ""]
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
        if quantization.float_for_speed:
            lines += [f"Kept float because INT8 is slower there: {', '.join(quantization.float_for_speed)}.", ""]
        if quantization.float_outputs:
            lines += ["Kept float so that the outputs, and where the rules say so the inputs of the layers that "
                      f"compute them, are not rounded to 8 bits: {', '.join(quantization.float_outputs)}.", ""]
        for how in dict.fromkeys(quantization.rewritten.values()):
            units = [unit for unit, its in quantization.rewritten.items() if its == how]
            lines += [f"Rewritten for speed, with the same values: {', '.join(units)}; {how}.", ""]
    lines += _limits(info, config, verify, probe, quantization, pruning)
    return "\n".join(lines)


def warmup_text(timed) -> str:
    runs = f"{timed.warmup} warm-up runs" if timed.warmup is not None else None
    if timed.extra.get("warmup_ms") is not None:  # a runtime that warms up for a time (trtexec), then maybe runs
        during = f"{timed.extra['warmup_ms']} ms of warm-up"
        return f"{during}, then {runs}" if timed.warmup else during
    return runs or "the runtime's own warm-up"


def _loading(runtime: dict, info: ModelInfo, device_steps: list[str] | None, guides: list[str]) -> list[str]:
    """How to run the artifact in a few lines, chosen by the artifact's file format as runtime.json lists it."""
    files = runtime.get("files") or {}
    spec = runtime.get("input") or {}
    outputs = runtime.get("outputs") or {}
    # runtime.json names each output as the runtime knows it, and says which of the two raw maps it is.
    named = {desc.split(":")[0]: name for name, desc in outputs.items()}
    box, cls = named.get("box_dist", "box_dist"), named.get("cls_logit", "cls_logit")
    model = files.get("model", "")
    lines = ["## Loading it", ""]
    if device_steps:
        lines += ["Its runtime runs on the device: see *On the device* below. To try it on a PC first, the same "
                  "ONNX file runs in ONNX Runtime, which is how the build scored it:", ""]
    elif guides:
        lines += [f"Its runtime is built into the device's own project: see {', '.join(f'`{g}`' for g in guides)}. "
                  "The model's input and outputs are described in `runtime.json`.", ""]
    else:
        lines += ["In Python, from this folder (`pip install numpy opencv-python` and the runtime's package):", ""]
    if model.endswith(".onnx"):
        run = ["import onnxruntime as ort", "",
               f'session = ort.InferenceSession("{model}", providers=["CPUExecutionProvider"])',
               f'box_dist, cls_logit = session.run(["{box}", "{cls}"], {{"{spec.get("name", "images")}": x}})']
    elif "param" in files and "bin" in files:
        fp16 = runtime.get("precision") == "fp16"
        run = ["import ncnn", "",
               "net = ncnn.Net()",
               f"net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = {fp16}",
               f'net.load_param("{files["param"]}")',
               f'net.load_model("{files["bin"]}")',
               "extractor = net.create_extractor()",
               "# ncnn.Mat does not copy the array: x stays alive, and the Mat is cloned.",
               f'extractor.input("{spec.get("name", "in0")}", ncnn.Mat(np.ascontiguousarray(x[0])).clone())',
               f'box_dist = np.array(extractor.extract("{box}")[1])[None]',
               f'cls_logit = np.array(extractor.extract("{cls}")[1])[None]']
    else:
        if not guides:
            lines += [f"`runtime.json` lists the artifact's files ({', '.join(sorted(files.values()))}), its input "
                      "and its two raw outputs; load them with the target's runtime.", ""]
        return lines + _postprocess_note(info)
    layout = spec.get("layout", "NCHW")
    lines += ["```python", "import json", "", "import cv2", "import numpy as np", run[0], "",
              "from postprocess import postprocess", "",
              'spec = json.load(open("runtime.json"))',
              'size = spec["input"]["imgsz"]',
              "# Letterbox exactly as the build did: keep the aspect ratio, pad with grey 114, RGB, scale 1/255.",
              'image = cv2.imread("image.jpg")',
              "ratio = min(size / image.shape[0], size / image.shape[1])",
              "w, h = round(image.shape[1] * ratio), round(image.shape[0] * ratio)",
              "left, top = round((size - w) / 2 - 0.1), round((size - h) / 2 - 0.1)",
              "canvas = np.full((size, size, 3), 114, np.uint8)",
              "canvas[top:top + h, left:left + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)",
              ("x = canvas[None, :, :, ::-1].astype(np.float32) / 255  # NHWC" if layout == "NHWC" else
               "x = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255  # NCHW"),
              *run[2:],
              'detections = postprocess(box_dist[0], cls_logit[0], size, spec["strides"])',
              "# x1, y1, x2, y2 back in the image's pixels; then score and class index (spec[\"names\"]).",
              "boxes = (detections[:, :4] - [left, top, left, top]) / ratio",
              "```", ""]
    return lines + _postprocess_note(info)


def _postprocess_note(info: ModelInfo) -> list[str]:
    return ["`postprocess(box_dist[0], cls_logit[0], imgsz, strides, conf=0.25, iou=0.7, max_det=300)` decodes "
            "one image's raw maps and runs NMS; it gives rows of x1, y1, x2, y2, score, class in input pixels "
            f"(0..{info.imgsz}).", ""]


def _limits(info: ModelInfo, config: dict, verify: AccuracyReport, probe: SpeedReport | None,
            quantization: QuantizationReport | None, pruning: dict | None) -> list[str]:
    split = verify.split
    limits = [f"It was exported, checked and measured at {info.imgsz}x{info.imgsz} input only, and detects only "
              f"its {len(info.names)} classes ({', '.join(info.names)}).",
              f"Its figures come from {split.images} images of `{split.source}`: on other images (another camera, "
              "scene or object scale) accuracy will differ; measure it on your own images before relying on it."]
    if verify.reference.kind == "fidelity":
        limits.append("No labels were given, so its accuracy is unknown: the figures say how closely it follows "
                      "the FP32 model, not how often either is right.")
    if verify.artifact is not None and config["precision"] != "fp32":
        limits.append(f"It is {config['precision'].upper()}: it needs the same preprocessing as above (letterbox, "
                      "grey 114, RGB, 1/255); any other input scaling loses more than the figures say.")
    if not verify.within_budget or (verify.total_drop_points is not None
                                    and verify.total_drop_points > verify.total_budget_points):
        limits.append("Its accuracy loss is over the build's budget: it was published with --accept-drop.")
    if probe is None:
        limits.append("Its speed was not measured.")
    else:
        limits.append("Its speed was measured on one device only (above); on any other it will differ.")
    if pruning and pruning["steps"] and not pruning["steps"][-1]["fine_tuned"]:
        limits.append("It was pruned without fine-tuning, so the accuracy lost to pruning was not recovered.")
    if quantization is not None and not quantization.within_budget:
        limits.append("No quantization candidate met the budget on the selection split; the one with the smallest "
                      "drop was kept.")
    return ["## Limits", "", *(f"- {line}" for line in limits), ""]


def guides(bundle: Path) -> list[str]:
    """READMEs a target ships inside the artifact (a firmware project's), named in the model card."""
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.glob("*/README.md"))


def built_on_device(bundle: Path) -> list[str]:
    folder = bundle / "built_on_device"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _found(accuracy) -> str:
    return accuracy.found_text() or "—"


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
