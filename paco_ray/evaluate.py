"""``python -m paco_ray.evaluate CHECKPOINT|RUN``: evaluate one checkpoint (a directory holding
state.pt, the file itself, or either in object storage) or the best checkpoint of a run folder
(best_checkpoint.resolve_checkpoint), on the dataset the checkpoint names or on --data-path; print
a table (or JSON) and optionally draw per-class accuracy against training frequency and the
confusion matrix. ``evaluate_checkpoint`` is also what ``paco-train`` runs on the best checkpoint
(as a Ray task, driver.evaluate_on_cluster). Torch loads only once a checkpoint is evaluated, so
``--help`` answers at once."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from .best_checkpoint import Picked, resolve_checkpoint
from .config import TrainConfig
from .data.longtail import ClassInfo
from .data.prepared import DatasetError, PreparedDataset
from .data.staging import local_dataset
from .errors import InputError, MissingInputError
from .run_folder import to_json
from .storage import fetch_dir



EVALUATE_DESCRIPTION = """\
Evaluate a checkpoint, or the best checkpoint of a run folder (by the validation balanced
accuracy each checkpoint recorded), on the validation and/or test split: top-1, top-5, balanced
accuracy and the many/medium/few-shot groups; optionally per class, as JSON, and as figures."""

EVALUATE_EPILOG = """\
examples:
  paco-eval runs/fashion_mnist_lt-if100-max5000-val500-paco-seed0                # best checkpoint, test split
  paco-eval runs/RUN/checkpoint_epoch_0015 --split val --split test --per-class
  paco-eval runs/RUN --plot per_class.png --confusion confusion.png
  paco-eval s3://bucket/runs/RUN --data-path /data/cifar100_lt_if100 --json"""


def parser(prog: str = "paco-eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=EVALUATE_DESCRIPTION, epilog=EVALUATE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint (directory holding state.pt, or state.pt), or a run folder "
                                           "(checkpoint_*/ subfolders): its best checkpoint by "
                                           "val_balanced_acc; local or s3://, gs://...")
    parser.add_argument("--split", action="append", choices=("train", "val", "test"),
                        help="split to evaluate (repeatable; default: test)")
    parser.add_argument("--per-class", action="store_true", help="also print per-class accuracy")
    parser.add_argument("--data-path", metavar="PATH",
                        help="prepared dataset to evaluate on instead of the one the checkpoint recorded (e.g. "
                             "after moving it); it must hold the checkpoint's classes")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw per-class top-1 accuracy against training images per class")
    parser.add_argument("--confusion", metavar="FILE.png",
                        help="draw the row-normalised confusion matrix, classes by training frequency")
    parser.add_argument("--json", action="store_true",
                        help="print the results (and per-class numbers with --per-class) as JSON")
    return parser


def open_checkpoint_dataset(cfg, classes: ClassInfo, data_path: str | None):
    """The prepared dataset a checkpoint is evaluated on: ``data_path`` if given, else the one it
    was trained on; refused unless it holds the checkpoint's classes (names, in order)."""
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
    import torch  # the model's modules, here and not at the top: --help loads none of them

    from .checkpoint import load_model_weights, load_state
    from .data.loaders import build_loaders
    from .metrics import evaluate_split
    from .model import PaCoModel

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
    from .metrics import TABLE_COLUMNS

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
    args = parser().parse_args(argv)
    from .metrics import format_per_class, format_table  # after the options: --help loads no torch

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
