"""A user with a checkpoint and unlabelled camera images: the build measures fidelity to the FP32 model."""

import json
import re
import shutil

import pytest

from tests.conftest import EMBEDDED_MODEL, run_deploy, tree_state


@pytest.fixture(scope="module")
def user(tmp_path_factory, shapes_yaml):
    """A folder as a user has it: best.pt and photos/ with no labels anywhere near them."""
    folder = tmp_path_factory.mktemp("label-free-user")
    shutil.copyfile(EMBEDDED_MODEL, folder / "best.pt")
    photos = folder / "photos"
    photos.mkdir()
    for image in sorted((shapes_yaml.parent / "images" / "train").iterdir())[:48]:
        shutil.copyfile(image, photos / image.name)
    return folder


@pytest.fixture(scope="module")
def built(user, tmp_path_factory):
    home = tmp_path_factory.mktemp("label-free-home")  # its own home: proves no embedded data is generated
    done = run_deploy(["build", "--json", "--model", "best.pt", "--calib", "photos", "--accept-drop"], user, home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), home


def test_a_build_without_labels_reports_fidelity_not_accuracy(built, user):
    summary, home = built
    stages = {s["stage"]: s["metrics"] for s in summary["stages"]}
    verify = stages["verify"]
    assert verify["reference"]["kind"] == verify["artifact"]["kind"] == "fidelity"
    # The FP32 model, scored against its own confident boxes, finds every one of them again.
    assert verify["reference"]["matched_boxes"] == 1.0 and verify["reference"]["map50_95"] > 0.99
    assert 0.5 < verify["artifact"]["matched_boxes"] <= 1.0
    # ... at their own place (0 px), and says in pixels how far INT8's found boxes moved.
    assert verify["reference"]["box_shift_px"] == 0.0 and 0.0 <= verify["artifact"]["box_shift_px"] < 8.0
    assert verify["split"]["images"] == 12 and "held out, reported" in verify["split"]["source"]
    quantize = stages["quantize"]
    assert quantize["selection"]["images"] == 12 and quantize["calibration_images"] == 24
    # What fidelity cannot resolve on these images: FP32 itself with its class logits jittered.
    floor = stages["reference"]["selection_jitter_floor"]
    assert floor["sigma"] == 0.01 and floor["drop_points"] >= 0 and len(floor["drop_interval"]) == 2
    assert not (home / "data").exists()  # the embedded shapes set is never used for a user's model
    bundle = user / "dist" / "yolov8n-160-cpu-int8"
    card = (bundle / "README.md").read_text()
    assert "## Fidelity to the FP32 model (no labels were given)" in card and "not accuracy figures" in card
    assert f"({verify['artifact']['box_shift_px']:.2f} px)" in card
    # The near-tie rule is stated, and the count it applied to is recorded (0 or more, never absent without labels).
    assert "won NMS over by less than 0.01 in score counts as that box" in card
    assert verify["artifact"]["near_tie_boxes"] >= 0 and verify["reference"]["near_tie_boxes"] >= 0
    assert run_deploy(["check", str(bundle)], user, home).returncode == 0


def test_a_fidelity_gate_says_how_far_the_boxes_moved(built, user):
    """Over budget without labels, the message gives what the points stand for: the share of FP32 boxes found
    again and how far their sides moved, so the user can judge --accept-drop."""
    _, home = built
    # INT4 weights with no loss allowed: the one candidate misses it.
    done = run_deploy(["build", "--model", "best.pt", "--calib", "photos", "--precision", "int4",
                       "--max-map-drop", "0"], user, home)
    assert done.returncode == 4, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "fidelity mAP50-95 points" in line and "of FP32 boxes found again" in line
    assert re.search(r"\d+\.\d% \(\d+\.\d\d px\) of FP32 boxes found again", line), line
    # And what FP32 itself loses to noise a third or less of the INT8 error measured: a zero budget is under it.
    assert re.search(r"FP32 itself, its class logits jittered by N\(0, 0.01\) .* loses \d+\.\d\d \[", line), line
    assert "so this budget is finer than fidelity resolves on these photos" in line


def test_the_held_out_images_are_never_calibrated_on(built):
    summary, _ = built
    stages = {s["stage"]: s["metrics"] for s in summary["stages"]}
    fingerprints = {stages["reference"]["selection_split"]["fingerprint"],
                    stages["reference"]["report_split"]["fingerprint"]}
    assert len(fingerprints) == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "best.pt"], "--model without --data needs images to measure the model on: --calib IMAGES"),
    (["--model", "best.pt", "--calib", "photos", "--prune", "0.5"], "pruning fine-tunes and measures on labelled"),
    (["--model", "best.pt", "--calib", "few"], "3 readable images; a label-free build needs at least 8"),
])
def test_unusable_label_free_input_is_refused_before_any_stage(user, tmp_path, args, message):
    few = user / "few"
    if not few.exists():
        few.mkdir()
        for image in sorted((user / "photos").iterdir())[:3]:
            shutil.copyfile(image, few / image.name)
    before = tree_state(user)
    done = run_deploy(["build", *args], user, tmp_path / "home")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert tree_state(user) == before and not (tmp_path / "home" / "cache").exists()


def test_a_data_yaml_without_labels_is_refused_before_any_stage(user, tmp_path, shapes_yaml):
    data = tmp_path / "data"
    shutil.copytree(shapes_yaml.parent / "images" / "val", data / "images" / "val")
    (data / "data.yaml").write_text("train: images/val\nval: images/val\nnames:\n  0: a\n  1: b\n  2: c\n  3: d\n")
    done = run_deploy(["build", "--model", str(user / "best.pt"), "--data", str(data / "data.yaml")], tmp_path,
                      tmp_path / "home")
    assert done.returncode == 2 and "no image of its val split has a label" in done.stderr
    assert "--calib IMAGES to measure fidelity" in done.stderr
    assert not (tmp_path / "home" / "cache").exists()


def test_images_the_model_detects_nothing_in_stop_the_build_with_one_line(user, tmp_path):
    """A drop of 0.00 against no boxes at all would pass any model; the build says why it cannot measure."""
    import cv2
    import numpy as np

    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(12):
        cv2.imwrite(str(blank / f"wall{i:02d}.png"), np.full((96, 128, 3), 20 * i, np.uint8))
    before = tree_state(user)
    done = run_deploy(["build", "--model", "best.pt", "--calib", str(blank)], user, tmp_path / "home")
    errors = [line for line in done.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "the FP32 model detects nothing at conf >= 0.25 on the images held out to measure fidelity" in errors[0]
    assert "held out for selection): 3 images and" in errors[0] and "held out, reported): 3 images)" in errors[0]
    assert tree_state(user) == before
