"""SGD with linear warmup and cosine decay, stepped once per training step."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup from 1/warmup_steps to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, steps_per_epoch: int):
    """(SGD over the trainable parameters, its per-step warmup-cosine LambdaLR)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                                momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, optim.warmup_epochs * steps_per_epoch, optim.epochs * steps_per_epoch))
    return optimizer, scheduler
