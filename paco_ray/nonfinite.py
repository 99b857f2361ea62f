"""A training step that may be skipped without a trace, decided on the device (no host sync): its
flag is set when the loss or any gradient is not finite on some rank, and a skipped step changes
no weight, no optimizer state (``optim.skip_next_step_if``), no key encoder and no queue
(``PaCoModel.end_step``) and, with ``BatchNormState``, no BatchNorm statistic."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm


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
