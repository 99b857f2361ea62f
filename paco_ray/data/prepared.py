"""A prepared dataset directory (see pipelines/writer.py), opened and validated for training."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from .longtail import ClassInfo

MEANS = {1: ((0.2860,), (0.3530,)),                                    # Fashion-MNIST
         3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}            # ImageNet statistics


class DatasetError(ValueError):
    """A prepared dataset that cannot be used; the message names the file."""


@dataclass
class PreparedDataset:
    path: Path
    classes: ClassInfo
    channels: int
    sources: dict[str, list[str]]   # split -> source of each .beton row
    labels: dict[str, list[int]]
    image_size: int = 0  # side of the stored square images when all share it, else 0

    @property
    def mean(self) -> tuple[float, ...]:
        return MEANS[self.channels][0]

    @property
    def std(self) -> tuple[float, ...]:
        return MEANS[self.channels][1]

    def size(self, split: str) -> int:
        return len(self.labels[split])

    def beton(self, split: str) -> Path:
        return self.path / f"{split}.beton"

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        path = Path(path)
        if not path.is_dir():
            raise DatasetError(f"data.path: {path} is not a directory (prepare one with python -m pipelines...)")
        for name in ("manifest.parquet", "classes.parquet"):
            if not (path / name).is_file():
                raise DatasetError(f"data.path: {path / name} missing (prepare the dataset with python -m pipelines...)")
        try:
            classes_table = pq.read_table(path / "classes.parquet")
            manifest = pq.read_table(path / "manifest.parquet")
        except Exception as err:
            raise DatasetError(f"data.path: {path}: unreadable Parquet ({type(err).__name__})") from None
        c = classes_table.to_pydict()
        meta = classes_table.schema.metadata or {}
        classes = ClassInfo(tuple(c["name"]), tuple(c["train_count"]), int(c["many_threshold"][0]),
                            int(c["few_threshold"][0]))
        m = manifest.filter(manifest.column("skipped").to_numpy(zero_copy_only=False) == False).to_pydict()  # noqa: E712
        sources: dict[str, list[str]] = {}
        labels: dict[str, list[int]] = {}
        for split, _, label, source in sorted(zip(m["split"], m["index"], m["label"], m["source"])):
            sources.setdefault(split, []).append(source)  # in .beton row order
            labels.setdefault(split, []).append(label)
        for split in sources:
            if not (path / f"{split}.beton").is_file():
                raise DatasetError(f"data.path: {path / f'{split}.beton'} missing")
        return cls(path, classes, int(meta.get(b"paco_ray.channels", b"3")), sources, labels,
                   int(meta.get(b"paco_ray.image_size", b"0")))


def default_dataset_dir(data_cfg) -> Path:
    """Where the embedded default is cached, named by the settings that shape it."""
    name = (f"{data_cfg.dataset}-if{data_cfg.imbalance_factor:g}-max{data_cfg.max_per_class}"
            f"-val{data_cfg.val_per_class}")
    return Path(data_cfg.cache_dir).expanduser().resolve() / name


def resolve_dataset(data_cfg) -> Path:
    """``data.path``, or the embedded default, prepared once (a no-op when already cached)."""
    if data_cfg.path:
        return Path(data_cfg.path)
    from pipelines.fashion_mnist import write

    from .datasets import fashion_mnist_lt

    try:  # fashion_mnist_lt already names the data.* keys in its errors
        data = fashion_mnist_lt(data_cfg.root, data_cfg.imbalance_factor, data_cfg.max_per_class,
                                data_cfg.val_per_class)
        return write(data, data_cfg.root, default_dataset_dir(data_cfg), imbalance_factor=data_cfg.imbalance_factor,
                     max_per_class=data_cfg.max_per_class, val_per_class=data_cfg.val_per_class)
    except (ValueError, FileNotFoundError) as err:
        raise DatasetError(str(err)) from None
