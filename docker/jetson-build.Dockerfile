# The `deploy` command on a Jetson, for the half of the `jetson` target that needs the board's own TensorRT.
#
# NOT BUILT HERE. The machines this project is developed and tested on have the Docker client but no engine,
# so this file was never built or run: CI only lints it (hadolint, tests/test_docker.py). It is kept small
# so that it can be checked by reading. Build it on a Jetson, or with any arm64 engine (NVIDIA's L4T images
# are arm64-only), from the repository root:
#     docker build -f docker/jetson-build.Dockerfile -t edge-deploy-jetson .
#     docker run --rm --runtime nvidia -v "$PWD:/work" edge-deploy-jetson --help
#
# What runs in it, and what does not. A Jetson build has two halves:
#   - model side (load, prune, export, QDQ quantization, the onnxruntime checks): torch, torchvision,
#     Ultralytics, onnxruntime, OpenCV. It runs wherever `./deploy` runs (an x86 host). torch==2.14.1, as
#     pinned, has no Jetson (CUDA, aarch64) build on PyPI, and none of this needs the board.
#   - engine side (TensorRT engine from the QDQ ONNX and its build recipe, trtexec timing, the device runner):
#     TensorRT, trtexec and the ONNX file only. Engines are valid only for the TensorRT version and GPU that
#     built them, so this half runs on the board, in this image.
# So the project is installed WITHOUT its dependencies, plus only the packages the `deploy` command itself
# and the runner side import (pins below = pyproject.toml's; tests/test_docker.py checks they agree).
# The `jetson` extra adds nothing from PyPI: on L4T, TensorRT, its ONNX parser and trtexec come from the base
# image's NVIDIA packages (PyPI's tensorrt wheels are not built for Tegra). Runs here: `deploy targets`,
# `deploy check BUNDLE`, and the jetson runner (standard library + trtexec) on a job folder made by the host:
#     docker run --rm --runtime nvidia -v "$PWD/job:/work/job" --entrypoint python edge-deploy-jetson \
#         -m edge_deploy.targets.jetson.runner /work/job
# `deploy build` needs the model side: here it stops at a missing module; run it on the host.
#
# Base: NVIDIA's L4T TensorRT image from NGC, pinned to the JetPack it matches (see jetson-runner.Dockerfile):
#   JetPack 6.1/6.2, L4T r36.4, TensorRT 10.3 (Orin):      nvcr.io/nvidia/l4t-tensorrt:r10.3.0-devel (default)
#   JetPack 5.1, L4T r35, TensorRT 8.5 (Xavier NX, Orin):   nvcr.io/nvidia/l4t-tensorrt:r8.5.2.2-devel
#     docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/l4t-tensorrt:r8.5.2.2-devel -f docker/jetson-build.Dockerfile .
# -devel, because only the -devel images ship trtexec (/usr/src/tensorrt/bin).
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-tensorrt:r10.3.0-devel
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# The project needs Python 3.11. The bases' Ubuntu has 3.10 (r36) or 3.8 (r35, whose Ubuntu 20.04 packages no
# 3.11 at all), so uv (pinned, from PyPI) installs one pinned CPython 3.11 the same way on both. The base's own
# python3 stays as it is, with the TensorRT bindings built for it: this image reaches TensorRT through trtexec.
ARG UV_VERSION=0.13.9
ARG PYTHON_VERSION=3.11.18
ARG UV_PYTHON_INSTALL_DIR=/opt/python

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m pip install --no-cache-dir --target /tmp/uv "uv==${UV_VERSION}" \
    && /tmp/uv/bin/uv python install --no-cache --no-bin "${PYTHON_VERSION}" \
    && "$(/tmp/uv/bin/uv python find --managed-python --no-project "${PYTHON_VERSION}")" -m venv /opt/edge-deploy/venv \
    && rm -rf /tmp/uv /root/.cache \
    && useradd --no-log-init --create-home --uid 1000 --groups video deploy \
    && mkdir -p /opt/edge-deploy/home/ultralytics /work \
    && chown -R deploy:deploy /opt/edge-deploy/home /work

# Only what the install reads: the project metadata (pyproject.toml names README.md as the readme) and the
# four folders that become the edge_deploy packages.
COPY pyproject.toml README.md /tmp/src/
COPY edge_deploy/ /tmp/src/edge_deploy/
COPY pipeline/ /tmp/src/pipeline/
COPY calibration/ /tmp/src/calibration/
COPY targets/ /tmp/src/targets/
RUN /opt/edge-deploy/venv/bin/pip install --no-cache-dir --no-deps /tmp/src \
    && /opt/edge-deploy/venv/bin/pip install --no-cache-dir \
        click==8.5.1 rich==15.0.0 pyyaml==6.0.3 pydantic==2.14.3 numpy==2.4.6 \
    && rm -rf /tmp/src

# Offline, like everywhere else in this project: caches and Ultralytics' config live inside the image
# (DEPLOY_HOME, YOLO_CONFIG_DIR = the folder pipeline/ultra.py derives from it), and nothing installs itself.
# Mount a volume on /opt/edge-deploy/home to keep the build cache between runs.
ENV PATH=/opt/edge-deploy/venv/bin:/usr/src/tensorrt/bin:${PATH} \
    DEPLOY_HOME=/opt/edge-deploy/home \
    YOLO_CONFIG_DIR=/opt/edge-deploy/home/ultralytics \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0 \
    PYTHONUNBUFFERED=1

# Fails the build early when the chosen base has no trtexec (a -runtime tag), or `deploy` does not start.
RUN command -v trtexec && deploy --help

# By uid, so that a host or an orchestrator can tell it is not root; supplementary groups (video) still
# come from /etc/group because no group is named.
USER 1000
# The user's project folder (deploy.yaml, dist/): mount it here.
WORKDIR /work
ENTRYPOINT ["deploy"]
CMD ["--help"]
