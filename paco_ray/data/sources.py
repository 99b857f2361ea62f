"""Read one image named by a manifest ``source``: ``FILE#ROW`` for array files (IDX, CIFAR
pickle batches) or an image file path (decoded with PIL). Used by the torch loader."""
from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from .idx import read_idx


@lru_cache(maxsize=16)
def _array_file(path: str) -> np.ndarray:
    """All images of an array file as N x H x W x C uint8."""
    name = Path(path).name
    if "idx3-ubyte" in name:
        return read_idx(path)[..., None].copy()
    return cifar_images(load_cifar_batch(path))


def load_cifar_batch(path: str | Path) -> dict:
    """A CIFAR-10/100 python batch (the user's own file: the one place paco_ray unpickles data)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def cifar_images(batch: dict) -> np.ndarray:
    return np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_source(source: str) -> np.ndarray:
    """H x W x C uint8 image for a manifest source."""
    if "#" in source:
        path, row = source.rsplit("#", 1)
        return _array_file(path)[int(row)]
    from PIL import Image

    with Image.open(source) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)
