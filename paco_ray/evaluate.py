"""Accuracy metrics for long-tailed classification, and ``python -m paco_ray.evaluate CHECKPOINT``."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Iterable

import torch
import torch.distributed as dist

from .data.longtail import ClassInfo
from .errors import InputError

TABLE_COLUMNS = ("top1", "top5", "balanced_acc", "many", "medium", "few")


@torch.no_grad()
def per_class_counts(model: torch.nn.Module, batches: Iterable, normalize, num_classes: int,
                     device: torch.device) -> torch.Tensor:
    """(3, C) int64: images, top-1 hits and top-5 hits per true class, summed over DDP ranks."""
    counts = torch.zeros(3, num_classes, dtype=torch.long, device=device)
    k = min(5, num_classes)
    was_training = model.training
    model.eval()
    for images, labels in batches:
        labels = labels.to(device)
        logits = model(normalize(images)).logits
        topk = logits.topk(k, dim=1).indices
        hits1 = topk[:, 0] == labels
        hits5 = (topk == labels.unsqueeze(1)).any(1)
        counts[0].index_add_(0, labels, torch.ones_like(labels))
        counts[1].index_add_(0, labels, hits1.long())
        counts[2].index_add_(0, labels, hits5.long())
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts.cpu()


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
                   device: torch.device) -> dict[str, float]:
    """Metrics (with ``per_class``) of ``model`` on this rank's shard of ``split``, summed over ranks."""
    counts = per_class_counts(model, loaders.eval(split), loaders.normalize, classes.num_classes, device)
    return metrics_from_counts(counts, classes)


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


def evaluate_checkpoint(path: str, splits: list[str] | None = None) -> tuple[dict[str, dict], ClassInfo]:
    """Rebuild the model and data named by a checkpoint (a directory, a state.pt, or a URI in object
    storage) and evaluate it on ``splits`` (default: val and, when the dataset has one, test)."""
    import tempfile

    from .checkpoint import load_model_weights, load_state
    from .config import TrainConfig
    from .data.loaders import build_loaders
    from .data.prepared import DatasetError, PreparedDataset
    from .data.staging import local_dataset
    from .model import PaCoModel
    from .storage import fetch_dir

    with tempfile.TemporaryDirectory() as local:
        state = load_state(fetch_dir(path, local))
    cfg = TrainConfig.from_dict(state["config"])
    data = PreparedDataset.open(local_dataset(cfg.data.path, cfg.data.stage_dir))
    if splits is None:
        splits = [s for s in ("val", "test") if s in data.labels]
    missing = [s for s in splits if s not in data.labels]
    if missing:
        raise DatasetError(f"--split {missing[0]}: {data.path} has no {missing[0]} split")
    classes = ClassInfo.from_dict(state["classes"])
    model = PaCoModel.from_config(cfg, classes.num_classes, data.channels)
    load_model_weights(model, state, cfg, classes.num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loaders = build_loaders(data, cfg.data, rank=0, world_size=1, seed=cfg.seed, device=device)
    return {split: evaluate_split(model, loaders, split, classes, device) for split in splits}, classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paco_ray.evaluate", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint directory (holding state.pt) or state.pt file")
    parser.add_argument("--split", action="append", choices=("train", "val", "test"),
                        help="split to evaluate (repeatable; default: test)")
    parser.add_argument("--per-class", action="store_true", help="also print per-class accuracy")
    args = parser.parse_args(argv)
    try:
        results, classes = evaluate_checkpoint(args.checkpoint, args.split or ["test"])
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.per_class:
        for split, m in results.items():
            print(f"\n[{split}]\n{format_per_class(m, classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
