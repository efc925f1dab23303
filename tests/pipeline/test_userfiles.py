"""The one place user files are read and output places checked."""

import json

import pytest

from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.userfiles import check_writable_folder, enclosing_bundle, read_yaml, shown


def test_only_our_manifest_makes_a_bundle(tmp_path):
    web_app = tmp_path / "app"
    web_app.mkdir()
    (web_app / "manifest.json").write_text(json.dumps({"name": "a web app", "icons": []}))
    assert enclosing_bundle(web_app / "dist") is None
    assert check_writable_folder(web_app / "dist", "output folder") == web_app / "dist"
    bundle = tmp_path / "yolov8n-160-cpu-int8"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"bundle": bundle.name, "files": {}}))
    assert enclosing_bundle(bundle / "a" / "b") == bundle
    with pytest.raises(InputError, match="inside the published bundle"):
        check_writable_folder(bundle / "nested", "output folder")


def test_nothing_is_created_by_the_check(tmp_path):
    check_writable_folder(tmp_path / "new" / "deeper", "output folder")
    assert list(tmp_path.iterdir()) == []


def test_yaml_errors_name_the_file_and_line_in_one_line(tmp_path):
    broken = tmp_path / "data.yaml"
    broken.write_text("train: a\nval: [b\nnames: {}\n")
    with pytest.raises(InputError) as error:
        read_yaml(broken, "data YAML")
    assert "data YAML" in str(error.value) and "line" in str(error.value) and "\n" not in str(error.value)


def test_control_characters_in_paths_are_escaped():
    assert shown("a\nb.pt") == "'a\\nb.pt'" and shown("plain.pt") == "plain.pt"
