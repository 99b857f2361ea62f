"""The whole training configuration as dataclasses, loaded from YAML and ``--set`` overrides.

Unknown keys and invalid values raise :class:`ConfigError` with a one-line message that names
the offending key as a dotted path (``paco.temperature``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .migrations import DEFAULT_DATASET, upgrade_renamed_keys
from .schema import ConfigError, apply_overrides, check, from_mapping, read_yaml_mapping
from .storage import absolute_storage, check_no_credentials

__all__ = ["ConfigError", "TrainConfig", "DataConfig", "DefaultDataConfig", "load_config"]

PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset directory or URI (python -m pipelines.*); empty: the embedded default
    stage_dir: str = ""  # node-local copy of a dataset in object storage; empty: $PACO_RAY_STAGE_DIR or ~/.cache
    batch_size: int = 128  # global, split evenly across workers
    eval_batch_size: int = 1024
    num_workers: int = 0  # loader workers per training worker; 0: FFCV uses the worker's CPUs, torch loads in-process
    loader: str = "ffcv"
    augment: str = "small"  # small: pad-crop + flip | imagenet: resized crop + flip, colour on the key view
    image_size: int = 0  # training crop size; 0: the stored size (small family only)
    crop_padding: int = 2
    query_view: str = "crop_flip"  # one of paco_ray.data.augment.VIEWS; "": 0.1's choice (randaugment if randaugment_ops)
    key_view: str = "crop_flip"  # "": 0.1's choice (sim for the imagenet family, crop_flip for small)
    randaugment_ops: int = 0  # timm RandAugment n (views randaugment, randcls); 0 = off
    randaugment_magnitude: int = 10  # m on timm's 0-10 scale (10: shear 0.3, rotate 30 degrees)
    randaugment_std: float = 0.5  # Gaussian noise on m per op (timm's mstd)
    cutout: int = 16  # side of Cutout's square (view autoaugment_cutout)


@dataclass
class DefaultDataConfig:
    """The embedded default dataset, Fashion-MNIST-LT: prepared by the command-line driver into
    cache_dir (once; a no-op when cached) when data.path is empty. Workers never read these keys."""
    root: str = "/usr/share/datasets/fashion-mnist"
    imbalance_factor: float = 100.0
    max_per_class: int = 5000
    val_per_class: int = 500
    cache_dir: str = "~/.cache/paco_ray"


@dataclass
class ModelConfig:
    backbone: str = "resnet_small28"
    proj_dim: int = 64
    projector: str = ""  # model.PROJECTORS: mlp | mlp_bn | gpaco_mlp; empty: the loss's published head (losses.LOSSES)
    pretrained: str = ""  # weights file (.pth or .safetensors; path or URI) loaded into the backbone, classifier excluded
    trainable: str = "all"  # model.TRAINABLE: all | last_block (the official Places-LT fine-tuning: convolutions
    #                         of the query encoder frozen but its last residual block's; BN, projector, classifier train)


@dataclass
class PaCoConfig:
    alpha: float = 0.005  # scale down with few classes: alpha x same-class keys should stay O(1)
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 0.2
    queue_size: int = 1024
    momentum: float = 0.99  # key-encoder EMA
    shuffle_keys: bool = False  # MoCo's shuffle BN: the key encoder's batch mixed across DDP ranks
    smooth: float = 0.0  # label smoothing of the center positives (the official loss's ``smooth``)


@dataclass
class OptimConfig:
    epochs: int = 15
    lr: float = 0.1  # for the global batch size
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: int = 1
    schedule: str = "cosine"  # optim.SCHEDULES: cosine (after the warmup) | step (the official CIFAR schedule)
    milestones: list[int] = field(default_factory=lambda: [320, 360])  # schedule step: epochs after which lr x gamma
    gamma: float = 0.1


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
    compile: bool = False  # torch.compile the query and key encoders
    progress_every_s: float = 30.0  # rank 0's progress line within an epoch, every this many seconds (0: none)
    storage_path: str = "runs"
    name: str = ""  # empty: derived from dataset, loss and seed
    keep_checkpoints: int = 2
    max_failures: int = 0
    node_wait_s: float = 1800.0  # how long one attempt to place the workers waits for nodes; 0: no limit
    # an attempt ends sooner once the autoscaler (v2) has reported the workers infeasible for this long; 0: never
    node_infeasible_s: float = 60.0
    node_types: str = ""  # cluster.yaml or RayCluster/RayJob manifest (path or URI) where the running
    #                       autoscaler's config cannot be read from the driver (capacity.py); empty: none
    resume_override: bool = False  # resume from a checkpoint whose training settings differ from these
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/Inf (default: stop with an error naming it)
    placement_strategy: str = "PACK"  # of the workers over nodes: PACK | SPREAD | STRICT_SPREAD | STRICT_PACK
    log_level: str = "WARNING"  # Ray Train's own log lines; progress is printed by rank 0
    data: DataConfig = field(default_factory=DataConfig)
    default_data: DefaultDataConfig = field(default_factory=DefaultDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    paco: PaCoConfig = field(default_factory=PaCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def contrastive(self) -> bool:
        """Whether the loss trains on a key view (losses.LOSSES names where its keys come from)."""
        from .losses import LOSSES

        return LOSSES[self.loss].keys is not None

    @property
    def run_name(self) -> str:
        dataset = Path(self.data.path).name if self.data.path else DEFAULT_DATASET
        return self.name or f"{dataset}-{self.loss}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        """A validated config from a mapping; keys renamed in 0.2 are read under their new names."""
        cfg = from_mapping(cls, upgrade_renamed_keys(raw)[0])
        validate(cfg)
        return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot train; each message names the key. A key naming a component's
    choice is checked against that component's own list (losses.LOSSES, data.loaders.LOADERS, ...)."""
    from .losses import LOSSES

    check(cfg.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}", cfg.loss)
    check(cfg.workers >= 1, "workers", "must be >= 1", cfg.workers)
    check(cfg.cpus_per_worker > 0, "cpus_per_worker", "must be > 0", cfg.cpus_per_worker)
    check(cfg.amp_dtype in ("bfloat16", "float16"), "amp_dtype", "must be bfloat16 or float16", cfg.amp_dtype)
    check(cfg.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
           "must be DEBUG, INFO, WARNING or ERROR", cfg.log_level)
    check(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", cfg.keep_checkpoints)
    check(cfg.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)", cfg.max_failures)
    check(cfg.node_wait_s >= 0, "node_wait_s", "must be >= 0 (0: wait without limit)", cfg.node_wait_s)
    check(cfg.node_infeasible_s >= 0, "node_infeasible_s", "must be >= 0 (0: wait node_wait_s whatever the "
          "autoscaler reports)", cfg.node_infeasible_s)
    check_no_credentials("node_types", cfg.node_types)
    check(cfg.placement_strategy in PLACEMENTS, "placement_strategy", f"must be one of {', '.join(PLACEMENTS)}",
           cfg.placement_strategy)
    check(bool(cfg.storage_path), "storage_path", "must not be empty", cfg.storage_path)
    check_no_credentials("storage_path", cfg.storage_path)
    check_no_credentials("data.path", cfg.data.path)
    check("/" not in cfg.name, "name", "must not contain '/'", cfg.name)
    _validate_data(cfg)
    _validate_model_and_optim(cfg)


def _validate_data(cfg: TrainConfig) -> None:
    from .data.augment import FAMILIES, RANDAUGMENT_VIEWS, VIEWS
    from .data.loaders import LOADERS

    d = cfg.data
    check(d.loader in LOADERS, "data.loader", f"must be one of {', '.join(LOADERS)}", d.loader)
    check(d.augment in FAMILIES, "data.augment", f"must be one of {', '.join(FAMILIES)}", d.augment)
    check(d.image_size >= 0, "data.image_size", "must be >= 0", d.image_size)
    check(d.image_size > 0 or d.augment != "imagenet", "data.image_size", "must be > 0 with data.augment=imagenet",
           d.image_size)
    check(d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size)
    check(d.batch_size % cfg.workers == 0, "data.batch_size",
           f"must be divisible by workers={cfg.workers}", d.batch_size)
    check(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1", d.eval_batch_size)
    check(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
    check(d.crop_padding >= 0, "data.crop_padding", "must be >= 0", d.crop_padding)
    for name in ("query_view", "key_view"):
        view = getattr(d, name)
        check(view in ("", *VIEWS), f"data.{name}", f"must be one of {', '.join(VIEWS)}", view)
        check(d.randaugment_ops > 0 or view not in RANDAUGMENT_VIEWS, "data.randaugment_ops",
               f"must be > 0 with data.{name}={view}", d.randaugment_ops)
    check(d.randaugment_ops >= 0, "data.randaugment_ops", "must be >= 0", d.randaugment_ops)
    check(0 <= d.randaugment_magnitude <= 10, "data.randaugment_magnitude", "must be in [0, 10] (timm's scale)",
           d.randaugment_magnitude)
    check(d.randaugment_std >= 0, "data.randaugment_std", "must be >= 0", d.randaugment_std)
    check(d.cutout >= 0, "data.cutout", "must be >= 0", d.cutout)

    e = cfg.default_data
    check(e.imbalance_factor >= 1, "default_data.imbalance_factor", "must be >= 1", e.imbalance_factor)
    check(e.max_per_class >= 1, "default_data.max_per_class", "must be >= 1", e.max_per_class)
    check(e.val_per_class >= 1, "default_data.val_per_class", "must be >= 1", e.val_per_class)


def _validate_model_and_optim(cfg: TrainConfig) -> None:
    from .backbones import BACKBONES, TIMM_PREFIX, timm_model_exists
    from .model import PROJECTORS, TRAINABLE
    from .optim import SCHEDULES

    m = cfg.model
    timm_name = m.backbone[len(TIMM_PREFIX):] if m.backbone.startswith(TIMM_PREFIX) else None
    check(m.backbone in BACKBONES or timm_name is not None, "model.backbone",
           f"must be one of {', '.join(BACKBONES)}, or timm:<model name>", m.backbone)
    check(timm_name is None or timm_model_exists(timm_name), "model.backbone",
           "names no timm model (timm.list_models() lists them)", m.backbone)
    check(m.proj_dim >= 1, "model.proj_dim", "must be >= 1", m.proj_dim)
    check(m.projector in ("", *PROJECTORS), "model.projector", f"must be one of {', '.join(PROJECTORS)}",
           m.projector)
    check(m.trainable in TRAINABLE, "model.trainable", f"must be one of {', '.join(TRAINABLE)}", m.trainable)
    check(m.trainable == "all" or timm_name is None, "model.trainable",
           "last_block needs a ResNet backbone of paco_ray or torchvision (not timm:)", m.trainable)
    check_no_credentials("model.pretrained", m.pretrained)

    p = cfg.paco
    check(p.alpha >= 0, "paco.alpha", "must be >= 0", p.alpha)
    check(p.beta >= 0, "paco.beta", "must be >= 0", p.beta)
    check(p.alpha > 0 or p.beta > 0, "paco.beta", "must be > 0 when paco.alpha is 0", p.beta)
    check(p.gamma >= 0, "paco.gamma", "must be >= 0", p.gamma)
    check(p.temperature > 0, "paco.temperature", "must be > 0", p.temperature)
    check(p.queue_size >= 1, "paco.queue_size", "must be >= 1", p.queue_size)
    check(0 <= p.momentum < 1, "paco.momentum", "must be in [0, 1)", p.momentum)
    check(0 <= p.smooth < 1, "paco.smooth", "must be in [0, 1)", p.smooth)

    o = cfg.optim
    check(o.epochs >= 1, "optim.epochs", "must be >= 1", o.epochs)
    check(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    check(o.momentum > 0 or not o.nesterov, "optim.nesterov", "needs optim.momentum > 0", o.nesterov)
    check(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", "must be in [0, optim.epochs)",
           o.warmup_epochs)
    check(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {', '.join(SCHEDULES)}", o.schedule)
    check(list(o.milestones) == sorted(set(o.milestones)) and all(m >= 0 for m in o.milestones), "optim.milestones",
           "must be increasing epochs >= 0", o.milestones)
    check(0 < o.gamma <= 1, "optim.gamma", "must be in (0, 1]", o.gamma)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML file (or the embedded default when ``path`` is None) plus overrides."""
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    raw, notes = upgrade_renamed_keys(apply_overrides(raw, overrides or []))
    for note in notes:
        sys.stderr.write(f"warning: {note}\n")
    cfg = TrainConfig.from_dict(raw)
    # absolute: Ray and Tune change the working directory
    data = dataclasses.replace(cfg.data, path=absolute_storage(cfg.data.path) if cfg.data.path else "")
    model = dataclasses.replace(cfg.model, pretrained=absolute_storage(cfg.model.pretrained) if cfg.model.pretrained else "")
    return dataclasses.replace(cfg, storage_path=absolute_storage(cfg.storage_path), data=data, model=model,
                               node_types=absolute_storage(cfg.node_types) if cfg.node_types else "")


def with_data_path(cfg: TrainConfig, path: str | os.PathLike) -> TrainConfig:
    """A copy of ``cfg`` reading the prepared dataset at ``path``."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path)))
