"""Loaders behind one interface: training batches of (query view, key view, label, index) and
evaluation batches of (image, label), sharded across DDP ranks. Images stay uint8 until
``normalize`` moves them to the device."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .augment import view_transform
from .datasets import DatasetSplits, ImageSet


class TwoViewDataset(Dataset):
    """Each item: two independently augmented views of one image, its label and its index."""

    def __init__(self, data: ImageSet, query_transform, key_transform):
        self.data, self.query_transform, self.key_transform = data, query_transform, key_transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image = self.data.images[i]
        return self.query_transform(image), self.key_transform(image), self.data.labels[i], i


class TorchLoaders:
    """torchvision/DataLoader data path.

    Shuffling and augmentation of epoch e on rank r are a function of (seed, e, r) alone, so a
    run resumed at an epoch boundary sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, splits: DatasetSplits, data_cfg, *, rank: int, world_size: int, seed: int,
                 device: torch.device):
        self.splits, self.cfg = splits, data_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = device
        size = splits.train.images.shape[-1]
        self.train_set = TwoViewDataset(splits.train, view_transform(data_cfg, size, query=True),
                                        view_transform(data_cfg, size, query=False))
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(splits.mean, device=device).view(shape) * 255
        self.std = torch.tensor(splits.std, device=device).view(shape) * 255

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch * 1009 + self.rank) % (2**31)

    def train(self, epoch: int) -> DataLoader:
        """This rank's shard of the training split for ``epoch`` (equal batches on every rank)."""
        sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        torch.manual_seed(self.epoch_seed(epoch))  # augmentation RNG when num_workers == 0
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size // self.world_size, sampler=sampler,
                          drop_last=True, num_workers=self.cfg.num_workers,
                          generator=torch.Generator().manual_seed(self.epoch_seed(epoch)),
                          pin_memory=self.device.type == "cuda")

    def eval(self, split: str) -> DataLoader:
        """This rank's shard (every world_size-th image, no padding) of ``split``: (image, label)."""
        data = self.splits.split(split)
        shard = torch.arange(self.rank, len(data), self.world_size)
        dataset = torch.utils.data.TensorDataset(data.images[shard], data.labels[shard])
        return DataLoader(dataset, batch_size=self.cfg.eval_batch_size, shuffle=False,
                          pin_memory=self.device.type == "cuda")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float on the device (channels_last on CUDA)."""
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return (images.float() - self.mean) / self.std


def build_loaders(splits: DatasetSplits, data_cfg, *, rank: int, world_size: int, seed: int,
                  device: torch.device) -> TorchLoaders:
    """The loader named by ``data.loader``."""
    if data_cfg.loader == "torch":
        return TorchLoaders(splits, data_cfg, rank=rank, world_size=world_size, seed=seed, device=device)
    raise ValueError(f"data.loader: unknown loader {data_cfg.loader!r}")
