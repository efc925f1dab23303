from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_deploy.calibration.preprocess import Preprocess
from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.engine import Engine
from edge_deploy.pipeline.stages.export import ExportStage
from edge_deploy.pipeline.stages.load import LoadStage

REPO = Path(__file__).resolve().parents[1]
DEPLOY = Path(sys.executable).parent / "deploy"
EMBEDDED_MODEL = REPO / "pipeline" / "embedded" / "yolov8n-shapes.pt"

# A shell without job control starts background commands (`./run-tests &`, `nohup .ci/run &`) with SIGINT ignored,
# and an ignored signal stays ignored through exec: the `deploy` processes the Ctrl-C tests interrupt would never
# see it. Handling it here makes every child start with the default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def deploy_home(tmp_path_factory) -> Path:
    """One DEPLOY_HOME for the session: the generated data set and stage cache are shared by tests."""
    home = tmp_path_factory.mktemp("deploy-home")
    from edge_deploy.pipeline.ultra import ultralytics_offline

    ultralytics_offline(home)
    return home


@pytest.fixture(scope="session")
def shapes_yaml(deploy_home) -> Path:
    from edge_deploy.pipeline.build import embedded_data

    return embedded_data(deploy_home)


@pytest.fixture(scope="session")
def small_shapes_yaml(tmp_path_factory) -> Path:
    """A small copy of the shapes set for tests that need a data set but not its accuracy."""
    from edge_deploy.pipeline.embedded.shapes import ShapesSpec, generate

    return generate(tmp_path_factory.mktemp("small-shapes"), ShapesSpec(train_images=24, val_images=12))


@pytest.fixture(scope="session")
def engine(deploy_home):
    return Engine(deploy_home / "cache")


@pytest.fixture(scope="session")
def exported(engine, deploy_home) -> dict:
    """Artifacts of load + export of the embedded model, shared by the stage tests."""
    available = {"source": Artifact.of(EMBEDDED_MODEL)}
    available.update(engine.run(LoadStage(deploy_home, None), available).artifacts)
    available.update(engine.run(ExportStage(deploy_home, 17, True, 1e-4), available).artifacts)
    return available


@pytest.fixture(scope="session")
def model_info(exported) -> dict:
    return json.loads(exported["model_info"].path.read_text())


@pytest.fixture(scope="session")
def preprocess(model_info) -> Preprocess:
    return Preprocess(model_info["imgsz"])


@pytest.fixture(scope="session")
def cpu_fp32_bundle(tmp_path_factory, deploy_home) -> Path:
    """A published cpu FP32 bundle of the embedded model, for the commands that take a bundle."""
    out = tmp_path_factory.mktemp("cpu-fp32-dist")
    done = run_deploy(["build", "--json", "--precision", "fp32", "--runs", "50", "--output", str(out)], out,
                      deploy_home)
    assert done.returncode == 0, done.stderr
    return Path(json.loads(done.stdout)["bundle"])


def run_deploy(args: list[str], cwd: Path, home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEPLOY_HOME": str(home), "COLUMNS": "160"}
    env.pop("DEPLOY_DEBUG", None)
    return subprocess.run([str(DEPLOY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_json(args: list[str], cwd: Path, home: Path) -> dict:
    done = run_deploy(["build", "--json", *args], cwd, home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def tree_state(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes: what 'untouched' means in the tests."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
