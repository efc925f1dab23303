"""The embedded default model exported at a chosen size, and calibration images as a build would pick them: the
setup the arm calibration and ranking benchmarks share."""

from __future__ import annotations

import json
from pathlib import Path

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.calibration.sets import calibration_set, choice_splits, class_names
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.build import EMBEDDED_MODEL, embedded_data
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.results import ModelInfo
from edge_deploy.pipeline.stages.export import ExportStage
from edge_deploy.pipeline.stages.load import LoadStage


def exported_embedded(home: Path, imgsz: int) -> tuple[Path, ModelInfo, Path]:
    """The embedded model's FP32 ONNX at `imgsz` (from the build cache when present), its info, the data YAML."""
    data = embedded_data(home)
    engine = Engine(home / "cache")
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(home, imgsz, class_names(data)), available).artifacts)
    available.update(engine.run(ExportStage(home, 17, True, 1e-4), available).artifacts)
    info = ModelInfo.from_json(json.loads(available["model_info"].path.read_text()))
    return available["onnx"].path, info, data


def calibration_images(data: Path, imgsz: int, count: int) -> tuple[list[Path], Preprocess]:
    """`count` train images, none of them in the selection or report split (as a build's calibration set)."""
    pre = Preprocess(imgsz=imgsz, layout="NCHW")
    selection, report = choice_splits(data, pre, 100, 0)
    chosen = calibration_set(data, pre, count, 0, "train", exclude=frozenset(selection.file_hashes + report.file_hashes))
    return list(chosen.files), pre


def calibration_tensors(data: Path, imgsz: int, count: int) -> list:
    files, pre = calibration_images(data, imgsz, count)
    return [load_tensor(p, pre)[0] for p in files]
