"""Image sets for calibration and evaluation, identified by content, never by file name."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_deploy.calibration.preprocess import Preprocess, read_image
from edge_deploy.pipeline.artifacts import atomic_dir, sha256_file
from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.userfiles import read_text, read_yaml, shown

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def resolve_split(data_yaml: Path, split: str) -> Path:
    """The image folder of one split of an Ultralytics data YAML."""
    spec = _read_data_yaml(data_yaml)
    if split not in spec:
        raise InputError(f"data YAML {shown(data_yaml)} has no '{split}' split")
    if not isinstance(spec[split], str) or not spec[split].strip():
        raise InputError(f"data YAML {shown(data_yaml)}: '{split}' must be a folder path (a list of folders or "
                         "image list files is not supported)")
    root = Path(data_yaml).parent
    if spec.get("path"):
        if not isinstance(spec["path"], str):
            raise InputError(f"data YAML {shown(data_yaml)}: 'path' must be a folder path")
        root = root / spec["path"]  # an absolute `path` replaces the yaml's folder
    folder = root / spec[split]
    if not folder.is_dir():
        raise InputError(f"data YAML {shown(data_yaml)}: '{split}' folder {shown(folder)} does not exist")
    return folder


def class_names(data_yaml: Path) -> list[str]:
    names = _read_data_yaml(data_yaml).get("names")
    if isinstance(names, dict) and names and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise InputError(f"data YAML {shown(data_yaml)}: 'names' must number the classes 0..{len(names) - 1} "
                             "without gaps")
        names = [names[k] for k in sorted(names)]
    if isinstance(names, list) and names and all(isinstance(n, (str, int, float)) for n in names):
        return [str(n) for n in names]
    raise InputError(f"data YAML {shown(data_yaml)} has no usable class names ('names': a list, or a mapping "
                     "0: name, 1: name, ...)")


def validate_split(split: "ImageSet", num_classes: int) -> None:
    """Every image of a labelled split decodes, and every label file is YOLO text: 'class x y w h' per line,
    class in range, coordinates in 0..1.

    Run before any stage: a label naming a class the data does not have would otherwise be scored as nothing
    and publish a meaningless mAP, and an undecodable image would stop the build only after minutes of work.
    """
    for image, label in zip(split.files, split.labels):
        if read_image(image) is None:
            raise InputError(f"{shown(image)} in {shown(split.source)} is not a readable image; remove it or "
                             "replace it")
        if label.exists() or label.is_symlink():
            parse_label_file(label, num_classes)


def parse_label_file(path: Path, num_classes: int | None = None) -> list[tuple[int, float, float, float, float]]:
    """(class, x_centre, y_centre, w, h) normalised, from a YOLO label file; InputError naming file:line."""
    rows = []
    for number, line in enumerate(read_text(path, "label file").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"label file {shown(path)}:{number}"
        if len(fields) != 5:
            raise InputError(f"{where}: expected 5 numbers 'class x y w h', got {len(fields)}")
        try:
            cls = int(fields[0])
            x, y, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise InputError(f"{where}: expected an integer class and 4 numbers, got {line.strip()[:60]!r}") from None
        if cls < 0 or (num_classes is not None and cls >= num_classes):
            raise InputError(f"{where}: class {cls} is not one of the data's {num_classes} classes "
                             f"(0..{num_classes - 1})")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x, y, w, h)):
            raise InputError(f"{where}: coordinates must be normalised to 0..1, got {' '.join(fields[1:])}")
        if w == 0 or h == 0:
            raise InputError(f"{where}: a box of zero width or height")
        rows.append((cls, x, y, w, h))
    return rows


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
        if source.is_file() and source.suffix.lower() not in (".yaml", ".yml"):
            raise InputError(f"calibration source {shown(source)} is a file that is neither a data YAML (.yaml) nor "
                             f"a video ({', '.join(sorted(VIDEO_SUFFIXES))}); give a folder of images, a data YAML "
                             "or a video")
        folder = resolve_split(source, split) if source.is_file() else source
        candidates = _candidate_files(folder)
    if not candidates:
        raise InputError(f"calibration folder {shown(folder)} is empty")
    order = _sampling_order(candidates, seed)
    chosen, hashes, stored, skipped = [], [], [], 0
    for path in order:
        if len(chosen) == size:
            break
        if path.suffix.lower() not in IMAGE_SUFFIXES or read_image(path) is None:
            skipped += 1
            continue
        digest = sha256_file(path)
        if digest in exclude:
            continue
        stored.append(_stored_as(path))
        chosen.append(path)
        hashes.append(digest)
    if not chosen:
        raise InputError(f"calibration folder {folder}: none of its {len(candidates)} files is a readable image")
    _warn_not_colour(stored, len(chosen), "calibration images")
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


_NOT_COLOUR = {1: "grey", 2: "grey with alpha", 4: "with alpha"}


def _stored_as(path: Path) -> str | None:
    """How a readable image is stored when it is not 3-channel colour ("grey", "with alpha", ...), else None."""
    import cv2

    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    channels = 1 if image.ndim == 2 else image.shape[2]
    return None if channels == 3 else _NOT_COLOUR.get(channels, f"{channels} channels")


def _warn_not_colour(stored: list, total: int, what: str) -> None:
    """Grey and alpha images are read as Ultralytics reads them, so a monochrome camera's frames calibrate for
    what it delivers; a few among colour ones are more likely a mistake, which the count lets the user see."""
    kinds = [kind for kind in stored if kind is not None]
    if kinds:
        counts = ", ".join(f"{kinds.count(kind)} {kind}" for kind in sorted(set(kinds)))
        warnings.warn(f"{len(kinds)} of {total} {what} are not 3-channel colour ({counts}); they are read as "
                      "Ultralytics reads them: grey repeated in each colour channel, alpha dropped", stacklevel=3)


def _sampling_order(candidates: list[Path], seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    shuffled = [candidates[i] for i in rng.permutation(len(candidates))]
    by_class: dict[int, list[Path]] = {}
    unlabelled = []
    for path in shuffled:
        label = label_path(path)
        # Only an image's own label file counts (a stray .txt among the images is no label of anything).
        classes = _label_classes(label) if path.suffix.lower() in IMAGE_SUFFIXES and label != path else None
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
    return {row[0] for row in parse_label_file(path)}


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
    if not any(_label_classes(label) for label in val.labels):
        raise InputError(f"data YAML {data_yaml}: no image of its val split has a label with a box (YOLO .txt files "
                         "beside the images, under 'labels/'); give labelled data, or leave out --data and pass "
                         "--calib IMAGES to measure fidelity to the FP32 model instead")
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
    return read_yaml(data_yaml, "data YAML")


def unlabelled_splits(source: Path, pre: Preprocess, calibration_size: int, selection_size: int, report_size: int,
                      seed: int, frames_dir: Path | None = None) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(calibration, selection, report) from one folder of unlabelled images or a video, disjoint.

    For a user with a model and camera images but no labels: the held-out
    selection and report images are scored by fidelity to the FP32 model, the
    rest calibrates. Each held-out part is at most a quarter of what is there.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
        if frames_dir is None:
            raise InputError("a video source needs a folder for its frames")
        candidates = video_frames(source, calibration_size + selection_size + report_size, seed, frames_dir)
    elif source.is_dir():
        candidates = [p for p in _candidate_files(source) if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        raise InputError(f"{source}: a label-free build needs a folder of images or a video (a data YAML goes to "
                         "--data)")
    wanted = calibration_size + selection_size + report_size
    rng = np.random.default_rng(seed)
    picked, hashes, stored, skipped, copies = [], [], [], 0, 0
    for index in rng.permutation(len(candidates)):
        if len(picked) == wanted:
            break
        path = candidates[int(index)]
        if read_image(path) is None:
            skipped += 1
            continue
        digest = sha256_file(path)
        if digest in hashes:
            # A copy could land in a held-out part and in calibration at once.
            copies += 1
            continue
        stored.append(_stored_as(path))
        picked.append(path)
        hashes.append(digest)
    if len(picked) < 8:
        raise InputError(f"{source}: {len(picked)} readable images; a label-free build needs at least 8 (some to "
                         "calibrate on, some held out to measure fidelity to the FP32 model)")
    _warn_not_colour(stored, len(picked), "images")
    if copies:
        warnings.warn(f"{copies} images are byte-identical copies of others and were left out, so that no image is "
                      "both calibrated on and held out", stacklevel=2)
    selection_count = max(1, min(selection_size, len(picked) // 4))
    report_count = max(1, min(report_size, len(picked) // 4))
    cut = selection_count + report_count
    if len(picked) - cut < min(calibration_size, 100):
        warnings.warn(f"{len(picked) - cut} images are left to calibrate on after holding out {cut} for "
                      "fidelity; INT8 scales from so few are unreliable", stacklevel=2)

    def part(start: int, end: int, label: str) -> ImageSet:
        return ImageSet(f"{source} ({label})", tuple(picked[start:end]), tuple(hashes[start:end]), pre,
                        skipped if label == "calibration" else 0)

    # What the held-out parts leave over beyond calibration.size is not calibrated on: more images would only
    # lengthen calibration (at 640 px, 0.4 s each in ncnn), and the size asked for is what the user budgeted.
    return (part(cut, cut + calibration_size, "calibration"), part(0, selection_count, "held out for selection"),
            part(selection_count, cut, "held out, reported"))
