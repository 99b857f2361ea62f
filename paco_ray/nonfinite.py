"""A training step that may be skipped without a trace, decided on the device (no host sync): its
flag is set when the loss or any gradient is not finite on some rank, and a skipped step changes
no weight, no optimizer state (``optim.skip_next_step_if``), no key encoder and no queue
(``PaCoModel.end_step``) and, with ``BatchNormState``, no BatchNorm statistic. The host reads the
flags now and then: ``check_finite`` stops at the first such step, ``skipped_steps`` lists them."""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .progress import LOGGER


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def nonfinite_flag(loss: torch.Tensor, params: list[torch.Tensor], check_gradients: bool = True) -> torch.Tensor:
    """1 (int32, on the device) when ``loss`` or, with ``check_gradients``, a gradient of
    ``params`` is not finite on any rank, else 0: every rank gets the same flag (one all-reduce)."""
    bad = ~torch.isfinite(loss.detach())
    grads = [p.grad for p in params if p.grad is not None] if check_gradients else []
    if grads:
        bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    return all_reduce_sum(bad.to(torch.int32)).clamp_(max=1)


class BatchNormState:
    """The running statistics of every BatchNorm in a model, saved before a step and put back
    where the step was skipped (a NaN batch would otherwise leave NaN statistics behind, and
    validation would return garbage)."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = [b for m in model.modules() if isinstance(m, _BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved: list[torch.Tensor] = []

    def save(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    @torch.no_grad()
    def restore_if(self, skipped: torch.Tensor) -> None:
        """Put the saved statistics back where ``skipped`` (0-dim 0/1 device tensor) is 1."""
        skip = skipped.bool()
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.copy_(torch.where(skip, saved, buffer))


def step_position(epoch: int, step: int, steps_per_epoch: int) -> str:
    """Where a step is, for people: ``epoch 2, step 5 (global step 105)``."""
    return f"epoch {epoch + 1}, step {step} (global step {epoch * steps_per_epoch + step})"


def nonfinite_steps(flags: list[torch.Tensor]) -> list[int]:
    """The 1-based steps flagged non-finite (one host sync for all of them)."""
    return (torch.stack(flags).cpu().nonzero().flatten() + 1).tolist() if flags else []


def check_finite(flags: list[torch.Tensor], losses: list[torch.Tensor], epoch: int, steps_per_epoch: int) -> None:
    """Stop, naming the first step whose loss (or, with a finite loss, a gradient) was not finite
    on some rank."""
    steps = nonfinite_steps(flags)
    if steps:
        value = losses[steps[0] - 1].item()
        what = f"non-finite loss ({value})" if not math.isfinite(value) else f"non-finite gradient (loss {value:.4g})"
        raise FloatingPointError(f"{what} at {step_position(epoch, steps[0], steps_per_epoch)}; "
                                 "set skip_nonfinite: true to skip such steps")


def skipped_steps(flags: list[torch.Tensor], epoch: int, steps_per_epoch: int) -> list[int]:
    """The epoch's skipped steps, each with a warning line; an epoch with no step taken is an error."""
    skipped = nonfinite_steps(flags)
    for step in skipped:
        logging.getLogger(LOGGER).warning(f"warning: skipped a step with a non-finite loss or gradient at "
                                          f"{step_position(epoch, step, steps_per_epoch)}")
    if len(skipped) == len(flags):
        raise FloatingPointError(f"every step of epoch {epoch + 1} had a non-finite loss or gradient "
                                 f"({len(skipped)} skipped)")
    return skipped
