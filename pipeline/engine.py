"""The stage engine: runs stages in order, caches them by meaning, records what happened.

A stage is given its input artifacts and an empty folder, and returns the
files it wrote there plus metrics. Its cache key is the hash of its name, the
source of every project module it runs, its settings, its inputs' content
hashes, any data fingerprints and the versions of the toolchain it uses (the
device's, for work done on a device). A failed stage leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, ClassVar

from edge_deploy.pipeline.codehash import source_hash
from edge_deploy.pipeline.artifacts import Artifact, atomic_write_text, hash_json, sha256_tree, temp_prefix
from edge_deploy.pipeline.errors import DeployError


def toolchain_versions(distributions: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class StageOutput:
    files: dict[str, Path]
    metrics: dict = field(default_factory=dict)
    # False for a result that must not be reused (a timing taken on a contended machine): it is kept for this
    # build only, outside the cache's keyed entries, and the next build measures again.
    cacheable: bool = True


class Stage:
    """Subclasses declare their name, toolchain and input names as class data."""

    name: ClassVar[str]
    toolchain: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[tuple[str, ...]] = ()
    # A stage that reports how the build went (release) sets this; the engine then gives it, in `timeline`, the
    # records of the stages run before it. They are not part of its key: they describe this build, not what the
    # stage computes, so an unchanged build reuses the release (and its report) as it is.
    wants_timeline: ClassVar[bool] = False
    timeline: tuple[dict, ...] = ()

    def progress(self, text: str) -> None:
        """Where a long stage says how far it is ('image 40/200 (35 s)'); the engine routes it to its on_event,
        so the CLI shows it beside the stage's own lines. Not part of the key."""

    def settings(self) -> dict:
        """Everything besides input artifacts that the result depends on."""
        return {}

    def gate(self, metrics: dict) -> None:
        """Raises AccuracyGateError when the result, fresh or cached, may not go on. Apart from run() so that
        whether a miss stops the build is not part of the key: a build stopped here and run again with
        --accept-drop, as the error says, reuses what the stage measured."""

    def fingerprints(self) -> dict:
        """Content fingerprints of data sets the stage reads (calibration, validation)."""
        return {}

    def code_modules(self) -> tuple[str, ...]:
        """Project modules whose source decides the result; their imports are followed."""
        return (type(self).__module__,)

    def toolchain_versions(self) -> dict:
        """Versions of what the stage runs; a stage whose work happens on a device reports the device's."""
        return toolchain_versions(self.toolchain)

    def run(self, inputs: dict[str, Artifact], out_dir: Path) -> StageOutput:
        raise NotImplementedError


@dataclass
class StageRecord:
    name: str
    key: str
    cache_hit: bool
    seconds: float
    artifacts: dict[str, Artifact]
    metrics: dict
    # Seconds from the engine's start to this stage's, and how long its work took when it ran (for a cache hit,
    # as its cache entry recorded it; None for an entry written before entries recorded it).
    started: float = 0.0
    work_seconds: float | None = None

    def timeline_entry(self) -> dict:
        return {"stage": self.name, "cache_hit": self.cache_hit, "started": round(self.started, 3),
                "seconds": round(self.seconds, 3),
                "work_seconds": None if self.work_seconds is None else round(self.work_seconds, 3)}

    def to_json(self) -> dict:
        return {**self.timeline_entry(), "key": self.key, "metrics": self.metrics,
                "artifacts": {k: {"path": str(a.path), "sha256": a.sha256} for k, a in self.artifacts.items()}}


class Engine:
    def __init__(self, cache_dir: Path, use_cache: bool = True,
                 on_event: Callable[[str, str], None] = lambda stage, event: None):
        self.cache_dir = Path(cache_dir)
        self.use_cache = use_cache
        self.on_event = on_event
        self._uncached: list[Path] = []
        self._t0 = time.perf_counter()
        self.records: list[StageRecord] = []

    def key(self, stage: Stage, inputs: dict[str, Artifact]) -> str:
        return hash_json({
            "stage": stage.name, "code": source_hash(tuple(stage.code_modules())), "settings": stage.settings(),
            "inputs": {name: inputs[name].sha256 for name in stage.inputs},
            "fingerprints": stage.fingerprints(), "toolchain": stage.toolchain_versions(),
        })

    def run(self, stage: Stage, available: dict[str, Artifact]) -> StageRecord:
        missing = [name for name in stage.inputs if name not in available]
        if missing:
            raise DeployError(f"stage {stage.name} needs {', '.join(missing)}, which no earlier stage produced")
        inputs = {name: available[name] for name in stage.inputs}
        key = self.key(stage, inputs)
        entry = self.cache_dir / stage.name / key[:32]
        if stage.wants_timeline:
            stage.timeline = tuple(r.timeline_entry() for r in self.records)
        started = time.perf_counter()
        cached = self._load(entry) if self.use_cache else None
        if cached is not None:
            artifacts, metrics, work_seconds = cached
            self.on_event(stage.name, "cached")
            stage.gate(metrics)
            return self._recorded(StageRecord(stage.name, key, True, time.perf_counter() - started, artifacts,
                                              metrics, started - self._t0, work_seconds))

        self.on_event(stage.name, "running")
        stage.progress = lambda text, name=stage.name: self.on_event(name, text)
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = entry.parent / f"{temp_prefix(entry.name)}{time.time_ns()}"
        work.mkdir()
        try:
            output = stage.run(inputs, work)
            index = {}
            for name, path in output.files.items():
                path = Path(path)
                if work not in path.parents:
                    raise DeployError(f"stage {stage.name} wrote {name} outside its folder")
                index[name] = {"path": path.relative_to(work).as_posix(), "sha256": sha256_tree(path)}
            work_seconds = time.perf_counter() - started
            (work / "stage.json").write_text(json.dumps({"key": key, "files": index, "metrics": output.metrics,
                                                         "seconds": round(work_seconds, 3)}, indent=1, sort_keys=True))
            if not output.cacheable:
                # A temporary name (with our pid): removed by close(), or swept after a killed build.
                entry = self.cache_dir / "uncached" / f"{temp_prefix(f'{stage.name}-{key[:16]}')}{time.time_ns()}"
                entry.parent.mkdir(parents=True, exist_ok=True)
                self._uncached.append(entry)
            if not self._place(work, entry):
                index = json.loads((entry / "stage.json").read_text())["files"]
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        artifacts = {n: Artifact(entry / f["path"], f["sha256"]) for n, f in index.items()}
        self.on_event(stage.name, "done")
        stage.gate(output.metrics)
        return self._recorded(StageRecord(stage.name, key, False, time.perf_counter() - started, artifacts,
                                          output.metrics, started - self._t0, work_seconds))

    def _place(self, work: Path, entry: Path) -> bool:
        """Moves a finished stage's folder to its cache entry; False when another build's valid entry for the same
        key got there first. That one stays (a build running beside this one may be reading it) and ours is
        dropped; a damaged entry is renamed away before ours takes its place, so no reader sees a half-deleted one."""
        if entry.exists() and self._load(entry) is not None:
            return False
        stale = None
        if entry.exists():
            stale = entry.parent / f"{temp_prefix(entry.name)}{time.time_ns()}"
            try:
                entry.rename(stale)
            except FileNotFoundError:
                stale = None
        try:
            work.rename(entry)
        except OSError:
            if self._load(entry) is None:  # not a race with another build of this key: a real failure
                raise
            return False
        finally:
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        return True

    def _recorded(self, record: StageRecord) -> StageRecord:
        self.records.append(record)
        return record

    def close(self) -> None:
        """Drops the results that were for this build only (see StageOutput.cacheable)."""
        for entry in self._uncached:
            shutil.rmtree(entry, ignore_errors=True)
        self._uncached.clear()

    @staticmethod
    def _load(entry: Path) -> tuple[dict[str, Artifact], dict, float | None] | None:
        record = entry / "stage.json"
        if not record.exists():
            return None
        data = json.loads(record.read_text())
        artifacts = {}
        for name, f in data["files"].items():
            path = entry / f["path"]
            # A cache entry edited or damaged on disk is not a hit.
            if not path.exists() or sha256_tree(path) != f["sha256"]:
                return None
            artifacts[name] = Artifact(path, f["sha256"])
        return artifacts, data["metrics"], data.get("seconds")


def write_build_record(path: Path, records: list[StageRecord], extra: dict) -> None:
    atomic_write_text(path, json.dumps({**extra, "stages": [r.to_json() for r in records]}, indent=2,
                                       sort_keys=True))
