"""Plans a build from the resolved config and runs its stages through the engine."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from calibration.preprocess import Preprocess
from calibration.sets import ImageSet, calibration_set, class_names, labelled_split, warn_if_sizes_differ
from pipeline.artifacts import Artifact
from pipeline.config import BuildConfig
from pipeline.engine import Engine, StageRecord, write_build_record
from pipeline.errors import AccuracyGateError, ConfigError, InputError
from pipeline.stages.load import check_model_path

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


def embedded_data(home: Path) -> Path:
    from pipeline.embedded.shapes import ShapesSpec, generate

    return generate(Path(home) / "data", ShapesSpec())


def keep_fp32(model: Path, destination: Path) -> Path:
    """Copies the FP32 model beside the bundles (atomically) so a failed INT8 build still leaves it."""
    import shutil
    import tempfile

    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    os.close(fd)
    shutil.copyfile(model, tmp)
    os.replace(tmp, destination)
    return destination


def resolve_inputs(config: BuildConfig, home: Path):
    """Checks every user-given path before any stage runs, so bad input fails fast and writes nothing."""
    from targets import load_target

    target = load_target(config.target)()
    if config.precision is None:
        config.precision = target.default_precision
    if config.profile is not None:
        profiles = {p.name: p for p in target.profiles}
        if config.profile not in profiles:
            raise ConfigError(f"target {target.name} has no profile '{config.profile}'; its profiles: "
                              f"{', '.join(profiles) or 'none'}")
        if config.probe.threads is None:
            config.probe.threads = profiles[config.profile].threads
        if config.imgsz is None:
            config.imgsz = profiles[config.profile].imgsz
    if config.precision not in target.precisions:
        raise ConfigError(f"target {target.name} supports precisions {', '.join(target.precisions)}, "
                          f"not {config.precision}")
    model = check_model_path(config.model) if config.model else EMBEDDED_MODEL
    if config.data is not None and not Path(config.data).is_file():
        raise InputError(f"data YAML not found: {config.data}")
    source = config.calibration.source
    if source is not None and not Path(source).exists():
        raise InputError(f"calibration source not found: {source}")
    return target, model


def run_build(config: BuildConfig, home: Path, use_cache: bool = True,
              on_event: Callable[[str, str], None] = lambda s, e: None) -> BuildResult:
    from pipeline.stages.compile import CompileStage
    from pipeline.stages.export import ExportStage
    from pipeline.stages.load import LoadStage
    from pipeline.stages.probe import ProbeStage
    from pipeline.stages.prune import PruneStage
    from pipeline.stages.quantize import QuantizeStage
    from pipeline.stages.release import ReleaseStage, publish
    from pipeline.stages.verify import VerifyStage

    config = config.model_copy(deep=True)
    target, model_path = resolve_inputs(config, home)
    if config.data:
        data_yaml = Path(config.data)
    else:
        on_event("embedded data", "running")  # about 20 s, once per DEPLOY_HOME
        data_yaml = embedded_data(home)
        on_event("embedded data", "done")
    engine = Engine(Path(home) / "cache", use_cache, on_event)
    records: list[StageRecord] = []
    available: dict[str, Artifact] = {"source": Artifact.of(model_path)}

    def run(stage) -> StageRecord:
        record = engine.run(stage, available)
        available.update(record.artifacts)
        records.append(record)
        return record

    calibration: ImageSet | None = None
    if config.precision in target.calibrated_precisions:
        # Chosen before any stage runs, so an unusable calibration source fails at once. Which files are
        # chosen does not depend on preprocessing; the input size is filled in once the model is loaded.
        calibration = calibration_set(config.calibration.source or data_yaml, Preprocess(imgsz=0),
                                      config.calibration.size, config.calibration.seed, config.calibration.split,
                                      frames_dir=Path(home) / "video-frames")

    load = run(LoadStage(home, config.imgsz, class_names(data_yaml)))
    info = json.loads(load.artifacts["model_info"].path.read_text())
    preprocess = Preprocess(imgsz=info["imgsz"], layout="NCHW")
    val = labelled_split(data_yaml, "val", preprocess)
    if calibration is not None:
        calibration = dataclasses.replace(calibration, preprocess=preprocess)
        warn_if_sizes_differ(calibration, val)
    if config.prune.enabled:
        p = config.prune
        train = labelled_split(data_yaml, "train", preprocess)
        taylor_images = list(calibration_set(data_yaml, preprocess, 32, 0, "train", min_recommended=1).files) \
            if p.criterion == "taylor" else []
        pruned = run(PruneStage(home, val, data_yaml, train.fingerprint, p.ratio, p.target_params, p.target_macs,
                                p.criterion, p.global_ranking, p.round_to, p.steps, p.epochs, p.map_floor,
                                taylor_images))
        info = json.loads(pruned.artifacts["model_info"].path.read_text())

    export = run(ExportStage(home, config.export.opset, config.export.simplify, config.export.tolerance))
    q = config.quantize
    enforce_budget = q.on_budget_exceeded == "fail"
    try:
        if calibration is not None and config.precision not in target.quantizes_itself:
            run(QuantizeStage(config.precision, calibration, val, q.method, q.per_channel, q.symmetric,
                              q.budget(config.precision), q.on_budget_exceeded, q.min_sqnr_db, q.int4_method,
                              q.int4_group))
        run(CompileStage(target, config.precision, calibration, q.method, val, q.budget(config.precision),
                         q.min_sqnr_db))
        run(VerifyStage(target, config.precision, val, q.budget(config.precision), enforce_budget))
    except AccuracyGateError as exc:
        kept = keep_fp32(export.artifacts["onnx"].path, Path(config.output) / f"{info['family']}.fp32.onnx")
        raise AccuracyGateError(f"{exc}; the FP32 model is kept at {kept}") from None
    run(ProbeStage(target, config.precision, val.files[0], preprocess, config.probe.warmup, config.probe.runs,
                   config.probe.threads))
    bundle_name = f"{info['family']}{'-pruned' if config.prune.enabled else ''}-{target.name}-{config.precision}"
    release = run(ReleaseStage(bundle_name, config.model_dump(mode="json"),
                               calibration.describe() if calibration else None, val.describe(),
                               pruned=config.prune.enabled,
                               quantize_report=calibration is not None
                               and config.precision not in target.quantizes_itself))
    bundle, changed = publish(release.artifacts["bundle"].path, config.output)
    record_path = Path(config.output) / f"{bundle_name}.build.json"
    write_build_record(record_path, records, {"bundle": str(bundle), "model": str(model_path),
                                              "data": str(data_yaml)})
    return BuildResult(config, bundle, changed, records, record_path)
