"""`deploy search`: a Pareto search over input size, pruning and precision, each trial an ordinary build.

A trial is `run_build` with a few settings changed, so everything a build shares with another (load, export, a
pruned model fine-tuned once, a quantized model) comes from the content-addressed cache. Pruned trials climb
fidelity rungs (fine-tune epochs): all start cheap, and asynchronous successive halving (ASHA) promotes about one
in `eta` of each rung, the ones on the best Pareto fronts of latency against mAP, to the next. Each trial is a Ray
task declaring its CPUs; Ray is imported here only, and only once a trial actually has to run, so a search whose
trials are all on record (a resumed one) starts no Ray at all.

Every finished trial is written as it arrives to `<output>/search/trials/<key>.json`, keyed by the hash of the
trial's build settings, the inputs' contents and this code: a re-run skips what is on record, so an interrupted
search resumes where it stopped.

On a cluster (`--ray-address`, or RAY_ADDRESS), every node needs this package installed and must see the same
DEPLOY_HOME and output folder (a shared filesystem mounted at the same path): trials read the data and write the
cache there, and the driver reads their build records. Without one, trials on other nodes still run and report
their numbers (they come back through Ray), but each node fills a cache of its own, so shared stages are computed
once per node instead of once, a node may lack the data set, device locks hold per node only, and `--pick`
rebuilds the chosen trial on the driver's machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edge_deploy.pipeline.artifacts import atomic_write_text, hash_json, sha256_file
from edge_deploy.pipeline.config import BuildConfig, PruneConfig, SearchConfig
from edge_deploy.pipeline.errors import AccuracyGateError, ConfigError, DeployError, InputError

SEARCH_FOLDER = "search"


@dataclass(frozen=True)
class TrialSpec:
    imgsz: int
    precision: str
    method: str = "auto"
    prune_ratio: float = 0.0  # 0: unpruned
    criterion: str | None = None
    epochs: int | None = None  # the fidelity: fine-tune epochs of a pruned trial; None when unpruned

    @property
    def pruned(self) -> bool:
        return self.prune_ratio > 0

    @property
    def arm(self) -> tuple:
        """The configuration without its fidelity: what successive halving promotes."""
        return self.imgsz, self.precision, self.method, self.prune_ratio, self.criterion

    @property
    def shared_prefix(self) -> tuple:
        """Trials with the same prefix share their first stages (load, prune + fine-tune, export): running two of
        them at once would compute those twice, so they run one after the other."""
        return self.imgsz, self.prune_ratio, self.criterion, self.epochs

    def label(self) -> str:
        parts = [f"{self.imgsz}px"]
        if self.pruned:
            parts.append(f"prune {self.prune_ratio:g} {self.criterion} {self.epochs}ep")
        parts.append(self.precision if self.method == "auto" else f"{self.precision} {self.method}")
        return " ".join(parts)


@dataclass
class Trial:
    spec: TrialSpec
    key: str
    status: str  # "done" or "failed"
    seconds: float = 0.0
    error: str | None = None
    # A failure of the machinery (a crashed worker, an unexpected exception) may pass: such a trial runs again
    # on the next run. A DeployError is the build's verdict and stays.
    retry: bool = False
    attempts: int = 1
    # What the search chooses on: mAP50-95 on the build's selection split (the FP32 model's there, less the
    # quantization drop the build measured there), never the split a build reports, so the front and the pick
    # are not tuned to the reported images.
    map50_95: float | None = None
    drop_points: float | None = None  # against the search's baseline, on the selection split; set by the driver
    # What the builds report: the final artifact on the report split, and its drop against the baseline there.
    report_map50: float | None = None
    report_map50_95: float | None = None
    report_drop_points: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    contended: str | None = None
    timed_on: str | None = None  # the host and device its latency came from: trials may run on several nodes
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    bundle: str | None = None
    build_record: str | None = None
    worker: dict = field(default_factory=dict)
    reused: bool = False  # this run found it on record

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("reused")
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Trial":
        data = dict(data)
        data["spec"] = TrialSpec(**data["spec"])
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    config: BuildConfig  # resolved (target defaults filled in), search settings included
    home: Path
    folder: Path
    target_name: str
    stride: int
    baseline: TrialSpec
    sizes: list[int]
    unpruned: list[TrialSpec]
    pruned: list[TrialSpec]  # at the first rung
    rungs: list[int]
    inputs_digest: str  # model and data contents: a trial on record was measured on these
    selection: dict = field(default_factory=dict)  # the split every choice is made on: images, source, fingerprint

    def describe(self) -> dict:
        return {"target": self.target_name, "profile": self.config.profile, "stride": self.stride,
                "baseline": asdict(self.baseline), "sizes": self.sizes, "rungs_epochs": self.rungs,
                "arms": len(self.unpruned) + len(self.pruned), "search": self.config.search.model_dump(mode="json")}


def _sizes(search: SearchConfig, stride: int, baseline: int) -> list[int]:
    if search.imgsz is not None:
        for size in search.imgsz:
            if size < stride or size % stride:
                raise ConfigError(f"search space has no valid point for input size {size}: sizes must be multiples "
                                  f"of the model's largest stride {stride} (e.g. {max(stride, size // stride * stride)})")
        return sorted(set(search.imgsz))
    low, high = search.imgsz_range or (math.ceil(baseline / 2), baseline)
    sizes = [k * stride for k in range(max(1, math.ceil(low / stride)), high // stride + 1)]
    if not sizes:
        raise ConfigError(f"search space has no valid point: no multiple of the model's largest stride {stride} lies "
                          f"in imgsz_range [{low}, {high}]")
    return sizes


def plan_search(config: BuildConfig, home: Path) -> Plan:
    """Checks the whole space against the model and the target before any trial runs (and before Ray starts)."""
    from edge_deploy.calibration.rules import PRECISIONS
    from edge_deploy.calibration.preprocess import Preprocess
    from edge_deploy.calibration.sets import choice_splits, class_names, labelled_split
    from edge_deploy.pipeline.artifacts import Artifact
    from edge_deploy.pipeline.build import check_against_target, embedded_data, resolve_inputs
    from edge_deploy.pipeline.engine import Engine
    from edge_deploy.pipeline.stages.load import LoadStage

    config = config.model_copy(deep=True)
    search = config.search
    if config.model is not None and config.data is None:
        raise ConfigError("deploy search scores every trial's mAP on labelled images: pass --data data.yaml "
                          "(or search the embedded model on its embedded data)")
    if config.prune.target_params is not None or config.prune.target_macs is not None or config.prune.ratio:
        raise ConfigError("deploy search chooses the prune ratio itself (search.prune_ratios); remove prune.ratio, "
                          "prune.target_params and prune.target_macs from the build settings")
    target, model_path = resolve_inputs(config, home)
    if target.compile_runs_on != "host" and config.probe.device is None:
        raise ConfigError(f"target {target.name}'s engine is built and timed on its device only: a search needs "
                          "latencies, pass --device NAME")
    data_yaml = Path(config.data) if config.data else embedded_data(home)
    names = class_names(data_yaml)
    engine = Engine(Path(home) / "cache")
    try:
        record = engine.run(LoadStage(home, config.imgsz, names), {"source": Artifact.of(model_path)})
    finally:
        engine.close()
    info = json.loads(record.artifacts["model_info"].path.read_text())
    stride, baseline_size = max(info["strides"]), info["imgsz"]
    sizes = _sizes(search, stride, baseline_size)

    precisions = list(search.precisions or target.precisions)
    arms: list[TrialSpec] = []
    for precision in dict.fromkeys(precisions):
        methods = search.quant_methods if PRECISIONS[precision].activation_bits is not None else ["auto"]
        for method in dict.fromkeys(methods):
            probe = config.model_copy(deep=True)
            probe.precision, probe.quantize.method = precision, method
            check_against_target(probe, target)  # one line naming what the target refuses
            arms.append(TrialSpec(0, precision, method))
    ratios = sorted(set(search.prune_ratios))
    criteria = list(dict.fromkeys(search.prune_criteria))
    unpruned = [TrialSpec(size, a.precision, a.method) for size in sizes for a in arms] if 0.0 in ratios else []
    pruned = [TrialSpec(size, a.precision, a.method, ratio, criterion, search.epochs[0])
              for size in sizes for ratio in ratios if ratio > 0 for criterion in criteria for a in arms]
    if not unpruned and not pruned:
        raise ConfigError("search space has no valid point")
    baseline = TrialSpec(baseline_size, "fp32")

    blank = Preprocess(imgsz=0)
    selection, report = choice_splits(data_yaml, blank, config.selection.size, config.selection.seed)
    digest = hash_json({"model": sha256_file(model_path), "selection": selection.fingerprint,
                        "report": report.fingerprint,
                        "train": labelled_split(data_yaml, "train", blank).fingerprint if pruned else None})
    config.data = data_yaml
    config.model = model_path if config.model else None
    return Plan(config, Path(home), Path(config.output) / SEARCH_FOLDER, target.name, stride, baseline, sizes,
                unpruned, pruned, list(search.epochs), digest,
                {"images": len(selection.files), "source": selection.source, "fingerprint": selection.fingerprint})


def trial_config(plan: Plan, spec: TrialSpec, output: Path) -> BuildConfig:
    """The build a trial is: the user's settings with the trial's choices; an over-budget artifact is still
    measured (the search judges it), and the search's own settings stay out so they do not change its key."""
    config = plan.config.model_copy(deep=True)
    config.search = SearchConfig()
    config.output = output
    config.imgsz = spec.imgsz
    config.precision = spec.precision
    config.quantize.method = spec.method
    config.quantize.on_budget_exceeded = "continue"
    prune = config.prune.model_dump()
    prune.update(ratio=spec.prune_ratio if spec.pruned else None, target_params=None, target_macs=None)
    if spec.pruned:
        prune.update(criterion=spec.criterion, epochs=spec.epochs)
    config.prune = PruneConfig(**prune)
    return config


def trial_key(plan: Plan, spec: TrialSpec) -> str:
    from edge_deploy.pipeline.codehash import source_hash

    settings = trial_config(plan, spec, Path(".")).model_dump(mode="json")
    settings.pop("output")
    return hash_json({"settings": settings, "inputs": plan.inputs_digest,
                      "code": source_hash(("edge_deploy.pipeline.build", __name__))})[:24]


# --------------------------------------------------------------------------------------------------------- trial


def run_trial(config_json: dict, home: str, spec_json: dict, key: str, cpus: int) -> dict:
    """One trial, in a Ray worker: the build on the `cpus` the task declared, then what the search compares. Never
    raises."""
    from edge_deploy.calibration.onnxrt import CPUS_VARIABLE, usable_cores

    started = time.time()
    spec = TrialSpec(**spec_json)
    # The worker process runs one trial at a time. Fine-tuning is not held to it: Ultralytics sets torch to every
    # core when it trains on the CPU.
    os.environ[CPUS_VARIABLE] = str(cpus)
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "cpus": usable_cores()}
    # Which worker runs which trial, while it runs (a user watching a cluster, or killing a stuck trial).
    marker = Path(config_json["output"]).parent / f"{key}.running"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({**worker, "trial": spec.label()}))
    except OSError:
        marker = None  # the driver's folder may not be reachable from this worker: only the marker is lost
    try:
        trial = _measure(BuildConfig.model_validate(config_json), Path(home), spec, key)
    except DeployError as exc:
        trial = Trial(spec, key, "failed", error=_one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 - a trial's failure is recorded, the search goes on
        trial = Trial(spec, key, "failed", error=_one_line(f"{type(exc).__name__}: {exc}"), retry=True)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    trial.seconds = round(time.time() - started, 2)
    trial.worker = worker
    return trial.to_json()


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _measure(config: BuildConfig, home: Path, spec: TrialSpec, key: str) -> Trial:
    from edge_deploy.pipeline.build import run_build

    result = run_build(config, home)
    accuracy = result.accuracy.artifact_or_reference
    selection = result.metrics("reference")["selection"]["map50_95"]
    quantized = next((r.metrics for r in result.records if r.name == "quantize"), None)
    if quantized is not None:
        selection -= quantized["drop_points"] / 100
    trial = Trial(spec, key, "done", map50_95=round(selection, 6), report_map50=accuracy.map50,
                  report_map50_95=accuracy.map50_95, build_record=str(result.record_path))
    speed = result.speed
    if speed is not None:
        probe = speed.artifact or speed.reference  # no artifact: the FP32 ONNX is the reference itself
        trial.p50_ms, trial.p90_ms = probe.latency_ms.get("p50"), probe.latency_ms.get("p90")
        trial.contended = speed.contended
        trial.timed_on = timed_on(probe.device)
    trial.size_bytes = result.metrics("compile").get("size_bytes")
    checkpoint = next(r.artifacts["checkpoint"].path for r in reversed(result.records) if "checkpoint" in r.artifacts)
    trial.macs, trial.params = _macs_params(home, checkpoint, spec.imgsz)
    # The bundle is the cache's release; the trial keeps its build record, `--pick` publishes the one chosen.
    shutil.rmtree(result.bundle, ignore_errors=True)
    trial.bundle = result.bundle.name
    return trial


def timed_on(device: dict) -> str:
    from edge_deploy.pipeline.report import device_text

    return f"{device.get('hostname') or 'unknown host'}: {device_text(device)}"


def _macs_params(home: Path, checkpoint: Path, imgsz: int) -> tuple[int, int]:
    import torch

    from edge_deploy.pipeline.prune import count_macs_params
    from edge_deploy.pipeline.ultra import ultralytics_offline

    # Unpickling a checkpoint imports Ultralytics. Configured here first: in a Ray worker whose trial found every
    # Ultralytics stage in the cache, this is the first import, and an unconfigured one made the worker's next
    # trial that loads a model fail (and would let Ultralytics reach for the network).
    ultralytics_offline(home)
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"].float().eval()
    macs, params = count_macs_params(model, imgsz)
    return int(macs), int(params)


# ----------------------------------------------------------------------------------------------------- front


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """The trials no other is at least as fast and as accurate as (and better in one), fastest first."""
    front = [t for t in trials if not any(_dominates(o, t) for o in trials if o is not t)]
    return sorted(front, key=lambda t: (t.p50_ms, -t.map50_95))


def _dominates(a: Trial, b: Trial) -> bool:
    return (a.p50_ms <= b.p50_ms and a.map50_95 >= b.map50_95
            and (a.p50_ms < b.p50_ms or a.map50_95 > b.map50_95))


def _fronts_order(trials: list[Trial]) -> list[Trial]:
    """Non-dominated sorting: the first front, then the front of what is left, ... (ties: the more accurate)."""
    left, ordered = list(trials), []
    while left:
        front = pareto_front(left)
        ordered += sorted(front, key=lambda t: -t.map50_95)
        left = [t for t in left if t not in front]
    return ordered


def measured(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.status == "done" and t.p50_ms is not None and t.map50_95 is not None]


def final_fidelity(trials: list[Trial]) -> list[Trial]:
    """Per configuration, its trial at the highest fidelity reached: lower rungs were only a way there."""
    best: dict[tuple, Trial] = {}
    for t in measured(trials):
        kept = best.get(t.spec.arm)
        if kept is None or (t.spec.epochs or 0) > (kept.spec.epochs or 0):
            best[t.spec.arm] = t
    return list(best.values())


# --------------------------------------------------------------------------------------------------- driver


@dataclass
class SearchResult:
    plan: Plan
    trials: list[Trial]  # every trial this search used, in the order they finished
    baseline: Trial
    front: list[Trial]
    best: Trial | None  # the fastest within budget
    best_found: Trial | None  # the least lossy when none is within budget
    executed: int
    reused: int
    seconds: float
    stopped_by: str | None  # "max_trials" / "time_budget" when the budget ended the search early
    record_path: Path
    table_path: Path
    plot_path: Path | None = None
    picked: Path | None = None

    @property
    def within_budget(self) -> bool:
        return self.best is not None


class _Ray:
    """Ray, started (or joined) the first time a trial has to run."""

    def __init__(self, search: SearchConfig, on_event, log: Path, why_workers: str = ""):
        self.search, self.on_event, self.log, self.why_workers = search, on_event, log, why_workers
        self.ray = None
        self.remote = None
        self.workers = 1
        self.cpus_per_trial = search.cpus_per_trial or 1  # on a cluster; here, local_shares decides

    def start(self) -> None:
        if self.ray is not None:
            return
        search = self.search
        if search.ray_address:
            check_reachable(search.ray_address)
        import logging

        import ray

        from edge_deploy.calibration.onnxrt import usable_cores

        self.on_event("ray", f"connecting to {search.ray_address}" if search.ray_address else "starting a local "
                                                                                               "instance")
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                       configure_logging=False)
        # Ray's start-up talk (its C++ core writes to the process's stderr) goes to a log file: stderr carries
        # our one line when something fails.
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # ray.init makes SIGTERM exit at once; the CLI's handler (stop the trials, say what is kept) stays.
        sigterm = signal.getsignal(signal.SIGTERM)
        saved = os.dup(2)
        try:
            with open(self.log, "ab") as log:
                os.dup2(log.fileno(), 2)
                if search.ray_address:
                    ray.init(address=search.ray_address, **options)
                else:
                    workers, self.cpus_per_trial = local_shares(search)
                    if workers * self.cpus_per_trial > usable_cores():
                        self.why_workers += (f"; more CPUs than this machine's {usable_cores()}: the trials' "
                                             "latencies are taken on a loaded machine")
                    # Ray listens on the machine's address (it replaces loopback with it), token-authenticated.
                    ray.init(num_cpus=workers * self.cpus_per_trial, object_store_memory=128 * 1024 * 1024,
                             **options)
        except Exception as exc:  # noqa: BLE001 - Ray's own errors vary by version; the user gets one line
            raise InputError(f"Ray could not start{' at ' + search.ray_address if search.ray_address else ''}: "
                             f"{_one_line(str(exc))[:300]} (Ray's log: {self.log})") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
        self.ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = search.workers or max(1, cpus // self.cpus_per_trial)
        # max_retries: a worker that dies mid-trial (killed, out of memory) is retried once by Ray on another.
        self.remote = ray.remote(num_cpus=self.cpus_per_trial, max_retries=1)(run_trial)
        self.on_event("ray", f"{self.workers} trial(s) at once, {self.cpus_per_trial} CPU each{self.why_workers}")

    def stop(self, refs) -> None:
        if self.ray is None:
            return
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        self.ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A Ray address that answers nothing fails in seconds with one line, instead of Ray's long retries."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address {address}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"Ray is not reachable at {address} ({exc.strerror or exc}); start its head with `ray start "
                         "--head` there, or leave out --ray-address for a local Ray instance") from None


class _Scheduler:
    """Asynchronous successive halving over the fidelity rungs; unpruned arms have one rung only."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.queue: list[TrialSpec] = [plan.baseline, *[s for s in plan.unpruned if s != plan.baseline], *plan.pruned]
        self.running: dict[TrialSpec, None] = {}
        self.done: dict[TrialSpec, Trial] = {}
        self.promoted: set[tuple] = set()

    def _rung(self, spec: TrialSpec) -> int:
        return self.plan.rungs.index(spec.epochs)

    def _rung_complete(self, rung: int) -> bool:
        pending = [s for s in [*self.queue, *self.running] if s.pruned and self._rung(s) <= rung]
        # Promotions from lower rungs may still arrive until those rungs are complete themselves.
        return not pending and (rung == 0 or self._rung_complete(rung - 1))

    def _promotion(self, take: bool = True) -> TrialSpec | None:
        rungs = self.plan.rungs
        for rung in range(len(rungs) - 2, -1, -1):
            finished = measured([t for s, t in self.done.items() if s.pruned and self._rung(s) == rung])
            if not finished:
                continue
            allowed = math.ceil(len(finished) / self.plan.config.search.eta) if self._rung_complete(rung) \
                else len(finished) // self.plan.config.search.eta
            for trial in _fronts_order(finished)[:allowed]:
                key = (trial.spec.arm, rung)
                if key not in self.promoted:
                    if take:
                        self.promoted.add(key)
                    return TrialSpec(**{**asdict(trial.spec), "epochs": rungs[rung + 1]})
        return None

    def next(self) -> TrialSpec | None:
        """The next trial to start, or None when nothing can start now."""
        promoted = self._promotion()
        if promoted is not None:
            return promoted
        busy = {s.shared_prefix for s in self.running}
        for spec in self.queue:
            if spec.shared_prefix not in busy or not self.running:
                self.queue.remove(spec)
                return spec
        return None

    def finished(self) -> bool:
        return not self.queue and not self.running and self._promotion(take=False) is None


def local_shares(search: SearchConfig) -> tuple[int, int]:
    """Trials at once on this machine, and the CPUs each declares: by default the usable cores shared among them.

    Each trial scores on the CPUs it declares, so N trials of one CPU each on a 2-core machine score N images at
    once, not N times two; one trial at a time gets every core.
    """
    from edge_deploy.calibration.onnxrt import usable_cores

    cores = usable_cores()
    workers = search.workers or max(1, cores // (search.cpus_per_trial or 1))
    return workers, search.cpus_per_trial or max(1, cores // workers)


def timed_here_one_at_a_time(search: SearchConfig, device: str | None) -> bool:
    """Whether the search runs one trial at a time because none was asked for and trials are timed here.

    A second trial's calibration or fine-tune beside a probe on this machine slowed small models 3-12x (a p50 of
    47.6 ms for a model whose quiet p50 is about 4), and the probe's spread did not always show it. Parallel trials
    are for a device, a cluster, or an explicit --workers.
    """
    return search.workers is None and not search.ray_address and device is None


def run_search(config: BuildConfig, home: Path,
               on_event: Callable[[str, str], None] = lambda s, e: None) -> SearchResult:
    """Runs the search (resuming from the trials on record) and writes the front."""
    started = time.monotonic()
    config = config.model_copy(deep=True)
    # Ray's own variable names a cluster as --ray-address does (and ray.init would follow it anyway).
    config.search.ray_address = config.search.ray_address or os.environ.get("RAY_ADDRESS") or None
    if config.search.ray_address:
        check_reachable(config.search.ray_address)  # at once, not after the plan's checks
    plan = plan_search(config, home)
    search = plan.config.search
    why_workers = ""
    if timed_here_one_at_a_time(search, plan.config.probe.device):
        search = search.model_copy(update={"workers": 1})
        why_workers = ("; one, because trials are timed on this machine (--workers N runs more at once, their "
                       "latencies then taken on a loaded machine)")
    trials_dir = plan.folder / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    scheduler = _Scheduler(plan)
    ray = _Ray(search, on_event, plan.folder / "ray.log", why_workers)
    order: list[Trial] = []
    executed = reused = 0
    in_flight: dict = {}  # Ray object ref -> (spec, key, attempts)
    stopped_by = None

    def record_of(key: str) -> Trial | None:
        path = trials_dir / f"{key}.json"
        if not path.exists():
            return None
        try:
            return Trial.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            return None  # damaged: run it again

    def finish(spec: TrialSpec, trial: Trial) -> None:
        scheduler.running.pop(spec, None)
        scheduler.done[spec] = trial
        order.append(trial)
        outcome = (f"mAP50-95 {trial.map50_95:.4f}, p50 {trial.p50_ms:.2f} ms" if trial.status == "done" and
                   trial.p50_ms is not None else trial.error or "done")
        on_event(f"trial {spec.label()}", f"{'on record' if trial.reused else trial.status}: {outcome}")

    def submit(spec: TrialSpec, key: str, attempts: int) -> None:
        out = trials_dir / key
        ray.start()  # it decides the CPUs each trial gets
        args = (trial_config(plan, spec, out.resolve()).model_dump(mode="json"), str(Path(home).resolve()),
                asdict(spec), key, ray.cpus_per_trial)
        in_flight[ray.remote.remote(*args)] = (spec, key, attempts)
        scheduler.running[spec] = None
        on_event(f"trial {spec.label()}", "running")

    try:
        while True:
            while True:
                over = ("time_budget" if search.time_budget_s is not None and
                        time.monotonic() - started > search.time_budget_s else
                        "max_trials" if search.max_trials is not None and
                        len(order) + len(in_flight) >= search.max_trials else None)
                if over:
                    if not scheduler.finished() and (scheduler.queue or scheduler._promotion(take=False)):
                        stopped_by = stopped_by or over
                    break
                capacity = ray.workers if ray.ray is not None else (search.workers or 1)
                if len(in_flight) >= max(1, capacity):
                    break
                spec = scheduler.next()
                if spec is None:
                    break
                key = trial_key(plan, spec)
                kept = record_of(key)
                if kept is not None and not (kept.status == "failed" and kept.retry):
                    kept.reused = True
                    reused += 1
                    scheduler.running[spec] = None
                    finish(spec, kept)
                    continue
                submit(spec, key, 1)
            if not in_flight:
                if stopped_by or scheduler.finished():
                    break
                continue
            ready, _ = ray.ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                spec, key, attempts = in_flight.pop(ref)
                try:
                    data = ray.ray.get(ref)
                except ray.ray.exceptions.RayError as exc:  # the worker died twice, or the cluster went away
                    data = Trial(spec, key, "failed", retry=True,
                                 error=_one_line(f"{type(exc).__name__}: {exc}")[:500]).to_json()
                trial = Trial.from_json(data)
                trial.attempts = attempts
                if trial.status == "failed" and trial.retry and attempts < 2:
                    # Not the build's verdict (a crash, a race on a shared file): once more before recording it.
                    on_event(f"trial {spec.label()}", f"failed ({trial.error}); retrying once")
                    submit(spec, key, attempts + 1)
                    continue
                executed += 1
                atomic_write_text(trials_dir / f"{key}.json", json.dumps(trial.to_json(), indent=1, sort_keys=True))
                finish(spec, trial)
    finally:
        ray.stop(list(in_flight))

    return _conclude(plan, scheduler, order, executed, reused, time.monotonic() - started, stopped_by)


def _conclude(plan: Plan, scheduler: _Scheduler, order: list[Trial], executed: int, reused: int, seconds: float,
              stopped_by: str | None) -> SearchResult:
    search = plan.config.search
    baseline = scheduler.done.get(plan.baseline)
    if baseline is None or baseline.status != "done":
        why = baseline.error if baseline is not None else "the budget ended before it ran"
        raise DeployError(f"the search's baseline ({plan.baseline.label()}, unpruned) did not build: {why}")
    for trial in order:
        if trial.map50_95 is not None:
            trial.drop_points = round((baseline.map50_95 - trial.map50_95) * 100, 3)
        if trial.report_map50_95 is not None:
            trial.report_drop_points = round((baseline.report_map50_95 - trial.report_map50_95) * 100, 3)
    # The baseline is a candidate only where it is a point of the space the user asked for.
    candidates = final_fidelity([t for s, t in scheduler.done.items() if s != plan.baseline
                                 or plan.baseline in plan.unpruned])
    front = pareto_front(candidates)
    within = [t for t in candidates if t.drop_points <= search.max_map_drop]
    best = min(within, key=lambda t: (t.p50_ms, -t.map50_95)) if within else None
    best_found = None if best else min(candidates, key=lambda t: (t.drop_points, t.p50_ms), default=None)
    record = plan.folder / "search.json"
    table = plan.folder / "front.md"
    result = SearchResult(plan, order, baseline, front, best, best_found, executed, reused, round(seconds, 1),
                          stopped_by, record, table, plan.folder / FRONT_PLOT)
    atomic_write_text(record, json.dumps(search_record(result), indent=1, sort_keys=True))
    atomic_write_text(table, front_markdown(result))
    _write_plot(result, best or best_found, "fastest within budget" if best else "least lossy, none within budget")
    return result


FRONT_PLOT = "front.svg"


def plot_record(result: SearchResult, chosen: Trial | None, choice: str | None) -> dict:
    """What the front's plot is drawn from. A picked bundle's manifest carries it, and the bundle's report draws
    it from there: a bundle moved elsewhere keeps its plot without the search folder."""
    front = {t.key for t in result.front}
    timed = measured(result.trials)
    b = result.baseline
    return {"points": [{"key": t.key, "label": t.spec.label(), "p50_ms": t.p50_ms, "map50_95": t.map50_95,
                        "drop_points": t.drop_points, "front": t.key in front, "busy": bool(t.contended)}
                       for t in timed],
            "failed": sum(t.status == "failed" for t in result.trials),
            "not_timed": sum(t.status == "done" and t not in timed for t in result.trials),
            "trials": len(result.trials), "timed_on": sorted({t.timed_on or "not recorded" for t in timed}),
            "selection": result.plan.selection, "max_map_drop": result.plan.config.search.max_map_drop,
            "baseline": {"key": b.key, "label": b.spec.label(), "p50_ms": b.p50_ms, "map50_95": b.map50_95},
            "chosen": None if chosen is None else {"key": chosen.key, "label": chosen.spec.label(),
                                                   "p50_ms": chosen.p50_ms, "map50_95": chosen.map50_95,
                                                   "drop_points": chosen.drop_points, "how": choice},
            "target": result.plan.target_name, "profile": result.plan.config.profile}


def _write_plot(result: SearchResult, chosen: Trial | None, choice: str | None) -> None:
    from edge_deploy.pipeline.report import search_svg

    atomic_write_text(result.plot_path, search_svg(plot_record(result, chosen, choice), standalone=True))


def search_record(result: SearchResult) -> dict:
    return {"plan": result.plan.describe(), "baseline": result.baseline.to_json(),
            "max_map_drop": result.plan.config.search.max_map_drop, "seconds": result.seconds,
            "executed": result.executed, "reused": result.reused, "stopped_by": result.stopped_by,
            "front": [t.key for t in result.front], "best_under_budget": result.best.key if result.best else None,
            "best_found": result.best_found.key if result.best_found else None,
            "trials": [{**t.to_json(), "reused": t.reused} for t in result.trials]}


FRONT_COLUMNS = ("trial", "epochs", "mAP50-95 (selection)", "drop (pts)", "mAP50-95 (report)", "drop (pts, report)",
                 "p50 ms", "size MiB", "MMACs", "params M")


def front_row(trial: Trial) -> list[str]:
    spec = trial.spec
    name = f"{spec.imgsz}px " + (f"prune {spec.prune_ratio:g} {spec.criterion} " if spec.pruned else "") + \
        (spec.precision if spec.method == "auto" else f"{spec.precision} {spec.method}")
    report = (f"{trial.report_map50_95:.4f}", f"{trial.report_drop_points:.2f}") \
        if trial.report_drop_points is not None else ("-", "-")
    return [name, str(spec.epochs) if spec.pruned else "-", f"{trial.map50_95:.4f}", f"{trial.drop_points:.2f}",
            *report,
            f"{trial.p50_ms:.2f}" + (" (busy)" if trial.contended else ""),
            f"{trial.size_bytes / 2**20:.2f}" if trial.size_bytes else "-",
            f"{trial.macs / 1e6:.1f}" if trial.macs else "-", f"{trial.params / 1e6:.2f}" if trial.params else "-"]


def front_markdown(result: SearchResult) -> str:
    b = result.baseline
    lines = [f"# Pareto front: latency vs mAP50-95 ({result.plan.target_name}, profile "
             f"{result.plan.config.profile or 'none'})", "",
             f"Baseline: {b.spec.label()} unpruned, mAP50-95 {b.map50_95:.4f}, p50 {b.p50_ms:.2f} ms. Budget: "
             f"{result.plan.config.search.max_map_drop:.2f} points, judged on the selection split (the front and "
             "the pick never look at the report split, whose figures are shown beside). "
             f"{len(result.trials)} trials "
             f"({result.executed} run now, {result.reused} on record), {result.seconds:.0f} s"
             + (f"; stopped by {result.stopped_by}" if result.stopped_by else "") + ".", "",
             "| " + " | ".join(FRONT_COLUMNS) + " |", "|" + "---|" * len(FRONT_COLUMNS)]
    lines += ["| " + " | ".join(front_row(t)) + " |" for t in result.front]
    if result.best:
        lines += ["", f"Fastest within budget: {result.best.spec.label()} ({result.best.drop_points:.2f} points, "
                      f"p50 {result.best.p50_ms:.2f} ms)."]
    elif result.best_found:
        lines += ["", f"No trial within budget; least lossy: {result.best_found.spec.label()} "
                      f"({result.best_found.drop_points:.2f} points)."]
    failed = [t for t in result.trials if t.status == "failed"]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {t.spec.label()}: {t.error}" for t in failed]
    return "\n".join(lines) + "\n"


def budget_error(result: SearchResult) -> AccuracyGateError:
    search = result.plan.config.search
    found = result.best_found
    best = (f"the best found is {found.spec.label()} at {found.drop_points:.2f} points (p50 {found.p50_ms:.2f} ms)"
            if found else "no trial produced a measurement")
    return AccuracyGateError(f"no trial is within {search.max_map_drop:.2f} mAP50-95 points of the baseline "
                             f"({len(result.trials)} trials); {best}; every trial is in {result.record_path} "
                             "(--accept-drop to accept it)")


def publish_pick(result: SearchResult, home: Path) -> Path:
    """Builds the chosen trial again into the output folder (every stage a cache hit where the workers share this
    machine's cache) and adds the search's record to its manifest."""
    from edge_deploy.pipeline.artifacts import sha256_tree
    from edge_deploy.pipeline.build import run_build
    from edge_deploy.pipeline.report import add_search_section
    from edge_deploy.pipeline.stages.release import MANIFEST, REPORT_HTML, REPORT_MD

    chosen = result.best or result.best_found
    if chosen is None:
        raise DeployError("no trial produced a measurement, so there is nothing to publish")
    plan = result.plan
    built = run_build(trial_config(plan, chosen.spec, Path(plan.config.output)), home)
    manifest_path = built.bundle / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    choice = "picked: fastest within budget" if result.best else "picked: least lossy (--accept-drop)"
    plot = plot_record(result, chosen, choice)
    manifest["search"] = {"record": str(result.record_path.resolve()), "trial": chosen.key,
                          "choice": "best-under-budget" if result.best else "least lossy (--accept-drop)",
                          "spec": asdict(chosen.spec), "max_map_drop": plan.config.search.max_map_drop,
                          "drop_points": chosen.drop_points, "p50_ms": chosen.p50_ms,
                          "baseline": {"spec": asdict(result.baseline.spec), "map50_95": result.baseline.map50_95},
                          "front": [{"spec": asdict(t.spec), "map50_95": t.map50_95, "p50_ms": t.p50_ms}
                                    for t in result.front],
                          "trials": len(result.trials), "plot": plot}
    # The release stage wrote the report before the search was known: its page gains the search's section here,
    # and the manifest the new files' hashes, so `deploy check` still holds.
    page, text = add_search_section((built.bundle / REPORT_HTML).read_text(),
                                    (built.bundle / REPORT_MD).read_text(), manifest["search"])
    for name, content in ((REPORT_HTML, page), (REPORT_MD, text)):
        atomic_write_text(built.bundle / name, content)
        manifest["files"][name] = sha256_tree(built.bundle / name)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    _write_plot(result, chosen, choice)
    result.picked = built.bundle
    return built.bundle
