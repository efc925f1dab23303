"""Plans a build from the resolved config and runs its stages through the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from calibration.preprocess import Preprocess
from calibration.sets import ImageSet, calibration_set, labelled_split
from pipeline.artifacts import Artifact
from pipeline.config import BuildConfig
from pipeline.engine import Engine, StageRecord, write_build_record
from pipeline.errors import ConfigError, InputError
from pipeline.stages.load import check_model_path

EMBEDDED_MODEL = Path(__file__).parent / "embedded" / "yolov8n-shapes.pt"


@dataclass
class BuildResult:
    bundle: Path
    bundle_changed: bool
    records: list[StageRecord]
    record_path: Path

    def metrics(self, stage: str) -> dict:
        return next(r.metrics for r in self.records if r.name == stage)


def embedded_data(home: Path) -> Path:
    from pipeline.embedded.shapes import ShapesSpec, generate

    return generate(Path(home) / "data", ShapesSpec())


def resolve_inputs(config: BuildConfig, home: Path):
    """Checks every user-given path before any stage runs, so bad input fails fast and writes nothing."""
    from targets import load_target

    target = load_target(config.target)()
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
    from pipeline.stages.quantize import QuantizeStage
    from pipeline.stages.release import ReleaseStage, publish
    from pipeline.stages.verify import VerifyStage

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

    load = run(LoadStage(home, config.imgsz))
    info = json.loads(load.artifacts["model_info"].path.read_text())
    preprocess = Preprocess(imgsz=info["imgsz"], layout="NCHW")
    val = labelled_split(data_yaml, "val", preprocess)
    calibration: ImageSet | None = None
    if config.precision in target.calibrated_precisions:
        calibration = calibration_set(config.calibration.source or data_yaml, preprocess,
                                      config.calibration.size, config.calibration.seed)

    run(ExportStage(home, config.export.opset, config.export.simplify, config.export.tolerance))
    if calibration is not None:
        run(QuantizeStage(calibration, config.quantize.method, config.quantize.per_channel,
                          config.quantize.min_sqnr_db))
    run(CompileStage(target, config.precision))
    run(VerifyStage(target, config.precision, val, config.quantize.max_map_drop))
    run(ProbeStage(target, config.precision, val.files[0], preprocess, config.probe.warmup, config.probe.runs,
                   config.probe.threads))
    bundle_name = f"{info['family']}-{target.name}-{config.precision}"
    release = run(ReleaseStage(bundle_name, config.model_dump(mode="json"),
                               calibration.describe() if calibration else None, val.describe()))
    bundle, changed = publish(release.artifacts["bundle"].path, config.output)
    record_path = Path(config.output) / f"{bundle_name}.build.json"
    write_build_record(record_path, records, {"bundle": str(bundle), "model": str(model_path),
                                              "data": str(data_yaml)})
    return BuildResult(bundle, changed, records, record_path)
