# Device-side runner for the `jetson` target: one job folder in, result.json out, on the Jetson itself.
#
# NOT BUILT HERE. The machines this project is developed and tested on have the Docker client but no engine,
# so this file was never built or run: CI only lints it (hadolint, tests/test_docker.py). It is kept small
# so that it can be checked by reading. Build it on a Jetson, or with any arm64 engine (NVIDIA's L4T images
# are arm64-only), from the repository root:
#     docker build -f docker/jetson-runner.Dockerfile -t edge-deploy-jetson-runner .
# and run a job folder made by `deploy` (writable by uid 1000; else add --user "$(id -u)" --group-add video):
#     docker run --rm --runtime nvidia -v "$PWD/job:/job" \
#         -v /usr/bin/tegrastats:/usr/bin/tegrastats:ro edge-deploy-jetson-runner
# tegrastats is the host's (JetPack's) tool, not the image's: without that mount the runner falls back to the
# INA3221 rails in sysfs, or reports power as unavailable.
#
# Base: NVIDIA's L4T TensorRT image from NGC, pinned to the JetPack it matches; an engine is only valid for
# the TensorRT version and GPU it was built with, so the base must match the board's JetPack:
#   JetPack 6.1/6.2, L4T r36.4, Ubuntu 22.04, TensorRT 10.3 (Orin):  nvcr.io/nvidia/l4t-tensorrt:r10.3.0-devel (default)
#   JetPack 5.1, L4T r35, Ubuntu 20.04, TensorRT 8.5 (Xavier NX, Orin):  nvcr.io/nvidia/l4t-tensorrt:r8.5.2.2-devel
#     docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/l4t-tensorrt:r8.5.2.2-devel -f docker/jetson-runner.Dockerfile .
# The -devel images, not -runtime (r10.3.0-runtime, r8.5.2-runtime; smaller): only -devel ships trtexec
# (/usr/src/tensorrt/bin), which builds and times the engine on the device.
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-tensorrt:r10.3.0-devel
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive

# Python 3 and numpy only, both from Ubuntu. runner.py itself needs the standard library and trtexec; numpy is
# the one package every target's runner may count on. The base's own python3 (3.10 on r36, 3.8 on r35) is the
# one its TensorRT Python bindings are built for, and Ubuntu's numpy 1.x the one they were built against.
# The user is in `video`: with --runtime nvidia the GPU's device nodes are root:video, mode 0660.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-numpy \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-log-init --create-home --uid 1000 --groups video runner \
    && mkdir /job \
    && chown runner:runner /job

# Standalone scripts, importing each other as top-level modules (measure.py beside the runner, as on any
# device). Owned by root and read-only to the runner user.
COPY targets/jetson/runner.py targets/jetson/trtexec.py targets/jetson/tegrastats.py targets/runners/launch.py \
     targets/runners/measure.py targets/runners/power.py /opt/edge-deploy/

ENV PATH=/usr/src/tensorrt/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Fails the build early when the chosen base has no trtexec (a -runtime tag).
RUN command -v trtexec

# By uid, so that a host or an orchestrator can tell it is not root; supplementary groups (video) still
# come from /etc/group because no group is named.
USER 1000
WORKDIR /job
ENTRYPOINT ["python3", "/opt/edge-deploy/runner.py"]
# The job folder the runner reads job.json from and writes result.json to.
CMD ["/job"]
