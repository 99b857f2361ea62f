"""The views' photometric ops on a whole uint8 batch (B, C, H, W) at once, on the batch's device.

Each image draws its own ops and magnitudes, as the per-sample reference ops in ``augment.py``
do (timm's RandAugment, torchvision's ColorJitter, RandomGrayscale, GaussianBlur, AutoAugment,
and Cutout); the images that drew the same op are transformed together by one batched op
(``batched_ops``). Every draw is made on the CPU from a ``torch.Generator`` and each batch's
parameters travel to the device in one pinned, non-blocking copy per dtype, so augmenting a
batch never waits for the device.

A stage's ``plan(batch, height, width, channels, generator)`` returns steps, applied in order;
a step is a list of ``Group(fn, rows, params)`` over disjoint rows: ``fn(images[rows], **params)``,
every parameter holding one entry per row. On the CPU a group runs in chunks of a few images at
large sizes, so that its intermediate float tensors stay in cache.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from . import batched_ops as ops


# timm's RandAugment op set, as in the official PaCo code ('PosterizeTpu' there is 'Posterize' here)
TIMM_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                 "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


class Group(NamedTuple):
    fn: Callable[..., torch.Tensor]
    rows: torch.Tensor                 # int64 indices into the batch (CPU until sent)
    params: dict[str, torch.Tensor]    # one entry per row


Step = list[Group]


def _groups(choice: torch.Tensor, active: torch.Tensor, n: int) -> list[tuple[int, torch.Tensor]]:
    """(k, rows) for each option k in 0..n-1 drawn by some active image."""
    out = []
    for k in range(n):
        rows = (active & (choice == k)).nonzero().flatten()
        if len(rows):
            out.append((k, rows))
    return out


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)


def _tv_theta(center: list[float], angle: float, translate: list[float], shear: list[float]) -> list[float]:
    return _get_inverse_affine_matrix(center, angle, translate, 1.0, shear)


# ----------------------------------------------------------------------------- timm's RandAugment


PIL_AFFINE_SCALE = {"ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45, "Rotate": 30.0}


def pil_affine_matrix(name: str, value: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) PIL affine data of a timm geometric op at a per-image ``value`` (signed)."""
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


def timm_op(name: str, level: torch.Tensor, sign: torch.Tensor, h: int, w: int,
            fill: torch.Tensor) -> tuple[Callable, dict]:
    """(fn, params) of one timm RandAugment op at per-image ``level`` (0-10) and ``sign`` (+-1)."""
    if name in PIL_AFFINE_SCALE:
        matrix = pil_affine_matrix(name, level / 10 * PIL_AFFINE_SCALE[name] * sign, h, w)
        return ops.pil_affine, {"matrix": matrix, "fill": fill}
    factor = level / 10 * 1.8 + 0.1
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        fn = {"Color": ops.pil_color, "Contrast": ops.pil_contrast, "Brightness": ops.tv_brightness,
              "Sharpness": ops.pil_sharpness}[name]
        return fn, {"factor": factor}
    if name == "Posterize":
        return ops.posterize, {"bits": (level / 10 * 4).long()}
    if name == "Solarize":
        return ops.solarize, {"threshold": (level / 10 * 256).floor()}
    if name == "SolarizeAdd":
        return ops.solarize_add, {"add": (level / 10 * 110).long().clamp(max=128)}
    return {"AutoContrast": v2.functional.autocontrast, "Equalize": v2.functional.equalize,
            "Invert": v2.functional.invert}[name], {}


class RandAugmentStage:
    """timm's ``rand-n{n}-m{m}-mstd{std}`` (``TimmRandAugment``): for each of n layers an op is
    drawn uniformly from TIMM_RAND_OPS (with replacement) and applied with p 0.5 at magnitude
    m + N(0, std) clipped to 0-10, with a random sign. Geometric ops sample bilinearly (timm
    draws bilinear or bicubic) and fill with ``fill``."""

    def __init__(self, num_ops: int, magnitude: float, magnitude_std: float, fill: tuple[int, ...]):
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.fill = torch.tensor(fill, dtype=torch.float32)

    def draw(self, batch: int, generator: torch.Generator | None = None):
        """(op index, applied, level, sign), each (num_ops, batch)."""
        shape = (self.num_ops, batch)
        op = torch.randint(len(TIMM_RAND_OPS), shape, generator=generator)
        applied = torch.rand(shape, generator=generator) < 0.5
        level = (self.magnitude + self.magnitude_std * torch.randn(shape, generator=generator)).clamp(0, 10)
        sign = torch.where(torch.rand(shape, generator=generator) > 0.5, -1.0, 1.0)
        return op, applied, level, sign

    def plan(self, batch, h, w, channels, generator=None) -> list[Step]:
        op, applied, level, sign = self.draw(batch, generator)
        fill = self.fill[:channels]
        steps = []
        for layer in range(self.num_ops):
            step = []
            for k, rows in _groups(op[layer], applied[layer], len(TIMM_RAND_OPS)):
                fn, params = timm_op(TIMM_RAND_OPS[k], level[layer, rows], sign[layer, rows], h, w,
                                     fill.expand(len(rows), -1))
                step.append(Group(fn, rows, params))
            steps.append(step)
        return steps


# ----------------------------------------------------------------------------- torchvision's ops


class ColorJitterStage:
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)``: per image a random order of
    the four adjustments and a factor for each, drawn uniformly in 1 +- b (c, s) and +- h."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float = 0.0, p: float = 1.0):
        self.ranges = [(1 - brightness, 1 + brightness) if brightness else None,
                       (1 - contrast, 1 + contrast) if contrast else None,
                       (1 - saturation, 1 + saturation) if saturation else None, (-hue, hue) if hue else None]
        self.p = p

    def plan(self, batch, h, w, channels, generator=None) -> list[Step]:
        applied = (torch.rand(batch, generator=generator) < self.p if self.p < 1
                   else torch.ones(batch, dtype=torch.bool))
        order = torch.rand(batch, 4, generator=generator).argsort(1)  # a random permutation per image
        factors = [None if r is None else _uniform(*r, batch, generator) for r in self.ranges]
        fns = (ops.tv_brightness, ops.tv_contrast, ops.tv_saturation, ops.tv_hue)
        steps = []
        for position in range(4):
            steps.append([Group(fns[k], rows, {"shift" if k == 3 else "factor": factors[k][rows]})
                          for k, rows in _groups(order[:, position], applied, 4) if factors[k] is not None])
        return steps


class GrayscaleStage:
    """torchvision's ``RandomGrayscale(p)``."""

    def __init__(self, p: float):
        self.p = p

    def plan(self, batch, h, w, channels, generator=None) -> list[Step]:
        rows = (torch.rand(batch, generator=generator) < self.p).nonzero().flatten()
        return [[Group(ops.to_grayscale, rows, {})] if len(rows) and channels == 3 else []]


class BlurStage:
    """torchvision's ``RandomApply([GaussianBlur(kernel, sigma=(lo, hi))], p)``: sigma uniform per image."""

    def __init__(self, kernel: int, sigma: tuple[float, float], p: float):
        self.kernel, self.sigma, self.p = kernel, sigma, p

    def plan(self, batch, h, w, channels, generator=None) -> list[Step]:
        applied = torch.rand(batch, generator=generator) < self.p
        sigma = _uniform(*self.sigma, batch, generator)
        rows = applied.nonzero().flatten()
        if not len(rows):
            return [[]]
        lim = (self.kernel - 1) / (2.0 * math.sqrt(2.0))  # torchvision's _get_gaussian_kernel1d
        x = torch.linspace(-lim, lim, steps=self.kernel)
        kernel = torch.softmax(-(x / sigma[rows].unsqueeze(1)).pow(2), dim=1)
        return [[Group(ops.gaussian_blur, rows, {"kernel": kernel})]]


# torchvision AutoAugment op -> (batched fn, the parameter it takes from the signed magnitude)
AUTOAUGMENT_COLOUR = {
    "Brightness": (ops.tv_brightness, lambda m: {"factor": 1.0 + m}),
    "Color": (ops.tv_saturation, lambda m: {"factor": 1.0 + m}),
    "Contrast": (ops.tv_contrast, lambda m: {"factor": 1.0 + m}),
    "Sharpness": (ops.tv_sharpness, lambda m: {"factor": 1.0 + m}),
    "Posterize": (ops.posterize, lambda m: {"bits": m.long()}),
    "Solarize": (ops.solarize, lambda m: {"threshold": 255.0 * m}),
    "AutoContrast": (v2.functional.autocontrast, lambda m: {}),
    "Equalize": (v2.functional.equalize, lambda m: {}),
    "Invert": (v2.functional.invert, lambda m: {}),
}


def autoaugment_theta(name: str, magnitude: float, h: int, w: int) -> list[float]:
    """torchvision AutoAugment's inverse affine matrix for a geometric op (nearest, as it uses)."""
    if name == "ShearX":
        return _tv_theta([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], [math.degrees(math.atan(magnitude)), 0.0])
    if name == "ShearY":
        return _tv_theta([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], [0.0, math.degrees(math.atan(magnitude))])
    if name == "TranslateX":
        return _tv_theta([0.0, 0.0], 0.0, [float(int(magnitude)), 0.0], [0.0, 0.0])
    if name == "TranslateY":
        return _tv_theta([0.0, 0.0], 0.0, [0.0, float(int(magnitude))], [0.0, 0.0])
    return _tv_theta([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], [0.0, 0.0])  # Rotate


def autoaugment_op(name: str, magnitudes: list[float], h: int, w: int, fill: torch.Tensor) -> tuple[Callable, dict]:
    """(fn, params) of one torchvision AutoAugment op at a signed magnitude per image; ``fill`` (C,)."""
    if name in AUTOAUGMENT_COLOUR:
        fn, param = AUTOAUGMENT_COLOUR[name]
        return fn, param(torch.tensor(magnitudes, dtype=torch.float32))
    theta = torch.tensor([autoaugment_theta(name, m, h, w) for m in magnitudes], dtype=torch.float32)
    return ops.tv_affine, {"theta": theta.view(-1, 2, 3), "fill": fill.expand(len(magnitudes), -1)}


class AutoAugmentStage:
    """torchvision's ``AutoAugment(policy, fill)``: per image one of the policy's sub-policies,
    each of its two ops applied with its probability at its magnitude bin, signed ops negated
    with p 0.5. The policy table and magnitude bins are torchvision's own."""

    def __init__(self, policy: v2.AutoAugmentPolicy, fill: int):
        self.reference = v2.AutoAugment(policy, fill=fill)
        self.policies, self.space = self.reference._policies, self.reference._AUGMENTATION_SPACE
        self.fill = torch.tensor([float(fill)])
        self.tables: dict[tuple[int, int], list] = {}  # image size -> _ops(h, w)

    def _ops(self, h: int, w: int) -> list[list[tuple[str, float, float, bool]]]:
        """Per slot and sub-policy: (op, probability, magnitude at (h, w), signed); once per size."""
        if (h, w) in self.tables:
            return self.tables[h, w]
        table = []
        for slot in range(2):
            row = []
            for policy in self.policies:
                name, probability, bin_ = policy[slot]
                magnitudes, signed = self.space[name]
                values = magnitudes(10, h, w)
                row.append((name, probability, 0.0 if values is None else float(values[bin_]),
                            signed and values is not None))
            table.append(row)
        self.tables[h, w] = table
        return table

    def plan(self, batch, h, w, channels, generator=None) -> list[Step]:
        chosen = torch.randint(len(self.policies), (batch,), generator=generator).tolist()
        fill = self.fill.expand(channels)
        table = self._ops(h, w)
        steps = []
        for slot in range(2):
            applied = torch.rand(batch, generator=generator).tolist()
            negate = (torch.rand(batch, generator=generator) <= 0.5).tolist()
            by_op: dict[str, tuple[list[int], list[float]]] = {}
            for i, p in enumerate(chosen):
                name, probability, m, signed = table[slot][p]
                if not applied[i] <= probability:
                    continue
                rows, ms = by_op.setdefault(name, ([], []))
                rows.append(i)
                ms.append(-m if signed and negate[i] else m)
            step = []
            for name, (rows, ms) in by_op.items():
                fn, params = autoaugment_op(name, ms, h, w, fill)
                step.append(Group(fn, torch.tensor(rows, dtype=torch.long), params))
            steps.append(step)
        return steps


class CutoutStage:
    """``Cutout(length)``: a square zeroed about a uniformly drawn pixel of each image, clipped."""

    def __init__(self, length: int):
        self.length = length

    def plan(self, batch, h, w, channels, generator=None) -> list[Step]:
        y = torch.randint(h, (batch,), generator=generator)
        x = torch.randint(w, (batch,), generator=generator)
        half = self.length // 2
        return [[Group(lambda images, top, left: ops.cutout(images, top, left, 2 * half), torch.arange(batch),
                       {"top": y - half, "left": x - half})]]


# ----------------------------------------------------------------------------- a view's stages


def send(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors to ``device`` in one pinned, non-blocking copy per dtype (no host wait)."""
    if device.type == "cpu":
        return tensors
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for dtype in {t.dtype for t in tensors}:
        which = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in which]).pin_memory().to(device, non_blocking=True)
        for i, part in zip(which, flat.split([tensors[i].numel() for i in which])):
            out[i] = part.view(tensors[i].shape)
    return out


def _words(images: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 batch seen as (B, words) of the widest integer dividing an image:
    copying rows in 8-byte words is several times faster than byte by byte on the CPU."""
    flat = images.view(images.shape[0], -1)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if flat.shape[1] % size == 0:
            return flat.view(dtype)
    return flat


CPU_CHUNK_ELEMENTS = 2**19  # pixel values per chunk of a group on the CPU (about 3 images at 224 px)


class BatchedAugment:
    """Stages applied in order to uint8 batches on any device; ``stages`` empty: the identity."""

    def __init__(self, stages: list):
        self.stages = stages

    def __bool__(self) -> bool:
        return bool(self.stages)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.stages:
            return images
        b, c, h, w = images.shape
        steps = [step for stage in self.stages for step in stage.plan(b, h, w, c, generator)]
        groups = [g for step in steps for g in step]
        cpu = [g.rows for g in groups] + [v for g in groups for v in g.params.values()]
        moved = iter(send(cpu, images.device))
        rows = [next(moved) for _ in groups]
        params = [{k: next(moved) for k in g.params} for g in groups]
        chunk = max(1, CPU_CHUNK_ELEMENTS // (c * h * w)) if images.device.type == "cpu" else b
        out = images.clone(memory_format=torch.contiguous_format)
        for g, r, p in zip(groups, rows, params):
            if len(r) == b and chunk >= b:
                out = g.fn(out, **p).contiguous()
                continue
            for start in range(0, len(r), chunk):
                part = r[start:start + chunk]
                done = g.fn(out.index_select(0, part), **{k: v[start:start + chunk] for k, v in p.items()})
                _words(out).index_copy_(0, part, _words(done.contiguous()))
        return out

    def __repr__(self) -> str:
        return f"BatchedAugment({', '.join(type(s).__name__ for s in self.stages)})"
