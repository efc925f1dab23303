"""The installed shape of the project: one `edge_deploy` package whose subpackages are the source folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DEPLOY = Path(sys.executable).parent / "deploy"
TOOLCHAINS = ("torch", "onnxruntime", "ncnn", "tensorrt", "tensorflow", "ultralytics")


def setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_folder(name: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools looks for package `name`: the longest package-dir entry that is a prefix of it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in package_dir:
            return REPO / package_dir[".".join(parts[:cut])] / Path(*parts[cut:])
    return REPO / Path(*parts)


def run_outside_repo(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # cwd outside the repository keeps its root off sys.path, so only the installed package can be found; a
    # PYTHONPATH from the caller's shell would defeat that.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["DEPLOY_HOME"] = str(tmp_path / "home")
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_every_package_folder_is_listed_and_every_listed_package_exists():
    config = setuptools_config()
    package_dir = config["package-dir"]
    listed = set(config["packages"])
    # A folder with an __init__.py that is not listed is silently left out of a wheel (an editable install still
    # finds it, so nothing else notices).
    on_disk = set()
    for name, folder in package_dir.items():
        for init in (REPO / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(REPO / folder).parts
                on_disk.add(".".join([name, *relative]))
    unlisted = sorted(on_disk - listed)
    assert not unlisted, f"package folders missing from [tool.setuptools].packages: {unlisted}"
    missing = sorted(name for name in listed if not (package_folder(name, package_dir) / "__init__.py").is_file())
    assert not missing, f"listed packages with no __init__.py where package-dir puts them: {missing}"
    assert all(name.split(".")[0] == "edge_deploy" for name in listed), sorted(listed)


def test_source_folders_are_not_top_level_packages(tmp_path):
    check = ("import importlib.util,sys; sys.exit(0 if all(importlib.util.find_spec(n) is None "
             "for n in ('pipeline','targets','calibration')) else 1)")
    done = run_outside_repo([sys.executable, "-c", check], tmp_path)
    assert done.returncode == 0, f"pipeline, targets or calibration is importable at top level: {done.stderr}"
    done = run_outside_repo([sys.executable, "-c", "import edge_deploy.pipeline.engine"], tmp_path)
    assert done.returncode == 0, done.stderr


def test_deploy_targets_json_lists_cpu_and_arm(tmp_path):
    done = run_outside_repo([str(DEPLOY), "targets", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    for name in ("cpu", "arm"):
        assert name in listed, sorted(listed)
        missing = {"precisions", "int8", "input", "compile_runs_on"} - set(listed[name])
        assert not missing, f"{name} lacks {sorted(missing)}"


def test_listing_targets_imports_no_toolchain(tmp_path):
    code = ("import edge_deploy; edge_deploy.target_capabilities(); import sys; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TOOLCHAINS!r}))")
    done = run_outside_repo([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"listing targets imported toolchains: {done.stdout.strip()}"


def test_the_public_api_survives_the_targets_subpackage_being_imported(tmp_path):
    # A function named like the subpackage would be replaced by it on first import; the API avoids that.
    code = ("import edge_deploy, edge_deploy.targets; caps = edge_deploy.target_capabilities(); "
            "assert caps['arm']['int8']['methods'] == ['minmax', 'entropy']; edge_deploy.target_capabilities()")
    done = run_outside_repo([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
