"""Loaders behind one interface, over a prepared dataset directory:

- ``train(epoch)``: this rank's batches of (query view, key view, label, index), uint8 images on
  the device: each loader crops and flips, then the views' photometric ops run batched on the
  device (``batched_photometric``, the same implementation for both loaders);
- ``eval(split)``: this rank's shard (no padding) of (image, label);
- ``normalize(images)``: uint8 -> normalised float on the device (channels_last on CUDA).

``FFCVLoaders`` read the .beton files (decoding and geometric augmentation in FFCV, compiled);
``TorchLoaders`` are the torchvision/DataLoader fallback reading the manifest's sources.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from .augment import batched_photometric, crop, eval_transform, geometric, view_names
from .prepared import DatasetError, PreparedDataset
from .sources import read_source


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)


class _Loaders:
    """What both loaders share: the views' batched photometric ops and normalisation."""

    def __init__(self, data: PreparedDataset, data_cfg, *, rank: int, world_size: int, seed: int,
                 device: torch.device):
        self.data, self.cfg, self.rank, self.world_size, self.seed = data, data_cfg, rank, world_size, seed
        self.channels, self.device = data.channels, device
        self.fill = tuple(round(255 * m) for m in data.mean)  # the mean colour, for augmentations' fill
        self.views = view_names(data_cfg)
        self.augment = [batched_photometric(view, data_cfg, self.fill) for view in self.views]
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(data.mean, device=device).view(shape) * 255
        self.std = torch.tensor(data.std, device=device).view(shape) * 255

    def _on_device(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :self.channels].to(self.device, non_blocking=True)

    def _augmented(self, batches, epoch: int):
        """Each batch with both views moved to the device and through their photometric ops, drawn
        from a generator seeded by (seed, epoch, rank) alone (apart from the crops' RNG)."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.rank) + 2**31)
        for x_q, x_k, labels, index in batches:
            yield (self.augment[0](self._on_device(x_q), generator), self.augment[1](self._on_device(x_k), generator),
                   labels, index)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float on the device (channels_last on CUDA)."""
        images = self._on_device(images)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return (images.float() - self.mean) / self.std


class SourceImages(Dataset):
    """(image CHW uint8, label, index) read from manifest sources, with optional per-view transforms."""

    def __init__(self, data: PreparedDataset, split: str, transforms=(None,)):
        self.sources, self.labels, self.transforms = data.sources[split], data.labels[split], transforms

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = torch.from_numpy(read_source(self.sources[i])).permute(2, 0, 1)
        views = [t(image) if t is not None else image for t in self.transforms]
        return (*views, self.labels[i], i)


def _image_size(data_cfg, data: PreparedDataset) -> int:
    if data_cfg.image_size:
        return data_cfg.image_size
    if not data.image_size:
        raise DatasetError(f"data.image_size: images in {data.path} vary in size; set data.image_size "
                           "(and data.augment=imagenet)")
    return data.image_size


class TorchLoaders(_Loaders):
    """torchvision/DataLoader data path. Shuffling and augmentation of epoch e on rank r are a
    function of (seed, e, r) alone, so a resumed run sees exactly the batches of an uninterrupted one."""

    def __init__(self, data: PreparedDataset, data_cfg, *, rank: int, world_size: int, seed: int,
                 device: torch.device):
        super().__init__(data, data_cfg, rank=rank, world_size=world_size, seed=seed, device=device)
        size = _image_size(data_cfg, data)
        self.train_set = SourceImages(data, "train", tuple(v2.Compose(geometric(view, data_cfg, size))
                                                           for view in self.views))
        self.eval_transform = eval_transform(data_cfg, size)

    def train(self, epoch: int):
        sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        seed = epoch_seed(self.seed, epoch, self.rank)
        torch.manual_seed(seed)  # augmentation RNG when num_workers == 0
        loader = DataLoader(self.train_set, batch_size=self.cfg.batch_size // self.world_size, sampler=sampler,
                            drop_last=True, num_workers=self.cfg.num_workers,
                            generator=torch.Generator().manual_seed(seed), pin_memory=self.device.type == "cuda")
        return self._augmented(loader, epoch)

    def eval(self, split: str):
        dataset = SourceImages(self.data, split, (self.eval_transform,))
        shard = torch.utils.data.Subset(dataset, range(self.rank, len(dataset), self.world_size))
        loader = DataLoader(shard, batch_size=self.cfg.eval_batch_size, shuffle=False,
                            num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        return ((images, labels) for images, labels, _ in loader)


def sharded_order(rank: int, world_size: int):
    """An FFCV traversal order with the torch path's sharding: DistributedSampler(shuffle, seed,
    drop_last=True) for an explicit rank, so each sample is seen at most once per epoch across
    ranks (FFCV's own distributed order pads with duplicates) and no process group is needed."""
    import numpy as np
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedRandomOrder(TraversalOrder):
        def __init__(self):  # ffcv calls the instance with the loader
            pass

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            sampler = DistributedSampler(self.indices, num_replicas=world_size, rank=rank, shuffle=True,
                                         seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            return self.indices[np.array(list(sampler), dtype=np.int64)]

    return ShardedRandomOrder()


class FFCVLoaders(_Loaders):
    """FFCV data path: two views of each image through two pipeline entries decoding the same field."""

    def __init__(self, data: PreparedDataset, data_cfg, *, rank: int, world_size: int, seed: int,
                 device: torch.device):
        super().__init__(data, data_cfg, rank=rank, world_size=world_size, seed=seed, device=device)
        self.threads = torch.get_num_threads()  # import ffcv and every Loader reset it
        self.size = _image_size(data_cfg, data)
        self.workers = data_cfg.num_workers or max(1, self.threads)  # default: the CPUs this worker was given
        self._eval: dict = {}
        self._train = self._loader("train", train=True)

    def _view(self, view: str | None) -> list:
        """FFCV decoding, crop and flip of a training view (``None``: the evaluation decoding)."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor, ToTorchImage

        kind, arg = crop(view, self.cfg) if view is not None else (None, None)
        if view is None:
            imagenet = self.cfg.augment == "imagenet"
            ops = [CenterCropRGBImageDecoder((self.size, self.size), 0.875) if imagenet else SimpleRGBImageDecoder()]
        elif kind == "resized":
            ops = [RandomResizedCropRGBImageDecoder((self.size, self.size), scale=arg), RandomHorizontalFlip()]
        else:
            ops = [SimpleRGBImageDecoder(), RandomHorizontalFlip()] + ([RandomTranslate(padding=arg)] if arg else [])
        ops += [ToTensor(), ToTorchImage(channels_last=False)]
        if self.device.type == "cuda":
            ops.append(ToDevice(self.device, non_blocking=True))
        return ops

    def _loader(self, split: str, train: bool):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        query = self._view(self.views[0]) if train else self._view(None)
        # on CUDA labels and indices travel with FFCV's pinned, non-blocking copy too
        to_device = [ToDevice(self.device, non_blocking=True)] if train and self.device.type == "cuda" else []
        pipelines = {"image": query, "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device],
                     "index": [IntDecoder(), ToTensor(), Squeeze(1), *to_device]}
        if train:
            key_view = self._view(self.views[1])
            pipelines["image_key"] = PipelineSpec("image", decoder=key_view[0], transforms=key_view[1:])
            options = dict(batch_size=self.cfg.batch_size // self.world_size, seed=self.seed, drop_last=True,
                           order=sharded_order(self.rank, self.world_size))
        else:
            options = dict(batch_size=self.cfg.eval_batch_size, order=OrderOption.SEQUENTIAL, drop_last=False,
                           indices=list(range(self.rank, self.data.size(split), self.world_size)))
        path = self.data.beton(split)
        try:
            loader = Loader(str(path), num_workers=self.workers, pipelines=pipelines, **options)
        except Exception as err:
            raise DatasetError(f"{path}: corrupt or truncated .beton ({type(err).__name__}: {err})".splitlines()[0]) from None
        finally:
            torch.set_num_threads(self.threads)
        if loader.reader.num_samples != self.data.size(split):
            raise DatasetError(f"{path}: holds {loader.reader.num_samples} samples, manifest lists {self.data.size(split)}")
        return loader

    def train(self, epoch: int):
        self._train.next_epoch = epoch  # FFCV orders epoch e by seed + e
        return self._augmented(((x_q, x_k, labels, index) for x_q, labels, index, x_k in self._train), epoch)

    def eval(self, split: str):
        if split not in self._eval:
            self._eval[split] = self._loader(split, train=False)
        return ((images, labels) for images, labels, _ in self._eval[split])


LOADERS = {"ffcv": FFCVLoaders, "torch": TorchLoaders}  # data.loader


def build_loaders(data: PreparedDataset, data_cfg, *, rank: int, world_size: int, seed: int, device: torch.device):
    """The loader named by ``data.loader`` (a key of LOADERS)."""
    return LOADERS[data_cfg.loader](data, data_cfg, rank=rank, world_size=world_size, seed=seed, device=device)
