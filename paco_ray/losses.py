"""PaCo loss and the baselines it is compared with.

Every loss takes the classifier's center logits (B, C) and the log class prior (C,);
the contrastive terms of PaCo additionally take the query/key projections and the queue.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy(center_logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax cross-entropy (the prior is ignored)."""
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

    Only one (B, 2B+K) logit matrix is built: the positive terms are gathered through per-class
    sums of the contrast features instead of a (B, 2B+K) positive mask.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        center = center_logits.float() + log_prior.float()
        batch, num_classes = center.shape
        contrast = torch.cat([q, k, queue.detach()], dim=0)                      # (N, D)
        contrast_labels = torch.cat([labels, labels, queue_labels])              # (N,)
        valid = contrast_labels >= 0
        safe_labels = contrast_labels.clamp(min=0)

        # Denominator: logsumexp over centers (weight 1) and features (weight gamma), q_i excluded.
        log_den = torch.logsumexp(center, dim=1)
        if gamma > 0:
            feature_logits = q @ contrast.T / temperature                        # (B, N), the only one
            feature_logits.masked_fill_(~valid, float("-inf"))
            feature_logits[:, :batch].diagonal().fill_(float("-inf"))
            feature_lse = torch.logsumexp(feature_logits, dim=1)
            log_den = torch.logaddexp(log_den, feature_lse + math.log(gamma))

        # Numerator: beta * center logit of y_i + alpha * sum of logits of same-label features.
        positive_center = center.gather(1, labels.unsqueeze(1)).squeeze(1)
        class_sums = torch.zeros(num_classes, q.shape[1], dtype=q.dtype, device=q.device)
        class_sums = class_sums.index_add(0, safe_labels, contrast * valid.unsqueeze(1))
        class_counts = torch.bincount(safe_labels, weights=valid.to(q.dtype), minlength=num_classes)
        same_label_logit_sum = ((q * class_sums[labels]).sum(1) - (q * q).sum(1)) / temperature
        positive_count = class_counts[labels] - 1.0                               # q_i itself excluded

        weight_total = beta + alpha * positive_count
        weighted_logits = beta * positive_center + alpha * same_label_logit_sum
        loss = -(weighted_logits - weight_total * log_den) / weight_total
        return loss.mean()
