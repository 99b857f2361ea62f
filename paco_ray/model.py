"""PaCoModel: query encoder, projector, classifier (the class centers), key encoder and queue."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone, load_pretrained

if TYPE_CHECKING:
    from .config import TrainConfig

# How a loss gets its keys: PaCo from a momentum encoder, GPaCo from the query encoder; None: no keys.
KEY_SOURCES = {"paco": "momentum", "gpaco": "query", "balanced_softmax": None, "ce": None}


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
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        keys, labels = all_gather_cat(keys.detach()), all_gather_cat(labels)
        if keys.shape[0] > self.size:
            keys, labels = keys[-self.size:], labels[-self.size:]
        finite = torch.isfinite(keys).all(dim=1)  # a non-finite key is stored as an empty slot
        slots = (self.ptr + torch.arange(keys.shape[0], device=self.ptr.device)) % self.size
        self.keys[slots] = torch.where(finite.unsqueeze(1), keys, 0.0).to(self.keys.dtype)
        self.labels[slots] = torch.where(finite, labels, -1)
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)

    def filled(self) -> torch.Tensor:
        """Number of occupied slots (a 0-dim tensor, no device sync)."""
        return (self.labels >= 0).sum()


class PaCoOutput(NamedTuple):
    """What one forward pass gives the loss; the contrastive fields are None without a key view."""
    logits: torch.Tensor                        # (B, C) center logits, before the log prior
    q: torch.Tensor | None = None               # (B, D) normalised query projections
    k: torch.Tensor | None = None               # (B, D) normalised key projections (no grad)
    queue_keys: torch.Tensor | None = None      # (K, D) queue before this batch was enqueued
    queue_labels: torch.Tensor | None = None    # (K,) -1 for empty slots


PROJECTORS = ("mlp", "mlp_bn")


def projection_head(in_dim: int, out_dim: int, kind: str = "mlp") -> nn.Sequential:
    """``mlp``: Linear-ReLU-Linear; ``mlp_bn``: Linear-BN-ReLU-Linear (the official PaCo/MoCo head)."""
    if kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")
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
    module ``key_encoder``), ``"query"`` (GPaCo: keys from the query encoder without gradient) or
    ``None`` (CE / Balanced Softmax: no projector, no queue).
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
    def from_config(cls, cfg: "TrainConfig", num_classes: int, in_channels: int) -> "PaCoModel":
        """The model a training config describes (its loss decides the key source)."""
        model = cls(cfg.model.backbone, num_classes, in_channels, cfg.model.proj_dim, cfg.paco.queue_size,
                    cfg.paco.momentum, KEY_SOURCES[cfg.loss], cfg.model.projector, cfg.paco.shuffle_keys)
        if cfg.model.pretrained:
            model.load_backbone(cfg.model.pretrained)
        return model

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
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query, over encoder and projector parameters."""
        key_params = self._key_params()
        torch._foreach_mul_(key_params, self.momentum)
        torch._foreach_add_(key_params, self._query_params(), alpha=1.0 - self.momentum)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> PaCoOutput:
        """Center logits of ``x_q``; with a key view and labels (contrastive training) also the
        query and key projections and the queue. That call updates the key encoder and enqueues
        this batch's keys."""
        features = self.encoder(x_q)
        logits = self.classifier(features)
        if x_k is None or self.key_source is None:
            return PaCoOutput(logits)
        q = F.normalize(self.projector(features), dim=1)
        with torch.no_grad():
            if self.key_source == "momentum":
                self.momentum_update()
                k = encode_shuffled(self._key_branch, x_k) if self.shuffle_keys else self._key_branch(x_k)
            else:
                k = self.projector(self.encoder(x_k))
            k = F.normalize(k, dim=1)
            queue_keys, queue_labels = self.queue.keys.clone(), self.queue.labels.clone()
            self.queue.enqueue(k, labels)
        return PaCoOutput(logits, q, k, queue_keys, queue_labels)
