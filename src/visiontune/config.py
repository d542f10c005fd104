"""The training configuration: one typed dataclass that is the single source of truth.

Every field carries a one-line help text and its allowed values in ``metadata``; the CLI flags
(``--batch-size`` for ``batch_size``) are generated from those fields, a YAML file gives
defaults, flags override, and everything passes through the same :func:`config_from_dict`
validation, so a wrong value is reported the same way wherever it came from. The resolved
config is written into every run folder as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from visiontune.atomic_io import write_text_atomically
from visiontune.errors import ConfigError, shown
from visiontune.safe_yaml import load_yaml_file

STRATEGIES = ("linear-probe", "partial", "full", "gradual")


def _option(help: str, *, choices: tuple | None = None, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, metavar: str | None = None) -> dict:
    """Field metadata: help text, allowed choices, and a numeric range (``*_open`` excludes the end)."""
    return {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "metavar": metavar}


@dataclass
class TrainConfig:
    """Everything that decides what a training run does."""

    data: str | None = field(default=None, metadata=_option(
        "image folder (train/ and val/ class folders, or one class-per-folder tree) or a CSV manifest path,label",
        metavar="DIR"))
    model: str | None = field(default=None, metadata=_option(
        "architecture: a torchvision name (resnet50) or timm:<name> (timm:convnext_tiny)", metavar="NAME"))
    weights: str = field(default="DEFAULT", metadata=_option(
        "pretrained weights: DEFAULT (the architecture's own), a weights enum name, 'none' (random init) or a file",
        metavar="DEFAULT|none|PATH"))
    strategy: str = field(default="full", metadata=_option(
        "what trains: linear-probe (head only), partial (last --train-groups groups + head), full, gradual "
        "(head for --freeze-epochs, then everything)", choices=STRATEGIES))
    epochs: int = field(default=10, metadata=_option("number of epochs in total (all phases)", low=1))
    budget: str | None = field(default=None, metadata=_option(
        "time budget for the whole run (90s, 3m, 1h30m or seconds): times the first steps and chooses --epochs "
        "to end within it (10 percent either way), stopping early if time runs out; not with --epochs", metavar="TIME"))
    batch_size: int = field(default=64, metadata=_option(
        "images per optimisation step (64: faster per image than 32 on a CPU, benchmarks/recipes.md)", low=1))
    image_size: int | None = field(default=None, metadata=_option(
        "crop size in pixels (default: the pretrained weights' own)", low=8))
    lr: float | Literal["auto"] = field(default=1e-3, metadata=_option(
        "learning rate of the backbone (peak, after warmup; gradual halves it after unfreezing); "
        "'auto' runs the LR finder", low=0.0, low_open=True))
    head_lr: float | None = field(default=None, metadata=_option(
        "learning rate of the new head (default: 10x --lr, in every strategy)", low=0.0, low_open=True))
    optimizer: str = field(default="adamw", metadata=_option("optimizer", choices=("adamw", "sgd")))
    momentum: float = field(default=0.9, metadata=_option("SGD momentum", low=0.0, high=1.0, high_open=True))
    weight_decay: float = field(default=0.01, metadata=_option(
        "weight decay (never applied to norm layers and biases)", low=0.0))
    warmup_epochs: float = field(default=1.0, metadata=_option(
        "epochs of linear warmup at the start of each phase, capped at half the phase", low=0.0))
    grad_clip: float = field(default=0.0, metadata=_option("clip the gradient norm to this; 0 turns it off", low=0.0))
    label_smoothing: float = field(default=0.0, metadata=_option(
        "label smoothing of the cross-entropy (0.1 lost on 2 of the 3 sets of benchmarks/recipes.md)", low=0.0,
        high=1.0, high_open=True))
    ema: float = field(default=0.0, metadata=_option(
        "decay per step of an exponential moving average of the weights (typical 0.999), validated beside "
        "the model each epoch and kept when better; 0 turns it off", low=0.0, high=1.0, high_open=True,
        metavar="DECAY"))
    mixup: float = field(default=0.0, metadata=_option("mixup alpha; 0 turns it off", low=0.0))
    cutmix: float = field(default=0.0, metadata=_option("cutmix alpha; 0 turns it off", low=0.0))
    augment: str = field(default="basic", metadata=_option(
        "training augmentation (basic: random resized crop + flip)", choices=("basic", "none", "trivial", "randaugment")))
    balance: bool = field(default=False, metadata=_option(
        "weight the loss by inverse class frequency, for imbalanced data"))
    train_groups: int = field(default=1, metadata=_option(
        "partial: how many layer groups before the head train", low=0))
    layer_decay: float | None = field(default=None, metadata=_option(
        "full/gradual: multiply the learning rate by this per layer group, from the head down", low=0.0, high=1.0,
        low_open=True))
    freeze_epochs: int = field(default=1, metadata=_option("gradual: epochs that train only the head", low=1))
    patience: int = field(default=0, metadata=_option(
        "stop after this many epochs without a better validation accuracy; 0 never stops early", low=0))
    val_split: float | None = field(default=None, metadata=_option(
        "fraction of a single class-per-folder tree held out for validation (stratified, seeded)", low=0.0,
        high=1.0, low_open=True, high_open=True))
    on_bad_image: str = field(default="skip", metadata=_option(
        "unreadable images: skip them (listed in report.json) or stop with an error", choices=("skip", "error")))
    # torch.manual_seed takes at most 2**64 - 1 and the sampler seeds with seed + epoch, so 2**63 - 1 leaves room.
    seed: int = field(default=0, metadata=_option("random seed: data order, augmentation, initialisation", low=0,
                                                   high=2**63 - 1))
    device: str = field(default="auto", metadata=_option("where to train", choices=("auto", "cpu", "cuda")))
    precision: str = field(default="auto", metadata=_option(
        "auto: bf16/fp16 autocast where the device supports it, else fp32", choices=("auto", "fp32", "bf16", "fp16")))
    sync_bn: bool = field(default=False, metadata=_option(
        "multi-GPU (torchrun): share BatchNorm statistics across GPUs (SyncBatchNorm), for full fine-tuning"))
    workers: int | None = field(default=None, metadata=_option(
        "data loader worker processes (default: min(4, CPUs - 1) on a GPU; none on a CPU of up to 3 cores)", low=0))
    feature_cache: str = field(default="auto", metadata=_option(
        "when only the head trains on a frozen backbone, run the backbone once per image and train the head on "
        "its features (auto: in memory if they fit, else on disk in $VISIONTUNE_CACHE)",
        choices=("auto", "memory", "disk", "off")))
    cache_views: int | None = field(default=None, metadata=_option(
        "feature cache with random augmentation: augmented views to cache per image (default: chosen from the "
        "frozen phase's epochs and the memory budget; 0: train uncached)", low=0))
    compile: bool = field(default=False, metadata=_option("torch.compile the model (slow to start; opt-in)"))
    out: str | None = field(default=None, metadata=_option(
        "run folder to create (default: runs/<model>-<timestamp>)", metavar="RUN"))
    source_model: str | None = field(default=None, metadata=_option(
        "with --weights FILE: the architecture the file was saved from (e.g. regnet_y_400mf, timm:regnety_004); "
        "both models are traced and their tensors paired by data flow", metavar="NAME"))
    task: str = field(default="auto", metadata=_option(
        "single: one class per image; multilabel: any number per image (CSV path,labels with cat|dog, or one 0/1 "
        "column per class); auto: multilabel when a manifest's rows carry several labels or none",
        choices=("auto", "single", "multilabel")))
    val_data: str | None = field(default=None, metadata=_option(
        "a separate validation source (a folder, a CSV manifest, WebDataset shards or hf:PATH); the whole of --data "
        "then trains", metavar="SOURCE"))
    epoch_samples: int | None = field(default=None, metadata=_option(
        "streamed shards: training samples per epoch, over all processes (default: all the samples the shards' "
        "classes.json counts)", low=1))
    image_column: str | None = field(default=None, metadata=_option(
        "hf: data: the column holding the images (default: the Image feature)", metavar="NAME"))
    label_column: str | None = field(default=None, metadata=_option(
        "hf: data: the column holding the labels (default: the ClassLabel feature, or 'label')", metavar="NAME"))
    track: str = field(default="none", metadata=_option(
        "log parameters, per-epoch metrics, the run's files and the model to an experiment tracker (mlflow: "
        "MLFLOW_TRACKING_URI, else MLflow's local store in the current folder); TensorBoard logs either way",
        choices=("none", "mlflow")))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def valid_keys() -> list[str]:
    return [f.name for f in config_fields()]


# -- validation: one path for YAML, flags and Python -------------------------------------------


def config_from_dict(values: dict[str, Any], *, require_data: bool = True) -> TrainConfig:
    """Build a validated TrainConfig; unknown keys, wrong types and out-of-range values raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(valid_keys()))
    if unknown:
        named = ", ".join(shown(key).strip("'") for key in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(f"unknown config key(s) {named}; valid keys: {', '.join(valid_keys())}")
    hints = typing.get_type_hints(TrainConfig)
    coerced = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    config = TrainConfig(**coerced)
    validate(config, require_data=require_data)
    return config


def validate(config: TrainConfig, *, require_data: bool = True) -> TrainConfig:
    """Check types, ranges and choices of every field, and the rules that span fields."""
    hints = typing.get_type_hints(TrainConfig)
    for spec in config_fields():
        value = _coerce(spec.name, getattr(config, spec.name), hints[spec.name])
        setattr(config, spec.name, value)
        _check_range(spec, value)
    if require_data:
        for name in ("data", "model"):
            if not getattr(config, name):
                raise ConfigError(f"--{_flag(name)} is required (a config file may set '{name}')")
    if config.strategy == "gradual" and config.epochs <= config.freeze_epochs:
        raise ConfigError(
            f"strategy gradual trains the head for --freeze-epochs {config.freeze_epochs} and then everything, so "
            f"--epochs must be larger (got {config.epochs}); use linear-probe to train only the head")
    return config


def _check_range(spec: dataclasses.Field, value: Any) -> None:
    meta = spec.metadata
    if value is None or isinstance(value, (bool, str)) and meta.get("choices") is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{spec.name} must be one of {', '.join(meta['choices'])}, got {shown(value)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        raise ConfigError(f"{spec.name} must be {_describe_range(meta)}, got {shown(value)}")


def _describe_range(meta: dict) -> str:
    low, high = meta.get("low"), meta.get("high")
    parts = []
    if low is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {_number(low)}")
    if high is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {_number(high)}")
    return " and ".join(parts)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"  # 9223372036854775807, not 9.22337e+18


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError naming both."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options
                         and str not in options):
        if type(None) in options:
            return None
        raise ConfigError(f"{name} needs a value of type {_type_name(hint)}, got nothing")
    for option in options:
        if typing.get_origin(option) is Literal and value in typing.get_args(option):
            return value
    for option in options:
        converted = _convert(value, option)
        if converted is not _FAILED:
            return converted
    raise ConfigError(f"{name} must be {_type_name(hint)}, got {shown(value)}")


_FAILED = object()


def _convert(value: Any, target: Any) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        return _FAILED
    if target is int:
        if isinstance(value, bool):
            return _FAILED
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _FAILED
        return _FAILED
    if target is float:
        if isinstance(value, bool):
            return _FAILED
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _FAILED
        return number if number == number and abs(number) != float("inf") else _FAILED  # no NaN or inf
    if target is str:
        return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else _FAILED
    return _FAILED


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    names = []
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is Literal:
            names.extend(repr(v) for v in typing.get_args(option))
        else:
            names.append({int: "an integer", float: "a number", str: "a string", bool: "true or false"}[option])
    return " or ".join(names)


# -- config files ----------------------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated later, together with the flags)."""
    path = Path(path)
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {path} {state}; give a YAML file of TrainConfig keys")
    values = load_yaml_file(path) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    return values


def save_config(config: TrainConfig, path: str | Path) -> Path:
    # atomically, like every file visiontune writes: never through a symlink planted at the path
    return write_text_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_config(path: str | Path) -> TrainConfig:
    """Load a run's config.yaml (written by :func:`save_config`) back into a validated TrainConfig."""
    return config_from_dict(load_config_file(path), require_data=False)


# -- command line ----------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (but the fields in ``exclude``). Defaults are suppressed so
    that only the flags a user typed reach :func:`config_from_args`, which lets a YAML file supply the rest."""
    hints = typing.get_type_hints(TrainConfig)
    for spec in config_fields():
        if spec.name in exclude:
            continue
        meta = spec.metadata
        default = spec.default
        help_text = meta["help"] + ("" if default in (None, False) else f" (default: {default})")
        if hints[spec.name] is bool:
            parser.add_argument(f"--{_flag(spec.name)}", action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        parser.add_argument(f"--{_flag(spec.name)}", default=argparse.SUPPRESS, help=help_text,
                            choices=meta.get("choices"), metavar=meta.get("metavar") or (None if meta.get("choices") else spec.name.upper()))


def given_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the user actually set on the command line."""
    return {name: getattr(args, name) for name in valid_keys() if hasattr(args, name)}


def config_from_args(args: argparse.Namespace, config_file: str | Path | None = None) -> TrainConfig:
    """Defaults < YAML file < flags, validated once."""
    values = load_config_file(config_file) if config_file else {}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    values.update(given_config_values(args))
    return config_from_dict(values)
