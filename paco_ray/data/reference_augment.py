"""The views image by image: the reference the batched path (augment.batched_photometric, what
the loaders run) is tested and measured against, and never on the training path. timm's
RandAugment (the published scale) and Cutout are written here as per-sample ops; both draw only
from torch's RNG, so a view is a function of the seed like every torchvision op."""
from __future__ import annotations

import random

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .augment import geometric, recipe


class TimmRandAugment(torch.nn.Module):
    """timm's ``rand_augment_transform('rand-n{n}-m{m}-mstd{std}')``: each of n ops drawn from
    batched_augment.TIMM_RAND_OPS is applied with p 0.5 at magnitude m + N(0, std) clipped to timm's 0-10 scale
    (m 10: shear 0.3, rotate 30 degrees, translate 45% of the side), filling with ``fill``.

    timm draws from Python's and NumPy's global RNGs; both are reseeded per image from torch's."""

    def __init__(self, num_ops: int, magnitude: int, magnitude_std: float, fill: tuple[int, ...]):
        super().__init__()
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_pct": 0.45, "img_mean": tuple(fill)}
        self.transform = rand_augment_transform(f"rand-n{num_ops}-m{magnitude}-mstd{magnitude_std}", hparams)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2**31, ()))
        random.seed(seed)
        np.random.seed(seed)
        return F.pil_to_tensor(self.transform(F.to_pil_image(image)))

    def extra_repr(self) -> str:
        return repr(self.transform)


class Cutout(torch.nn.Module):
    """Zero a ``length`` x ``length`` square centred on a uniformly drawn pixel, clipped at the
    borders (DeVries & Taylor 2017, as in the official CIFAR recipe: applied before normalising)."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.length // 2
        out = image.clone()
        out[..., max(0, y - half):min(h, y + half), max(0, x - half):min(w, x + half)] = 0
        return out

    def extra_repr(self) -> str:
        return f"length={self.length}"


def _jitter(brightness, contrast, saturation, hue, p):
    jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
    return jitter if p == 1.0 else v2.RandomApply([jitter], p=p)


PER_SAMPLE = {  # op -> its torchvision / timm transform, from (arguments..., fill)
    "jitter": lambda b, c, s, h, p, fill: _jitter(b, c, s, h, p),
    "grayscale": lambda p, fill: v2.RandomGrayscale(p=p),
    "blur": lambda kernel, sigma, p, fill: v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=p),
    "randaugment": lambda n, m, std, fill: TimmRandAugment(n, m, std, fill),
    "autoaugment": lambda policy, grey, fill: v2.AutoAugment(policy, fill=grey),
    "cutout": lambda length, fill: Cutout(length),
}


def photometric(view: str, data_cfg, fill: tuple[int, ...]) -> list:
    """A view's per-sample ops after crop and flip; ``fill`` is the mean colour (0-255 per channel)."""
    return [PER_SAMPLE[op](*args, fill) for op, args in recipe(view, data_cfg)]


def view_transform(view: str, data_cfg, image_size: int, fill: tuple[int, ...]) -> v2.Compose:
    """One whole view image by image (the reference for a view)."""
    return v2.Compose(geometric(view, data_cfg, image_size) + photometric(view, data_cfg, fill))
