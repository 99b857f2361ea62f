"""In-memory image splits (train / val / test) of a long-tailed dataset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .idx import read_idx
from .longtail import ClassInfo, exponential_profile, longtail_split, scaled_shot_thresholds

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


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


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"data.root: {root / stem}[.gz] not found (Debian package dataset-fashion-mnist "
                            f"installs it under /usr/share/datasets/fashion-mnist)")


def fashion_mnist_lt(root: str | Path, imbalance_factor: float = 100.0, max_per_class: int = 5000,
                     val_per_class: int = 500) -> DatasetSplits:
    """Fashion-MNIST-LT: exponential long-tailed train split of the official training set, a
    balanced validation split from its unused images, and the official balanced 10k test set."""
    root = Path(root)
    train_file, test_file = _idx_file(root, "train-images-idx3-ubyte"), _idx_file(root, "t10k-images-idx3-ubyte")
    train_images = read_idx(train_file)
    train_labels = read_idx(_idx_file(root, "train-labels-idx1-ubyte")).astype(np.int64)
    test_images = read_idx(test_file)
    test_labels = read_idx(_idx_file(root, "t10k-labels-idx1-ubyte")).astype(np.int64)
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"data.root: {name} labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    counts = exponential_profile(max_per_class, len(FASHION_MNIST_CLASSES), imbalance_factor)
    try:
        train_idx, val_idx = longtail_split(train_labels, counts, val_per_class)
    except ValueError as err:
        raise ValueError(f"data.max_per_class/data.val_per_class: {err}") from None
    many, few = scaled_shot_thresholds(max_per_class)

    def image_set(file: Path, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> ImageSet:
        return ImageSet(torch.from_numpy(images[rows]).unsqueeze(1), torch.from_numpy(labels[rows]),
                        [f"{file}#{r}" for r in rows])

    return DatasetSplits(
        train=image_set(train_file, train_images, train_labels, train_idx),
        val=image_set(train_file, train_images, train_labels, val_idx),
        test=image_set(test_file, test_images, test_labels, np.arange(len(test_labels))),
        classes=ClassInfo(FASHION_MNIST_CLASSES, tuple(counts), many, few),
    )
