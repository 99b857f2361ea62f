"""A prepared dataset directory (see pipelines/writer.py), opened and validated for training."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from ..errors import InputError
from .longtail import ClassInfo


class Normalization(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Per-dataset statistics, as the official recipes use them; a pipeline records its choice in
# classes.parquet. Datasets prepared without one use the default of their channel count.
NORMALIZATION = {
    "fashion_mnist": Normalization((0.2860,), (0.3530,)),
    "cifar": Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # also Places-LT's
    "inat": Normalization((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),
}
DEFAULT_NORMALIZATION = {1: "fashion_mnist", 3: "imagenet"}
NORMALIZATION_KEY = b"paco_ray.normalization"  # classes.parquet metadata: a NORMALIZATION name


FILES_KEY = b"paco_ray.files"  # manifest metadata: {file name: {"size", "sha256"}} of the other files


class DatasetError(InputError):
    """A prepared dataset that cannot be used; the message names the file."""


@dataclass
class PreparedDataset:
    path: Path
    classes: ClassInfo
    channels: int
    sources: dict[str, list[str]]   # split -> source of each .beton row
    labels: dict[str, list[int]]
    image_size: int = 0  # side of the stored square images when all share it, else 0
    normalization: str = ""  # a NORMALIZATION name; empty: the default of the channel count

    @property
    def statistics(self) -> Normalization:
        return NORMALIZATION[self.normalization or DEFAULT_NORMALIZATION[self.channels]]

    @property
    def mean(self) -> tuple[float, ...]:
        return self.statistics.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.statistics.std

    def size(self, split: str) -> int:
        return len(self.labels[split])

    def beton(self, split: str) -> Path:
        return self.path / f"{split}.beton"

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        """The prepared directory ``path``, checked before any image is read: its two Parquet
        tables exist and parse, the recorded normalization fits the channel count, every class's
        recorded shot group agrees with its count and the thresholds (a hand-edited table would
        mislabel many/medium/few), every split has its .beton, and each file the manifest records
        has the recorded size (a truncated copy). Each failure is one DatasetError naming the file."""
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
        classes, channels, normalization, image_size = _read_classes(path, classes_table)
        sources, labels = _read_splits(path, manifest)
        _check_sizes(path, manifest, {"classes.parquet", *(f"{split}.beton" for split in sources)})
        return cls(path, classes, channels, sources, labels, image_size, normalization)


def _read_classes(path: Path, table) -> tuple[ClassInfo, int, str, int]:
    """(classes, channels, normalization, stored image size) from classes.parquet."""
    c = table.to_pydict()
    meta = table.schema.metadata or {}
    classes = ClassInfo(tuple(c["name"]), tuple(c["train_count"]), int(c["many_threshold"][0]),
                        int(c["few_threshold"][0]))
    channels, normalization = int(meta.get(b"paco_ray.channels", b"3")), meta.get(NORMALIZATION_KEY, b"").decode()
    if normalization and (normalization not in NORMALIZATION or len(NORMALIZATION[normalization].mean) != channels):
        raise DatasetError(f"data.path: {path / 'classes.parquet'}: normalization {normalization!r} is not one of "
                           f"the {channels}-channel statistics")
    for name, recorded, derived in zip(classes.names, c["shot_group"], classes.shot_groups()):
        if recorded != derived:  # the table was edited by hand: counts and groups disagree
            raise DatasetError(f"data.path: {path / 'classes.parquet'}: class {name!r} is recorded as "
                               f"{recorded!r} but its training count and thresholds make it {derived!r}")
    return classes, channels, normalization, int(meta.get(b"paco_ray.image_size", b"0"))


def _read_splits(path: Path, manifest) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """Per split, the sources and labels of the kept images in .beton row order; each split's .beton exists."""
    m = manifest.filter(manifest.column("skipped").to_numpy(zero_copy_only=False) == False).to_pydict()  # noqa: E712
    sources: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    for split, _, label, source in sorted(zip(m["split"], m["index"], m["label"], m["source"])):
        sources.setdefault(split, []).append(source)  # in .beton row order
        labels.setdefault(split, []).append(label)
    for split in sources:
        if not (path / f"{split}.beton").is_file():
            raise DatasetError(f"data.path: {path / f'{split}.beton'} missing")
    return sources, labels


def _check_sizes(path: Path, manifest, used: set[str]) -> None:
    """Each ``used`` file the manifest records has the recorded size (checksums are checked when staging)."""
    recorded_files = json.loads((manifest.schema.metadata or {}).get(FILES_KEY, b"{}"))
    for name, recorded in recorded_files.items():
        if name not in used:
            continue
        size = (path / name).stat().st_size
        if size != recorded["size"]:  # a truncated or replaced file
            raise DatasetError(f"data.path: {path / name} has {size} bytes, the manifest records {recorded['size']}")
