"""The build configuration: `deploy.yaml`, overridden by flags, validated by pydantic."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_deploy.pipeline.errors import ConfigError, InputError
from edge_deploy.pipeline.userfiles import read_yaml, shown


class Section(BaseModel):
    # NaN and infinity compare false with every bound, so they would slip past ge/le checks.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _not_empty(cls, value):
    # An empty path would silently mean the current folder.
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


class CalibrationConfig(Section):
    source: Optional[Path] = Field(None, description="image folder, data YAML or video; default: the build's data")
    _source_not_empty = field_validator("source", mode="before")(_not_empty)
    split: Literal["train", "val"] = Field("train", description="which split of a data YAML to sample")
    size: int = Field(200, ge=1, le=100_000)
    seed: int = 0


class SelectionConfig(Section):
    size: int = Field(100, ge=1, le=100_000, description="val images held out for the build's choices when the "
                                                         "data YAML has no 'selection' split (at most half of val)")
    seed: int = 0


class FidelityConfig(Section):
    conf: float = Field(0.25, gt=0, lt=1, description="the FP32 model's detections at this confidence or above are "
                                                       "the boxes fidelity is measured against")
    report_size: int = Field(200, ge=1, le=100_000, description="label-free builds: unlabelled images held out "
                                                                "for the reported fidelity (at most a quarter)")


class ExportConfig(Section):
    opset: int = Field(17, ge=13, le=21)
    simplify: bool = True
    # Maximum |onnx - torch| allowed, relative to the largest output magnitude.
    tolerance: float = Field(1e-4, gt=0)


# mAP50-95 points a quantized model may lose by default: INT8 must be nearly
# lossless; 4-bit weights buy size at a price the user accepts up front.
DEFAULT_MAP_DROP = {"fp32": 0.0, "fp16": 0.1, "int8": 0.5, "w4a8": 2.0, "int4": 2.0}


class QuantizeConfig(Section):
    method: Literal["auto", "minmax", "entropy", "percentile"] = Field(
        "auto", description="auto tries every method the target accepts and keeps the best on the selection split")
    per_channel: bool = True
    symmetric: bool = Field(False, description="zero-point-0 INT8 activations, as TensorRT requires")
    max_map_drop: Optional[float] = Field(
        None, ge=0, description="mAP50-95 points the quantized model may lose against FP32; default per precision")
    on_budget_exceeded: Literal["fail", "continue"] = Field(
        "fail", description="continue ships the best INT8 model found even when it misses the budget")
    # Signal-to-quantization-noise ratio of the INT8 outputs against FP32, on
    # calibration images, below which the conversion is rejected.
    min_sqnr_db: float = Field(15.0, ge=0, le=200, description="lowest output SQNR (dB) of a quantized artifact "
                                                                "against its FP32 parent")
    int4_method: Literal["gptq", "rtn"] = Field("gptq", description="INT4 weight rounding: GPTQ or round-to-nearest")
    int4_group: int = Field(0, ge=0, description="INT4 scale per group of this many input channels; 0 = per channel")

    def budget(self, precision: str) -> float:
        return self.max_map_drop if self.max_map_drop is not None else DEFAULT_MAP_DROP[precision]


class PruneConfig(Section):
    ratio: Optional[float] = Field(None, gt=0, lt=1, description="share of channels to remove, e.g. 0.5")
    target_params: Optional[int] = Field(None, gt=0, description="prune until at most this many parameters")
    target_macs: Optional[int] = Field(None, gt=0, description="prune until at most this many MACs")
    criterion: Literal["l1", "l2", "bn_scale", "taylor", "fpgm", "lamp", "random"] = Field(
        "bn_scale", description="bn_scale recovered best after fine-tuning in benchmarks/pruning.py")
    global_ranking: bool = Field(False, description="rank channels across layers instead of per layer")
    round_to: int = Field(8, ge=1, description="keep channel counts multiples of this (NEON and TensorRT like 8)")
    steps: int = Field(1, ge=1, le=50)
    epochs: int = Field(12, ge=0, description="fine-tuning epochs after each step (Ultralytics trainer)")
    map_floor: Optional[float] = Field(None, ge=0, le=1, description="stop when mAP50-95 falls below this")
    max_map_drop: float = Field(1.0, ge=0, description="mAP50-95 points pruning may cost; the final artifact is "
                                                       "gated against the unpruned model by this plus the "
                                                       "precision's budget")

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.ratio, self.target_params, self.target_macs))

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in ("ratio", "target_params", "target_macs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one pruning target, not {' and '.join(given)}")
        return self


class ProbeConfig(Section):
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=50, le=100_000, description="timed runs; fewer than 50 give unstable percentiles")
    threads: Optional[int] = Field(None, ge=1)
    device: Optional[str] = Field(None, description="device from devices.yaml the probe runs on (default: here)")
    inventory: Optional[Path] = Field(None, description="device inventory (default: ./devices.yaml)")


PRECISION = Literal["fp32", "fp16", "int8", "w4a8", "int4"]


class SearchConfig(Section):
    """`deploy search`: the space, the fidelities and the budget of a Pareto search over builds."""

    max_map_drop: float = Field(1.0, ge=0, description="mAP50-95 points a trial may lose against the baseline (the "
                                                        "FP32 unpruned model at the build's input size)")
    imgsz: Optional[list[int]] = Field(None, description="input sizes to try (multiples of the model's largest "
                                                         "stride); default: imgsz_range")
    imgsz_range: Optional[tuple[int, int]] = Field(None, description="smallest and largest input size; every "
                                                                     "multiple of the stride between them is tried; "
                                                                     "default: half the build's size to all of it")
    prune_ratios: list[float] = Field([0.0, 0.25, 0.5], min_length=1, description="shares of channels to prune "
                                                                                   "(0: unpruned)")
    prune_criteria: list[Literal["l1", "l2", "bn_scale", "taylor", "fpgm", "lamp", "random"]] = Field(
        ["bn_scale"], min_length=1)
    precisions: Optional[list[PRECISION]] = Field(None, description="default: every precision the target supports")
    quant_methods: list[Literal["auto", "minmax", "entropy", "percentile"]] = Field(
        ["auto"], min_length=1, description="INT8 range methods tried per quantized precision (auto: the build's own "
                                            "choice); mixed precision engages inside each build when its budget is "
                                            "missed")
    epochs: list[int] = Field([1, 4, 12], min_length=1, description="fine-tune epochs of pruned trials, one per "
                                                                    "fidelity rung, cheapest first; the last is the "
                                                                    "full budget")
    eta: int = Field(3, ge=2, le=10, description="successive halving: about 1 in eta trials of a rung is promoted")
    max_trials: Optional[int] = Field(None, ge=1, description="trials (builds) the search may use, finished ones "
                                                              "of an earlier run included")
    time_budget_s: Optional[float] = Field(None, gt=0, description="wall time after which no new trial starts")
    workers: Optional[int] = Field(None, ge=1, le=1024, description="trials at once (default: 1 when trials are "
                                                                     "timed on this machine, else CPUs / "
                                                                     "cpus_per_trial)")
    cpus_per_trial: Optional[int] = Field(None, ge=1, le=256, description="CPUs each trial's Ray task declares, "
                                                                      "which its scoring keeps to (default: this "
                                                                      "machine's cores shared among the trials at "
                                                                      "once; 1 on a cluster)")
    ray_address: Optional[str] = Field(None, description="an existing Ray cluster (host:port or ray://host:port); "
                                                         "default: a local Ray instance")
    pick: Literal["none", "best-under-budget"] = Field(
        "none", description="best-under-budget publishes the fastest trial within max_map_drop as a bundle")
    accept_drop: bool = Field(False, description="exit 0 (and pick the least lossy trial) when no trial is within "
                                                 "max_map_drop")

    @field_validator("imgsz")
    @classmethod
    def _sizes(cls, value):
        if value is not None and not value:
            raise ValueError("give at least one input size")
        for size in value or ():
            if size < 1:
                raise ValueError(f"input size {size} must be positive")
        return value

    @field_validator("imgsz_range")
    @classmethod
    def _range(cls, value):
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError(f"imgsz_range [{value[0]}, {value[1]}] must be two positive sizes, smallest first")
        return value

    @field_validator("prune_ratios")
    @classmethod
    def _ratios(cls, value):
        for ratio in value:
            if not 0 <= ratio < 1:
                raise ValueError(f"prune ratio {ratio} must be in [0, 1)")
        return value

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, value):
        if any(e < 0 for e in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"epochs {value} must be non-negative and increasing (cheapest rung first)")
        return value

    @model_validator(mode="after")
    def _one_size_source(self):
        if self.imgsz is not None and self.imgsz_range is not None:
            raise ValueError("give search.imgsz or search.imgsz_range, not both")
        return self


class BuildConfig(Section):
    model: Optional[Path] = Field(None, description="Ultralytics .pt or .yaml; default: the embedded YOLOv8n")
    data: Optional[Path] = Field(None, description="Ultralytics data YAML; default: the embedded shapes set, or with "
                                                   "--model and no data, a label-free build on --calib images")
    target: str = "cpu"
    profile: Optional[str] = Field(None, description="device profile of the target (threads): see `deploy targets`")
    precision: Optional[Literal["fp32", "fp16", "int8", "w4a8", "int4"]] = Field(
        None, description="default: the target's default (int8 on cpu); see `deploy targets`")
    imgsz: Optional[int] = Field(None, ge=32, le=4096)
    output: Path = Path("dist")

    _paths_not_empty = field_validator("model", "data", "output", mode="before")(_not_empty)
    calibration: CalibrationConfig = CalibrationConfig()
    selection: SelectionConfig = SelectionConfig()
    fidelity: FidelityConfig = FidelityConfig()
    export: ExportConfig = ExportConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    probe: ProbeConfig = ProbeConfig()
    search: SearchConfig = SearchConfig()  # read by `deploy search` only


def _unknown_key_message(error: dict, model: type[BaseModel]) -> str:
    location = [str(p) for p in error["loc"]]
    section = model
    for part in location[:-1]:
        field = section.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        section = field.annotation
    close = difflib.get_close_matches(location[-1], list(section.model_fields), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{'.'.join(location)}'{hint}"


def validate(raw: dict, origin: str) -> BuildConfig:
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"{origin}: {_unknown_key_message(error, BuildConfig)}") from None
        where = ".".join(str(p) for p in error["loc"]) or "config"
        raise ConfigError(f"{origin}: {where}: {error['msg'].removeprefix('Value error, ')}") from None


def load_config(path: Optional[Path], overrides: dict) -> BuildConfig:
    """Merges the file (if any) with flag overrides given as dotted keys."""
    raw: dict = {}
    origin = "flags"
    if path is not None:
        if not str(path).strip():
            raise ConfigError("--config: the config file's path must not be empty")
        origin = shown(path)
        try:
            raw = read_yaml(path, "config file")
        except InputError as exc:  # a config that cannot be read is a config error, whatever the reason
            raise ConfigError(str(exc)) from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parents[:depth])
                raise ConfigError(f"{origin}: '{section}' must be a section of settings, not {node!r}; the flag "
                                  f"for {dotted} cannot be merged into it")
        node[leaf] = value
    return validate(raw, origin)


def dump_config(config: BuildConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
