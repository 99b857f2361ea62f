"""The command lines of ``paco-train`` / ``python -m paco_ray.train`` and ``paco-tune`` /
``python -m paco_ray.tune``: their options and help, with no heavy import, so ``--help`` and a
mistyped option answer at once."""
from __future__ import annotations

import argparse

TRAIN_DESCRIPTION = """\
Train a long-tailed image classifier with PaCo (or GPaCo, Balanced Softmax, cross-entropy) on Ray
Train workers, then evaluate the best checkpoint on the validation and test splits.

Without a config it trains the embedded default: Fashion-MNIST-LT (imbalance 100), prepared on
first use into ~/.cache/paco_ray. A config is a YAML file of the keys that differ from the
defaults (see configs/ and --print-config); --set overrides single keys."""

TRAIN_EPILOG = """\
examples:
  paco-train                                            # PaCo on Fashion-MNIST-LT, 2 CPU workers
  paco-train --set loss=balanced_softmax --set optim.epochs=30
  paco-train configs/cifar100_lt.yaml --set data.path=data/cifar100_lt_if100
  paco-train configs/imagenet_lt.yaml --gpu --workers 8  # on a Ray cluster (ray up cluster.yaml)
  paco-train configs/cifar100_lt.yaml --print-config      # the resolved config, nothing run

where results go:
  <storage_path>/<name>/ (default runs/<dataset>-<loss>-seed<seed>/): config.yaml, metrics.jsonl
  (one line per epoch), results.json (the best checkpoint's val/test table), checkpoint_epoch_NNNN/
  checkpoints and tensorboard/ (tensorboard --logdir runs). Running the same name again resumes
  from its last checkpoint. Evaluate a run later with paco-eval <run folder>."""

TUNE_DESCRIPTION = """\
Search hyperparameters (temperature, alpha, queue size, or any other key) with Ray Tune and ASHA:
each trial trains on Ray Train workers and reports every epoch; weak trials stop early. At the
end: the trial table, the best trials' checkpoints (others deleted), best_config.yaml ready for
paco-train, and the best checkpoint's test accuracy."""

TUNE_EPILOG = """\
examples:
  paco-tune search_spaces/fashion_mnist_lt.yaml              # ~15 min on 2 cores
  paco-tune search_spaces/imagenet_lt.yaml --dry-run         # the trials and resources, nothing run
  paco-tune search_spaces/cifar100_lt.yaml --set num_samples=4 --set base.optim.lr=0.05
  paco-tune search_spaces/imagenet_lt.yaml --resume          # after an interruption

A search space holds base: (a training config, inline or the path of a file in configs/),
search: (the keys to sample), scheduler:, num_samples:, resources: and checkpoints:.
Results go to <storage_path>/<name>/ (default runs/tune/<space file name>/)."""


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


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def train_parser(prog: str = "paco-train") -> argparse.ArgumentParser:
    parser = _parser(prog, TRAIN_DESCRIPTION, TRAIN_EPILOG)
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded Fashion-MNIST-LT job)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set loss=ce --set paco.temperature=0.1")
    parser.add_argument("--workers", type=int, help="number of Ray Train workers (default: the config's, 2)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="one GPU per worker, NCCL, bf16 autocast")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (nothing is prepared or run)")
    return parser


def train_overrides(args: argparse.Namespace) -> list[str]:
    """--set, --workers and --gpu as config overrides, in that order."""
    overrides = list(args.set)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.gpu is not None:
        overrides.append(f"use_gpu={str(args.gpu).lower()}")
    return overrides


def evaluate_parser(prog: str = "paco-eval") -> argparse.ArgumentParser:
    parser = _parser(prog, EVALUATE_DESCRIPTION, EVALUATE_EPILOG)
    parser.add_argument("checkpoint", help="checkpoint (directory holding state.pt, or state.pt), or a run folder "
                                           "(epoch_NNNN/ or checkpoint_*/ subfolders): its best checkpoint by "
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


def tune_parser(prog: str = "paco-tune") -> argparse.ArgumentParser:
    parser = _parser(prog, TUNE_DESCRIPTION, TUNE_EPILOG)
    parser.add_argument("space", help="search-space YAML (search_spaces/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the space file, e.g. --set num_samples=4 --set base.optim.lr=0.05")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    parser.add_argument("--dry-run", action="store_true", help="check the space and its data, print the trials "
                        "and resources, run nothing")
    parser.add_argument("--then-train", action="store_true",
                        help="retrain best_config.yaml as exported (the trials' workers, batch and lr) to the full "
                             "epoch budget, into <experiment>/retrain/")
    parser.add_argument("--scale-to-cluster", action="store_true",
                        help="with --then-train: retrain on every worker the cluster can hold instead, keeping the "
                             "per-worker batch and scaling lr with the global batch (this changes the steps per "
                             "epoch, the key encoder's pace and the queue's turnover that were tuned)")
    parser.add_argument("--retry-errored", action="store_true",
                        help="with --resume: also continue trials that errored (by default they stay errored)")
    return parser
