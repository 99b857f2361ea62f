"""PaCo and GPaCo losses and the baselines they are compared with, and ``LOSSES``: the one table
of loss names, each with how it is computed from a forward pass, where its keys come from and its
published projection head. Adding a loss is an entry here and its test.

The losses take the classifier's center logits (B, C); Balanced Softmax, PaCo and GPaCo add the
log class prior (C,); PaCo and GPaCo additionally take the projections and the queue.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class Loss(NamedTuple):
    """A training loss: ``compute(out, labels, log_prior, weights)`` of one forward pass (``out``:
    model.PaCoOutput; ``weights``: alpha, beta, gamma, temperature, smooth); ``keys``: where its
    key view's features come from ("momentum": MoCo's key encoder, "query": the query encoder with
    gradient), None for a loss without a key view; ``head``: the projector its published code uses."""
    compute: Callable[..., torch.Tensor]
    keys: str | None = None
    head: str = "mlp"


LOSSES = {
    "paco": Loss(lambda out, labels, log_prior, w: paco_loss(
        out.q, out.k, out.queue_keys, labels, out.queue_labels, out.logits, log_prior, **w),
        keys="momentum", head="mlp_bn"),
    "gpaco": Loss(lambda out, labels, log_prior, w: gpaco_loss(
        out.q, out.k, out.queue_keys, labels, out.queue_labels, out.logits, out.logits_k, log_prior, **w),
        keys="query", head="gpaco_mlp"),
    "balanced_softmax": Loss(lambda out, labels, log_prior, w: balanced_softmax(out.logits, labels, log_prior)),
    "ce": Loss(lambda out, labels, log_prior, w: cross_entropy(out.logits, labels)),
}


def compute_loss(loss: str, out, labels: torch.Tensor, log_prior: torch.Tensor, paco) -> torch.Tensor:
    """The training loss named ``loss`` (a key of LOSSES) of one forward pass; ``paco``: the
    config's PaCoConfig (its weights and temperature)."""
    weights = dict(alpha=paco.alpha, beta=paco.beta, gamma=paco.gamma, temperature=paco.temperature, smooth=paco.smooth)
    return LOSSES[loss].compute(out, labels, log_prior, weights)


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
    smooth: float = 0.0,
) -> torch.Tensor:
    """Parametric contrastive loss (Cui et al., ICCV 2021), mean over the batch.

    For anchor q_i the contrast set is every q_j (j != i), every k_j and every queue entry
    (entries whose label is negative are empty slots and are ignored), plus the C class centers.
    Logits are ``center_logits + log_prior`` for centers and ``q_i . v / temperature`` for features.
    Positives: the center of y_i with weight ``beta``, every contrast feature labelled y_i with
    weight ``alpha``. Denominator weights: 1 for centers, ``gamma`` for features. ``smooth``
    spreads the centers' weight as the official loss's label smoothing does: ``beta * (1 - smooth)``
    on y_i and ``beta * smooth / (C - 1)`` on every other center.

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

        # Numerator: beta * center logit of y_i (smoothed) + alpha * sum of logits of same-label features.
        positive_center = center.gather(1, labels.unsqueeze(1)).squeeze(1)
        if smooth:
            others = (center.sum(1) - positive_center) / max(num_classes - 1, 1)
            positive_center = (1.0 - smooth) * positive_center + smooth * others
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


def gpaco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, labels: torch.Tensor,
               queue_labels: torch.Tensor, logits_q: torch.Tensor, logits_k: torch.Tensor, log_prior: torch.Tensor,
               **weights) -> torch.Tensor:
    """Generalized PaCo (Cui et al., TPAMI 2023) as its published code computes it: both views
    went through the query encoder with gradient, and every one of the 2B features is an anchor,
    with its own view's center logits, against all 2B features but itself and the queue. That is
    the mean of ``paco_loss`` anchored on each view (anchor q: q_j, j != i, every k_j; anchor k:
    every q_j, k_j, j != i), each batch the same size."""
    return 0.5 * (paco_loss(q, k, queue, labels, queue_labels, logits_q, log_prior, **weights)
                  + paco_loss(k, q, queue, labels, queue_labels, logits_k, log_prior, **weights))
