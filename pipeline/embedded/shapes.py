"""Deterministic synthetic detection data set ("shapes") in Ultralytics YOLO format.

No data set can be downloaded on the machines this project targets, yet every
accuracy claim must be measured. This generator gives real ground truth: each
object is drawn from a polygon whose box is known exactly, on a cluttered
textured background, with occlusion and truncation kept within limits that a
labeller would still box.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edge_deploy.pipeline.artifacts import atomic_dir

CLASS_NAMES = ("circle", "rectangle", "triangle", "cross")
GENERATOR_VERSION = 1

# An object hidden behind others for more than this fraction is no longer
# something a labeller would box; placements that would cause it are retried.
MIN_VISIBLE_FRACTION = 0.5
MIN_INSIDE_FRACTION = 0.55


@dataclass(frozen=True)
class ShapesSpec:
    train_images: int = 1000
    val_images: int = 200
    # Images the build makes its choices on (quantization method, float fallback, pruning floor): never
    # trained on, never reported, so the reported val numbers stay unbiased.
    selection_images: int = 200
    seed: int = 20261123
    min_size: tuple[int, int] = (160, 128)
    max_size: tuple[int, int] = (224, 176)
    max_objects: int = 6

    def key(self) -> str:
        payload = json.dumps({"spec": asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _polygon(cls: int, size: float, aspect: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    half_w, half_h = size / 2, size * aspect / 2
    if cls == 0:
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t) * half_w, np.sin(t) * half_h], axis=1)
    elif cls == 1:
        pts = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    elif cls == 2:
        skew = rng.uniform(-0.4, 0.4) * half_w
        pts = np.array([[skew, -half_h], [half_w, half_h], [-half_w, half_h]])
    else:
        arm = rng.uniform(0.28, 0.42)
        a, b = half_w * arm, half_h * arm
        pts = np.array([
            [-a, -half_h], [a, -half_h], [a, -b], [half_w, -b], [half_w, b], [a, b],
            [a, half_h], [-a, half_h], [-a, b], [-half_w, b], [-half_w, -b], [-a, -b],
        ])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(40, 215, size=3)
    # Low-frequency colour noise: bilinear upsampling of a coarse random grid.
    grid = rng.normal(0, 35, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.float32)
    ys = np.linspace(0, grid.shape[0] - 1, height)
    xs = np.linspace(0, grid.shape[1] - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, grid.shape[0] - 1), np.minimum(x0 + 1, grid.shape[1] - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    low = (grid[y0][:, x0] * (1 - wy) * (1 - wx) + grid[y1][:, x0] * wy * (1 - wx)
           + grid[y0][:, x1] * (1 - wy) * wx + grid[y1][:, x1] * wy * wx)
    img = base + low
    # Stripes, so that edges exist that are not objects.
    if rng.random() < 0.6:
        period = rng.uniform(6, 30)
        theta = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        img += (np.sin(2 * math.pi * phase) * rng.uniform(5, 25))[..., None]
    img += rng.normal(0, rng.uniform(2, 10), size=img.shape)
    return np.clip(img, 0, 255)


def _distractors(canvas: Image.Image, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    for _ in range(rng.integers(0, 5)):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))


def render_image(index: int, split_seed: int, spec: ShapesSpec) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """Returns an RGB uint8 image and its labels as (class, x0, y0, x1, y1) in pixels."""
    rng = np.random.default_rng([spec.seed, split_seed, index])
    width = int(rng.integers(spec.min_size[0], spec.max_size[0] + 1))
    height = int(rng.integers(spec.min_size[1], spec.max_size[1] + 1))
    canvas = Image.fromarray(_background(width, height, rng).astype(np.uint8))
    _distractors(canvas, rng)
    image = np.asarray(canvas).astype(np.float32)

    placed: list[dict] = []
    target = int(rng.integers(1, spec.max_objects + 1))
    for _attempt in range(target * 8):
        if len(placed) == target:
            break
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = float(rng.uniform(12, min(width, height) * 0.6))
        aspect = float(rng.uniform(0.6, 1.6)) if cls != 0 else float(rng.uniform(0.75, 1.33))
        pts = _polygon(cls, size, aspect, float(rng.uniform(0, 2 * math.pi)), rng)
        pts += np.array([rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height])
        pad = int(size) + 2
        mask_img = Image.new("L", (width + 2 * pad, height + 2 * pad), 0)
        ImageDraw.Draw(mask_img).polygon([(float(x) + pad, float(y) + pad) for x, y in pts], fill=255)
        full = np.asarray(mask_img) > 127
        area = full.sum()
        if area < 40:
            continue
        mask = full[pad:pad + height, pad:pad + width]
        if mask.sum() / area < MIN_INSIDE_FRACTION:
            continue
        if any((o["visible"] & ~mask).sum() < MIN_VISIBLE_FRACTION * o["area"] for o in placed):
            continue
        for o in placed:
            o["visible"] &= ~mask
        colour = rng.uniform(0, 255, size=3)
        local = image[mask].mean(axis=0)
        if np.abs(colour - local).sum() < 90:  # keep the object distinguishable from what it covers
            colour = 255 - local
        shade = rng.uniform(0.8, 1.2, size=mask.shape)[..., None] if rng.random() < 0.5 else 1.0
        region = np.broadcast_to(colour, image.shape) * shade
        image = np.where(mask[..., None], region, image)
        placed.append({"cls": cls, "visible": mask.copy(), "area": int(mask.sum())})

    labels = []
    for o in placed:
        ys, xs = np.nonzero(o["visible"])
        if len(xs) == 0:
            continue
        # The box of what is inside the image (truncation) and not hidden; COCO's convention.
        labels.append((o["cls"], float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    image += rng.normal(0, 3, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _write_split(root: Path, split: str, count: int, split_seed: int, spec: ShapesSpec) -> None:
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    for i in range(count):
        image, labels = render_image(i, split_seed, spec)
        h, w = image.shape[:2]
        name = f"{split}_{i:05d}"
        Image.fromarray(image).save(img_dir / f"{name}.png", optimize=False)
        lines = [
            f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
            for c, x0, y0, x1, y1 in labels
        ]
        (lbl_dir / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def generate(root: Path, spec: ShapesSpec = ShapesSpec()) -> Path:
    """Writes the data set under root/<spec key>/ (atomically) and returns the data YAML path."""
    final = Path(root) / f"shapes-{spec.key()}"
    data_yaml = final / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    with atomic_dir(final, replace=False) as tmp:
        _write_split(tmp, "train", spec.train_images, 1, spec)
        _write_split(tmp, "val", spec.val_images, 2, spec)
        _write_split(tmp, "selection", spec.selection_images, 3, spec)
        names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
        # No `path` key: Ultralytics then resolves splits against the yaml's own folder,
        # so the set can be moved.
        (tmp / "data.yaml").write_text(f"train: images/train\nval: images/val\nselection: images/selection\n"
                                       f"names:\n{names}\n")
    return data_yaml
