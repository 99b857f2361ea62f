"""PaCoModel: query encoder, projector, classifier (the class centers), key encoder and queue."""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone, load_pretrained
from .losses import LOSSES


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every DDP rank in rank order (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class KeyQueue(nn.Module):
    """Ring buffer of the last ``size`` keys and their labels; empty slots have label -1.

    ``enqueue`` gathers keys from all DDP ranks first, so every rank holds the same queue.
    Any batch size works: writes wrap around the end of the buffer.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Write the keys of every rank after the last ones; where ``ok`` (a 0-dim 0/1 device
        tensor) is 0 nothing changes, decided on the device (a skipped step leaves no trace)."""
        keys, labels = all_gather_cat(keys.detach()), all_gather_cat(labels)
        if keys.shape[0] > self.size:
            keys, labels = keys[-self.size:], labels[-self.size:]
        written = torch.ones((), dtype=torch.bool, device=keys.device) if ok is None else ok.bool()
        finite = torch.isfinite(keys).all(dim=1)  # a non-finite key is stored as an empty slot
        slots = (self.ptr + torch.arange(keys.shape[0], device=self.ptr.device)) % self.size
        new_keys = torch.where(finite.unsqueeze(1), keys, 0.0).to(self.keys.dtype)
        self.keys[slots] = torch.where(written, new_keys, self.keys[slots])
        self.labels[slots] = torch.where(written, torch.where(finite, labels, -1), self.labels[slots])
        self.ptr.copy_((self.ptr + written.long() * keys.shape[0]) % self.size)

    def filled(self) -> torch.Tensor:
        """Number of occupied slots (a 0-dim tensor, no device sync)."""
        return (self.labels >= 0).sum()


class PaCoOutput(NamedTuple):
    """What one forward pass gives the loss; the contrastive fields are None without a key view."""
    logits: torch.Tensor                        # (B, C) center logits of the query view, before the log prior
    q: torch.Tensor | None = None               # (B, D) normalised query projections
    k: torch.Tensor | None = None               # (B, D) normalised key projections (PaCo: no grad; GPaCo: grad)
    queue_keys: torch.Tensor | None = None      # (K, D) the queue: this batch is enqueued after the step
    queue_labels: torch.Tensor | None = None    # (K,) -1 for empty slots
    logits_k: torch.Tensor | None = None        # (B, C) GPaCo: center logits of the key view


# The projection heads: ``mlp`` Linear-ReLU-Linear; ``mlp_bn`` Linear-BN-ReLU-Linear (the official
# PaCo/MoCo head); ``gpaco_mlp`` Linear-ReLU-Linear-ReLU-Linear (the official GPaCo head, ``mlp`` in its builder).
PROJECTORS = ("mlp", "mlp_bn", "gpaco_mlp")
# What trains: ``all``, or ``last_block``: the official Places-LT fine-tuning (paco_fp16_places.py),
# every convolution frozen but those of the query encoder's last residual block.
TRAINABLE = ("all", "last_block")


def projection_head(in_dim: int, out_dim: int, kind: str = "mlp") -> nn.Sequential:
    """The projector named ``kind`` (PROJECTORS), ``in_dim`` -> ``out_dim``."""
    if kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")
    if kind == "gpaco_mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, in_dim),
                             nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    norm = [nn.BatchNorm1d(in_dim)] if kind == "mlp_bn" else []
    return nn.Sequential(nn.Linear(in_dim, in_dim), *norm, nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


@torch.no_grad()
def encode_shuffled(encode, x: torch.Tensor) -> torch.Tensor:
    """``encode(x)`` computed on a batch shuffled across DDP ranks and put back in order (MoCo's
    shuffle BN): BatchNorm in ``encode`` then sees a random mix of every rank's samples, so keys
    carry no statistics of their own rank's batch. Every rank must pass the same batch size;
    without DDP (or with one rank) it is ``encode(x)``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return encode(x)
    world, rank = dist.get_world_size(), dist.get_rank()
    everything = all_gather_cat(x)
    order = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(order, src=0)  # one permutation for all ranks
    keys = all_gather_cat(encode(everything[order.view(world, -1)[rank]]))
    return keys[torch.argsort(order).view(world, -1)[rank]]


class PaCoModel(nn.Module):
    """Encoder + classifier, plus for contrastive losses a projector, a key encoder and a queue.

    ``key_source``: ``"momentum"`` (PaCo: keys from an EMA copy of encoder and projector, the
    module ``key_encoder``), ``"query"`` (GPaCo: the key view through the query encoder and the
    classifier, with gradient) or ``None`` (CE / Balanced Softmax: no projector, no queue).

    The forward pass changes no state but BatchNorm's statistics; ``end_step`` (after the
    optimizer step) makes the momentum update and enqueues the batch's keys, only for a step
    that was not skipped.
    """

    def __init__(self, backbone: str, num_classes: int, in_channels: int = 3, proj_dim: int = 128,
                 queue_size: int = 8192, momentum: float = 0.999, key_source: str | None = "momentum",
                 projector: str = "mlp", shuffle_keys: bool = False):
        super().__init__()
        if key_source not in ("momentum", "query", None):
            raise ValueError(f"key_source must be 'momentum', 'query' or None, got {key_source!r}")
        self.encoder, feature_dim = build_backbone(backbone, in_channels)
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.key_source = key_source
        self.momentum = momentum
        self.shuffle_keys = shuffle_keys  # shuffle the key encoder's batch across DDP ranks
        if key_source is not None:
            self.projector = projection_head(feature_dim, proj_dim, projector)
            self.queue = KeyQueue(queue_size, proj_dim)
        if key_source == "momentum":
            self.key_encoder = copy.deepcopy(self.encoder)
            self.key_projector = copy.deepcopy(self.projector)
            for p in self._key_params():
                p.requires_grad_(False)

    def compile_encoders(self) -> None:
        """``torch.compile`` the query encoder and the key encoder in place (parameter names,
        checkpoints and the momentum update are unchanged); compiled on their first call."""
        self.encoder.compile()
        if self.key_source == "momentum":
            self.key_encoder.compile()

    @classmethod
    def from_config(cls, cfg, num_classes: int, in_channels: int) -> "PaCoModel":
        """The model a training config describes (its loss decides the key source)."""
        loss = LOSSES[cfg.loss]
        projector = cfg.model.projector or loss.head  # "": the head of the loss's published code
        model = cls(cfg.model.backbone, num_classes, in_channels, cfg.model.proj_dim, cfg.paco.queue_size,
                    cfg.paco.momentum, loss.keys, projector, cfg.paco.shuffle_keys)
        if cfg.model.pretrained:
            model.load_backbone(cfg.model.pretrained)
        if cfg.model.trainable == "last_block":
            model.freeze_all_but_last_block()
        return model

    def last_block(self) -> nn.Module:
        """The query encoder's last residual block (torchvision: layer4[-1])."""
        stages = [m for name, m in self.encoder.named_children() if name.startswith("layer")] or \
            [m for m in self.encoder.children() if isinstance(m, nn.Sequential)]
        if not stages:
            raise ValueError("model.trainable: last_block needs a ResNet backbone")
        return stages[-1][-1]

    def freeze_all_but_last_block(self) -> None:
        """Freeze every convolution weight but those of the query encoder's last residual block,
        as the official Places-LT fine-tuning does; BatchNorm, projector and classifier train."""
        keep = {id(m) for m in self.last_block().modules()}
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in keep:
                module.weight.requires_grad_(False)

    def load_backbone(self, source: str) -> tuple[int, int]:
        """Pretrained weights into the query encoder and, as the official code does, the key encoder."""
        loaded = load_pretrained(self.encoder, source)
        if self.key_source == "momentum":
            self.key_encoder.load_state_dict(self.encoder.state_dict())
        return loaded

    def _key_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_encoder(x))

    def _query_params(self) -> list[torch.Tensor]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def _key_params(self) -> list[torch.Tensor]:
        return [*self.key_encoder.parameters(), *self.key_projector.parameters()]

    @torch.no_grad()
    def momentum_update(self, ok: torch.Tensor | None = None) -> None:
        """key <- m * key + (1 - m) * query over encoder and projector parameters; nothing where
        ``ok`` (a 0-dim 0/1 device tensor) is 0. Made after each optimizer step, it is MoCo's
        update at the start of the next step (same parameters, same arithmetic)."""
        weight = torch.full((), 1.0 - self.momentum, device=self.classifier.weight.device)
        if ok is not None:
            weight = weight * ok
        torch._foreach_lerp_(self._key_params(), self._query_params(), weight)

    @torch.no_grad()
    def end_step(self, out: PaCoOutput, labels: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """After the optimizer step of a contrastive batch: the momentum update (PaCo) and the
        enqueue of its keys, both only where ``ok`` is 1: a skipped step leaves no trace."""
        if self.key_source is None or out.k is None:
            return
        if self.key_source == "momentum":
            self.momentum_update(ok)
        self.queue.enqueue(out.k, labels, ok)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> PaCoOutput:
        """Center logits of ``x_q``; with a key view (contrastive training) also the query and key
        projections, the queue as it is before this batch, and for GPaCo the key view's center
        logits. ``labels`` are the batch's (the keys are enqueued with them by ``end_step``)."""
        features = self.encoder(x_q)
        logits = self.classifier(features)
        if x_k is None or self.key_source is None:
            return PaCoOutput(logits)
        q = F.normalize(self.projector(features), dim=1)
        queue_keys, queue_labels = self.queue.keys, self.queue.labels
        if self.key_source == "query":  # GPaCo: both views through the query encoder, with gradient
            key_features = self.encoder(x_k)
            k = F.normalize(self.projector(key_features), dim=1)
            return PaCoOutput(logits, q, k, queue_keys, queue_labels, self.classifier(key_features))
        with torch.no_grad():
            k = encode_shuffled(self._key_branch, x_k) if self.shuffle_keys else self._key_branch(x_k)
            k = F.normalize(k, dim=1)
        return PaCoOutput(logits, q, k, queue_keys, queue_labels)
