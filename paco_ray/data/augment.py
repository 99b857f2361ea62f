"""Per-view augmentations on uint8 image tensors (torchvision.transforms.v2).

Families: ``small`` (Fashion-MNIST, CIFAR: pad-and-crop + flip, optional RandAugment on the
query view) and ``imagenet`` (random resized crop + flip; colour jitter, grayscale and blur on the
key view; RandAugment on the query view). The FFCV path runs the geometric and key-view colour
ops as FFCV operations; RandAugment (not in FFCV) runs per sample after decoding in both paths.
"""
from __future__ import annotations

from torchvision.transforms import v2


def geometric(data_cfg, image_size: int) -> list:
    if data_cfg.augment == "imagenet":
        return [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    crop = v2.RandomCrop(image_size, padding=data_cfg.crop_padding) if data_cfg.crop_padding else v2.Identity()
    return [crop, v2.RandomHorizontalFlip()]


def blur_kernel_size(image_size: int) -> int:
    """An odd kernel of about 10% of the image side (SimCLR), at least 3."""
    return max(3, int(0.1 * image_size)) | 1


def key_color(data_cfg, image_size: int) -> list:
    """The key view's photometric ops of the imagenet family, as torchvision v2 transforms."""
    if data_cfg.augment != "imagenet":
        return []
    return [v2.RandomApply([v2.ColorJitter(brightness=0.4)], p=0.8),
            v2.RandomApply([v2.ColorJitter(contrast=0.4)], p=0.8),
            v2.RandomApply([v2.ColorJitter(saturation=0.4)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5)]


def ffcv_key_color(data_cfg, image_size: int) -> list:
    """The same ops as ``key_color``, as compiled FFCV operations on decoded HxWx3 batches."""
    if data_cfg.augment != "imagenet":
        return []
    from ffcv.transforms import RandomBrightness, RandomContrast, RandomSaturation

    from .ffcv_ops import RandomGaussianBlur, RandomGrayscale

    return [RandomBrightness(0.4, p=0.8), RandomContrast(0.4, p=0.8), RandomSaturation(0.4, p=0.8),
            RandomGrayscale(p=0.2), RandomGaussianBlur(blur_kernel_size(image_size), (0.1, 2.0), p=0.5)]


def query_randaugment(data_cfg) -> list:
    if data_cfg.randaugment_ops <= 0:
        return []
    return [v2.RandAugment(num_ops=data_cfg.randaugment_ops, magnitude=data_cfg.randaugment_magnitude)]


def view_transform(data_cfg, image_size: int, query: bool) -> v2.Compose:
    """The full transform of one view for the torch loader."""
    photometric = query_randaugment(data_cfg) if query else key_color(data_cfg, image_size)
    return v2.Compose(geometric(data_cfg, image_size) + photometric)


def eval_transform(data_cfg, image_size: int) -> v2.Compose:
    if data_cfg.augment == "imagenet":
        return v2.Compose([v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([v2.Identity()])
