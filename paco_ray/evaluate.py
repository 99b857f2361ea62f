"""Accuracy metrics for long-tailed classification, and ``python -m paco_ray.evaluate CHECKPOINT|RUN``.

The command evaluates one checkpoint (a directory holding state.pt, the file itself, or either in
object storage) or the best checkpoint of a run folder (by the validation balanced accuracy each
checkpoint recorded), on the dataset the checkpoint names or on --data-path; it prints a
table (or JSON) and can draw per-class accuracy against training frequency and the confusion
matrix."""
from __future__ import annotations

import sys

if __name__ == "__main__":  # the command's options first: --help answers before the heavy imports
    from paco_ray.commands import evaluate_parser
    evaluate_parser().parse_args()

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .commands import evaluate_parser
from .data.longtail import ClassInfo
from .errors import InputError, MissingInputError

TABLE_COLUMNS = ("top1", "top5", "balanced_acc", "many", "medium", "few")
PICK_METRIC = "val_balanced_acc"  # what a run keeps its checkpoints by (driver.run_trainer)
CHECKPOINT_DIR = re.compile(r"epoch_\d+|checkpoint_.+")  # LocalSession's and Ray Train's names
CHECKPOINT_EPOCH = re.compile(r"(?:checkpoint_)?epoch_(\d+)")  # names that say their epoch


# ----------------------------------------------------------------------------- metrics


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


# ----------------------------------------------------------------------------- checkpoints and runs


@dataclass
class Picked:
    """The checkpoint chosen from a run folder, and why."""
    checkpoint: str   # local path or URI
    run: str
    metric: str
    value: float
    candidates: int

    def describe(self) -> str:
        value = f"{self.value:.2f}" if math.isfinite(self.value) else "none recorded"
        return (f"checkpoint {self.checkpoint}: best {self.metric} ({value}) of the "
                f"{self.candidates} checkpoint(s) in {self.run}")


def run_checkpoints(path: str) -> list[str] | None:
    """Paths (inside ``path``'s filesystem) of the checkpoints of a run folder: its subfolders named
    epoch_NNNN (LocalSession) or checkpoint_* (Ray Train) that hold state.pt. None when ``path`` is
    itself a checkpoint (a file, or a directory holding state.pt)."""
    import pyarrow.fs

    from .checkpoint import STATE_FILE, CheckpointError
    from .storage import exists, filesystem, storage_error, subdirectories

    try:
        fs, root = filesystem(path if "://" in path else os.path.abspath(path))
        kind = fs.get_file_info(root).type
    except OSError as err:  # object storage: no such bucket, no credentials
        raise InputError(f"{path}: {storage_error(err, path)}") from None
    if kind == pyarrow.fs.FileType.NotFound:
        raise MissingInputError(f"checkpoint or run folder {path!r} does not exist")
    if kind == pyarrow.fs.FileType.File or exists(fs, f"{root}/{STATE_FILE}"):
        return None
    found = sorted(d for d in subdirectories(fs, root)
                   if CHECKPOINT_DIR.fullmatch(d.rsplit("/", 1)[-1]) and exists(fs, f"{d}/{STATE_FILE}"))
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint (no {STATE_FILE}) nor a run folder (no epoch_NNNN/ or "
                              f"checkpoint_*/ subfolder holding {STATE_FILE})")
    return found


def recorded_metric(checkpoint: str, metric: str = PICK_METRIC) -> float:
    """The validation ``metric`` a checkpoint recorded with its state (-inf when absent or NaN)."""
    import tempfile

    from .checkpoint import STATE_FILE, load_state
    from .storage import fetch_dir

    with tempfile.TemporaryDirectory() as local:
        state = load_state(fetch_dir(f"{checkpoint}/{STATE_FILE}", local))
    value = (state.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def epoch_scores(storage: str) -> dict[int, float]:
    """Epoch -> PICK_METRIC from a run folder's metrics.jsonl (empty when it has none): what each
    epoch's checkpoint recorded, without reading the checkpoints."""
    import json

    from .run_folder import METRICS
    from .storage import exists, filesystem, read_text

    fs, file = filesystem(f"{storage}/{METRICS}")
    if not exists(fs, file):
        return {}
    lines = [json.loads(line) for line in read_text(fs, file).splitlines() if line.strip()]
    return {m["epoch"]: float(m[PICK_METRIC]) if isinstance(m.get(PICK_METRIC), (int, float)) else -math.inf
            for m in lines if "epoch" in m}


def resolve_checkpoint(path: str) -> tuple[str, Picked | None]:
    """``path`` itself when it is a checkpoint; for a run folder, its checkpoint with the highest
    recorded PICK_METRIC (from metrics.jsonl for checkpoints named by epoch, else from the
    checkpoint itself), by the criterion the training command uses (best_checkpoint.best_checkpoint)."""
    from .best_checkpoint import best_checkpoint
    from .storage import to_uri

    found = run_checkpoints(path)
    if found is None:
        return path, None
    storage = path if "://" in path else os.path.abspath(path)
    by_epoch = epoch_scores(storage)

    def score(directory: str) -> float:
        named = CHECKPOINT_EPOCH.fullmatch(directory.rsplit("/", 1)[-1])
        if named and int(named[1]) in by_epoch:
            return by_epoch[int(named[1])]
        return recorded_metric(to_uri(storage, directory))

    scored = [(score(d), d) for d in found]
    best = to_uri(storage, best_checkpoint(scored, storage))
    value = max(score for score, _ in scored)
    return best, Picked(best, path, PICK_METRIC, value, len(found))


# ----------------------------------------------------------------------------- evaluation


def open_checkpoint_dataset(cfg, classes: ClassInfo, data_path: str | None):
    """The prepared dataset a checkpoint is evaluated on: ``data_path`` if given, else the one it
    was trained on; refused unless it holds the checkpoint's classes (names, in order)."""
    from .data.prepared import DatasetError, PreparedDataset
    from .data.staging import local_dataset

    where = f"--data-path {data_path}" if data_path else f"data.path {cfg.data.path} (recorded in the checkpoint)"
    try:
        data = PreparedDataset.open(local_dataset(data_path or cfg.data.path, cfg.data.stage_dir))
    except DatasetError as err:
        hint = "" if data_path else "; if the dataset has moved, give its new place with --data-path"
        raise DatasetError(f"{err}{hint}") from None
    names = tuple(data.classes.names)
    if names != tuple(classes.names):
        if len(names) != classes.num_classes:
            detail = f"it has {len(names)} classes, the checkpoint {classes.num_classes}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(names, classes.names)) if a != b)
            detail = f"its class {i} is {names[i]!r}, the checkpoint's {classes.names[i]!r}"
        raise DatasetError(f"{where}: holds other classes than the checkpoint ({detail})")
    return data


def evaluate_checkpoint(path: str, splits: list[str] | None = None, *, data_path: str | None = None,
                        confusion: bool = False) -> tuple[dict[str, dict], ClassInfo]:
    """Rebuild the model and data named by a checkpoint (a directory, a state.pt, or a URI in object
    storage) and evaluate it on ``splits`` (default: val and, when the dataset has one, test).
    ``data_path`` replaces the dataset the checkpoint recorded (it must hold the same classes);
    ``confusion`` adds each split's (C, C) confusion counts under "confusion"."""
    import tempfile

    from .checkpoint import load_model_weights, load_state
    from .config import TrainConfig
    from .data.loaders import build_loaders
    from .data.prepared import DatasetError
    from .model import PaCoModel
    from .storage import fetch_dir

    with tempfile.TemporaryDirectory() as local:
        state = load_state(fetch_dir(path, local))
    cfg = TrainConfig.from_dict(state["config"])
    classes = ClassInfo.from_dict(state["classes"])
    data = open_checkpoint_dataset(cfg, classes, data_path)
    if splits is None:
        splits = [s for s in ("val", "test") if s in data.labels]
    missing = [s for s in splits if s not in data.labels]
    if missing:
        raise DatasetError(f"--split {missing[0]}: {data.path} has no {missing[0]} split")
    model = PaCoModel.from_config(cfg, classes.num_classes, data.channels)
    load_model_weights(model, state, cfg, classes.num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loaders = build_loaders(data, cfg.data, rank=0, world_size=1, seed=cfg.seed, device=device)
    return {split: evaluate_split(model, loaders, split, classes, device, confusion) for split in splits}, classes


# ----------------------------------------------------------------------------- the command


def figure_paths(option: str, path: str | None, splits: list[str]) -> dict[str, Path]:
    """Where ``option``'s figure of each split goes: ``path`` itself for one split, else
    ``<stem>-<split>.png`` beside it. Checked before anything is evaluated."""
    if path is None:
        return {}
    file = Path(path)
    if file.suffix.lower() != ".png":
        raise InputError(f"{option} {path}: the figure is written as PNG; name a .png file")
    if not file.parent.expanduser().is_dir():
        raise MissingInputError(f"{option} {path}: directory {str(file.parent)!r} does not exist")
    if len(splits) == 1:
        return {splits[0]: file}
    return {s: file.with_name(f"{file.stem}-{s}{file.suffix}") for s in splits}


def write_figures(results: dict[str, dict], classes: ClassInfo, plots: dict[str, Path],
                  confusions: dict[str, Path]) -> list[Path]:
    """Draw the per-class scatter and the confusion matrix of each split asked for; the files written."""
    from .plots import confusion_figure, per_class_scatter, save_png

    written = []
    for split, file in plots.items():
        save_png(per_class_scatter(results[split]["per_class"], classes,
                                   f"{split}: per-class top-1 accuracy ({classes.num_classes} classes)"), file)
        written.append(file)
    for split, file in confusions.items():
        save_png(confusion_figure(results[split]["confusion"], classes,
                                  f"{split}: confusion ({classes.num_classes} classes, rows sum to 1)"), file)
        written.append(file)
    return written


def results_json(results: dict[str, dict], classes: ClassInfo, checkpoint: str, picked: Picked | None,
                 per_class: bool) -> str:
    """The command's results for machines: the checkpoint (and how it was picked), each split's
    table row, and with ``per_class`` each class's numbers; NaN (a group without classes) is null."""
    from .run_folder import to_json

    out: dict[str, Any] = {
        "checkpoint": checkpoint,
        "picked": None if picked is None else {"run": picked.run, "metric": picked.metric, "value": picked.value,
                                                "candidates": picked.candidates},
        "splits": {split: {c: m[c] for c in TABLE_COLUMNS} for split, m in results.items()},
    }
    if per_class:
        groups = classes.shot_groups()
        out["per_class"] = {split: [{"class": name, "train_images": n, "group": g, "top1": acc}
                                    for name, n, g, acc in zip(classes.names, classes.train_counts, groups,
                                                               m["per_class"])]
                            for split, m in results.items()}
    return to_json(out)


def main(argv: list[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    splits = args.split or ["test"]
    try:
        plots = figure_paths("--plot", args.plot, splits)
        confusions = figure_paths("--confusion", args.confusion, splits)
        checkpoint, picked = resolve_checkpoint(args.checkpoint)
        if picked is not None:
            print(picked.describe(), file=sys.stderr)
        results, classes = evaluate_checkpoint(checkpoint, splits, data_path=args.data_path,
                                               confusion=bool(confusions))
        for file in write_figures(results, classes, plots, confusions):
            print(f"wrote {file}", file=sys.stderr)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(results_json(results, classes, checkpoint, picked, args.per_class))
        return 0
    print(format_table(results))
    if args.per_class:
        for split, m in results.items():
            print(f"\n[{split}]\n{format_per_class(m, classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
