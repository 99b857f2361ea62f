"""SGD with a learning-rate schedule stepped once per training step (``SCHEDULES``: linear warmup
then cosine decay, or the official CIFAR step schedule); a step can be skipped on the device (no
host sync) with ``skip_next_step_if``."""
from __future__ import annotations

import math

import torch



def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup from 1/warmup_steps to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_decay(step: int, steps_per_epoch: int, warmup_epochs: int, milestones: list[int], gamma: float) -> float:
    """LR multiplier of the official CIFAR schedule (``paco_cifar.py`` ``adjust_learning_rate``),
    set per epoch e (0-based): (e + 1) / warmup_epochs while e <= warmup_epochs (so epoch
    ``warmup_epochs`` itself runs at (warmup + 1) / warmup, as there), then gamma^k where k
    milestones are below e (320, 360: x0.1 after epoch 320, x0.01 after 360)."""
    epoch = step // steps_per_epoch
    if warmup_epochs and epoch <= warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return gamma ** sum(epoch > m for m in milestones)


SCHEDULES = ("cosine", "step")


def build_optimizer(model: torch.nn.Module, optim, steps_per_epoch: int):
    """(SGD over the trainable parameters, its per-step LambdaLR: ``optim.schedule``). Fused SGD
    reads a ``found_inf`` flag on the device and skips the whole update when it is set."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                nesterov=optim.nesterov, fused=True)
    if optim.momentum > 0:  # a skipped first step must leave zeros, not fused SGD's uninitialised buffers
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if optim.schedule == "step":
        multiplier = lambda step: step_decay(step, steps_per_epoch, optim.warmup_epochs,  # noqa: E731
                                             list(optim.milestones), optim.gamma)
    else:
        multiplier = lambda step: warmup_cosine(step, optim.warmup_epochs * steps_per_epoch,  # noqa: E731
                                                optim.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return optimizer, scheduler


def skip_next_step_if(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """The next ``optimizer.step()`` leaves parameters and momentum untouched where ``flag`` (a
    0/1 tensor on the parameters' device) is 1: decided on the device, without a host sync.
    (With a GradScaler enabled, its own non-finite check sets the flag instead.)"""
    for group in optimizer.param_groups:
        group["fused"] = True  # a state dict saved by an unfused SGD resets it when loaded
    optimizer.grad_scale, optimizer.found_inf = None, flag.float()
