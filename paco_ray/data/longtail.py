"""Long-tailed profiles (CIFAR-LT convention) and many/medium/few shot groups."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ImageNet-LT / CIFAR-LT convention: many > 100, few < 20 training images, at n_max = 500 (CIFAR-LT).
MANY_SHOT = 100
FEW_SHOT = 20
REFERENCE_MAX_PER_CLASS = 500


def exponential_profile(max_per_class: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_c = n_max * IF^(-c / (C - 1)), c = 0..C-1, rounded down."""
    if num_classes == 1:
        return [max_per_class]
    return [int(max_per_class * imbalance_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def scaled_shot_thresholds(max_per_class: int) -> tuple[int, int]:
    """(many, few) thresholds scaled from the CIFAR-LT convention to a larger n_max.

    Datasets whose head class has more than 500 images (Fashion-MNIST-LT: 5000) would otherwise
    have no few-shot class at all; the thresholds scale with n_max / 500 and are recorded.
    """
    scale = max(1.0, max_per_class / REFERENCE_MAX_PER_CLASS)
    return int(round(MANY_SHOT * scale)), int(round(FEW_SHOT * scale))


@dataclass(frozen=True)
class ClassInfo:
    """Per-class facts of a long-tailed training split, recorded with the dataset and checkpoints."""

    names: tuple[str, ...]
    train_counts: tuple[int, ...]
    many_threshold: int = MANY_SHOT
    few_threshold: int = FEW_SHOT

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def shot_groups(self) -> list[str]:
        """'many' (> many_threshold), 'few' (< few_threshold) or 'medium', per class."""
        return [shot_group(n, self.many_threshold, self.few_threshold) for n in self.train_counts]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "train_counts": list(self.train_counts),
                "many_threshold": self.many_threshold, "few_threshold": self.few_threshold}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassInfo":
        return cls(tuple(d["names"]), tuple(int(n) for n in d["train_counts"]),
                   int(d["many_threshold"]), int(d["few_threshold"]))


def shot_group(count: int, many_threshold: int, few_threshold: int) -> str:
    if count > many_threshold:
        return "many"
    if count < few_threshold:
        return "few"
    return "medium"


def longtail_split(labels: np.ndarray, counts: list[int], val_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a long-tailed train split and a balanced validation split.

    Train takes the first ``counts[c]`` images of class c in file order; validation takes the
    last ``val_per_class`` images of each class, which the train split never uses.
    """
    train, val = [], []
    for c, n in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if n + val_per_class > len(members):
            raise ValueError(f"class {c} has {len(members)} images, fewer than {n} train + {val_per_class} val")
        train.append(members[:n])
        val.append(members[len(members) - val_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
