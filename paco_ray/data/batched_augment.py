"""timm's RandAugment on a whole uint8 batch (B, C, H, W) at once, on the batch's own device.

Each image draws its own ops, magnitudes and signs, as the per-sample ``TimmRandAugment`` does:
for each of n layers an op is drawn uniformly (with replacement) from TIMM_RAND_OPS and applied
with p 0.5 at magnitude m + N(0, std) clipped to 0-10. Images that drew the same op are
transformed together. The draws are made on the CPU (torch's RNG), so selecting an op's images
needs no device sync. Geometric ops follow PIL's affine convention (pixel centres, fill colour
outside the source) with bilinear sampling; timm draws bilinear or bicubic per op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .augment_ops import TIMM_RAND_OPS


def _blend(image: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * image + (1 - factor) * degenerate, clamped and truncated to uint8 (per-sample factor)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * image.float() + (1 - f) * degenerate).clamp_(0, 255).to(torch.uint8)


def _gray(image: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(image).float() if image.shape[1] == 3 else image.float()


def _smoothed(image: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded), borders unchanged:
    nine shifted sums in int16 (at most 13 x 255)."""
    x = image.to(torch.int16)
    h, w = x.shape[-2:]
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy:dy + h - 2, dx:dx + w - 2]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor")  # round half up
    return out.float()


def affine(image: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.transform(AFFINE, (a, b, c, d, e, f))`` per image: the output pixel centred at
    (x, y) reads the input at (a x + b y + c, d x + e y + f); ``matrix`` is (B, 2, 3)."""
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device) + 0.5, torch.arange(w, device=image.device) + 0.5,
                            indexing="ij")
    centres = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    source = centres @ matrix.transpose(1, 2)  # (B, HW, 2) in input pixel units
    inside = ((source[..., 0] >= 0) & (source[..., 0] < w) & (source[..., 1] >= 0) & (source[..., 1] < h))
    grid = torch.stack([2 * source[..., 0] / w - 1, 2 * source[..., 1] / h - 1], -1).view(b, h, w, 2)
    sampled = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = torch.where(inside.view(b, 1, h, w), sampled, fill.view(1, -1, 1, 1).float())
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _matrices(name: str, value: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) PIL affine data of a geometric op at per-sample ``value``."""
    one, zero = torch.ones_like(value), torch.zeros_like(value)
    if name == "ShearX":
        rows = [one, value, zero, zero, one, zero]
    elif name == "ShearY":
        rows = [one, zero, zero, value, one, zero]
    elif name == "TranslateXRel":
        rows = [one, zero, value * w, zero, one, zero]
    elif name == "TranslateYRel":
        rows = [one, zero, zero, zero, one, value * h]
    else:  # Rotate by value degrees counter-clockwise about the centre, as PIL's Image.rotate
        angle = -value * math.pi / 180
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = w / 2, h / 2
        rows = [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]
    return torch.stack(rows, -1).view(-1, 2, 3)


def apply_op(name: str, image: torch.Tensor, level: torch.Tensor, sign: torch.Tensor,
             fill: torch.Tensor) -> torch.Tensor:
    """One timm op on a batch, each image at its own level (0-10) and sign (+-1), timm's scale."""
    level, sign = level.to(image.device), sign.to(image.device)
    if name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate"):
        scale = {"ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45, "Rotate": 30.0}[name]
        return affine(image, _matrices(name, level / 10 * scale * sign, *image.shape[-2:]), fill)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = level / 10 * 1.8 + 0.1
        if name == "Brightness":
            return _blend(image, torch.zeros((), device=image.device), factor)
        if name == "Contrast":
            return _blend(image, _gray(image).mean((-3, -2, -1), keepdim=True), factor)
        if name == "Color":
            return _blend(image, _gray(image), factor) if image.shape[1] == 3 else image
        return _blend(image, _smoothed(image), factor)
    view = (-1, 1, 1, 1)
    if name == "Posterize":  # keep int(4 level / 10) most significant bits
        bits = (level / 10 * 4).long()
        return image & ((255 << (8 - bits)) & 255).to(torch.uint8).view(view)
    if name == "Solarize":  # invert pixels >= threshold (256: none)
        threshold = (level / 10 * 256).long().clamp(max=256).view(view)
        invert = (image >= threshold.clamp(max=255).to(torch.uint8)) & (threshold < 256)
        return torch.where(invert, 255 - image, image)
    if name == "SolarizeAdd":  # add to pixels below 128
        add = (level / 10 * 110).long().clamp(max=128).to(torch.uint8).view(view)
        return torch.where(image < 128, image + add, image)  # below 128 + at most 128: no overflow
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert}[name](image)


class BatchedRandAugment(torch.nn.Module):
    """``TimmRandAugment`` for a batch: the same op set, probabilities and magnitude scale."""

    def __init__(self, num_ops: int, magnitude: float, magnitude_std: float, fill: tuple[int, ...]):
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.fill = torch.tensor(fill, dtype=torch.float32)

    def draw(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(op index, applied, level, sign) per layer and image, on the CPU: each (num_ops, batch)."""
        shape = (self.num_ops, batch)
        ops = torch.randint(len(TIMM_RAND_OPS), shape)
        applied = torch.rand(shape) < 0.5
        level = (self.magnitude + self.magnitude_std * torch.randn(shape)).clamp(0, 10)
        sign = torch.where(torch.rand(shape) > 0.5, -1.0, 1.0)
        return ops, applied, level, sign

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ops, applied, level, sign = self.draw(images.shape[0])
        fill = self.fill.to(images.device)[: images.shape[1]]
        out = images
        for layer in range(self.num_ops):
            out = out.clone()
            for k, name in enumerate(TIMM_RAND_OPS):
                rows = (applied[layer] & (ops[layer] == k)).nonzero().flatten()  # CPU: no device sync
                if len(rows):
                    index = rows.to(images.device, non_blocking=True)
                    out[index] = apply_op(name, out[index], level[layer, rows], sign[layer, rows], fill)
        return out
