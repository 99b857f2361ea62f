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


def tune_parser(prog: str = "paco-tune") -> argparse.ArgumentParser:
    parser = _parser(prog, TUNE_DESCRIPTION, TUNE_EPILOG)
    parser.add_argument("space", help="search-space YAML (search_spaces/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the space file, e.g. --set num_samples=4 --set base.optim.lr=0.05")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    parser.add_argument("--dry-run", action="store_true", help="check the space and its data, print the trials "
                        "and resources, run nothing")
    parser.add_argument("--then-train", action="store_true",
                        help="retrain the best config to the full epoch budget on the whole cluster")
    return parser
