"""scripts/make_deepforest_fixture.py: tiling, box clipping, site split, licence check, on a tiny
synthetic wheel; and, where the real wheel has been fetched (a setup step), the real fixture and the
checkpoint trained on it."""

from __future__ import annotations

import filecmp
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_deepforest_fixture", REPO / "scripts" / "make_deepforest_fixture.py")
fx = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fx  # dataclasses look their module up there
_spec.loader.exec_module(fx)

CHECKPOINT = REPO / "tests" / "fixtures" / "yolov8n-deepforest.pt"
REAL_WHEEL = REPO / ".deploy" / "cache" / "wheels" / fx.WHEEL_NAME
MIT = "MIT License\n\nCopyright (c) 2019, Someone\n\nPermission is hereby granted, free of charge, to any person\n"


def _voc(boxes) -> bytes:
    objects = "".join(f"<object><name>Tree</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    return f"<annotation><filename>x.png</filename>{objects}</annotation>".encode()


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# A 96x64 "training" image (3x2 tiles of 32) and a 40x40 "other site" image (one tile).
TRAIN_BOXES = [
    (2, 2, 12, 12),     # inside tile r0 c0
    (26, 4, 36, 14),    # 6 of 10 px in c0 (60 %): kept in c0 clipped to x 26..32; 40 % in c1: dropped there
    (60, 10, 70, 20),   # 4 of 10 px in c1, 6 in c2: kept only in c2
    (40, 28, 50, 36),   # 4 of 8 px in row 0, 4 in row 1: exactly half in each, kept in both
    (70, 40, 80, 50),   # inside r1 c2: the bottom row goes to selection
]
SOURCES = (
    fx.Source("pkg/data/train.png", "pkg/data/train.xml", "SITEA", "train", selection_rows=1),
    fx.Source("pkg/data/other.png", "pkg/data/other.xml", "SITEB", "val"),
)


def _wheel(path: Path, licence: str = MIT) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(fx.LICENSE_MEMBER, licence)
        z.writestr("pkg/data/train.png", _png(96, 64, 1))
        z.writestr("pkg/data/train.xml", _voc(TRAIN_BOXES))
        z.writestr("pkg/data/other.png", _png(40, 40, 2))
        z.writestr("pkg/data/other.xml", _voc([(5, 5, 15, 25), (30, 30, 39, 39)]))
    return path


def _labels(root: Path, split: str, name: str) -> list[list[float]]:
    text = (root / "labels" / split / f"{name}.txt").read_text()
    return [[float(v) for v in line.split()] for line in text.splitlines()]


def test_tile_grid_covers_the_image_once_with_near_equal_tiles():
    for width, height, tile in [(2299, 2472, 256), (1249, 1035, 256), (400, 400, 256), (100, 50, 256), (96, 64, 32)]:
        grid = fx.tile_grid(width, height, tile)
        cover = np.zeros((height, width), dtype=int)
        for _r, _c, x0, y0, x1, y1 in grid:
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()
        widths = {x1 - x0 for *_, x0, _y0, x1, _y1 in grid}
        assert max(widths) - min(widths) <= 1
    assert len(fx.tile_grid(2299, 2472, 256)) == 9 * 10
    assert len(fx.tile_grid(400, 400, 256)) == 4  # 400/256 rounds to 2: four 200 px tiles, no sliver


def test_clip_boxes_keeps_at_least_half_inside_and_shifts():
    window = (100, 200, 164, 264)
    assert fx.clip_boxes([(110, 210, 120, 220)], window) == [(10, 210 - 200, 20, 20)]
    assert fx.clip_boxes([(158, 210, 168, 220)], window) == [(58, 10, 64, 20)]  # 60 % inside, clipped
    assert fx.clip_boxes([(159, 210, 169, 220)], window) == [(59, 10, 64, 20)]  # exactly half
    assert fx.clip_boxes([(160, 210, 170, 220)], window) == []  # 40 % inside
    assert fx.clip_boxes([(0, 0, 10, 10), (120, 220, 120, 230)], window) == []  # outside; zero area


def test_build_tiles_clips_and_splits_by_site(tmp_path):
    data_yaml = fx.build(_wheel(tmp_path / "fake.whl"), tmp_path / "out", tile=32, sources=SOURCES)
    root = data_yaml.parent
    assert data_yaml.read_text().startswith("train: images/train\nval: images/val\nselection: images/selection\n")
    assert (root / "LICENSE").read_text() == MIT
    names = {split: sorted(p.stem for p in (root / "images" / split).glob("*.png"))
             for split in ("train", "val", "selection")}
    assert names == {"train": ["SITEA_r00_c00", "SITEA_r00_c01", "SITEA_r00_c02"],
                     "selection": ["SITEA_r01_c00", "SITEA_r01_c01", "SITEA_r01_c02"],
                     "val": ["SITEB_r00_c00"]}
    assert Image.open(root / "images" / "val" / "SITEB_r00_c00.png").size == (40, 40)
    # The tile is the crop of the source image at its place.
    source = np.asarray(Image.open(io.BytesIO(_png(96, 64, 1))))
    assert (np.asarray(Image.open(root / "images" / "selection" / "SITEA_r01_c02.png")) == source[32:64, 64:96]).all()

    def box(x0, y0, x1, y1, size=32):
        return pytest.approx([0, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size],
                             abs=1e-6)

    assert _labels(root, "train", "SITEA_r00_c00") == [box(2, 2, 12, 12), box(26, 4, 32, 14)]
    assert _labels(root, "train", "SITEA_r00_c01") == [box(8, 28, 18, 32)]
    assert _labels(root, "train", "SITEA_r00_c02") == [box(0, 10, 6, 20)]
    assert _labels(root, "selection", "SITEA_r01_c01") == [box(8, 0, 18, 4)]
    assert _labels(root, "selection", "SITEA_r01_c02") == [box(6, 8, 16, 18)]
    assert _labels(root, "selection", "SITEA_r01_c00") == []
    assert _labels(root, "val", "SITEB_r00_c00") == [box(5, 5, 15, 25, 40), box(30, 30, 39, 39, 40)]


def test_build_is_deterministic_and_refuses_a_non_mit_licence(tmp_path):
    wheel = _wheel(tmp_path / "fake.whl")
    a = fx.build(wheel, tmp_path / "a", tile=32, sources=SOURCES).parent
    b = fx.build(wheel, tmp_path / "b", tile=32, sources=SOURCES).parent
    assert a.name == b.name
    for split in ("train", "val", "selection"):
        for kind in ("images", "labels"):
            files = sorted(p.name for p in (a / kind / split).iterdir())
            assert files and filecmp.cmpfiles(a / kind / split, b / kind / split, files, shallow=False)[0] == files
    with pytest.raises(SystemExit, match="not the MIT"):
        fx.build(_wheel(tmp_path / "gpl.whl", "GNU GENERAL PUBLIC LICENSE\n"), tmp_path / "c", tile=32, sources=SOURCES)
    assert not list((tmp_path / "c").iterdir())  # nothing half-written is left


@pytest.mark.skipif(not REAL_WHEEL.exists(), reason="the deepforest wheel has not been fetched "
                                                    "(scripts/make_deepforest_fixture.py)")
def test_real_fixture_builds_and_loads(tmp_path, deploy_home):
    from edge_deploy.pipeline.ultra import ultralytics_offline

    data_yaml = fx.build(REAL_WHEEL, tmp_path, wheel_sha256=fx.WHEEL_SHA256)
    stats = (data_yaml.parent / "stats.json").read_text()
    counts = {split: (sum(s["tiles"] for s in sites.values()), sum(s["boxes"] for s in sites.values()))
              for split, sites in json.loads(stats).items()}
    assert counts == {"train": (72, 439), "selection": (18, 125), "val": (28, 374)}
    ultralytics_offline(deploy_home)
    from ultralytics.data.utils import check_det_dataset

    info = check_det_dataset(str(data_yaml))
    assert info["names"] == {0: "tree"}
    assert Path(info["val"]).is_dir()

    if CHECKPOINT.exists():
        from ultralytics import YOLO

        model = YOLO(str(CHECKPOINT))
        assert model.names == {0: "tree"}
        tile = data_yaml.parent / "images" / "val" / "YELL-541000_r01_c01.png"
        assert len(model.predict(str(tile), imgsz=256, conf=0.25, device="cpu", verbose=False)[0].boxes) > 0
