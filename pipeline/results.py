"""Typed results that stages return and the summary, model card and release render.

Each travels through the stage cache as JSON (`to_json` / `from_json`), so a
cached build renders exactly like a fresh one. No result is keyed by a string
built from a precision and a target name: a report names its reference and its
artifact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_deploy.pipeline.errors import InputError


class JsonResult:
    """Dataclasses that nest other JsonResults, turned into plain JSON and back.

    A field whose metadata says `internal` (data a later stage reads, such as bootstrap samples, not a figure to
    show) is left out unless `internal=True`: a stage's own artifact keeps it, metrics and bundles do not.
    """

    def to_json(self, internal: bool = False) -> dict:
        return _plain(self, internal)

    @classmethod
    def from_json(cls, data: dict):
        import typing

        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, kind = data[f.name], hints[f.name]
            nested = _json_result_type(kind)
            if nested is not None and isinstance(value, dict):
                value = nested.from_json(value)
            values[f.name] = value
        return cls(**values)


def _plain(value, internal: bool):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), internal) for f in dataclasses.fields(value)
                if internal or not f.metadata.get("internal")}
    if isinstance(value, (list, tuple)):
        return [_plain(v, internal) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, internal) for k, v in value.items()}
    return value


def _json_result_type(kind) -> type | None:
    import typing

    candidates = typing.get_args(kind) or (kind,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, JsonResult):
            return candidate
    return None


@dataclass(frozen=True)
class ImageSplit(JsonResult):
    """Which images a number comes from."""

    role: str  # "selection" (choices are made on it) or "report" (numbers are reported on it)
    source: str
    images: int
    fingerprint: str

    def describe(self) -> str:
        return f"{self.role} split: {self.images} images from {self.source}"


@dataclass(frozen=True)
class Accuracy(JsonResult):
    map50: float
    map50_95: float
    images: int
    objects: int
    # "accuracy": against labels. "fidelity": against the FP32 model's confident detections on the same images
    # (what an unlabelled set can measure); then `matched_boxes` is the share of those boxes found again.
    kind: str = "accuracy"
    matched_boxes: float | None = None
    # The 95 % percentile interval of map50_95 over bootstrap resamples of the images (evaluate.BOOTSTRAP_*).
    map50_95_interval: list | None = None
    # map50_95 on each of those resamples: the same seeded resamples for every model scored on the same images,
    # so two models' samples subtract into a paired bootstrap of their difference. Data, not a figure to show.
    bootstrap: list | None = field(default=None, repr=False, compare=False, metadata={"internal": True})
    # Fidelity only: how far the found boxes' sides are from the FP32 model's, on average, in image pixels.
    box_shift_px: float | None = None
    # Fidelity only: how many detections were scored as the FP32 box they are a near-tie of (NEAR_TIE_SCORE);
    # None where the reference carries no near-ties.
    near_tie_boxes: int | None = None

    def __post_init__(self):
        # An evaluator's "no data" value (-1), a NaN or a count that is not one must never pass for a measurement
        # and reach a bundle.
        for name in ("map50", "map50_95", "matched_boxes"):
            value = getattr(self, name)
            if value is None and name == "matched_boxes":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InputError(f"{name} {value!r} on {self.images} images is not a measurement (an evaluator "
                                 "returns such a value when no label or detection could be scored); check the "
                                 "labels and the images")
        if self.images < 1:
            raise InputError("an accuracy figure needs at least one image")
        if self.box_shift_px is not None and not (isinstance(self.box_shift_px, (int, float))
                                                  and 0.0 <= self.box_shift_px < float("inf")):
            raise InputError(f"box shift {self.box_shift_px!r} px on {self.images} images is not a measurement")

    def describe(self) -> str:
        text = f"{'fidelity ' if self.kind == 'fidelity' else ''}mAP50-95 {self.map50_95:.4f}{self.interval_text()}"
        if self.kind == "fidelity" and self.matched_boxes is not None:
            text += f", {self.matched_boxes:.1%} of FP32 boxes found again"
            if self.box_shift_px is not None:
                text += f", their sides {self.box_shift_px:.2f} px off on average"
            if self.near_tie_boxes:
                text += f"; {self.near_tie_boxes} scored as the FP32 box they are a near-tie of"
        return text

    def found_text(self) -> str | None:
        """The share of FP32 boxes found again and how far they moved, for tables; None where not measured."""
        if self.matched_boxes is None:
            return None
        shift = f" ({self.box_shift_px:.2f} px)" if self.box_shift_px is not None else ""
        return f"{self.matched_boxes:.1%}{shift}"

    def interval_text(self) -> str:
        if self.map50_95_interval is None:
            return ""
        low, high = self.map50_95_interval
        return f" (95% {low:.4f}..{high:.4f})"


# Fidelity's unsure band: the FP32 model's detections scored from UNSURE_FRACTION x conf up to conf are neither
# required nor counted wrong (COCO crowd regions). Without it, fidelity mAP measured how sharply the FP32 scores
# separate at the threshold, not whether a model changed its answers: on 100 unlabelled photos through the
# real-image YOLOv8s-size fixture model, 375 reference boxes sit at 0.25 or above and 890 more between 0.125 and
# 0.25, so a score moving by 0.01 put a non-reference box above a reference one, and FP16-rounded weights alone lost
# 0.66 fidelity points (0.40 with the band; the cpu INT8 3.11 and 2.43; benchmarks/fidelity_floor.py). Half the
# threshold keeps every box the FP32 model is confident about required.
UNSURE_FRACTION = 0.5
# The band's NMS side: a box NMS keeps at its IoU (evaluate.EVAL_IOU) but not at that minus UNSURE_NMS_MARGIN is as
# unsure as one scored just under the threshold, and so is one NMS keeps only at that plus the margin. Whether it
# stays hangs on its overlap with a neighbour the FP32 model also found, and boxes moving by a fraction of a pixel
# decide it: on the real-image YOLOv8s-size model FP16-rounded weights (boxes 0.003 px off) lost one such box of 375
# on the selection photos, which cost 0.40 fidelity points with the score band alone and 0 with both
# (benchmarks/fidelity_floor.py has both bands and the score band alone); in a one-off check, every reference box
# the Percentile INT8 model missed at IoU 0.8 or less had a neighbour at IoU 0.61-0.71.
UNSURE_NMS_MARGIN = 0.05
# The band's anchor side. Where NMS kept a required box over a neighbouring anchor of the same class (overlapping it
# at evaluate.EVAL_IOU or more) whose score was within NEAR_TIE_SCORE of it, the FP32 model itself did not tell the
# two apart: any change to the class logits picks either. A detection that is that neighbour's box (IoU at least
# NEAR_TIE_IOU with it, and more than with the kept box) is scored as the kept box. On the real-image YOLOv8s-size
# model the whole INT8 fidelity drop came from such swaps: independent noise of 0.01 on FP32's class logits cost
# 0.65 / 0.64 points on the selection / report photos without this side and 0 with it; INT8 MinMax went from 0.50 /
# 1.03 to 0.10 / 0.12 (6 and 10 boxes taken as their near-tie), while FP32 and FP16-rounded weights take none and
# stay at 0 (benchmarks/fidelity_floor.py has the drop with and without it).
NEAR_TIE_SCORE = 0.01
NEAR_TIE_IOU = 0.9


@dataclass(frozen=True)
class FidelityReference:
    """What fidelity scores against, per image of one split, boxes as (class, x, y, w, h) in original pixels: the
    FP32 model's detections at `conf` or above that NMS keeps with a margin (required), and those in the unsure band
    just below `conf` or at NMS's edge (ignored). `near_ties`, per image and per required box, the boxes (x, y, w, h)
    of the neighbouring anchors it nearly tied with (NEAR_TIE_SCORE); empty where not measured."""

    boxes: list
    unsure: list
    conf: float
    near_ties: list = field(default_factory=list)


@dataclass(frozen=True)
class ReferenceAccuracy(JsonResult):
    """The FP32 ONNX model in ONNX Runtime, measured once per build on both splits."""

    selection: Accuracy
    report: Accuracy
    selection_split: ImageSplit
    report_split: ImageSplit
    # The FP32 model's detections at `fidelity_conf` or above, per image of each split: the boxes fidelity is
    # measured against (and, for an unlabelled split, what its mAP means).
    fidelity_conf: float = 0.25
    selection_boxes: list = field(default_factory=list)
    report_boxes: list = field(default_factory=list)
    # ONNX Runtime's intra-op threads while scoring (calibration.onnxrt.SCORING_THREADS).
    threads: int | None = None
    # Its detections in fidelity's unsure band, just under `fidelity_conf` (evaluate.UNSURE_FRACTION).
    selection_unsure_boxes: list = field(default_factory=list)
    report_unsure_boxes: list = field(default_factory=list)
    # Per required box, the neighbouring anchors' boxes it nearly tied with (FidelityReference.near_ties).
    selection_near_tie_boxes: list = field(default_factory=list)
    report_near_tie_boxes: list = field(default_factory=list)
    # Where the selection split is scored by fidelity: what the FP32 model itself loses there with its class logits
    # given seeded noise far smaller than an 8-bit model's error ({"sigma", "drop_points", "drop_interval"}). A
    # budget under it is finer than fidelity resolves on these images (evaluate.jitter_floor).
    selection_jitter_floor: dict | None = None

    def fidelity_reference(self, role: str) -> FidelityReference:
        """What fidelity on the `selection` or `report` split scores against."""
        boxes = [[tuple(b) for b in image] for image in getattr(self, f"{role}_boxes")]
        unsure = [[tuple(b) for b in image] for image in getattr(self, f"{role}_unsure_boxes")]
        near_ties = [[[tuple(b) for b in ties] for ties in image] for image in getattr(self, f"{role}_near_tie_boxes")]
        return FidelityReference(boxes, unsure, self.fidelity_conf, near_ties)


@dataclass(frozen=True)
class AccuracyReport(JsonResult):
    """verify: the artifact in its own runtime against the FP32 reference, on the report split."""

    artifact_label: str
    reference: Accuracy
    # None when the artifact is the FP32 ONNX run by ONNX Runtime, i.e. the reference itself.
    artifact: Accuracy | None
    drop_points: float
    budget_points: float
    within_budget: bool
    split: ImageSplit
    # On a labelled split, the artifact's fidelity to the FP32 model too (on an unlabelled one, `artifact` is it).
    fidelity: Accuracy | None = None
    # After pruning: the original model (before pruning and quantization) on the same split, and the whole
    # build's loss against it, gated by its own budget.
    original: Accuracy | None = None
    total_drop_points: float | None = None
    total_budget_points: float | None = None
    # 95 % interval of each drop in points, from a paired bootstrap over the report images (the same resamples
    # for both models); [0, 0] when the artifact is the reference itself.
    drop_interval: list | None = None
    total_drop_interval: list | None = None
    # What the bootstrap was: resamples, seed, level, and that it resamples images.
    bootstrap: dict | None = None
    # Warnings about what the figures can say: each {"flag": name, "message": sentence} (see verify.py).
    flags: list = field(default_factory=list)
    # The runtime's thread count while scoring the artifact (calibration.onnxrt.SCORING_THREADS).
    threads: int | None = None
    # The selection split's jitter floor (label-free builds), which the gate's message names.
    selection_jitter_floor: dict | None = None

    @property
    def artifact_or_reference(self) -> Accuracy:
        return self.artifact if self.artifact is not None else self.reference


def reported(value, unit: str = "") -> str:
    """A figure as shown to people: a runtime that does not report it gets "not reported", never a number."""
    return "not reported" if value is None else f"{value}{unit}"


@dataclass(frozen=True)
class ProbeResult(JsonResult):
    """One device job's measurement, the same schema for every runtime and transport.

    A figure the runtime does not report (TensorRT 7's throughput, a p90 an old trtexec never printed) is None
    and is shown as "not reported", never as a number.
    """

    runner: str
    runner_version: int
    runtime: str  # name and version of the runtime that ran the model, as the device reports it
    device: dict  # what the device says of itself (machine, processor, OS, clocks, ...) and the transport used
    threads: Any
    batch: int
    warmup: int | None  # warm-up runs (after extra's warmup_ms where the runtime warms up for a time first)
    runs: int
    load_ms: float | None
    latency_ms: dict  # mean, p50, p90, p99, min, max, std of the warm runs
    fps: float | None
    memory_mb: dict
    power: dict  # {"status": "measured", ...} or {"status": "unavailable", "reason": ...}; never 0 for "none"
    extra: dict = field(default_factory=dict)
    first_inference_ms: float | None = None
    samples_ms: list = field(default_factory=list)  # every warm run's latency, in order
    job: dict = field(default_factory=dict)  # the job's settings as the device received them
    # The host's side: connect/upload/run/download seconds, and when the job started and finished (UTC).
    host_timings: dict = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None

    @classmethod
    def from_runner(cls, data: dict, transport: dict, **host) -> "ProbeResult":
        known = {f.name for f in dataclasses.fields(cls)}
        device = {**data.get("host", {}), "transport": transport}
        values = {k: v for k, v in data.items() if k in known and k not in ("device", "extra", *host)}
        extra = {k: v for k, v in data.items() if k not in known and k != "host"}
        return cls(device=device, extra=extra, **values, **host)

    def power_text(self) -> str:
        if self.power.get("status") == "measured":
            return f"{self.power['average_watts']} W"
        return "unavailable"


# How a probe timed the FP32 reference and the artifact (SpeedReport.timing): in one process, in turns; in turns
# where each block is a run of the runtime's own tool (trtexec loads one engine per run); or one job each.
INTERLEAVED = "in one process, in turns"
IN_TURNS_RUN_PER_BLOCK = "in turns, one {tool} run per block"
ONE_AFTER_THE_OTHER = "in two jobs, one after the other"
# The reference of a target that cannot time its own FP32 build beside the artifact.
FP32_ONNX = "FP32 ONNX"


@dataclass(frozen=True)
class SpeedReport(JsonResult):
    """probe: the FP32 reference and the artifact, each in its runtime on the device that ran it."""

    artifact_label: str
    reference: ProbeResult
    artifact: ProbeResult | None  # None when the artifact is the reference itself
    speedup_p50: float | None
    # Set when a timing's spread says the machine was busy: such a report is shown but never cached.
    contended: str | None = None
    # What the reference is: the FP32 ONNX in ONNX Runtime, or the target's own FP32 build in its runtime.
    reference_label: str = FP32_ONNX
    # How the two were timed (INTERLEAVED, IN_TURNS_RUN_PER_BLOCK or ONE_AFTER_THE_OTHER); None without an
    # artifact.
    timing: str | None = None
    # Timed in turns: the speed-up of each round (rounds, runs_per_round, median, min, max).
    speedup_rounds: dict | None = None

    @property
    def in_turns(self) -> bool:
        return self.timing is not None and self.timing != ONE_AFTER_THE_OTHER

    def speedup_text(self) -> str:
        """How much faster the artifact ran, against what, and how it was timed (a speed-up exists)."""
        text = (f"{self.artifact_label} ran {self.speedup_p50}x as fast as {self.reference_label} at p50, timed "
                f"{self.timing or ONE_AFTER_THE_OTHER}")
        rounds = self.speedup_rounds
        if rounds:
            text += (f"; {rounds['min']}-{rounds['max']}x (median {rounds['median']}x) over its {rounds['rounds']} "
                     f"rounds of {rounds['runs_per_round']} runs each")
        return text


@dataclass(frozen=True)
class CompileReport(JsonResult):
    target: str
    precision: str
    files: dict  # role -> file name in the artifact folder
    size_bytes: int
    # How the artifact was checked against its FP32 parent on real preprocessed images.
    check: str
    check_value: float
    check_images: int
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizationReport(JsonResult):
    precision: str
    method: str
    choice: str
    selection: ImageSplit
    budget_points: float
    drop_points: float  # on the selection split, against the FP32 reference on the same images
    within_budget: bool
    float_units: list
    units: int  # how many units (nodes or layers) the backend quantizes
    unit_kind: str
    calibration_images: int
    trials: list
    sensitivity: list
    # Kept float by the backend's rules because their integer kernels are slower (not by the search, not counted in
    # `units`).
    float_for_speed: list = field(default_factory=list)
    # Kept float by the rules so that the model's outputs are not rounded to 8 bits (QuantRules.float_outputs), nor
    # the inputs of the layers that compute them (QuantRules.float_output_layers).
    float_outputs: list = field(default_factory=list)
    # What the drops are ("accuracy" or "fidelity"), the kept candidate's FP32 boxes found again (fidelity), and
    # the selection split's jitter floor: what the gate's message says, from a fresh or a cached report alike.
    measure: str = "accuracy"
    found_again: str | None = None
    selection_jitter_floor: dict | None = None
    # How the units in `sensitivity` were scored, in words (the backend's ranked_by); None where none were ranked.
    ranked_by: str | None = None
    # {unit: how} for the units the kept candidate has in another form than the float graph's, computing the same
    # values (QuantBackend.rewritten).
    rewritten: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo(JsonResult):
    """What compile and the runtimes need to know about the detector, passed explicitly to every target."""

    source: str
    family: str
    task: str
    names: list
    imgsz: int
    strides: list
    reg_max: int
    params: int
    pruned: bool = False
