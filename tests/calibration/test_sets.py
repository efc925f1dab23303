import shutil

import pytest

from calibration.preprocess import Preprocess
from calibration.sets import calibration_set, labelled_split, resolve_split
from pipeline.errors import InputError

PRE = Preprocess(64)


def test_sampling_is_seeded_and_fingerprint_follows_content(tmp_path, small_shapes_yaml):
    a = calibration_set(small_shapes_yaml, PRE, size=8, seed=1)
    b = calibration_set(small_shapes_yaml, PRE, size=8, seed=1)
    c = calibration_set(small_shapes_yaml, PRE, size=8, seed=2)
    assert a.files == b.files and a.fingerprint == b.fingerprint
    assert a.files != c.files and a.fingerprint != c.fingerprint
    assert calibration_set(small_shapes_yaml, Preprocess(96), size=8, seed=1).fingerprint != a.fingerprint

    # Renaming files changes nothing; changing one image's bytes changes the fingerprint.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for index, path in enumerate(a.files):
        shutil.copyfile(path, renamed / f"img{index:02d}.png")
    whole = calibration_set(renamed, PRE, size=8, seed=0)
    assert sorted(whole.file_hashes) == sorted(a.file_hashes)
    first = sorted(renamed.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    assert calibration_set(renamed, PRE, size=8, seed=0).fingerprint != whole.fingerprint


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="is empty"):
        calibration_set(tmp_path, PRE, size=8, seed=0)


def test_only_corrupt_or_non_image_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="none of its 2 files is a readable image"):
        calibration_set(tmp_path, PRE, size=8, seed=0)


def test_corrupt_files_are_skipped_and_counted(tmp_path, small_shapes_yaml):
    folder = resolve_split(small_shapes_yaml, "train")
    for path in sorted(folder.iterdir())[:4]:
        shutil.copyfile(path, tmp_path / path.name)
    (tmp_path / "broken.png").write_bytes(b"PNG?")
    chosen = calibration_set(tmp_path, PRE, size=10, seed=0)
    assert len(chosen.files) == 4 and chosen.skipped == 1


def test_labelled_split_pairs_labels(small_shapes_yaml):
    val = labelled_split(small_shapes_yaml, "val", PRE)
    assert len(val.files) == 12
    assert all(label.exists() and label.parent.name == "val" for label in val.labels)


def test_missing_split(tmp_path):
    data = tmp_path / "data.yaml"
    data.write_text("train: images/train\nnames: [a]\n")
    with pytest.raises(InputError, match="no 'val' split"):
        resolve_split(data, "val")
