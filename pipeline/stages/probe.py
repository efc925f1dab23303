"""probe: latency percentiles, FPS, load time, memory and power of the artifact and of the FP32 reference.

A target that declares `times_builds_in_turns` gets one job with its artifact and its own FP32 build, timed in turns
(in one process, or for TensorRT one trtexec run per block, both engines built in the job); any other is timed
against the FP32 ONNX in ONNX Runtime in a job of its own. What runs is the target's device runner
on a job folder the target fills; where it runs is the transport's business. The cache key records the device and
the runtime versions the transport reports, not the host's packages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
import warnings
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Awaitable, Callable

from edge_deploy.calibration.preprocess import Preprocess, load_tensor
from edge_deploy.pipeline.artifacts import Artifact, sha256_file
from edge_deploy.pipeline.engine import Stage, StageOutput
from edge_deploy.pipeline.results import (FP32_ONNX, IN_TURNS_RUN_PER_BLOCK, INTERLEAVED, ONE_AFTER_THE_OTHER,
                                          ModelInfo, ProbeResult, SpeedReport)
from edge_deploy.pipeline.stages.verify import artifact_label


class ProbeStage(Stage):
    name = "probe"
    inputs = ("model_info", "onnx", "artifact")

    def __init__(self, target, precision: str, image: Path, preprocess: Preprocess, warmup: int, runs: int,
                 threads: int | None, transport, reference_target, reference_transport,
                 hold: Callable[[str], AbstractAsyncContextManager] | None = None,
                 on_result: Callable[[str, ProbeResult, Path, object, str], None] | None = None,
                 timeout: float = 900):
        """`hold(device)` keeps a device to this build while its job runs; `on_result(role, result, artifact
        folder, target, precision)` is told of each result the moment it arrives (the results store); `timeout`
        bounds each device job. None of them changes what is measured, so none is part of the cache key."""
        self.target, self.precision, self.image, self.preprocess = target, precision, Path(image), preprocess
        self.warmup, self.runs, self.threads = warmup, runs, threads
        self.transport, self.reference_target, self.reference_transport = \
            transport, reference_target, reference_transport
        self.hold, self.on_result, self.timeout = hold, on_result, timeout

    def settings(self) -> dict:
        return {"target": self.target.name, "precision": self.precision, "warmup": self.warmup,
                "runs": self.runs, "threads": self.threads, "preprocess": self.preprocess.params()}

    def fingerprints(self) -> dict:
        return {"probe_image": sha256_file(self.image)}

    def toolchain_versions(self) -> dict:
        return {"artifact": self.transport.describe(self.target.runtime_packages),
                "reference": self.reference_transport.describe(self.reference_target.runtime_packages)}

    def code_modules(self) -> tuple[str, ...]:
        return (type(self).__module__, type(self.target).__module__, type(self.reference_target).__module__,
                type(self.transport).__module__, "edge_deploy.targets.transports", "edge_deploy.targets.runners.measure",
                "edge_deploy.targets.runners.launch", "edge_deploy.targets.runners.power",
                *(runner_module(t) for t in (self.target, self.reference_target)))

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        info = ModelInfo.from_json(json.loads(inputs["model_info"].path.read_text()))
        tensor, _ = load_tensor(self.image, self.preprocess)
        target_tensor = tensor.transpose(0, 2, 3, 1).copy() if self.target.input_layout == "NHWC" else tensor
        # The build's profile's thread count when it names one; else None, and the device runner uses every core
        # it may run on, sets that number on its runtime and reports it (a result never says "runtime default").
        job = {"warmup": self.warmup, "runs": self.runs, "threads": self.threads}
        outputs = {}
        timed = self.precision not in self.target.reference_precisions  # else the artifact is the reference
        paired = timed and self.pairs()
        reference = artifact = unpaired_reason = None
        reference_label, artifact_job = FP32_ONNX, out_dir / "job-artifact"
        if paired:
            fp32_dir = self._fp32(self.target, inputs, info, out_dir)
            self._check_fp32(fp32_dir, inputs["onnx"].path, tensor, target_tensor)
            artifact_job = out_dir / "job-pair"
            both = self._probe(self.target, self.transport, inputs["artifact"].path, job, target_tensor,
                               artifact_job, fp32_dir)
            if "reference" in both.extra:
                reference, artifact = split_pair(both)
                self._tell("reference", reference, fp32_dir, self.target, "fp32")
                # The reference target's own FP32 build is the FP32 ONNX in its runtime; any other target's FP32
                # build runs in that target's runtime (an ncnn FP32 model, a TensorRT FP32 engine).
                reference_label = FP32_ONNX if self.target.name == self.reference_target.name else \
                    artifact_label(self.target, "fp32")
            else:
                # The device timed the artifact but not its FP32 build beside it (a TensorRT FP32 engine that
                # would not build): the FP32 ONNX is timed in a job of its own instead, the speed-up names it and
                # the two jobs, and nothing is cached, so the next build tries the pair again.
                artifact, unpaired_reason = both, both.extra.get("reference_failed", "no FP32 result came back")
                warnings.warn(f"probe: {unpaired_reason}; the FP32 ONNX is timed in a job of its own instead",
                              stacklevel=2)
            self._tell("artifact", artifact, inputs["artifact"].path, self.target, self.precision)
        if reference is None:
            reference_dir = self._fp32(self.reference_target, inputs, info, out_dir)
            reference = self._probe(self.reference_target, self.reference_transport, reference_dir, job, tensor,
                                    out_dir / "job-fp32")
            self._tell("reference", reference, reference_dir, self.reference_target, "fp32")
        if timed and artifact is None:
            artifact = self._probe(self.target, self.transport, inputs["artifact"].path, job, target_tensor,
                                   artifact_job)
            self._tell("artifact", artifact, inputs["artifact"].path, self.target, self.precision)
        if artifact is not None:
            # What the device built and sent back (a TensorRT engine and its logs) ships with the bundle.
            returned = [n for n in artifact.extra.get("bring_back", []) if (artifact_job / n).is_file()]
            if returned:
                (out_dir / "from_device").mkdir()
                for name in returned:
                    shutil.move(artifact_job / name, out_dir / "from_device" / name)
                outputs["device_files"] = out_dir / "from_device"
        report = speed_report(artifact_label(self.target, self.precision), reference, artifact, reference_label)
        path = out_dir / "probe.json"
        path.write_text(json.dumps(report.to_json(), indent=1))
        # Job folders hold copies of the model; only the results and what the device built are worth keeping.
        for folder in out_dir.iterdir():
            if folder.is_dir() and folder.name != "from_device":
                shutil.rmtree(folder)
        if report.contended:
            warnings.warn(f"probe: {report.contended}; the numbers are shown but not cached: run again on a quiet "
                          "machine", stacklevel=2)
        return StageOutput({"probe_report": path, **outputs}, report.to_json(),
                           cacheable=report.contended is None and unpaired_reason is None)

    def pairs(self) -> bool:
        """Whether the artifact and its FP32 build are timed in one job, in turns: the target's runner can, and
        the device runs the Python runners (a phone over adb runs ncnn's own benchmark tool instead)."""
        return self.target.times_builds_in_turns and self.transport.runs_python_runners

    @staticmethod
    def _fp32(target, inputs: dict[str, Artifact], info: ModelInfo, out_dir: Path) -> Path:
        folder = out_dir / f"fp32-{target.name}"
        folder.mkdir()
        target.compile(inputs["onnx"].path, None, "fp32", info, folder)
        return folder

    def _check_fp32(self, fp32_dir: Path, onnx: Path, tensor, target_tensor) -> None:
        """The target's FP32 build is the speed-up's yardstick, so it is held to compile's FP32 tolerance against
        the ONNX it came from, on the probe's image: a build that lost a layer would otherwise look slow or fast
        for nothing."""
        from edge_deploy.calibration.onnxrt import SCORING_THREADS, ort_infer
        from edge_deploy.pipeline.stages.compile import float_parity

        reference = ort_infer(onnx, SCORING_THREADS)(tensor)
        produced = self.target.runtime(fp32_dir, threads=SCORING_THREADS)(target_tensor)
        float_parity(f"probe[{self.target.name}]: the FP32 build timed beside the artifact", reference, produced,
                     self.target.parity_tolerance["fp32"])

    def _probe(self, target, transport, artifact_dir: Path, job: dict, tensor, job_dir: Path,
               fp32_dir: Path | None = None):
        job_dir.mkdir()
        target.prepare_job(Path(artifact_dir), job, tensor, job_dir,
                           **({"reference_dir": fp32_dir} if fp32_dir else {}))
        return asyncio.run(self._held_job(target, transport, job_dir))

    def _tell(self, role: str, result: ProbeResult, artifact_dir: Path, target, precision: str) -> None:
        if self.on_result is not None:
            self.on_result(role, result, Path(artifact_dir), target, precision)

    async def _held_job(self, target, transport, job_dir: Path):
        from edge_deploy.targets.transports import run_job

        return await held_job(self.hold, transport.label, lambda: run_job(
            transport, job_dir, target.runner, target.runtime_packages, self.timeout, support=target.runner_support))


async def held_job(hold: Callable[[str], AbstractAsyncContextManager] | None, device: str,
                   job: Callable[[], Awaitable[ProbeResult]]) -> ProbeResult:
    """One device job under the device's lock (this machine's too: two builds timing here at once would each
    measure the other's load), the wait recorded in the result's host timings (`lock_wait_s`). Only the job is
    held: whatever a build does before or after it runs alongside other builds' jobs."""
    if hold is None:
        return await job()
    asked = time.monotonic()
    async with hold(device):
        waited = time.monotonic() - asked
        result = await job()
    return dataclasses.replace(result, host_timings={**result.host_timings, "lock_wait_s": round(waited, 3)})


def speed_report(label: str, reference: ProbeResult, artifact: ProbeResult | None,
                 reference_label: str) -> SpeedReport:
    """The artifact's speed-up over the reference at p50 where both ran on one device, how the two were timed,
    each round's ratio when they were timed in turns, and whether either timing says the machine was busy."""
    speedup = None
    if artifact and same_device(reference, artifact) and reference.latency_ms.get("p50") \
            and artifact.latency_ms.get("p50"):
        speedup = round(reference.latency_ms["p50"] / artifact.latency_ms["p50"], 3)
    timing, rounds = None, None
    if artifact is not None:
        block, tool = artifact.extra.get("interleaved_block"), artifact.extra.get("interleaved_tool")
        timing = ONE_AFTER_THE_OTHER if not block else \
            IN_TURNS_RUN_PER_BLOCK.format(tool=tool) if tool else INTERLEAVED
        rounds = round_speedups(reference.samples_ms, artifact.samples_ms, block) if block else None
    return SpeedReport(label, reference, artifact, speedup,
                       contention([reference] + ([artifact] if artifact else [])), reference_label, timing, rounds)


def split_pair(both: ProbeResult) -> tuple[ProbeResult, ProbeResult]:
    """The FP32 reference's and the artifact's results out of one paired job's: the device, the host's timings
    and the job's times are the job's, so both carry them."""
    extra = dict(both.extra)
    runner_reference = extra.pop("reference")
    known = {f.name for f in dataclasses.fields(ProbeResult)}
    own = {k: v for k, v in runner_reference.items() if k in known and k not in ("device", "extra")}
    reference = dataclasses.replace(both, extra={k: v for k, v in runner_reference.items() if k not in known},
                                    **own)
    return reference, dataclasses.replace(both, extra=extra)


def round_speedups(reference_ms: list, artifact_ms: list, block: int) -> dict | None:
    """The speed-up in each round of a timing in turns: the mean of a round's FP32 block over the mean of the
    artifact's block beside it. How far they spread says how steady the ratio was while the machine moved."""
    if not block or not reference_ms or len(reference_ms) != len(artifact_ms):
        return None
    ratios = sorted(sum(reference_ms[i:i + block]) / sum(artifact_ms[i:i + block])
                    for i in range(0, len(artifact_ms), block))
    middle = len(ratios) // 2
    median = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    return {"rounds": len(ratios), "runs_per_round": block, "median": round(median, 3),
            "min": round(ratios[0], 3), "max": round(ratios[-1], 3)}


def same_device(first, second) -> bool:
    """Whether two results came from one machine: a speed-up between two machines means nothing."""
    def where(result):
        return {k: v for k, v in result.device.get("transport", {}).items() if k != "packages"}

    return where(first) == where(second)


# A p90 this far above the p50 means other work shared the cores during the timed runs.
CONTENDED_P90_OVER_P50 = 1.5
# A p50 this far above the fastest run means most runs were slowed, evenly enough to pass the p90 test: an INT8
# probe on a 2-core VM whose runs went from 55 ms down to 40 ms in its last tenth gave p50 52.3 ms, 1.33x its
# fastest, p90 only 1.15x p50, and 1.14x FP32's speed where a one-off interleaved timing gave 1.80x.
# Quiet probes of this project's builds measured 1.02-1.17x (2026-12-01).
CONTENDED_P50_OVER_MIN = 1.25


def contention(results) -> str | None:
    for result in results:
        p50, p90, fastest = (result.latency_ms.get(k) for k in ("p50", "p90", "min"))
        if p50 is None or p90 is None:
            continue  # a runtime that reports no percentiles gives no sign either way
        if p90 > CONTENDED_P90_OVER_P50 * p50:
            return (f"{result.runtime} p90 {p90} ms is {p90 / p50:.1f}x its p50 {p50} ms, so the machine was busy "
                    "during the timed runs")
        if fastest and p50 > CONTENDED_P50_OVER_MIN * fastest:
            return (f"{result.runtime} p50 {p50} ms is {p50 / fastest:.2f}x its fastest run ({fastest} ms), so the "
                    "machine was busy (or changed its clocks) during most of the timed runs")
    return None


def runner_module(target) -> str:
    """The importable name of a target's runner script, so its source is part of the probe's key."""
    return f"{type(target).__module__}.{Path(target.runner).stem}"
