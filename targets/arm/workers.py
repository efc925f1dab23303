"""ncnn nets in worker processes, for scoring and calibration on every core.

ncnn's Python binding holds the GIL while a net computes, so threads run one
image at a time; and one net on two threads waited on itself (5 s instead of
0.55 s per 640 px image on this shared 2-core machine). Separate processes, each
with its own net at one thread, neither wait on each other nor on the GIL, and
give the same numbers as one process: every image is computed alone.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import weakref
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from edge_deploy.targets.arm.runner import open_net, run_once

# Below this input size an image takes milliseconds, and starting the processes (about a second: each imports numpy
# and ncnn and loads the net) costs more than spreading the images saves.
MIN_IMGSZ = 320
FILES = ("model.ncnn.param", "model.ncnn.bin")

_net = None  # a worker process's own net, opened once by _open


def ncnn_net(artifact_dir: Path, precision: str, threads: int | None = None):
    job = {"param": FILES[0], "bin": FILES[1], "precision": precision, "threads": threads}
    return open_net(Path(artifact_dir), job)


# Values of each tensor kept per calibration image. At 640 px the convolution inputs of a YOLOv8n hold 19.7M values
# per image; histogramming all of them cost 0.3 s per image on a quiet machine and 1.2 s on a busy one, as much as
# the inference. 2^15 per tensor per image is 2.0M values per image at 640 px (1.6 GB for 200 images, held between
# the two passes of collect_statistics) and leaves most tensors of a 160 px model whole. MinMax is exact whatever
# the sample; Entropy thresholds came out identical for 60 of 63 tensors at 640 px and 62 of 63 at 160 px. The few
# that moved have two near-equal KL minima, and 2^17 values moved another one just as far, so a larger sample
# would not pin them.
SAMPLE_PER_IMAGE = 1 << 15
SAMPLE_SEED = 0


def sample_image(net, image: np.ndarray, blobs: list[str], per_image: int = SAMPLE_PER_IMAGE):
    """One inference: per blob the exact extremes and a sample of `per_image` values (all of them when fewer),
    drawn from a generator seeded with the image's content, so that an image gives the same sample wherever it is
    computed and in whatever batch."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    seed = int.from_bytes(hashlib.blake2b(image, digest_size=8).digest(), "little")
    rng = np.random.default_rng([SAMPLE_SEED, seed])
    lowest = np.full(len(blobs), np.inf, np.float32)
    highest = np.full(len(blobs), -np.inf, np.float32)
    parts: list[np.ndarray | None] = []
    for i, value in enumerate(run_once(net, image, blobs)):
        flat = value.ravel()
        if not flat.size:
            parts.append(None)
            continue
        lowest[i], highest[i] = flat.min(), flat.max()
        parts.append(flat if flat.size <= per_image else flat[rng.integers(0, flat.size, per_image)])
    return lowest, highest, parts


def worker_count(imgsz: int) -> int:
    """How many processes score and calibrate a model of this input size here: 1 below MIN_IMGSZ."""
    from edge_deploy.calibration.onnxrt import scoring_workers

    return 1 if imgsz < MIN_IMGSZ else scoring_workers()


def _open(artifact_dir: str, precision: str) -> None:
    global _net
    _net = ncnn_net(Path(artifact_dir), precision, threads=1)


def _outputs(job: tuple[np.ndarray, list[str]]) -> list[np.ndarray]:
    image, names = job
    return run_once(_net, image, names)


def _sample(job: tuple[np.ndarray, list[str], int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    image, blobs, per_image = job
    return sample_image(_net, image, blobs, per_image)


class NcnnInProcess:
    """One net in this process, asked as NcnnWorkers is: what scores and calibrates need not care which it has."""

    workers = 1

    def __init__(self, net):
        self.net = net

    def outputs(self, images, names: list[str]) -> list[list[np.ndarray]]:
        return [run_once(self.net, image, names) for image in images]

    def samples(self, images, blobs: list[str], per_image: int):
        return [sample_image(self.net, image, blobs, per_image) for image in images]


class NcnnWorkers:
    """A pool of processes, each with the model at `artifact_dir` open at one thread; results come back in order."""

    def __init__(self, artifact_dir: Path, precision: str, workers: int):
        # spawn, not fork: the parent may hold onnxruntime's or torch's threads, which a forked child would inherit
        # half-initialised.
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_open,
                                        initargs=(str(artifact_dir), precision))
        self.workers = workers
        weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)

    def outputs(self, images, names: list[str]) -> list[list[np.ndarray]]:
        return list(self.pool.map(_outputs, [(image, names) for image in images]))

    def samples(self, images, blobs: list[str], per_image: int):
        return list(self.pool.map(_sample, [(image, blobs, per_image) for image in images]))
