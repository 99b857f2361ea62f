"""Per-view augmentations on uint8 image tensors (torchvision.transforms.v2)."""
from __future__ import annotations

from torchvision.transforms import v2


def view_transform(data_cfg, image_size: int, query: bool) -> v2.Compose:
    """Random crop (with padding) + horizontal flip; RandAugment on the query view if configured."""
    ops = [v2.RandomCrop(image_size, padding=data_cfg.crop_padding) if data_cfg.crop_padding else v2.Identity(),
           v2.RandomHorizontalFlip()]
    if query and data_cfg.randaugment_ops > 0:
        ops.append(v2.RandAugment(num_ops=data_cfg.randaugment_ops, magnitude=data_cfg.randaugment_magnitude))
    return v2.Compose(ops)
