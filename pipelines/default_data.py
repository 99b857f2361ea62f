"""The embedded default dataset, Fashion-MNIST-LT from the Debian package, prepared once into
``default_data.cache_dir`` by the command-line drivers when ``data.path`` is empty."""
from __future__ import annotations

from pathlib import Path

from paco_ray.config import DefaultDataConfig, TrainConfig, with_data_path
from paco_ray.data.prepared import DatasetError

from .fashion_mnist import prepare
from .writer import PipelineError

CONFIG_NAMES = {"root": "default_data.root", "sizes": "default_data.max_per_class/default_data.val_per_class",
                **{key: f"default_data.{key}" for key in ("imbalance_factor", "max_per_class", "val_per_class")}}


def default_dataset_dir(settings: DefaultDataConfig) -> Path:
    """Where the embedded default is cached, named by the settings that shape it."""
    name = (f"fashion_mnist_lt-if{settings.imbalance_factor:g}-max{settings.max_per_class}"
            f"-val{settings.val_per_class}")
    return Path(settings.cache_dir).expanduser().resolve() / name


def with_prepared_data(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` itself when it names a dataset; else a copy reading the embedded default, prepared
    now (a no-op when already cached). Errors name the ``default_data.*`` keys."""
    if cfg.data.path:
        return cfg
    s = cfg.default_data
    try:
        path = prepare(s.root, default_dataset_dir(s), imbalance_factor=s.imbalance_factor,
                       max_per_class=s.max_per_class, val_per_class=s.val_per_class, names=CONFIG_NAMES)
    except PipelineError as err:
        raise DatasetError(str(err)) from None
    return with_data_path(cfg, path)
