"""Fashion-MNIST (IDX files, gzip or not) -> Fashion-MNIST-LT prepared dataset.

python -m pipelines.fashion_mnist --src /usr/share/datasets/fashion-mnist --out data/fmnist_lt_if100

Train keeps the first n_c = n_max * IF^(-c/(C-1)) images of class c in file order; the validation
split takes the last --val-per-class training images of each class; the official 10k test set
stays balanced.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paco_ray.data.idx import read_idx
from paco_ray.data.longtail import ClassInfo, exponential_profile, longtail_split, scaled_shot_thresholds
from paco_ray.errors import MissingInputError

from .writer import PipelineError, Sample, check_at_least, run_cli, write_prepared

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLI_NAMES = {"root": "--src", "sizes": "--max-per-class/--val-per-class",  # what errors call the inputs
             "imbalance_factor": "--imbalance-factor", "max_per_class": "--max-per-class",
             "val_per_class": "--val-per-class"}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    sources: list[str]    # where each image came from ("file#row")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: ClassInfo

    def split(self, name: str) -> ImageSet:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r} (train, val or test)")
        return getattr(self, name)


def _idx_file(root: Path, stem: str, names: dict[str, str]) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise MissingInputError(f"{names['root']}: {root / stem}[.gz] not found (Debian package dataset-fashion-mnist "
                            f"installs it under {DEFAULT_SRC})")


def fashion_mnist_lt(root: str | Path, imbalance_factor: float = 100.0, max_per_class: int = 5000,
                     val_per_class: int = 500, names: dict[str, str] = CLI_NAMES) -> DatasetSplits:
    """Fashion-MNIST-LT: exponential long-tailed train split of the official training set, a
    balanced validation split from its unused images, and the official balanced 10k test set.
    Errors name the inputs as ``names`` says (the CLI's flags by default)."""
    for key, value in (("imbalance_factor", imbalance_factor), ("max_per_class", max_per_class),
                       ("val_per_class", val_per_class)):
        check_at_least(names[key], value, 1)
    root = Path(root)
    train_file = _idx_file(root, "train-images-idx3-ubyte", names)
    test_file = _idx_file(root, "t10k-images-idx3-ubyte", names)
    try:
        train_images, test_images = read_idx(train_file), read_idx(test_file)
        train_labels = read_idx(_idx_file(root, "train-labels-idx1-ubyte", names)).astype(np.int64)
        test_labels = read_idx(_idx_file(root, "t10k-labels-idx1-ubyte", names)).astype(np.int64)
    except ValueError as err:  # read_idx names the file
        raise PipelineError(str(err)) from None
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise PipelineError(f"{names['root']}: {name} labels outside 0..{len(CLASSES) - 1}")
    counts = exponential_profile(max_per_class, len(CLASSES), imbalance_factor)
    try:
        train_idx, val_idx = longtail_split(train_labels, counts, val_per_class)
    except ValueError as err:
        raise PipelineError(f"{names['sizes']}: {err}") from None
    many, few = scaled_shot_thresholds(max_per_class)

    def image_set(file: Path, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> ImageSet:
        return ImageSet(torch.from_numpy(images[rows]).unsqueeze(1), torch.from_numpy(labels[rows]),
                        [f"{file}#{r}" for r in rows])

    return DatasetSplits(
        train=image_set(train_file, train_images, train_labels, train_idx),
        val=image_set(train_file, train_images, train_labels, val_idx),
        test=image_set(test_file, test_images, test_labels, np.arange(len(test_labels))),
        classes=ClassInfo(CLASSES, tuple(counts), many, few),
    )


def samples(images: ImageSet) -> list[Sample]:
    array = images.images.permute(0, 2, 3, 1).numpy()  # N, H, W, 1
    return [Sample(src, int(y), lambda i=i: array[i]) for i, (src, y) in enumerate(zip(images.sources, images.labels))]


def prepare(src: str | Path, out: str | Path, *, imbalance_factor: float = 100.0, max_per_class: int = 5000,
            val_per_class: int = 500, force: bool = False, names: dict[str, str] = CLI_NAMES) -> Path:
    """Read the IDX files and write Fashion-MNIST-LT as a prepared dataset."""
    data = fashion_mnist_lt(src, imbalance_factor, max_per_class, val_per_class, names)
    fingerprint = {"pipeline": "fashion_mnist", "source": str(Path(src).resolve()),
                   "imbalance_factor": imbalance_factor, "max_per_class": max_per_class,
                   "val_per_class": val_per_class}
    return write_prepared(out, fingerprint=fingerprint, class_names=data.classes.names,
                          splits={s: samples(data.split(s)) for s in ("train", "val", "test")},
                          thresholds=(data.classes.many_threshold, data.classes.few_threshold),
                          write_mode="raw", force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.fashion_mnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=DEFAULT_SRC, help="directory with the four IDX files")
    parser.add_argument("--out", required=True, help="prepared dataset directory, or an object-storage URI (s3://bucket/prefix, gs://...)")
    parser.add_argument("--imbalance-factor", type=float, default=100.0)
    parser.add_argument("--max-per-class", type=int, default=5000)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is prepared")
    args = parser.parse_args(argv)
    return run_cli(lambda a: prepare(a.src, a.out, imbalance_factor=a.imbalance_factor,
                                     max_per_class=a.max_per_class, val_per_class=a.val_per_class,
                                     force=a.force), args)


if __name__ == "__main__":
    sys.exit(main())
