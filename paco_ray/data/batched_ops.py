"""Image ops on a uint8 batch (B, C, H, W), each image with its own parameters (tensors with a
leading B dimension, already on the batch's device). Two conventions, each matching its
per-sample reference within one grey level:

- PIL's, for timm's RandAugment (``pil_affine``, ``pil_blend``, ``pil_sharpness``, ...);
- torchvision's, for ColorJitter, RandomGrayscale, GaussianBlur and AutoAugment
  (``tv_affine``, ``tv_brightness``, ``tv_hue``, ...).

No op reads a value back to the host or builds a tensor from Python values on the device (a
blocking copy), so none waits for the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _per_image(value: torch.Tensor) -> torch.Tensor:
    return value.view(-1, 1, 1, 1)


def gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float luminance, torchvision's weights; the image itself for one channel."""
    if images.shape[1] == 1:
        return images.float()
    r, g, b = images.float().unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(images: torch.Tensor, degenerate: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """factor * image + (1 - factor) * degenerate per image, clamped and truncated to uint8 (PIL's
    ImageEnhance and torchvision's _blend alike)."""
    f = _per_image(factor)
    out = images.float().mul_(f)
    if not isinstance(degenerate, float) or degenerate != 0.0:
        out.add_((1 - f) * degenerate)
    return out.clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- geometry


def _sample(images: torch.Tensor, grid: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """grid_sample with torchvision's fill (B, C): a ones channel marks where the source was inside."""
    b, c, h, w = images.shape
    ones = torch.ones((b, 1, h, w), dtype=torch.float32, device=images.device)
    sampled = F.grid_sample(torch.cat([images.float(), ones], 1), grid, mode=mode, padding_mode="zeros",
                            align_corners=False)
    out, mask = sampled[:, :c], sampled[:, c:]
    fill = fill.reshape(b, -1, 1, 1).float()
    if mode == "nearest":
        out = torch.where(mask < 0.5, fill.expand_as(out), out)
    else:
        out = out.sub_(fill).mul_(mask).add_(fill)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def tv_affine(images: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """torchvision's affine/rotate per image: ``theta`` (B, 2, 3) is the inverse matrix
    torchvision builds (``_get_inverse_affine_matrix``), in pixels about the image centre; ``fill``
    (B, C) the colour outside the source."""
    b, _, h, w = images.shape
    x = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=images.device)
    y = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=images.device)
    base = torch.stack([x.expand(h, w), y.unsqueeze(1).expand(h, w), torch.ones(h, w, device=images.device)], -1)
    rescaled = theta.transpose(1, 2).clone()  # torchvision's _affine_grid: divided by the half sizes
    rescaled[..., 0] /= 0.5 * w
    rescaled[..., 1] /= 0.5 * h
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled)
    return _sample(images, grid.view(b, h, w, 2), fill, mode)


def pil_affine(images: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` per image, bilinear: the output pixel
    centred at (x, y) reads the input at (a x + b y + c, d x + e y + f); ``matrix`` is (B, 2, 3),
    ``fill`` (B, C)."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device) + 0.5,
                            torch.arange(w, device=images.device) + 0.5, indexing="ij")
    centres = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3).expand(b, -1, -1)
    source = centres.bmm(matrix.transpose(1, 2))  # (B, HW, 2) in input pixel units
    sx, sy = source.unbind(-1)
    grid = torch.stack([sx / (w / 2) - 1, sy / (h / 2) - 1], -1)
    # PIL fills every output pixel whose source centre falls outside (grid_sample would blend the border)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sampled = F.grid_sample(images.float(), grid.view(b, h, w, 2), mode="bilinear", padding_mode="border",
                            align_corners=False)
    out = torch.where(inside.view(b, 1, h, w), sampled, fill.reshape(b, -1, 1, 1).float())
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- PIL (timm) colour ops


def pil_smoothed(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded half up), borders
    unchanged: nine shifted sums in int16 (at most 13 x 255)."""
    x = images.to(torch.int16)
    h, w = x.shape[-2:]
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy:dy + h - 2, dx:dx + w - 2]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor")
    return out.float()


def pil_color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, gray(images).round_(), factor) if images.shape[1] == 3 else images


def pil_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, gray(images).round_().mean((-3, -2, -1), keepdim=True).add_(0.5).floor_(), factor)


def pil_sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, pil_smoothed(images), factor)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` (0-8, per image) most significant bits."""
    mask = ((255 << (8 - bits.long())) & 255).to(torch.uint8)
    return images & _per_image(mask)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels >= ``threshold`` (a float per image; above 255 inverts none)."""
    return torch.where(images.float() >= _per_image(threshold), 255 - images, images)


def solarize_add(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Add ``add`` (0-128 per image) to the pixels below 128 (so never past 255)."""
    return torch.where(images < 128, images + _per_image(add.to(torch.uint8)), images)


# ----------------------------------------------------------------------------- torchvision colour ops


def tv_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, 0.0, factor)


def tv_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    degenerate = gray(images).floor_() if images.shape[1] == 3 else images.float()
    return blend(images, degenerate.mean((-3, -2, -1), keepdim=True), factor)


def tv_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, gray(images).floor_(), factor) if images.shape[1] == 3 else images


def tv_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (in turns, -0.5-0.5) per image: torchvision's HSV round trip."""
    if images.shape[1] == 1:
        return images
    h, s, v = _rgb_to_hsv(TF.to_dtype(images, torch.float32, scale=True)).unbind(1)
    h = (h + shift.view(-1, 1, 1)).remainder_(1.0)
    return TF.to_dtype(_hsv_to_rgb(torch.stack((h, s, v), 1)), torch.uint8, scale=True)


def tv_sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: the same smoothing kernel, rounded half to even."""
    c = images.shape[1]
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5
    smoothed = F.conv2d(images.float(), (kernel / 13).expand(c, 1, 3, 3), groups=c).round_()
    degenerate = images.float()
    degenerate[..., 1:-1, 1:-1] = smoothed
    return blend(images, degenerate, factor)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale, keeping the number of channels."""
    return TF.rgb_to_grayscale(images, num_output_channels=images.shape[1])


def gaussian_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, rounded), separably, with a 1-D ``kernel``
    (B, K) per image."""
    b, c, h, w = images.shape
    k = kernel.shape[1]
    pad = k // 2
    weight = kernel.float().repeat_interleave(c, 0)  # one filter per image and channel
    x = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect").view(1, b * c, h + 2 * pad, w + 2 * pad)
    x = F.conv2d(x, weight.view(b * c, 1, 1, k), groups=b * c)
    x = F.conv2d(x, weight.view(b * c, 1, k, 1), groups=b * c)
    return x.view(b, c, h, w).round_().clamp_(0, 255).to(torch.uint8)


def cutout(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, length: int) -> torch.Tensor:
    """Zero a ``length`` square per image spanning rows top..top+length and columns
    left..left+length, clipped at the borders."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    top, left = top.view(-1, 1, 1), left.view(-1, 1, 1)
    square = (rows >= top) & (rows < top + length) & (cols >= left) & (cols < left + length)
    return images.masked_fill(square.unsqueeze(1), 0)
