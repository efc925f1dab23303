"""The bad-input corpus: every case is one line of a table, run as a user runs `deploy`.

Each case must give exactly one `error:` line on stderr (warnings aside) with the stated exit code and words,
no traceback, nothing new or changed in the user's folder (where an earlier good bundle sits), and no
temporary debris in the cache. Interruptions (SIGINT, SIGTERM, SIGKILL at several stages) follow the table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import DEPLOY, EMBEDDED_MODEL, run_deploy, tree_state

GOOD = "yolov8n-160-cpu-fp32"
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+-")


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # after `deploy`; {tmp} the bad inputs, {data} the embedded data YAML, {good} the bundle
    code: int
    words: str
    env: tuple[tuple[str, str], ...] = ()


def case(*args, code=2, words, env=()):
    return Case(args, code, words, env)


B = ("build",)
D = ("--data", "{data}")
CASES = {
    # models
    "model missing": case(*B, "--model", "{tmp}/missing.pt", *D, words="model not found"),
    "model is a folder": case(*B, "--model", "{tmp}/empty", *D, words="model path is a folder"),
    "model of an unsupported kind": case(*B, "--model", "{tmp}/model.onnx", *D, words="unsupported model file"),
    "model file empty": case(*B, "--model", "{tmp}/zero.pt", *D, words="is empty (0 bytes)"),
    "model file is text": case(*B, "--model", "{tmp}/notes.pt", *D, words="is not a PyTorch checkpoint"),
    "model is a classifier": case(*B, "--model", "{tmp}/classifier.pt", *D, words="is a classify model"),
    "model for other classes": case(*B, "--model", "{tmp}/two_classes.pt", *D,
                                    words="detects 2 classes but the data has 4"),
    "model a torch file without a model": case(*B, "--model", "{tmp}/plain_dict.pt", *D,
                                               words="not an Ultralytics checkpoint"),
    "model YAML binary": case(*B, "--model", "{tmp}/binary.yaml", *D, words="is a binary file, not text"),
    "model YAML a list": case(*B, "--model", "{tmp}/list.yaml", *D, words="must be a mapping of keys to values"),
    "model YAML not a model": case(*B, "--model", "{tmp}/names_only.yaml", *D, words="has no 'backbone' and 'head'"),
    "model path with a newline": case(*B, "--model", "{tmp}/two\nlines.pt", *D, words="model not found: '"),
    # data
    "data missing": case(*B, "--data", "{tmp}/missing.yaml", words="data YAML not found"),
    "data is a folder": case(*B, "--data", "{tmp}/empty", words="is a folder; give the .yaml file"),
    "data binary": case(*B, "--data", "{tmp}/binary.yaml", words="is a binary file, not text"),
    "data not UTF-8": case(*B, "--data", "{tmp}/latin1.yaml", words="is not UTF-8 text"),
    "data not YAML": case(*B, "--data", "{tmp}/broken.yaml", words="is not valid YAML"),
    "data a list": case(*B, "--data", "{tmp}/list.yaml", words="must be a mapping of keys to values, not a list"),
    "data without val": case(*B, "--data", "{tmp}/sets/no_val/data.yaml", words="has no 'val' split"),
    "data val folder missing": case(*B, "--data", "{tmp}/sets/val_missing/data.yaml", words="does not exist"),
    "data val folder without images": case(*B, "--data", "{tmp}/sets/val_empty/data.yaml", words="has no images"),
    "data val a list": case(*B, "--data", "{tmp}/sets/val_list/data.yaml", words="must be a folder path"),
    "data without names": case(*B, "--data", "{tmp}/sets/no_names/data.yaml", words="has no usable class names"),
    "data names with a gap": case(*B, "--data", "{tmp}/sets/names_gap/data.yaml", words="without gaps"),
    "label class out of range": case(*B, "--data", "{tmp}/sets/class_7/data.yaml",
                                     words="class 7 is not one of the data's 4 classes"),
    "label with 4 numbers": case(*B, "--data", "{tmp}/sets/four_fields/data.yaml", words="expected 5 numbers"),
    "label not numeric": case(*B, "--data", "{tmp}/sets/words/data.yaml", words="expected an integer class"),
    "label outside 0..1": case(*B, "--data", "{tmp}/sets/pixels/data.yaml", words="must be normalised to 0..1"),
    "label of zero size": case(*B, "--data", "{tmp}/sets/zero_box/data.yaml", words="zero width or height"),
    "label binary": case(*B, "--data", "{tmp}/sets/label_binary/data.yaml", words="is a binary file"),
    "label not UTF-8": case(*B, "--data", "{tmp}/sets/label_latin1/data.yaml", words="is not UTF-8 text"),
    "label is a folder": case(*B, "--data", "{tmp}/sets/label_folder/data.yaml", words="is a folder, not a file"),
    "val without any labels": case(*B, "--data", "{tmp}/sets/unlabelled/data.yaml",
                                   words="no image of its val split has a label"),
    "val of one image": case(*B, "--data", "{tmp}/sets/one_image/data.yaml", words="needs at least 2 images"),
    "val image corrupt": case(*B, "--data", "{tmp}/sets/corrupt_image/data.yaml", words="is not a readable image"),
    # calibration
    "calibration missing": case(*B, "--calib", "{tmp}/missing", words="calibration source not found"),
    "calibration folder empty": case(*B, "--calib", "{tmp}/empty", words="is empty"),
    "calibration folder corrupt": case(*B, "--calib", "{tmp}/corrupt",
                                       words="none of its 2 files is a readable image"),
    "calibration an image file": case(*B, "--calib", "{tmp}/grey/g.png", words="neither a data YAML"),
    "calibration video corrupt": case(*B, "--calib", "{tmp}/broken.mp4", words="has no readable frames"),
    "calibration YAML binary": case(*B, "--calib", "{tmp}/binary.yaml", words="is a binary file"),
    "calibration YAML without train": case(*B, "--calib", "{tmp}/sets/no_train/data.yaml",
                                           words="has no 'train' split"),
    # configuration
    "config unknown key": case(*B, "--config", "{tmp}/typo.yaml",
                               words="unknown key 'calibraton' (did you mean 'calibration'?)"),
    "config unknown nested key": case(*B, "--config", "{tmp}/nested_typo.yaml", words="unknown key 'quantize.methd'"),
    "config wrong type": case(*B, "--config", "{tmp}/wrong_type.yaml", words="calibration.size: Input should be"),
    "config negative size": case(*B, "--config", "{tmp}/negative.yaml", words="calibration.size: Input should be"),
    "config binary": case(*B, "--config", "{tmp}/binary.yaml", words="config file"),
    "config not UTF-8": case(*B, "--config", "{tmp}/latin1.yaml", words="is not UTF-8 text"),
    "config not YAML": case(*B, "--config", "{tmp}/broken.yaml", words="is not valid YAML"),
    "config a list": case(*B, "--config", "{tmp}/list.yaml", words="must be a mapping"),
    "config a folder": case(*B, "--config", "{tmp}/empty", words="is a folder, not a file"),
    "config missing": case(*B, "--config", "{tmp}/missing.yaml", words="config file not found"),
    "config section clashes with a flag": case(*B, "--config", "{tmp}/scalar_section.yaml", "--prune-epochs", "3",
                                               words="'prune' must be a section of settings"),
    "unknown target": case(*B, "--target", "cpux", words="unknown target 'cpux' (did you mean 'cpu'?)"),
    "unknown profile": case(*B, "--target", "arm", "--profile", "pi9", words="target arm has no profile 'pi9'"),
    "precision the target lacks": case(*B, "--target", "arm", "--precision", "w4a8",
                                       words="target arm supports precisions"),
    "unknown precision": case(*B, "--precision", "int3", words="precision: Input should be"),
    "unknown quantization method": case(*B, "--quant-method", "magic", words="quantize.method: Input should be"),
    "method the target refuses": case(*B, "--target", "arm", "--quant-method", "percentile",
                                      words="accepts quantize.method auto"),
    "pruning ratio out of range": case(*B, "--prune", "1.5", words="prune.ratio: Input should be less than 1"),
    "too few probe runs": case(*B, "--runs", "3", words="probe.runs"),
    "too many probe runs": case(*B, "--runs", "100000000", words="probe.runs: Input should be less than"),
    "a budget that is not a number": case(*B, "--max-map-drop", "nan", words="should be a finite number"),
    "an empty output path": case(*B, "--output=", words="output: must not be empty"),
    "an empty config path": case(*B, "--config=", words="must not be empty"),
    "config value of the wrong kind": case(*B, "--config", "{tmp}/model_number.yaml",
                                           words="model: Input is not a valid path"),
    "unknown option": case(*B, "--bogus", words="No such option '--bogus'"),
    "option without its value": case(*B, "--target", words="requires an argument"),
    "option of the wrong type": case(*B, "--imgsz", "abc", words="Invalid value for '--imgsz'"),
    "unknown command": case("biuld", words="No such command 'biuld'"),
    # outputs
    "output is a file": case(*B, "--output", "{tmp}/afile", words="is a file, not a folder"),
    "output inside a file": case(*B, "--output", "{tmp}/afile/sub", words="cannot be created"),
    "output inside a bundle": case(*B, "--output", "{good}/nested", words="is inside the published bundle"),
    "DEPLOY_HOME is a file": case(*B, words="DEPLOY_HOME folder", env=(("DEPLOY_HOME", "{tmp}/afile"),)),
    "a file where the bundle goes": case(*B, "--precision", "fp32", "--output", "{tmp}/occupied",
                                         words="exists and is not a bundle"),
    # label-free builds
    "model without data or images": case(*B, "--model", str(EMBEDDED_MODEL), words="needs images to measure"),
    "label-free pruning": case(*B, "--model", str(EMBEDDED_MODEL), "--calib", "{tmp}/photos", "--prune", "0.5",
                               words="pruning fine-tunes and measures on labelled"),
    "label-free with too few images": case(*B, "--model", str(EMBEDDED_MODEL), "--calib", "{tmp}/few",
                                           words="a label-free build needs at least 8"),
    "label-free from an untrained YAML": case(*B, "--model", "{tmp}/yolov8n.yaml", "--calib", "{tmp}/photos",
                                              words="describes an untrained model"),
    # bundles
    "check a missing bundle": case("check", "{tmp}/missing", words="bundle not found"),
    "check a file": case("check", "{tmp}/afile", words="is a file; a bundle is the folder"),
    "check a folder without manifest": case("check", "{tmp}/empty", code=8, words="no manifest.json"),
    "check a manifest that is not JSON": case("check", "{tmp}/bundles/not_json", code=8, words="is not valid JSON"),
    "check a manifest that is a list": case("check", "{tmp}/bundles/list", code=8, words="must hold a JSON object"),
    "check a manifest of the wrong shape": case("check", "{tmp}/bundles/files_list", code=8,
                                                words="'files' must map each file name"),
    "check a tampered bundle": case("check", "{tmp}/bundles/tampered", code=8, words="sha256 differs: model.onnx"),
    "check a bundle missing a file": case("check", "{tmp}/bundles/missing_file", code=8, words="missing README.md"),
    "check a bundle with an extra file": case("check", "{tmp}/bundles/extra", code=8,
                                              words="not in manifest: extra.txt"),
    "check a bundle with a link": case("check", "{tmp}/bundles/link", code=8, words="a link, not a file: metrics.json"),
}


@pytest.fixture(scope="module")
def user(deploy_home, tmp_path_factory):
    """A user's folder that already holds a good bundle, published by an earlier build."""
    cwd = tmp_path_factory.mktemp("bad-inputs-user")
    done = run_deploy(["build", "--precision", "fp32"], cwd, deploy_home)
    assert done.returncode == 0, done.stderr
    return cwd


@pytest.fixture(scope="module")
def bad(user, shapes_yaml, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    _make_bad_inputs(tmp, shapes_yaml, user / "dist" / GOOD)
    return tmp


def _make_bad_inputs(tmp: Path, shapes_yaml: Path, good: Path) -> None:
    import cv2
    import numpy as np

    (tmp / "empty").mkdir()
    (tmp / "notes.pt").write_text("not a checkpoint")
    (tmp / "zero.pt").write_bytes(b"")
    (tmp / "model.onnx").write_bytes(b"onnx?")
    torch.save({"weights": 1}, tmp / "plain_dict.pt")
    _classifier_checkpoint(tmp / "classifier.pt")
    _two_class_detector(tmp / "two_classes.pt")
    (tmp / "binary.yaml").write_bytes(b"\x00\x01\x02binary\xff")
    (tmp / "latin1.yaml").write_bytes("names: ['caf\u00e9']\n".encode("latin-1"))
    (tmp / "broken.yaml").write_text("train: [images/train\nval: {\n")
    (tmp / "list.yaml").write_text("- train\n- val\n")
    (tmp / "names_only.yaml").write_text("nc: 4\n")
    (tmp / "yolov8n.yaml").write_text("nc: 4\nbackbone: []\nhead: []\n")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp / "corrupt" / "readme.txt").write_text("hi")
    (tmp / "grey").mkdir()
    cv2.imwrite(str(tmp / "grey" / "g.png"), np.zeros((16, 16), np.uint8))
    (tmp / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2048))
    (tmp / "afile").write_text("a file")
    (tmp / "occupied").mkdir()
    (tmp / "occupied" / GOOD).write_text("the user's own file, which a build must not replace")
    for name, text in {"typo": "target: cpu\ncalibraton:\n  size: 10\n",
                       "nested_typo": "quantize:\n  methd: minmax\n",
                       "wrong_type": "calibration:\n  size: many\n",
                       "negative": "calibration:\n  size: -5\n",
                       "scalar_section": "prune: 0.5\n",
                       "model_number": "model: 5\n"}.items():
        (tmp / f"{name}.yaml").write_text(text)
    val_images = sorted((shapes_yaml.parent / "images" / "val").iterdir())[:4]
    photos = tmp / "photos"
    photos.mkdir()
    for image in sorted((shapes_yaml.parent / "images" / "train").iterdir())[:16]:
        shutil.copyfile(image, photos / image.name)
    (tmp / "few").mkdir()
    for image in val_images[:3]:
        shutil.copyfile(image, tmp / "few" / image.name)
    names = "names:\n  0: circle\n  1: rectangle\n  2: triangle\n  3: cross\n"

    def data_set(name: str, yaml_text: str, labels: dict[int, bytes | None] | None = None, images: int = 4) -> None:
        root = tmp / "sets" / name
        (root / "images" / "val").mkdir(parents=True)
        (root / "labels" / "val").mkdir(parents=True)
        for index, image in enumerate(val_images[:images]):
            shutil.copyfile(image, root / "images" / "val" / image.name)
            label = root / "labels" / "val" / f"{image.stem}.txt"
            content = (labels or {}).get(index, b"0 0.5 0.5 0.2 0.2\n")
            if content is None:
                label.mkdir()
            elif content != b"":
                label.write_bytes(content)
        (root / "data.yaml").write_text(yaml_text)

    standard = f"train: images/val\nval: images/val\n{names}"
    data_set("no_val", f"train: images/val\n{names}")
    data_set("no_train", f"val: images/val\n{names}")
    data_set("val_missing", f"train: images/val\nval: images/nowhere\n{names}")
    data_set("val_list", f"train: images/val\nval: [images/val, images/val]\n{names}")
    data_set("no_names", "train: images/val\nval: images/val\n")
    data_set("names_gap", "train: images/val\nval: images/val\nnames:\n  0: a\n  2: b\n")
    data_set("class_7", standard, {2: b"7 0.5 0.5 0.2 0.2\n"})
    data_set("four_fields", standard, {1: b"0 0.5 0.5 0.2\n"})
    data_set("words", standard, {1: b"circle 0.5 0.5 0.2 0.2\n"})
    data_set("pixels", standard, {0: b"1 80 60 20 20\n"})
    data_set("zero_box", standard, {0: b"1 0.5 0.5 0 0.1\n"})
    data_set("label_binary", standard, {0: b"\x00\x01\x02"})
    data_set("label_latin1", standard, {0: "0 0.5 0.5 0.2 0.2 \u00e9\n".encode("latin-1")})
    data_set("label_folder", standard, {0: None})
    data_set("unlabelled", standard, {i: b"" for i in range(4)})
    data_set("one_image", standard, images=1)
    data_set("corrupt_image", standard)
    next((tmp / "sets" / "corrupt_image" / "images" / "val").iterdir()).write_bytes(b"\x89PNG broken")
    empty_val = tmp / "sets" / "val_empty"
    (empty_val / "images" / "val").mkdir(parents=True)
    (empty_val / "data.yaml").write_text(standard)

    bundles = tmp / "bundles"
    for name in ("not_json", "list", "files_list", "tampered", "missing_file", "extra", "link"):
        shutil.copytree(good, bundles / name)
    (bundles / "not_json" / "manifest.json").write_text("{not json")
    (bundles / "list" / "manifest.json").write_text("[1, 2]")
    (bundles / "files_list" / "manifest.json").write_text(json.dumps({"files": ["model.onnx"]}))
    with open(bundles / "tampered" / "model.onnx", "ab") as f:
        f.write(b"\0")
    (bundles / "missing_file" / "README.md").unlink()
    (bundles / "extra" / "extra.txt").write_text("x")
    (bundles / "link" / "metrics.json").unlink()
    (bundles / "link" / "metrics.json").symlink_to("/etc/hostname")


def _classifier_checkpoint(path):
    import ultralytics
    from ultralytics.nn.tasks import ClassificationModel

    cfg = next((Path(ultralytics.__file__).parent / "cfg" / "models").rglob("yolov8-cls.yaml"))
    local = path.parent / "yolov8n-cls.yaml"
    local.write_text(cfg.read_text())
    torch.save({"model": ClassificationModel(str(local), nc=2, verbose=False)}, path)


def _two_class_detector(path):
    import ultralytics
    import yaml
    from ultralytics.nn.tasks import DetectionModel

    cfg = next((Path(ultralytics.__file__).parent / "cfg" / "models").rglob("yolov8.yaml"))
    model = DetectionModel({**yaml.safe_load(cfg.read_text()), "scale": "n"}, nc=2, verbose=False)
    torch.save({"model": model}, path)


def _debris(folder: Path) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if TEMPORARY.match(p.name))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("warning:")]


def test_the_corpus_is_large_and_every_case_distinct():
    assert len(CASES) >= 60
    assert len({c.args for c in CASES.values()}) == len(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_a_documented_code_and_loses_nothing(name, user, bad, shapes_yaml, deploy_home):
    spec = CASES[name]
    fill = {"tmp": bad, "data": shapes_yaml, "good": user / "dist" / GOOD}
    args = [a.format(**fill) for a in spec.args]
    env = {k: v.format(**fill) for k, v in spec.env}
    before, occupied = tree_state(user), tree_state(bad / "occupied")
    done = _run(args, user, Path(env.get("DEPLOY_HOME", deploy_home)))
    lines = _error_lines(done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert spec.words in lines[0], lines[0]
    assert done.returncode == spec.code, (done.returncode, lines[0])
    assert tree_state(user) == before  # the earlier bundle byte-identical, nothing new beside it
    assert tree_state(bad / "occupied") == occupied
    assert _debris(deploy_home) == [] and _debris(bad) == []


def _run(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEPLOY_HOME": str(home), "COLUMNS": "160"}
    env.pop("DEPLOY_DEBUG", None)
    return subprocess.run([str(DEPLOY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_full_disk_at_publish_is_one_line_and_the_earlier_bundle_survives(user, deploy_home, tmp_path):
    """A 2 MB file system as the output: every stage runs, publishing cannot."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mount / "dist" / "keep").mkdir(parents=True)
        (mount / "dist" / "keep" / "manifest.json").write_text("{}")
        before = tree_state(mount)
        done = _run(["build", "--precision", "fp32", "--output", str(mount / "dist")], user, deploy_home)
        lines = _error_lines(done.stderr)
        assert done.returncode == 2 and len(lines) == 1 and "the disk is full" in lines[0], done.stderr
        assert tree_state(mount) == before and _debris(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_output_is_refused_before_any_stage(user, deploy_home, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        done = _run(["build", "--output", str(mount / "dist"), "--no-cache"], user, deploy_home)
        lines = _error_lines(done.stderr)
        assert done.returncode == 2 and len(lines) == 1 and "read-only file system" in lines[0], done.stderr
        assert "load" not in done.stdout  # refused before the first stage
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# Interruptions: the build is stopped once the named step has started (progress lines on stdout say when).
INTERRUPTIONS = {
    "SIGINT during load": (signal.SIGINT, "load"),
    "SIGINT during export": (signal.SIGINT, "export"),
    "SIGTERM during reference": (signal.SIGTERM, "reference"),
    "SIGINT during quantize": (signal.SIGINT, "quantize"),
    "SIGKILL during export": (signal.SIGKILL, "export"),
    "SIGKILL during quantize": (signal.SIGKILL, "quantize"),
    "SIGKILL during embedded data": (signal.SIGKILL, "embedded data"),
}


@pytest.fixture(scope="module")
def interrupted_home(tmp_path_factory, shapes_yaml) -> Path:
    """A home of its own (so the shared cache is never half-written), holding the embedded data already."""
    home = tmp_path_factory.mktemp("interrupted-home")
    shutil.copytree(shapes_yaml.parents[1], home / "data")
    return home


@pytest.mark.parametrize("name", list(INTERRUPTIONS))
def test_an_interrupted_build_publishes_nothing_and_leaves_no_debris(name, user, interrupted_home,
                                                                     tmp_path_factory):
    sig, step = INTERRUPTIONS[name]
    home = interrupted_home if step != "embedded data" else tmp_path_factory.mktemp("home-without-data")
    before = tree_state(user)
    env = {**os.environ, "DEPLOY_HOME": str(home), "COLUMNS": "160"}
    process = subprocess.Popen([str(DEPLOY), "build", "--no-cache", "--output", str(user / "dist")], cwd=user,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.rstrip().endswith(f"{step}: running"):
            time.sleep(0.5 if step != "embedded data" else 3)
            process.send_signal(sig)
            break
    else:
        pytest.fail(f"the build never reached {step}: {''.join(seen)} {process.stderr.read()}")
    _, stderr = process.communicate(timeout=300)
    assert tree_state(user) == before
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        # Nothing can clean up after SIGKILL; the next start sweeps what the dead process left.
        again = _run(["build", "--target", "cpux"], user, home)
        assert again.returncode == 2
    else:
        lines = _error_lines(stderr)
        assert process.returncode == 130 and lines == ["error: interrupted; nothing was published"], stderr
    assert _debris(home) == [] and _debris(user) == []
    if step == "embedded data":
        assert not (home / "data").exists() or not any((home / "data").iterdir())
