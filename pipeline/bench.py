"""`deploy bench`: a published bundle's probe on one or many devices at once.

Each device runs its jobs one at a time under its lock; devices run concurrently (asyncio). A result is
written to the results store the moment it arrives, before anything else happens, so a device that drops
later, or a crash of this process, never loses a result that came back. With `--against` another bundle of the
same model, target and input size (FP32, or any precision: INT8 against FP16 on a Jetson) goes into each
device's job too, and the two are timed in turns there: the speed-up is then that device's own, taken in one
moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_deploy.pipeline.errors import ConfigError, DeployError
from edge_deploy.pipeline.results import ProbeResult, SpeedReport, reported

# Inference time of a dense detector does not depend on what the image shows (decoding and NMS are outside
# the graph), so without --image the job uses a fixed, seeded picture; the result names which one it used.
GENERATED_IMAGE_SEED = 20261130


@dataclass
class DeviceOutcome:
    device: str
    result: ProbeResult | None = None
    error: str | None = None
    exit_code: int = 0
    stored_id: int | None = None
    # With --against: the other bundle's result from the same job, the speed-up over it, and its precision.
    speed: SpeedReport | None = None
    reference_precision: str | None = None


def artifact_digest(files: dict[str, str]) -> str:
    """One hash for an artifact made of several files (name -> sha256), the same for a build and a bundle."""
    text = "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def bundle_artifact(bundle: Path) -> tuple[dict, dict, str]:
    """A checked bundle's manifest, its runtime description and the digest of the files its runtime loads."""
    from edge_deploy.pipeline.stages.release import check_bundle
    from edge_deploy.pipeline.userfiles import read_json

    manifest = check_bundle(bundle)
    runtime = read_json(Path(bundle) / "runtime.json", "bundle runtime description")
    files = {name: manifest["files"][name] for name in runtime.get("files", {}).values() if name in manifest["files"]}
    if not files:
        raise ConfigError(f"{bundle}: runtime.json names no model file the manifest lists")
    return manifest, runtime, artifact_digest(files)


def bundle_beside(manifest: dict, runtime: dict, target, digest: str, against: Path) -> tuple[dict, str]:
    """`against`'s manifest and artifact digest, once it is known to be another bundle of the same model, target
    and input size as the bundle benchmarked (whose artifact digest is `digest`), for a target whose runner can
    time the two in one job."""
    against_manifest, against_runtime, against_digest = bundle_artifact(against)
    if against_manifest["target"] != manifest["target"]:
        raise ConfigError(f"--against {against} is a '{against_manifest['target']}' bundle and the bundle "
                          f"benchmarked is for '{manifest['target']}': a speed-up compares one runtime's builds")
    if against_digest == digest:
        raise ConfigError(f"--against {against} holds the same model files as {manifest['bundle']}: "
                          "there is nothing to compare")
    if against_manifest.get("model_source_sha256") != manifest.get("model_source_sha256"):
        raise ConfigError(f"--against {against} was built from another model than {manifest['bundle']}")
    if against_runtime["input"]["imgsz"] != runtime["input"]["imgsz"]:
        raise ConfigError(f"--against {against} takes {against_runtime['input']['imgsz']} px input and "
                          f"{manifest['bundle']} {runtime['input']['imgsz']} px: they do different work")
    if not target.times_builds_in_turns:
        raise ConfigError(f"target '{target.name}' cannot time two models in one job; bench each bundle on its own")
    return against_manifest, against_digest


def probe_tensor(image: Path | None, imgsz: int, layout: str, work: Path) -> tuple[np.ndarray, dict]:
    from edge_deploy.calibration.preprocess import Preprocess, load_tensor
    from edge_deploy.pipeline.artifacts import sha256_file

    if image is None:
        import cv2

        rng = np.random.default_rng(GENERATED_IMAGE_SEED)
        image = work / "generated-probe-image.png"
        cv2.imwrite(str(image), rng.integers(0, 256, (imgsz, imgsz, 3), dtype=np.uint8))
        described = {"image": "generated (seeded noise; latency does not depend on content)"}
    else:
        described = {"image": str(image)}
    tensor, _ = load_tensor(Path(image), Preprocess(imgsz=imgsz, layout="NCHW"))
    described["image_sha256"] = sha256_file(Path(image))
    if layout == "NHWC":
        tensor = tensor.transpose(0, 2, 3, 1).copy()
    return tensor, described


async def bench_devices(bundle: Path, names: list[str], inventory, home: Path, store, runs: int, warmup: int,
                        threads: int | None, image: Path | None, timeout: float | None,
                        on_phase: Callable[[str, str], None], against: Path | None = None) -> list[DeviceOutcome]:
    from edge_deploy.pipeline.stages.probe import speed_report, split_pair
    from edge_deploy.pipeline.stages.verify import artifact_label
    from edge_deploy.targets import load_target

    manifest, runtime, digest = bundle_artifact(bundle)
    target = load_target(manifest["target"])()
    against_manifest, against_digest = (bundle_beside(manifest, runtime, target, digest, against) if against
                                        else (None, None))
    against_precision = against_manifest["precision"] if against else None
    devices = {name: inventory.get(name) for name in names}  # every name checked before any job starts
    for name, device in devices.items():
        if device.target and device.target != target.name:
            raise ConfigError(f"device {name} runs target '{device.target}', the bundle is for '{target.name}'")
    transports = {name: inventory.transport(name) for name in names}
    if against:
        unpaired = [name for name in names if not transports[name].runs_python_runners]
        if unpaired:
            raise ConfigError(f"--against needs devices that run the Python runners, and {', '.join(unpaired)} "
                              "cannot (a phone over adb, a board on a serial port): bench each bundle on its own")
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as work:
        work = Path(work)
        tensor, input_note = probe_tensor(image, int(runtime["input"]["imgsz"]), target.input_layout, work)
        job = {"warmup": warmup, "runs": runs, "threads": threads, "input_image": input_note}

        async def one(name: str) -> DeviceOutcome:
            from edge_deploy.targets.transports import run_job
            from edge_deploy.targets.transports.inventory import device_lock

            device = devices[name]
            limit = timeout or device.timeout_s
            try:
                async with device_lock(home, name, wait_s=limit, on_wait=lambda m: on_phase(name, m)):
                    job_dir = work / name
                    job_dir.mkdir()
                    target.prepare_job(bundle, job, tensor, job_dir,
                                       **({"reference_dir": against} if against else {}))
                    result = await run_job(transports[name], job_dir, target.runner, target.runtime_packages, limit,
                                           target.runner_support, on_phase=lambda p: on_phase(name, p))
                    speed = None
                    if against and "reference" in result.extra:  # else the runner says why (reference_failed)
                        reference, result = split_pair(result)
                        speed = speed_report(artifact_label(target, manifest["precision"]), reference, result,
                                             f"the {against_precision.upper()} bundle {against_manifest['bundle']}")
                    on_phase(name, "storing")
                    # Stored before anything else happens; off the event loop, so other devices' jobs go on while
                    # the store waits for a concurrent writer.
                    try:
                        if speed is not None:
                            await asyncio.to_thread(
                                store.add, speed.reference, device=name, artifact_sha256=against_digest,
                                artifact_label=f"{target.name} {against_precision}",
                                target=target.name, precision=against_precision,
                                bundle=against_manifest["bundle"], role="reference", config=job)
                        stored = await asyncio.to_thread(
                            store.add, result, device=name, artifact_sha256=digest,
                            artifact_label=f"{target.name} {manifest['precision']}", target=target.name,
                            precision=manifest["precision"], bundle=manifest["bundle"], config=job)
                    except DeployError as exc:
                        on_phase(name, "measured, not stored")
                        return DeviceOutcome(name, result, error=f"measured but not stored: {exc}",
                                             exit_code=exc.exit_code, speed=speed,
                                             reference_precision=against_precision)
                    on_phase(name, "done")
                    return DeviceOutcome(name, result, stored_id=stored, speed=speed,
                                         reference_precision=against_precision)
            except DeployError as exc:
                on_phase(name, "failed")
                try:
                    await asyncio.to_thread(store.add_failure, device=name, artifact_sha256=digest,
                                            bundle=manifest["bundle"], error=str(exc))
                except DeployError:
                    pass  # the failure is still reported on the command line
                return DeviceOutcome(name, error=str(exc), exit_code=exc.exit_code)

        return list(await asyncio.gather(*(one(name) for name in names)))


def outcome_line(outcome: DeviceOutcome) -> str:
    if outcome.result is None:
        return f"{outcome.device}: failed: {outcome.error}"
    if outcome.error:
        return f"{outcome.device}: {outcome.error}"
    r = outcome.result
    latency = r.latency_ms
    line = (f"{outcome.device}: {r.runtime}, p50 {reported(latency.get('p50'), ' ms')}, "
            f"p90 {reported(latency.get('p90'), ' ms')}, {reported(r.fps)} FPS, power {r.power_text()} "
            f"({r.device.get('processor') or r.device.get('machine', '?')})")
    speed = outcome.speed
    if speed is not None:
        line += f"; {(outcome.reference_precision or 'reference').upper()} p50 " \
                f"{reported(speed.reference.latency_ms.get('p50'), ' ms')}"
        if speed.speedup_p50 is not None:
            line += f"; {speed.speedup_text()}"
        if speed.contended:
            line += f"; the device was busy ({speed.contended}): run it again"
    elif r.extra.get("reference_failed"):
        line += f"; no speed-up: {r.extra['reference_failed']}"
    return line


def exit_code(outcomes: list[DeviceOutcome]) -> int:
    """0 when every device answered; else the worst device failure's code (a timeout outranks a failure)."""
    return max((o.exit_code for o in outcomes), default=0)


def outcomes_json(outcomes: list[DeviceOutcome]) -> list[dict]:
    return [{"device": o.device, "ok": o.result is not None, "error": o.error, "exit_code": o.exit_code,
             "stored_id": o.stored_id, "result": o.result.to_json() if o.result else None,
             **({} if o.speed is None else {"reference": o.speed.reference.to_json(),
                                            "reference_precision": o.reference_precision, "speed": {
                 key: getattr(o.speed, key)
                 for key in ("reference_label", "speedup_p50", "timing", "speedup_rounds", "contended")}})}
            for o in outcomes]
