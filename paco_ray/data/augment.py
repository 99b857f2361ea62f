"""The two views' recipes, on uint8 CHW tensors (torchvision.transforms.v2, timm's RandAugment).

A view is a crop (the family's, or a random resized crop of a given scale) + horizontal flip,
then per-sample photometric ops. A view is named by ``data.query_view`` / ``data.key_view`` (``paco_ray.config.VIEWS``):

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

``photometric`` gives a view's ops image by image (the reference); ``batched_photometric`` the
same ops for a whole batch on its device (``batched_augment``), which both loaders run after
their own crop and flip, so the two loaders share one implementation.
"""
from __future__ import annotations

from torchvision.transforms import v2

from .augment_ops import Cutout, TimmRandAugment
from .batched_augment import (AutoAugmentStage, BatchedAugment, BlurStage, ColorJitterStage, CutoutStage,
                              GrayscaleStage, RandAugmentStage)

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


def randaugment(data_cfg, fill: tuple[int, ...]) -> TimmRandAugment:
    return TimmRandAugment(data_cfg.randaugment_ops, data_cfg.randaugment_magnitude, data_cfg.randaugment_std, fill)


def photometric(view: str, data_cfg, fill: tuple[int, ...]) -> list:
    """The per-sample ops after crop and flip; ``fill`` is the mean colour (0-255 per channel)."""
    blur = v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=(0.1, 2.0))], p=0.5)
    recipes = {
        "crop_flip": lambda: [],
        "randaugment": lambda: [randaugment(data_cfg, fill)],
        "randcls": lambda: [v2.ColorJitter(0.4, 0.4, 0.4), randaugment(data_cfg, fill)],
        "randclsstack": lambda: [v2.ColorJitter(0.4, 0.4, 0.4), v2.RandomGrayscale(p=0.2), blur,
                                 randaugment(data_cfg, fill)],
        "autoaugment_cutout": lambda: [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128), Cutout(data_cfg.cutout)],
        "sim": lambda: [v2.ColorJitter(0.4, 0.4, 0.4), v2.RandomGrayscale(p=0.2), blur],
        "sim_cifar": lambda: [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                              v2.RandomGrayscale(p=0.2), blur],
    }
    return recipes[view]()


def batched_photometric(view: str, data_cfg, fill: tuple[int, ...]) -> BatchedAugment:
    """``photometric`` for a whole uint8 batch, each image drawing its own ops (the loaders' path)."""
    def blur():
        return BlurStage(BLUR_KERNEL, (0.1, 2.0), p=0.5)

    def rand():
        return RandAugmentStage(data_cfg.randaugment_ops, data_cfg.randaugment_magnitude, data_cfg.randaugment_std, fill)

    recipes = {
        "crop_flip": lambda: [],
        "randaugment": lambda: [rand()],
        "randcls": lambda: [ColorJitterStage(0.4, 0.4, 0.4), rand()],
        "randclsstack": lambda: [ColorJitterStage(0.4, 0.4, 0.4), GrayscaleStage(0.2), blur(), rand()],
        "autoaugment_cutout": lambda: [AutoAugmentStage(v2.AutoAugmentPolicy.CIFAR10, 128), CutoutStage(data_cfg.cutout)],
        "sim": lambda: [ColorJitterStage(0.4, 0.4, 0.4), GrayscaleStage(0.2), blur()],
        "sim_cifar": lambda: [ColorJitterStage(0.4, 0.4, 0.4, 0.1, p=0.8), GrayscaleStage(0.2), blur()],
    }
    return BatchedAugment(recipes[view]())


def view_transform(view: str, data_cfg, image_size: int, fill: tuple[int, ...]) -> v2.Compose:
    """One whole view image by image (the reference for a view; the loaders batch its photometric ops)."""
    return v2.Compose(geometric(view, data_cfg, image_size) + photometric(view, data_cfg, fill))


def eval_transform(data_cfg, image_size: int) -> v2.Compose:
    if data_cfg.augment == "imagenet":
        return v2.Compose([v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([v2.Identity()])
