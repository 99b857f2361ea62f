"""Per-sample augmentation ops on uint8 CHW tensors that torchvision does not have: timm's
RandAugment (the published PaCo scale) and Cutout. Both draw only from torch's RNG, so a view is
a function of the loader's seed like every torchvision op."""
from __future__ import annotations

import random

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

# timm's RandAugment op set, as in the official PaCo code ('PosterizeTpu' there is 'Posterize' here)
TIMM_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                 "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


class TimmRandAugment(torch.nn.Module):
    """timm's ``rand_augment_transform('rand-n{n}-m{m}-mstd{std}')``: each of n ops drawn from
    TIMM_RAND_OPS is applied with p 0.5 at magnitude m + N(0, std) clipped to timm's 0-10 scale
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
