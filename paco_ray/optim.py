"""SGD with linear warmup and cosine decay, stepped once per training step; a step can be skipped
on the device (no host sync) with ``skip_next_step_if``."""
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
    """(SGD over the trainable parameters, its per-step warmup-cosine LambdaLR). Fused SGD reads a
    ``found_inf`` flag on the device and skips the whole update when it is set."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                nesterov=optim.nesterov, fused=True)
    if optim.momentum > 0:  # a skipped first step must leave zeros, not fused SGD's uninitialised buffers
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, optim.warmup_epochs * steps_per_epoch, optim.epochs * steps_per_epoch))
    return optimizer, scheduler


def skip_next_step_if(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """The next ``optimizer.step()`` leaves parameters and momentum untouched where ``flag`` (a
    0/1 tensor on the parameters' device) is 1: decided on the device, without a host sync.
    (With a GradScaler enabled, its own non-finite check sets the flag instead.)"""
    for group in optimizer.param_groups:
        group["fused"] = True  # a state dict saved by an unfused SGD resets it when loaded
    optimizer.grad_scale, optimizer.found_inf = None, flag.float()
