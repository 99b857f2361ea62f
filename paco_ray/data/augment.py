"""Per-view augmentations on uint8 image tensors (torchvision.transforms.v2).

Families: ``small`` (Fashion-MNIST, CIFAR: pad-and-crop + flip, optional RandAugment on the
query view) and ``imagenet`` (random resized crop + flip; colour jitter, grayscale and blur on the
key view; RandAugment on the query view). ``geometric`` transforms are the ones the FFCV path
runs as FFCV operations; ``photometric`` ones run per sample after decoding in both paths.
"""
from __future__ import annotations

from torchvision.transforms import v2


def geometric(data_cfg, image_size: int) -> list:
    if data_cfg.augment == "imagenet":
        return [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    crop = v2.RandomCrop(image_size, padding=data_cfg.crop_padding) if data_cfg.crop_padding else v2.Identity()
    return [crop, v2.RandomHorizontalFlip()]


def photometric(data_cfg, query: bool) -> list:
    ops = []
    if query and data_cfg.randaugment_ops > 0:
        ops.append(v2.RandAugment(num_ops=data_cfg.randaugment_ops, magnitude=data_cfg.randaugment_magnitude))
    if not query and data_cfg.augment == "imagenet":
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5)]
    return ops


def view_transform(data_cfg, image_size: int, query: bool) -> v2.Compose:
    """The full transform of one view for the torch loader."""
    return v2.Compose(geometric(data_cfg, image_size) + photometric(data_cfg, query))


def eval_transform(data_cfg, image_size: int) -> v2.Compose:
    if data_cfg.augment == "imagenet":
        return v2.Compose([v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([v2.Identity()])
