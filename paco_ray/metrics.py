"""What a run measures: per-class prediction counts (on the device, summed over DDP ranks), the
long-tailed accuracies computed from them, the metrics every epoch reports, and their tables."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .data.longtail import ClassInfo

TABLE_COLUMNS = ("top1", "top5", "balanced_acc", "many", "medium", "few")



@torch.no_grad()
def prediction_counts(model: torch.nn.Module, batches: Iterable, normalize, num_classes: int,
                      device: torch.device, confusion: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3, C) int64 images, top-1 hits and top-5 hits per true class, and with ``confusion`` the
    (C, C) int64 confusion counts (row: true class, column: top-1 prediction), else None. Both are
    accumulated on the device (no host sync per batch) and summed over DDP ranks."""
    counts = torch.zeros(3, num_classes, dtype=torch.long, device=device)
    pairs = torch.zeros(num_classes * num_classes if confusion else 0, dtype=torch.long, device=device)
    k = min(5, num_classes)
    was_training = model.training
    model.eval()
    for images, labels in batches:
        labels = labels.to(device)
        logits = model(normalize(images)).logits
        topk = logits.topk(k, dim=1).indices
        hits1 = topk[:, 0] == labels
        hits5 = (topk == labels.unsqueeze(1)).any(1)
        ones = torch.ones_like(labels)
        counts[0].index_add_(0, labels, ones)
        counts[1].index_add_(0, labels, hits1.long())
        counts[2].index_add_(0, labels, hits5.long())
        if confusion:
            pairs.index_add_(0, labels * num_classes + topk[:, 0], ones)
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        if confusion:
            dist.all_reduce(pairs)
    return counts.cpu(), pairs.view(num_classes, num_classes).cpu() if confusion else None


def per_class_counts(model: torch.nn.Module, batches: Iterable, normalize, num_classes: int,
                     device: torch.device) -> torch.Tensor:
    """(3, C) int64: images, top-1 hits and top-5 hits per true class, summed over DDP ranks."""
    return prediction_counts(model, batches, normalize, num_classes, device)[0]


def metrics_from_counts(counts: torch.Tensor, classes: ClassInfo) -> dict[str, float]:
    """top1/top5 over images; balanced accuracy and many/medium/few as means of per-class accuracy
    (classes absent from the split are left out; a group with no class is NaN)."""
    total, hits1, hits5 = counts.double()
    present = total > 0
    per_class = torch.where(present, hits1 / total.clamp(min=1), torch.tensor(float("nan"), dtype=torch.double))
    groups = classes.shot_groups()
    metrics = {
        "top1": 100 * hits1.sum().item() / max(total.sum().item(), 1),
        "top5": 100 * hits5.sum().item() / max(total.sum().item(), 1),
        "balanced_acc": 100 * per_class[present].mean().item() if present.any() else float("nan"),
    }
    for group in ("many", "medium", "few"):
        members = torch.tensor([g == group for g in groups]) & present
        metrics[group] = 100 * per_class[members].mean().item() if members.any() else float("nan")
    metrics["per_class"] = [100 * a for a in per_class.tolist()]
    return metrics


def evaluate_split(model: torch.nn.Module, loaders, split: str, classes: ClassInfo,
                   device: torch.device, confusion: bool = False) -> dict[str, Any]:
    """Metrics (with ``per_class``, and with ``confusion`` the (C, C) counts under that key) of
    ``model`` on this rank's shard of ``split``, summed over ranks. A DDP model is evaluated
    through its module, with rank 0's buffers: DDP's own forward broadcasts buffers, a collective
    that a rank without a batch of the split (a split smaller than the workers) would never join."""
    counts, pairs = prediction_counts(synced_module(model), loaders.eval(split), loaders.normalize,
                                      classes.num_classes, device, confusion)
    metrics = metrics_from_counts(counts, classes)
    if pairs is not None:
        metrics["confusion"] = pairs
    return metrics


def synced_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper, its buffers (BatchNorm statistics) made rank 0's on every
    rank first (every rank takes part); any other model as it is."""
    if not hasattr(model, "module") or not (dist.is_available() and dist.is_initialized()):
        return model
    for buffer in model.module.buffers():
        dist.broadcast(buffer, src=0)
    return model.module


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows of metrics (e.g. {'val': ..., 'test': ...}) as a fixed-width text table."""
    lines = ["split  " + "".join(f"{c:>14}" for c in TABLE_COLUMNS)]
    for name, m in rows.items():
        cells = "".join(f"{'-' if math.isnan(m[c]) else format(m[c], '.2f'):>14}" for c in TABLE_COLUMNS)
        lines.append(f"{name:<7}{cells}")
    return "\n".join(lines)


def format_per_class(metrics: dict, classes: ClassInfo) -> str:
    groups = classes.shot_groups()
    lines = [f"{'class':<16}{'train imgs':>11}{'group':>8}{'acc':>8}"]
    for name, n, g, acc in zip(classes.names, classes.train_counts, groups, metrics["per_class"]):
        lines.append(f"{name[:15]:<16}{n:>11}{g:>8}{acc:>8.2f}")
    return "\n".join(lines)




@dataclass
class EpochStats:
    """One training epoch as the loop counted it."""
    loss: float             # mean training loss over every rank's steps
    elapsed: float          # seconds
    seen: torch.Tensor      # (N,) how often each training image was used, summed over ranks
    local_images: int       # images this rank trained on
    skipped: int            # steps skipped for a non-finite loss
    lr: float               # the learning rate at the epoch's end


def epoch_metrics(epoch: int, stats: EpochStats, val: dict[str, float],
                  queue_fill: float | None = None) -> dict[str, Any]:
    """What every epoch reports (to Ray, Tune, TensorBoard and the checkpoint); ``val`` holds the
    validation split's metrics (``per_class`` left out), ``queue_fill`` the share of the key
    queue holding keys (contrastive losses)."""
    metrics = {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "lr": stats.lr,
        "images_per_s": int(stats.seen.sum().item()) / stats.elapsed,
        "epoch_time_s": stats.elapsed,
        "train_samples": int((stats.seen > 0).sum().item()),
        "train_duplicate_samples": int((stats.seen > 1).sum().item()),
        "skipped_steps": stats.skipped,
        **{f"val_{k}": v for k, v in val.items()},
    }
    if queue_fill is not None:
        metrics["queue_fill"] = queue_fill
    return metrics
