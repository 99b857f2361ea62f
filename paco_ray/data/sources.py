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


# What a CIFAR python batch may reference: numpy arrays and dtypes, and bytes as pickled by Python 3
# at protocol 2. Anything else (os.system, builtins.eval, ...) is refused before it is called.
CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles the data of a CIFAR batch and nothing that could run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def load_cifar_batch(path: str | Path) -> dict:
    """A CIFAR-10/100 python batch, through :class:`CifarUnpickler` (the one place paco_ray
    unpickles; it only rebuilds arrays, bytes, lists and dicts)."""
    with open(path, "rb") as f:
        batch = CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise pickle.UnpicklingError(f"expected a dict, got {type(batch).__name__}")
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
