"""Plans a build from the resolved config and runs its stages through the engine."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_deploy.calibration.preprocess import Preprocess
from edge_deploy.calibration.sets import (ImageSet, calibration_set, choice_splits, class_names, labelled_split,
                                          unlabelled_splits, validate_split, warn_if_sizes_differ)
from edge_deploy.pipeline.artifacts import Artifact, sha256_file, sweep_stale, temp_prefix
from edge_deploy.pipeline.config import BuildConfig
from edge_deploy.pipeline.engine import Engine, StageRecord, write_build_record
from edge_deploy.pipeline.errors import AccuracyGateError, ConfigError, InputError
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.stages.load import check_model_path
from edge_deploy.pipeline.userfiles import check_writable_folder, shown

EMBEDDED_MODEL = Path(__file__).parent / "embedded" / "yolov8n-shapes.pt"


@dataclass
class BuildResult:
    config: BuildConfig  # as resolved: the target's default precision filled in
    bundle: Path
    bundle_changed: bool
    records: list[StageRecord]
    record_path: Path

    def metrics(self, stage: str) -> dict:
        return next(r.metrics for r in self.records if r.name == stage)

    @property
    def accuracy(self):
        """The verify stage's typed report: the artifact against the FP32 reference on the report split."""
        from edge_deploy.pipeline.results import AccuracyReport

        return AccuracyReport.from_json(self.metrics("verify"))

    @property
    def speed(self):
        """The probe stage's typed report: the FP32 reference and the artifact, each on the device that ran it;
        None when the target's artifact can only be timed on its device."""
        from edge_deploy.pipeline.results import SpeedReport

        record = next((r for r in self.records if r.name == "probe"), None)
        return SpeedReport.from_json(record.metrics) if record else None


def embedded_data(home: Path) -> Path:
    from edge_deploy.pipeline.embedded.shapes import ShapesSpec, generate

    return generate(Path(home) / "data", ShapesSpec())


def keep_fp32(model: Path, destination: Path) -> Path:
    """Copies the FP32 model beside the bundles (atomically) so a failed INT8 build still leaves it."""
    import shutil
    import tempfile

    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(destination.name), dir=destination.parent)
    os.close(fd)
    try:
        shutil.copyfile(model, tmp)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return destination


def check_against_target(config: BuildConfig, target) -> None:
    """A build the target cannot do is refused from its declared capabilities, before any stage runs."""
    from edge_deploy.calibration.rules import PRECISIONS

    if config.precision not in target.precisions:
        raise ConfigError(f"target {target.name} supports precisions {', '.join(target.precisions)}, "
                          f"not {config.precision}")
    spec = PRECISIONS[config.precision]
    rules = target.quant_rules
    if spec.calibrated and rules is None:
        raise ConfigError(f"target {target.name} declares no quantization backend for {config.precision}")
    method = config.quantize.method
    if spec.activation_bits is not None and method != "auto" and method not in rules.methods:
        raise ConfigError(f"target {target.name}'s INT8 ({rules.name}) accepts quantize.method auto, "
                          f"{', '.join(rules.methods)}; not {method}")


def resolve_inputs(config: BuildConfig, home: Path):
    """Checks every user-given path and the target's capabilities before any stage runs."""
    from edge_deploy.targets import load_target

    # Where results go is checked before minutes of work, not when publishing; stale temporaries of a killed
    # build are swept while we are there.
    check_writable_folder(home, "DEPLOY_HOME folder")
    check_writable_folder(config.output, "output folder")
    sweep_stale(Path(home), depth=4)
    sweep_stale(Path(config.output), depth=1)
    target = load_target(config.target)()
    if config.precision is None:
        config.precision = target.default_precision
    # The device is checked now, not after minutes of work; it says which profile it is when the build does not.
    device = probe_device(config, target)[1] if config.probe.device else None
    if config.profile is None and device is not None:
        config.profile = device.profile
    if config.profile is None:
        config.profile = target.default_profile
    if config.profile is not None:
        profiles = {p.name: p for p in target.profiles}
        if config.profile not in profiles:
            raise ConfigError(f"target {target.name} has no profile '{config.profile}'; its profiles: "
                              f"{', '.join(profiles) or 'none'}")
        if config.probe.threads is None:
            config.probe.threads = profiles[config.profile].threads
        if config.imgsz is None:
            config.imgsz = profiles[config.profile].imgsz
    check_against_target(config, target)
    model = check_model_path(config.model) if config.model else EMBEDDED_MODEL
    if config.data is not None and not Path(config.data).is_file():
        raise InputError(f"data YAML not found: {shown(config.data)}" if not Path(config.data).exists() else
                         f"data YAML {shown(config.data)} is a folder; give the .yaml file inside it")
    source = config.calibration.source
    if source is not None and not Path(source).exists():
        raise InputError(f"calibration source not found: {shown(source)}")
    if config.model is not None and config.data is None:
        if source is None:
            raise InputError("--model without --data needs images to measure the model on: --calib IMAGES (a folder "
                             "or a video; no labels needed, the build then reports fidelity to the FP32 model) or "
                             "--data data.yaml (labelled)")
        if config.prune.enabled:
            raise ConfigError("pruning fine-tunes and measures on labelled images: pass --data data.yaml, or build "
                              "without --prune")
        if model.suffix.lower() != ".pt":
            raise InputError(f"{shown(model)} describes an untrained model; a build without --data needs a trained "
                             ".pt checkpoint (a model built from YAML takes its classes from --data)")
    return target, model


def model_name(info: dict, model_path: Path) -> str:
    """The Ultralytics family (yolov8n, ...) when the checkpoint names it, else the checkpoint's file name."""
    return info["family"] if info["family"] != "custom" else Path(model_path).stem


# The FP32 ONNX in ONNX Runtime is every build's reference; its probe runs on the same device as the artifact's
# when that device has ONNX Runtime, else on this machine (and then no speed-up is computed).
REFERENCE_TARGET = "cpu"


def probe_device(config: BuildConfig, target):
    """The inventory and the entry the probe runs on, checked against the build's target (before any stage
    runs)."""
    from edge_deploy.targets.transports.inventory import LOCAL, Inventory

    name = config.probe.device or LOCAL
    inventory = Inventory.load(config.probe.inventory)
    device = inventory.get(name)
    if device.target and device.target != target.name:
        raise ConfigError(f"device {name} runs target '{device.target}', the build is for '{target.name}'")
    return inventory, device


def probe_stage(config: BuildConfig, target, image: Path, preprocess, home: Path, bundle_name: str):
    """The probe, on this machine or on `probe.device`: held under the device's lock, each result stored as it
    arrives."""
    from edge_deploy.pipeline.bench import artifact_digest
    from edge_deploy.pipeline.resultstore import default_store
    from edge_deploy.pipeline.stages.probe import ProbeStage
    from edge_deploy.targets import load_target
    from edge_deploy.targets.transports.inventory import LOCAL, device_lock

    reference_target = load_target(REFERENCE_TARGET)()
    name = config.probe.device or LOCAL
    inventory, device = probe_device(config, target)
    transport = inventory.transport(name)
    reference_transport = transport
    if name != LOCAL:
        versions = ({} if not transport.runs_python_runners else
                    transport.describe(reference_target.runtime_packages).get("packages", {}))
        if not transport.runs_python_runners or any(v == "not installed" for v in versions.values()):
            reference_transport = inventory.transport(LOCAL)
    store = default_store(home)

    def hold(label: str):
        return device_lock(home, label, wait_s=device.timeout_s)

    def on_result(role: str, result, artifact_dir: Path, owner, precision: str) -> None:
        described = json.loads((artifact_dir / "runtime.json").read_text())
        files = {f: sha256_file(artifact_dir / f) for f in described.get("files", {}).values()}
        store.add(result, device=result.device["transport"].get("device", LOCAL),
                  artifact_sha256=artifact_digest(files), artifact_label=f"{owner.name} {precision}",
                  target=owner.name, precision=precision, bundle=bundle_name, role=role,
                  config={"warmup": config.probe.warmup, "runs": config.probe.runs, "threads": config.probe.threads})

    return ProbeStage(target, config.precision, image, preprocess, config.probe.warmup, config.probe.runs,
                      config.probe.threads, transport, reference_target, reference_transport, hold, on_result,
                      timeout=device.timeout_s)


def run_build(config: BuildConfig, home: Path, use_cache: bool = True,
              on_event: Callable[[str, str], None] = lambda s, e: None) -> BuildResult:
    from edge_deploy.calibration.rules import PRECISIONS
    from edge_deploy.pipeline.stages.compile import CompileStage
    from edge_deploy.pipeline.stages.export import ExportStage, OriginalExportStage
    from edge_deploy.pipeline.stages.load import LoadStage
    from edge_deploy.pipeline.stages.prune import PruneStage
    from edge_deploy.pipeline.stages.quantize import QuantizeStage
    from edge_deploy.pipeline.stages.reference import OriginalReferenceStage, ReferenceStage
    from edge_deploy.pipeline.stages.release import ReleaseStage, publish
    from edge_deploy.pipeline.stages.verify import VerifyStage

    config = config.model_copy(deep=True)
    target, model_path = resolve_inputs(config, home)
    spec = PRECISIONS[config.precision]
    label_free = config.model is not None and config.data is None
    data_yaml = None
    if config.data:
        data_yaml = Path(config.data)
    elif not label_free:
        on_event("embedded data", "running")  # about 20 s, once per DEPLOY_HOME
        data_yaml = embedded_data(home)
        on_event("embedded data", "done")
    engine = Engine(Path(home) / "cache", use_cache, on_event)
    try:
        records: list[StageRecord] = []
        available: dict[str, Artifact] = {"source": Artifact.of(model_path)}

        def run(stage) -> StageRecord:
            record = engine.run(stage, available)
            available.update(record.artifacts)
            records.append(record)
            return record

        # Which files are chosen does not depend on preprocessing; the input size is filled in once the model
        # is loaded. Chosen before any stage runs, so an unusable source fails at once.
        blank = Preprocess(imgsz=0)
        calibration: ImageSet | None = None
        if label_free:
            calibration, selection, report = unlabelled_splits(
                config.calibration.source, blank, config.calibration.size, config.selection.size,
                config.fidelity.report_size, config.calibration.seed, frames_dir=Path(home) / "video-frames")
            if not spec.calibrated:
                calibration = None
        else:
            names = class_names(data_yaml)
            selection, report = choice_splits(data_yaml, blank, config.selection.size, config.selection.seed)
            for split in (selection, report, *([labelled_split(data_yaml, "train", blank)] if config.prune.enabled
                                               else [])):
                validate_split(split, len(names))
            if spec.calibrated:
                calibration = calibration_set(config.calibration.source or data_yaml, blank, config.calibration.size,
                                              config.calibration.seed, config.calibration.split,
                                              frames_dir=Path(home) / "video-frames",
                                              exclude=frozenset(selection.file_hashes + report.file_hashes))

        # A checkpoint brings its own classes; a model built from YAML takes the data's.
        load = run(LoadStage(home, config.imgsz, class_names(data_yaml) if data_yaml else None))
        info = json.loads(load.artifacts["model_info"].path.read_text())
        profile = next((p for p in target.profiles if p.name == config.profile), None)
        if not config.prune.enabled:  # a pruned model is checked once it is pruned
            target.check_model(ModelInfo.from_json(info), profile)
        preprocess = Preprocess(imgsz=info["imgsz"], layout="NCHW")
        val = dataclasses.replace(report, preprocess=preprocess)
        selection = dataclasses.replace(selection, preprocess=preprocess)
        if calibration is not None:
            calibration = dataclasses.replace(calibration, preprocess=preprocess)
            warn_if_sizes_differ(calibration, val)
        original: dict[str, Artifact] | None = None
        if config.prune.enabled:
            # The unpruned model, exported and measured like the final one, is what the whole build is gated against.
            record = engine.run(OriginalExportStage(home, config.export.opset, config.export.simplify,
                                                    config.export.tolerance), available)
            records.append(record)
            original = {**available, **record.artifacts}
            record = engine.run(OriginalReferenceStage(selection, val, config.fidelity.conf), original)
            records.append(record)
            available["reference_original"] = record.artifacts["reference"]
            p = config.prune
            train = labelled_split(data_yaml, "train", preprocess)
            taylor_images = list(calibration_set(data_yaml, preprocess, 32, 0, "train", min_recommended=1,
                                                 exclude=frozenset(selection.file_hashes)).files) \
                if p.criterion == "taylor" else []
            pruned = run(PruneStage(home, selection, data_yaml, train.fingerprint, p.ratio, p.target_params,
                                    p.target_macs, p.criterion, p.global_ranking, p.round_to, p.steps, p.epochs,
                                    p.map_floor, taylor_images))
            info = json.loads(pruned.artifacts["model_info"].path.read_text())
            target.check_model(ModelInfo.from_json(info), profile)

        export = run(ExportStage(home, config.export.opset, config.export.simplify, config.export.tolerance))
        run(ReferenceStage(selection, val, config.fidelity.conf))
        q = config.quantize
        budget = q.budget(config.precision)
        bundle_name = (f"{model_name(info, model_path)}-{info['imgsz']}{'-pruned' if config.prune.enabled else ''}-"
                       f"{target.name}-{config.precision}")
        # Where a build stopped by its accuracy gate leaves what it measured; a later build that publishes drops it.
        rejected_path = Path(config.output) / f"{bundle_name}.rejected.json"
        label_free_images = None if data_yaml else str(config.calibration.source)
        try:
            if calibration is not None:
                # A TensorRT calibration cache names the TensorRT that reads it: the profile's, where it says.
                facts = next((p.facts for p in target.profiles if p.name == config.profile), {})
                run(QuantizeStage(target, config.precision, calibration, selection, q.method, q.symmetric, budget,
                                  q.on_budget_exceeded, q.int4_method, q.int4_group,
                                  **({"trt_version": facts["tensorrt"]} if "tensorrt" in facts else {})))
            run(CompileStage(target, config.precision, selection, q.min_sqnr_db, config.profile))
            run(VerifyStage(target, config.precision, val, budget, q.on_budget_exceeded == "fail",
                            budget + config.prune.max_map_drop if config.prune.enabled else None))
        except AccuracyGateError as exc:
            kept = keep_fp32(export.artifacts["onnx"].path,
                             Path(config.output) / f"{model_name(info, model_path)}-{info['imgsz']}.fp32.onnx")
            message = f"{exc}; the FP32 model is kept at {kept}"
            if exc.report is not None:
                write_build_record(rejected_path, records, {
                    "rejected_by": exc.stage, "error": message, "report": exc.report, "fp32_model": str(kept),
                    "model": str(model_path), "data": str(data_yaml) if data_yaml else None,
                    "label_free_images": label_free_images})
                message += f", and what {exc.stage} measured at {rejected_path}"
            raise AccuracyGateError(message, exc.stage, exc.report) from None
        # A target whose engine is built where it runs is timed only on a device; here it is not timed at all.
        probed = target.compile_runs_on == "host" or config.probe.device is not None
        if probed:
            run(probe_stage(config, target, val.files[0], preprocess, home, bundle_name))
        else:
            # Its artifact becomes runnable only where it is compiled: timing anything here would describe
            # another machine. The release says so instead of showing a number.
            on_event("probe", f"skipped: {target.name}'s engine is built and timed on the device (--device NAME)")
        release = run(ReleaseStage(bundle_name, config.model_dump(mode="json"),
                                   calibration.describe() if calibration else None, pruned=config.prune.enabled,
                                   quantize_report=calibration is not None, probed=probed,
                                   device_files="device_files" in available))
        bundle, changed = publish(release.artifacts["bundle"].path, config.output)
        record_path = Path(config.output) / f"{bundle_name}.build.json"
        rejected_path.unlink(missing_ok=True)
        write_build_record(record_path, records, {"bundle": str(bundle), "model": str(model_path),
                                                  "data": str(data_yaml) if data_yaml else None,
                                                  "label_free_images": label_free_images})
        return BuildResult(config, bundle, changed, records, record_path)
    finally:
        engine.close()  # results meant for this build only
