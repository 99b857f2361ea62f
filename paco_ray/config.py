"""The whole training configuration as dataclasses, loaded from YAML and ``--set`` overrides.

Unknown keys and invalid values raise :class:`ConfigError` with a one-line message that names
the offending key as a dotted path (``paco.temperature``).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOSSES = ("paco", "gpaco", "balanced_softmax", "ce")
DATASETS = ("fashion_mnist_lt",)
LOADERS = ("ffcv", "torch")
AUGMENTS = ("small", "imagenet")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the key."""


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset directory (python -m pipelines.*); empty: the embedded default
    # The embedded default, prepared into cache_dir on first use when path is empty:
    dataset: str = "fashion_mnist_lt"
    root: str = "/usr/share/datasets/fashion-mnist"
    imbalance_factor: float = 100.0
    max_per_class: int = 5000
    val_per_class: int = 500
    cache_dir: str = "~/.cache/paco_ray"
    batch_size: int = 128  # global, split evenly across workers
    eval_batch_size: int = 1024
    num_workers: int = 0  # loader workers per training worker; 0: FFCV uses the worker's CPUs, torch loads in-process
    loader: str = "ffcv"
    augment: str = "small"  # small: pad-crop + flip | imagenet: resized crop + flip, colour on the key view
    image_size: int = 0  # training crop size; 0: the stored size (small family only)
    crop_padding: int = 2
    randaugment_ops: int = 0  # RandAugment on the query view; 0 = off
    randaugment_magnitude: int = 9


@dataclass
class ModelConfig:
    backbone: str = "resnet_small28"
    proj_dim: int = 64


@dataclass
class PaCoConfig:
    alpha: float = 0.005  # scale down with few classes: alpha x same-class keys should stay O(1)
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 0.2
    queue_size: int = 1024
    momentum: float = 0.99  # key-encoder EMA


@dataclass
class OptimConfig:
    epochs: int = 15
    lr: float = 0.1  # for the global batch size
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: int = 1


@dataclass
class TrainConfig:
    loss: str = "paco"
    seed: int = 0
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    amp: bool = True  # autocast on GPU (ignored on CPU)
    amp_dtype: str = "bfloat16"
    deterministic: bool = False
    storage_path: str = "runs"
    name: str = ""  # empty: derived from dataset, loss and seed
    keep_checkpoints: int = 2
    max_failures: int = 0
    resume_override: bool = False  # resume from a checkpoint whose training settings differ from these
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/Inf (default: stop with an error naming it)
    placement_strategy: str = "PACK"  # of the workers over nodes: PACK | SPREAD | STRICT_SPREAD | STRICT_PACK
    log_level: str = "WARNING"  # Ray Train's own log lines; progress is printed by rank 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    paco: PaCoConfig = field(default_factory=PaCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def contrastive(self) -> bool:
        return self.loss in ("paco", "gpaco")

    @property
    def run_name(self) -> str:
        dataset = Path(self.data.path).name if self.data.path else self.data.dataset
        return self.name or f"{dataset}-{self.loss}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        cfg = _build(cls, raw, "")
        validate(cfg)
        return cfg


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {kind}")
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], kind, prefix + name)
    return cls(**values)


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot train; each message names the key."""
    from .backbones import BACKBONES

    _check(cfg.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}", cfg.loss)
    _check(cfg.workers >= 1, "workers", "must be >= 1", cfg.workers)
    _check(cfg.cpus_per_worker > 0, "cpus_per_worker", "must be > 0", cfg.cpus_per_worker)
    _check(cfg.amp_dtype in ("bfloat16", "float16"), "amp_dtype", "must be bfloat16 or float16", cfg.amp_dtype)
    _check(cfg.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
           "must be DEBUG, INFO, WARNING or ERROR", cfg.log_level)
    _check(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", cfg.keep_checkpoints)
    _check(cfg.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)", cfg.max_failures)
    _check(cfg.placement_strategy in PLACEMENTS, "placement_strategy", f"must be one of {', '.join(PLACEMENTS)}",
           cfg.placement_strategy)
    _check(bool(cfg.storage_path), "storage_path", "must not be empty", cfg.storage_path)
    check_no_credentials("storage_path", cfg.storage_path)
    _check("/" not in cfg.name, "name", "must not contain '/'", cfg.name)

    d = cfg.data
    _check(d.dataset in DATASETS, "data.dataset", f"must be one of {', '.join(DATASETS)}", d.dataset)
    _check(d.loader in LOADERS, "data.loader", f"must be one of {', '.join(LOADERS)}", d.loader)
    _check(d.augment in AUGMENTS, "data.augment", f"must be one of {', '.join(AUGMENTS)}", d.augment)
    _check(d.image_size >= 0, "data.image_size", "must be >= 0", d.image_size)
    _check(d.image_size > 0 or d.augment != "imagenet", "data.image_size", "must be > 0 with data.augment=imagenet",
           d.image_size)
    _check(d.imbalance_factor >= 1, "data.imbalance_factor", "must be >= 1", d.imbalance_factor)
    _check(d.max_per_class >= 1, "data.max_per_class", "must be >= 1", d.max_per_class)
    _check(d.val_per_class >= 1, "data.val_per_class", "must be >= 1", d.val_per_class)
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size)
    _check(d.batch_size % cfg.workers == 0, "data.batch_size",
           f"must be divisible by workers={cfg.workers}", d.batch_size)
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1", d.eval_batch_size)
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
    _check(d.crop_padding >= 0, "data.crop_padding", "must be >= 0", d.crop_padding)
    _check(d.randaugment_ops >= 0, "data.randaugment_ops", "must be >= 0", d.randaugment_ops)
    _check(0 <= d.randaugment_magnitude <= 30, "data.randaugment_magnitude", "must be in [0, 30]",
           d.randaugment_magnitude)

    m = cfg.model
    _check(m.backbone in BACKBONES, "model.backbone", f"must be one of {', '.join(BACKBONES)}", m.backbone)
    _check(m.proj_dim >= 1, "model.proj_dim", "must be >= 1", m.proj_dim)

    p = cfg.paco
    _check(p.alpha >= 0, "paco.alpha", "must be >= 0", p.alpha)
    _check(p.beta >= 0, "paco.beta", "must be >= 0", p.beta)
    _check(p.alpha > 0 or p.beta > 0, "paco.beta", "must be > 0 when paco.alpha is 0", p.beta)
    _check(p.gamma >= 0, "paco.gamma", "must be >= 0", p.gamma)
    _check(p.temperature > 0, "paco.temperature", "must be > 0", p.temperature)
    _check(p.queue_size >= 1, "paco.queue_size", "must be >= 1", p.queue_size)
    _check(0 <= p.momentum < 1, "paco.momentum", "must be in [0, 1)", p.momentum)

    o = cfg.optim
    _check(o.epochs >= 1, "optim.epochs", "must be >= 1", o.epochs)
    _check(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    _check(o.momentum > 0 or not o.nesterov, "optim.nesterov", "needs optim.momentum > 0", o.nesterov)
    _check(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", "must be in [0, optim.epochs)",
           o.warmup_epochs)


# What may change between a checkpoint and the run that resumes from it: resources, I/O, logging.
RESUME_MAY_CHANGE = {"workers", "cpus_per_worker", "use_gpu", "amp", "amp_dtype", "storage_path", "name",
                     "keep_checkpoints", "max_failures", "log_level", "placement_strategy", "skip_nonfinite",
                     "resume_override", "data.num_workers", "data.eval_batch_size", "data.cache_dir"}


def resume_conflict(saved: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The first training setting in which ``cfg`` differs from a checkpoint's config, as
    ``key (checkpoint value vs this run's)``; None when resuming would continue the same run."""
    theirs, mine = flatten(TrainConfig.from_dict(saved).to_dict()), flatten(cfg.to_dict())
    for key in mine:
        if key not in RESUME_MAY_CHANGE and theirs[key] != mine[key]:
            return f"{key} ({theirs[key]!r} in the checkpoint vs {mine[key]!r})"
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config mapping."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({err.__class__.__name__})") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (safe loader); ``what`` names the file in one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {str(path)!r}{where}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r}: expected a mapping at top level")
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML file (or the embedded default when ``path`` is None) plus overrides."""
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    cfg = TrainConfig.from_dict(raw)
    cfg.storage_path = _absolute_storage(cfg.storage_path)
    if cfg.data.path:  # absolute: Ray and Tune change the working directory
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    return cfg


def _absolute_storage(path: str) -> str:
    """Ray needs absolute storage paths; URIs (s3://, gs://) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def check_no_credentials(key: str, uri: str) -> None:
    """Refuse ``scheme://user:secret@host/...``: checkpoints, logs and Tune's files record the
    value. The message does not echo it."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        raise ConfigError(f"{key}: a {uri.split('://', 1)[0]}:// URI must not carry credentials (user:secret@); "
                          "give them through the environment or the machine's role instead")
