"""Image sets for calibration and evaluation, identified by content, never by file name."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from calibration.preprocess import Preprocess, read_image
from pipeline.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_split(data_yaml: Path, split: str) -> Path:
    """The image folder of one split of an Ultralytics data YAML."""
    try:
        spec = yaml.safe_load(Path(data_yaml).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read data YAML {data_yaml}: {exc}") from None
    if not isinstance(spec, dict) or split not in spec:
        raise InputError(f"data YAML {data_yaml} has no '{split}' split")
    root = Path(data_yaml).parent
    if spec.get("path"):
        root = root / str(spec["path"])  # an absolute `path` replaces the yaml's folder
    folder = root / str(spec[split])
    if not folder.is_dir():
        raise InputError(f"data YAML {data_yaml}: '{split}' folder {folder} does not exist")
    return folder


def class_names(data_yaml: Path) -> list[str]:
    spec = yaml.safe_load(Path(data_yaml).read_text())
    names = spec.get("names")
    if isinstance(names, dict):
        return [names[k] for k in sorted(names)]
    if isinstance(names, list):
        return names
    raise InputError(f"data YAML {data_yaml} has no class names")


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


@dataclass(frozen=True)
class ImageSet:
    """Chosen images with their content hashes; the fingerprint covers contents and preprocessing."""

    source: str
    files: tuple[Path, ...]
    file_hashes: tuple[str, ...]
    preprocess: Preprocess
    skipped: int = 0
    labels: tuple[Path, ...] = field(default=())

    @property
    def fingerprint(self) -> str:
        payload = {"files": list(self.file_hashes), "preprocess": self.preprocess.params(),
                   "labels": [sha256_file(p) if p.exists() else None for p in self.labels]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "images": len(self.files), "skipped_unreadable": self.skipped,
                "fingerprint": self.fingerprint}


def calibration_set(source: Path, pre: Preprocess, size: int, seed: int, split: str = "train",
                    min_recommended: int = 100) -> ImageSet:
    """A seeded random sample of readable images from a folder or a data YAML's split."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"calibration source not found: {source}")
    folder = resolve_split(source, split) if source.is_file() else source
    candidates = _candidate_files(folder)
    if not candidates:
        raise InputError(f"calibration folder {folder} is empty")
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen, hashes, skipped = [], [], 0
    for index in order:
        if len(chosen) == size:
            break
        path = candidates[index]
        if path.suffix.lower() not in IMAGE_SUFFIXES or read_image(path) is None:
            skipped += 1
            continue
        chosen.append(path)
        hashes.append(sha256_file(path))
    if not chosen:
        raise InputError(f"calibration folder {folder}: none of its {len(candidates)} files is a readable image")
    if len(chosen) < min(size, min_recommended):
        warnings.warn(f"calibration set has only {len(chosen)} images; INT8 scales from so few are unreliable",
                      stacklevel=2)
    return ImageSet(str(folder), tuple(chosen), tuple(hashes), pre, skipped)


def labelled_split(data_yaml: Path, split: str, pre: Preprocess) -> ImageSet:
    """Every image of a split with its YOLO label file (missing label file = no objects)."""
    folder = resolve_split(data_yaml, split)
    files = [p for p in _candidate_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(f"data YAML {data_yaml}: '{split}' folder {folder} has no images")
    labels = tuple(label_path(p) for p in files)
    return ImageSet(str(folder), tuple(files), tuple(sha256_file(p) for p in files), pre, 0, labels)


def label_path(image: Path) -> Path:
    parts = list(image.parts)
    # Ultralytics' convention: the last 'images' folder in the path becomes 'labels'.
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")
