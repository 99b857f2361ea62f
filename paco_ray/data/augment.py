"""The two views' recipes, on uint8 CHW tensors (torchvision.transforms.v2, timm's RandAugment).

A view is a crop (the family's, or a random resized crop of a given scale) + horizontal flip,
then per-sample photometric ops. A view is named by ``data.query_view`` / ``data.key_view`` (``VIEWS``):

- ``crop_flip``: the family's crop (``small``: pad-crop ``data.crop_padding``; ``imagenet``:
  random resized crop 0.08-1) + flip;
- ``randaugment``: ``crop_flip`` + timm's RandAugment n ``randaugment_ops`` m ``randaugment_magnitude``
  mstd ``randaugment_std``, filled with the dataset's mean colour;
- ``randcls``: ``crop_flip`` + colour jitter 0.4/0.4/0.4 + that RandAugment (official ImageNet-LT/iNat query);
- ``randclsstack``: ``randcls`` with grayscale p 0.2 and blur p 0.5 before RandAugment (official ResNeXt query);
- ``autoaugment_cutout``: ``crop_flip`` + AutoAugment (CIFAR-10 policy, grey fill) + Cutout
  ``data.cutout`` (official CIFAR query);
- ``sim``: random resized crop 0.08-1 + flip + colour jitter 0.4/0.4/0.4 + grayscale p 0.2 +
  Gaussian blur (sigma 0.1-2) p 0.5 (official ImageNet-LT/iNat key, Places-LT both views);
- ``sim_cifar``: random resized crop 0.2-1 + flip + colour jitter 0.4/0.4/0.4/0.1 p 0.8 +
  grayscale p 0.2 + blur p 0.5 (official CIFAR key).

Each view's photometric ops are written once (``recipe``); ``batched_photometric`` builds them
for a whole batch on its device (``batched_augment``), which both loaders run after their own crop
and flip, so the two loaders share one implementation. ``reference_augment`` builds the same
recipe image by image, the reference the batched ops are tested against.
"""
from __future__ import annotations

from torchvision.transforms import v2

from .batched_augment import (AutoAugmentStage, BatchedAugment, BlurStage, ColorJitterStage, CutoutStage,
                              GrayscaleStage, RandAugmentStage)

FAMILIES = ("small", "imagenet")  # data.augment: pad-crop for small images, resized crops for photos
VIEWS = ("crop_flip", "randaugment", "randcls", "randclsstack", "autoaugment_cutout", "sim", "sim_cifar")
RANDAUGMENT_VIEWS = ("randaugment", "randcls", "randclsstack")  # need data.randaugment_ops > 0
RESIZED_CROP_SCALE = {"sim": (0.08, 1.0), "sim_cifar": (0.2, 1.0)}
BLUR_KERNEL = 13  # covers +-3 sigma of the largest sigma (2 px), as PIL's GaussianBlur(radius=sigma)


def view_names(data_cfg) -> tuple[str, str]:
    """(query view, key view); an empty name means the 0.1 behaviour: RandAugment on the query
    view when ``randaugment_ops`` > 0, and ``sim`` keys for the imagenet family."""
    query = data_cfg.query_view or ("randaugment" if data_cfg.randaugment_ops > 0 else "crop_flip")
    key = data_cfg.key_view or ("sim" if data_cfg.augment == "imagenet" else "crop_flip")
    return query, key


def crop(view: str, data_cfg) -> tuple[str, object]:
    """("resized", scale) for a random resized crop, or ("pad", padding) for a pad-and-crop."""
    if view in RESIZED_CROP_SCALE:
        return "resized", RESIZED_CROP_SCALE[view]
    if data_cfg.augment == "imagenet":
        return "resized", (0.08, 1.0)
    return "pad", data_cfg.crop_padding


def geometric(view: str, data_cfg, image_size: int) -> list:
    kind, arg = crop(view, data_cfg)
    if kind == "resized":
        first = v2.RandomResizedCrop(image_size, scale=arg, antialias=True)
    else:
        first = v2.RandomCrop(image_size, padding=arg) if arg else v2.Identity()
    return [first, v2.RandomHorizontalFlip()]


def recipe(view: str, data_cfg) -> list[tuple[str, tuple]]:
    """A view's photometric ops after crop and flip, as (op, arguments), written once for
    ``batched_photometric`` and the reference (``reference_augment.photometric``)."""
    jitter = ("jitter", (0.4, 0.4, 0.4, 0.0, 1.0))         # brightness, contrast, saturation, hue, p
    gray = ("grayscale", (0.2,))                          # p
    blur = ("blur", (BLUR_KERNEL, (0.1, 2.0), 0.5))       # kernel, sigma range, p
    rand = ("randaugment", (data_cfg.randaugment_ops, data_cfg.randaugment_magnitude, data_cfg.randaugment_std))
    return {  # one entry per VIEWS name
        "crop_flip": [],
        "randaugment": [rand],
        "randcls": [jitter, rand],
        "randclsstack": [jitter, gray, blur, rand],
        "autoaugment_cutout": [("autoaugment", (v2.AutoAugmentPolicy.CIFAR10, 128)), ("cutout", (data_cfg.cutout,))],
        "sim": [jitter, gray, blur],
        "sim_cifar": [("jitter", (0.4, 0.4, 0.4, 0.1, 0.8)), gray, blur],
    }[view]


BATCHED = {  # op -> its batched stage (batched_augment), from (arguments..., fill)
    "jitter": lambda b, c, s, h, p, fill: ColorJitterStage(b, c, s, h, p=p),
    "grayscale": lambda p, fill: GrayscaleStage(p),
    "blur": lambda kernel, sigma, p, fill: BlurStage(kernel, sigma, p=p),
    "randaugment": lambda n, m, std, fill: RandAugmentStage(n, m, std, fill),
    "autoaugment": lambda policy, grey, fill: AutoAugmentStage(policy, grey),
    "cutout": lambda length, fill: CutoutStage(length),
}


def batched_photometric(view: str, data_cfg, fill: tuple[int, ...]) -> BatchedAugment:
    """A view's photometric ops for a whole uint8 batch, each image drawing its own ops (the loaders' path)."""
    return BatchedAugment([BATCHED[op](*args, fill) for op, args in recipe(view, data_cfg)])


def eval_transform(data_cfg, image_size: int) -> v2.Compose:
    if data_cfg.augment == "imagenet":
        return v2.Compose([v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([v2.Identity()])
