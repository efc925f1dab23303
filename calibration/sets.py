"""Image sets for calibration and evaluation, identified by content, never by file name."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from edge_deploy.calibration.preprocess import Preprocess, read_image
from edge_deploy.pipeline.artifacts import atomic_dir, sha256_file
from edge_deploy.pipeline.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


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

    def head(self, count: int) -> "ImageSet":
        """The first `count` images (a smaller set with the same preprocessing)."""
        return ImageSet(self.source, self.files[:count], self.file_hashes[:count], self.preprocess, self.skipped,
                        self.labels[:count])


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def calibration_set(source: Path, pre: Preprocess, size: int, seed: int, split: str = "train",
                    min_recommended: int = 100, frames_dir: Path | None = None,
                    exclude: frozenset[str] = frozenset()) -> ImageSet:
    """A seeded sample of readable images from a folder, a data YAML's split or a video file.

    Where YOLO labels sit beside the images, the sample is class-stratified:
    classes take turns, so a rare class is represented instead of drowned.
    Images whose content hash is in `exclude` (the selection split) are never chosen.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"calibration source not found: {source}")
    if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
        if frames_dir is None:
            raise InputError("a video calibration source needs a folder for its frames")
        candidates = video_frames(source, size, seed, frames_dir)
        folder = source
    else:
        folder = resolve_split(source, split) if source.is_file() else source
        candidates = _candidate_files(folder)
    if not candidates:
        raise InputError(f"calibration folder {folder} is empty")
    order = _sampling_order(candidates, seed)
    chosen, hashes, skipped = [], [], 0
    for path in order:
        if len(chosen) == size:
            break
        if path.suffix.lower() not in IMAGE_SUFFIXES or read_image(path) is None:
            skipped += 1
            continue
        digest = sha256_file(path)
        if digest in exclude:
            continue
        _check_channels(path)
        chosen.append(path)
        hashes.append(digest)
    if not chosen:
        raise InputError(f"calibration folder {folder}: none of its {len(candidates)} files is a readable image")
    if len(chosen) < min(size, min_recommended):
        warnings.warn(f"calibration set has only {len(chosen)} images; INT8 scales from so few are unreliable",
                      stacklevel=2)
    return ImageSet(str(folder), tuple(chosen), tuple(hashes), pre, skipped)


def median_size(files, limit: int = 50) -> tuple[int, int]:
    """Approximate median (width, height) of up to `limit` images.

    Images are decoded at an eighth of their size (JPEG does that cheaply), so sizes are known to within 8
    pixels: plenty for spotting a 2x difference in scale.
    """
    import cv2

    sizes = []
    for path in list(files)[:limit]:
        image = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_8)
        full = cv2.imread(str(path)) if image is None else None
        shape = (full if full is not None else image).shape
        scale = 1 if full is not None else 8
        sizes.append((shape[1] * scale, shape[0] * scale))
    widths, heights = zip(*sizes)
    return int(np.median(widths)), int(np.median(heights))


def warn_if_sizes_differ(calibration: "ImageSet", val: "ImageSet", factor: float = 2.0) -> None:
    """Letterboxing makes any size usable, but objects at another scale give other activation ranges."""
    cw, ch = median_size(calibration.files)
    vw, vh = median_size(val.files)
    ratio = max(cw / vw, vw / cw, ch / vh, vh / ch)
    if ratio > factor:
        warnings.warn(f"calibration images (median {cw}x{ch}) and validation images (median {vw}x{vh}) differ in "
                      f"size by {ratio:.1f}x: INT8 ranges are measured at a scale the model will not see", stacklevel=2)


def _check_channels(path: Path) -> None:
    """Inference feeds 3-channel colour; a grey or 4-channel image would calibrate for other inputs."""
    import cv2

    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels != 3:
        raise InputError(f"calibration image {path} has {channels} channel{'s' * (channels > 1)}; "
                         "the model is fed 3-channel colour images")


def _sampling_order(candidates: list[Path], seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    shuffled = [candidates[i] for i in rng.permutation(len(candidates))]
    by_class: dict[int, list[Path]] = {}
    unlabelled = []
    for path in shuffled:
        classes = _label_classes(label_path(path))
        if classes is None:
            unlabelled.append(path)
            continue
        for c in sorted(classes) or [-1]:
            by_class.setdefault(c, []).append(path)
    if not by_class:
        return shuffled
    order, seen = [], set()
    queues = [by_class[c] for c in sorted(by_class)]
    while any(queues):
        for queue in queues:
            while queue:
                path = queue.pop(0)
                if path not in seen:
                    seen.add(path)
                    order.append(path)
                    break
    return order + [p for p in unlabelled if p not in seen]


def _label_classes(path: Path) -> set[int] | None:
    if not path.exists():
        return None
    classes = set()
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and fields[0].isdigit():
            classes.add(int(fields[0]))
    return classes


def video_frames(video: Path, count: int, seed: int, frames_dir: Path) -> list[Path]:
    """`count` frames spread evenly over the video (seeded offset), written once as PNG under frames_dir."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    if total <= 0:
        capture.release()
        raise InputError(f"calibration video {video} has no readable frames")
    step = max(total / count, 1.0)
    offset = np.random.default_rng(seed).uniform(0, step)
    wanted = sorted({min(int(offset + i * step), total - 1) for i in range(min(count, total))})
    folder = Path(frames_dir) / f"{sha256_file(video)[:16]}-{count}-{seed}"
    if not folder.is_dir():
        with atomic_dir(folder) as tmp:
            for index in wanted:
                capture.set(cv2.CAP_PROP_POS_FRAMES, index)
                ok, frame = capture.read()
                if ok:
                    cv2.imwrite(str(tmp / f"frame_{index:07d}.png"), frame)
    capture.release()
    frames = sorted(folder.glob("*.png"))
    if not frames:
        raise InputError(f"calibration video {video}: no frame could be decoded")
    return frames


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


def choice_splits(data_yaml: Path, pre: Preprocess, size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(selection, report): labelled images the build's choices are made on, and the ones it reports.

    Choosing a quantization method, a float fallback or a pruning step on the
    split that is then reported makes the reported drop optimistic; choosing on
    training images measures a model on what it memorised (the embedded
    detector loses about 0.8 points more INT8 mAP there than on unseen images).
    So the selection images come from a `selection` split of the data YAML when
    it has one, else from a seeded part of `val` (at most half), and the report
    is the rest of `val`.
    """
    spec = _read_data_yaml(data_yaml)
    val = labelled_split(data_yaml, "val", pre)
    if "selection" in spec:
        return labelled_split(data_yaml, "selection", pre), val
    if len(val.files) < 2:
        raise InputError(f"data YAML {data_yaml}: the val split needs at least 2 images, one part to make the "
                         "build's choices on and one to report, or give a 'selection' split")
    count = max(1, min(size, len(val.files) // 2))
    chosen = set(np.random.default_rng(seed).permutation(len(val.files))[:count].tolist())
    if count < min(size, 50):
        warnings.warn(f"the selection split has only {count} images (half of val): choices made on so few images "
                      "are noisy; add a 'selection' split to the data YAML", stacklevel=2)

    def part(indices: list[int], label: str) -> ImageSet:
        return ImageSet(f"{val.source} ({label})", tuple(val.files[i] for i in indices),
                        tuple(val.file_hashes[i] for i in indices), pre, 0, tuple(val.labels[i] for i in indices))

    rest = [i for i in range(len(val.files)) if i not in chosen]
    return part(sorted(chosen), f"{count} held out for selection"), part(rest, "the rest, reported")


def _read_data_yaml(data_yaml: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(data_yaml).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read data YAML {data_yaml}: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise InputError(f"data YAML {data_yaml}: expected a mapping with train, val and names")
    return spec
