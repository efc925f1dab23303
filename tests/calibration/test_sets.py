import shutil

import pytest

from edge_deploy.calibration.preprocess import Preprocess
from edge_deploy.calibration.sets import calibration_set, labelled_split, resolve_split, warn_if_sizes_differ
from edge_deploy.pipeline.errors import InputError

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


def test_sampling_is_class_stratified_when_labels_exist(tmp_path):
    import cv2
    import numpy as np

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(40):
        cv2.imwrite(str(images / f"{i:02d}.png"), np.full((8, 8, 3), i, np.uint8))
        rare = i in (5, 33)
        (labels / f"{i:02d}.txt").write_text(f"{1 if rare else 0} 0.5 0.5 0.2 0.2\n")
    for seed in range(5):
        chosen = calibration_set(images, PRE, size=4, seed=seed)
        assert {p.name for p in chosen.files} & {"05.png", "33.png"}, seed


def _mixed_channels(folder, colour: int) -> None:
    """`colour` 3-channel images, one grey and one with alpha."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for i in range(colour):
        cv2.imwrite(str(folder / f"colour{i}.png"), rng.integers(0, 255, (16, 20, 3), np.uint8))
    cv2.imwrite(str(folder / "grey.png"), rng.integers(0, 255, (16, 20), np.uint8))
    cv2.imwrite(str(folder / "alpha.png"), rng.integers(0, 255, (16, 20, 4), np.uint8))


def test_grey_and_alpha_images_calibrate_as_ultralytics_reads_them_and_are_counted(tmp_path):
    import numpy as np

    from edge_deploy.calibration.preprocess import load_tensor

    _mixed_channels(tmp_path / "mixed", colour=3)
    with pytest.warns(UserWarning, match=r"2 of 5 calibration images are not 3-channel colour \(1 grey, 1 with "
                                         r"alpha\); they are read as Ultralytics reads them"):
        chosen = calibration_set(tmp_path / "mixed", PRE, size=5, seed=0, min_recommended=1)
    assert {p.name for p in chosen.files} >= {"grey.png", "alpha.png"}
    # A monochrome camera's frame feeds the model its grey level in each colour channel.
    tensor, _ = load_tensor(tmp_path / "mixed" / "grey.png", PRE)
    assert np.array_equal(tensor[0, 0], tensor[0, 1]) and np.array_equal(tensor[0, 1], tensor[0, 2])
    assert tensor[0, 0].std() > 0.1
    (tmp_path / "mixed" / "grey.png").unlink()
    (tmp_path / "mixed" / "alpha.png").unlink()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_set(tmp_path / "mixed", PRE, size=3, seed=0, min_recommended=1)


def test_label_free_images_that_are_not_colour_are_counted(tmp_path):
    from edge_deploy.calibration.sets import unlabelled_splits

    _mixed_channels(tmp_path / "mixed", colour=8)
    with pytest.warns(UserWarning, match="2 of 10 images are not 3-channel colour"):
        parts = unlabelled_splits(tmp_path / "mixed", PRE, calibration_size=6, selection_size=2, report_size=2,
                                  seed=0)
    assert sum(len(part.files) for part in parts) == 10


def test_video_frames_are_a_calibration_source(tmp_path):
    import cv2
    import numpy as np

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    chosen = calibration_set(video, PRE, size=6, seed=0, frames_dir=tmp_path / "frames")
    assert len(chosen.files) == 6 and chosen.source == str(video)
    again = calibration_set(video, PRE, size=6, seed=0, frames_dir=tmp_path / "frames")
    assert again.fingerprint == chosen.fingerprint
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError, match="no readable frames"):
        calibration_set(tmp_path / "broken.mp4", PRE, size=6, seed=0, frames_dir=tmp_path / "frames")


def test_calibration_at_another_scale_is_warned_about(tmp_path, small_shapes_yaml):
    import cv2
    import numpy as np

    val = labelled_split(small_shapes_yaml, "val", PRE)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"big{i}.png"), np.full((1200, 1600, 3), 40 * i, np.uint8))
    big = calibration_set(tmp_path, PRE, size=3, seed=0, min_recommended=1)
    with pytest.warns(UserWarning, match="differ in size"):
        warn_if_sizes_differ(big, val)
    same = calibration_set(small_shapes_yaml, PRE, size=8, seed=0, min_recommended=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_sizes_differ(same, val)


def test_label_free_parts_are_disjoint_and_calibration_keeps_its_size(small_shapes_yaml):
    from edge_deploy.calibration.sets import unlabelled_splits

    folder = resolve_split(small_shapes_yaml, "train")
    assert len(list(folder.iterdir())) == 24
    calibration, selection, report = unlabelled_splits(folder, PRE, calibration_size=6, selection_size=3,
                                                       report_size=40, seed=0)
    # The report part is capped at a quarter of the 24; of the 15 left, only calibration.size are calibrated on.
    assert (len(calibration.files), len(selection.files), len(report.files)) == (6, 3, 6)
    parts = [set(calibration.files), set(selection.files), set(report.files)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_label_free_copies_of_an_image_are_used_once(tmp_path):
    from edge_deploy.calibration.sets import unlabelled_splits

    _mixed_channels(tmp_path / "photos", colour=10)
    for i in range(3):
        shutil.copyfile(tmp_path / "photos" / "colour0.png", tmp_path / "photos" / f"copy{i}.png")
    with pytest.warns(UserWarning, match="3 images are byte-identical copies of others and were left out"):
        parts = unlabelled_splits(tmp_path / "photos", PRE, calibration_size=20, selection_size=3, report_size=3,
                                  seed=0)
    hashes = [digest for part in parts for digest in part.file_hashes]
    assert len(hashes) == len(set(hashes)) == 12
