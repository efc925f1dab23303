"""ncnn nets in worker processes, for scoring and calibration on every core.

ncnn's Python binding holds the GIL while a net computes, so threads run one
image at a time; and one net on two threads waited on itself (5 s instead of
0.55 s per 640 px image on this shared 2-core machine). Separate processes, each
with its own net at one thread, neither wait on each other nor on the GIL, and
give the same numbers as one process: every image is computed alone.
"""

from __future__ import annotations

import multiprocessing
import weakref
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# Below this input size an image takes milliseconds, and starting the processes (about a second: each imports numpy
# and ncnn and loads the net) costs more than spreading the images saves.
MIN_IMGSZ = 320
_net = None


def worker_count(imgsz: int) -> int:
    """How many processes score and calibrate a model of this input size here: 1 below MIN_IMGSZ."""
    from edge_deploy.calibration.onnxrt import scoring_workers

    return 1 if imgsz < MIN_IMGSZ else scoring_workers()


def _open(artifact_dir: str, precision: str) -> None:
    global _net
    from edge_deploy.targets.arm import ncnn_net

    _net = ncnn_net(Path(artifact_dir), precision, threads=1)


def _outputs(job: tuple[np.ndarray, list[str]]) -> list[np.ndarray]:
    from edge_deploy.targets.arm import runner

    image, names = job
    return runner.run_once(_net, image, names)


def _sample(job: tuple[np.ndarray, list[str], int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    from edge_deploy.targets.arm import sample_image

    image, blobs, per_image = job
    return sample_image(_net, image, blobs, per_image)


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
