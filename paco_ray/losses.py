"""PaCo loss and the baselines it is compared with, and ``compute_loss``, the choice among them.

The losses take the classifier's center logits (B, C); Balanced Softmax and PaCo add the log class
prior (C,); PaCo additionally takes the query/key projections and the queue.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import PaCoConfig
    from .model import PaCoOutput


def compute_loss(loss: str, out: "PaCoOutput", labels: torch.Tensor, log_prior: torch.Tensor,
                 paco: "PaCoConfig") -> torch.Tensor:
    """The training loss named ``loss`` (paco, gpaco, balanced_softmax or ce) of one forward pass."""
    if loss in ("paco", "gpaco"):
        return paco_loss(out.q, out.k, out.queue_keys, labels, out.queue_labels, out.logits, log_prior,
                         alpha=paco.alpha, beta=paco.beta, gamma=paco.gamma, temperature=paco.temperature)
    if loss == "balanced_softmax":
        return balanced_softmax(out.logits, labels, log_prior)
    if loss == "ce":
        return cross_entropy(out.logits, labels)
    raise ValueError(f"unknown loss {loss!r}")


def cross_entropy(center_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain softmax cross-entropy."""
    return F.cross_entropy(center_logits.float(), labels)


def balanced_softmax(center_logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax (Ren et al. 2020): cross-entropy on logits shifted by the log class prior."""
    return F.cross_entropy(center_logits.float() + log_prior.float(), labels)


def paco_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    labels: torch.Tensor,
    queue_labels: torch.Tensor,
    center_logits: torch.Tensor,
    log_prior: torch.Tensor,
    *,
    alpha: float,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float,
) -> torch.Tensor:
    """Parametric contrastive loss (Cui et al., ICCV 2021), mean over the batch.

    For anchor q_i the contrast set is every q_j (j != i), every k_j and every queue entry
    (entries whose label is negative are empty slots and are ignored), plus the C class centers.
    Logits are ``center_logits + log_prior`` for centers and ``q_i . v / temperature`` for features.
    Positives: the center of y_i with weight ``beta``, every contrast feature labelled y_i with
    weight ``alpha``. Denominator weights: 1 for centers, ``gamma`` for features.

    No (B, 2B+K) mask and no concatenated logit matrix: the denominator combines the logsumexps
    of three blocks (q·q, q·k, q·queue), so the queue block's backward computes no gradient for the
    queue; the positive terms come from per-class sums of the contrast features.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float().detach()
        center = center_logits.float() + log_prior.float()
        batch, num_classes = center.shape
        q_scaled = q / temperature
        queue_valid = queue_labels >= 0

        # Denominator: logsumexp over centers (weight 1) and features (weight gamma), q_i excluded.
        log_den = torch.logsumexp(center, dim=1)
        if gamma > 0:
            self_logits = q_scaled @ q.T                                          # (B, B)
            self_logits.diagonal().fill_(float("-inf"))
            queue_logits = q_scaled @ queue.T                                     # (B, K), the large one
            # Empty slots exist only while the queue fills; on CPU checking costs nothing, on GPU it
            # would synchronise, so there the mask is always applied.
            if q.device.type != "cpu" or not bool(queue_valid.all()):
                queue_logits = queue_logits.masked_fill(~queue_valid, float("-inf"))
            feature_lse = torch.logsumexp(torch.stack([
                torch.logsumexp(self_logits, dim=1), torch.logsumexp(q_scaled @ k.T, dim=1),
                torch.logsumexp(queue_logits, dim=1)]), dim=0)
            log_den = torch.logaddexp(log_den, feature_lse + math.log(gamma))

        # Numerator: beta * center logit of y_i + alpha * sum of logits of same-label features.
        positive_center = center.gather(1, labels.unsqueeze(1)).squeeze(1)
        slot_class = torch.where(queue_valid, queue_labels, num_classes)          # empty slots -> extra row
        queue_sums = torch.zeros(num_classes + 1, q.shape[1], dtype=q.dtype, device=q.device)
        queue_sums = queue_sums.index_add(0, slot_class, queue)[:num_classes]
        batch_sums = torch.zeros(num_classes, q.shape[1], dtype=q.dtype, device=q.device).index_add(0, labels, q + k)
        # counts by index_add into a fixed size: CUDA's bincount reads the largest label back to the host
        class_counts = torch.zeros(num_classes + 1, dtype=q.dtype, device=q.device)
        class_counts.index_add_(0, slot_class, torch.ones_like(queue_labels, dtype=q.dtype))
        class_counts.index_add_(0, labels, torch.full_like(labels, 2, dtype=q.dtype))
        same_label_logit_sum = (q_scaled * (queue_sums + batch_sums)[labels]).sum(1) - (q_scaled * q).sum(1)
        positive_count = class_counts[labels] - 1.0                               # q_i itself excluded

        weight_total = beta + alpha * positive_count
        weighted_logits = beta * positive_center + alpha * same_label_logit_sum
        loss = -(weighted_logits - weight_total * log_den) / weight_total
        return loss.mean()
