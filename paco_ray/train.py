"""Train one config: ``python -m paco_ray.train [CONFIG.yaml] [--set key=value ...] [--workers N] [--gpu]``.

The command prepares the embedded default dataset when ``data.path`` is empty, runs the config
on N Ray Train workers (each runs ``loop.train_loop_per_worker``; one checkpoint per epoch under
``storage_path``), then evaluates the best checkpoint (by validation balanced accuracy) on the
validation and test splits and writes the run folder's results.json. ``paco-tune --then-train``
retrains through the same ``train_and_evaluate``. Torch, Ray and the pipelines load only once the
command runs, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import driver
from .best_checkpoint import SELECTION_METRIC, best_checkpoint, result_checkpoints
from .config import TrainConfig, load_config
from .data.staging import check_dataset
from .errors import CheckpointError, InputError
from .faults import KillPlan
from .run_folder import RESULTS, config_yaml, to_json
from .storage import filesystem, to_uri, write_text

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


def parser(prog: str = "paco-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded Fashion-MNIST-LT job)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set loss=ce --set paco.temperature=0.1")
    parser.add_argument("--workers", type=int, help="number of Ray Train workers (default: the config's, 2)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="one GPU per worker, NCCL, bf16 autocast")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (nothing is prepared or run)")
    return parser


def overrides(args: argparse.Namespace) -> list[str]:
    """--set, --workers and --gpu as config overrides, in that order."""
    overrides = list(args.set)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.gpu is not None:
        overrides.append(f"use_gpu={str(args.gpu).lower()}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config, overrides(args))
        if args.print_config:
            sys.stdout.write(config_yaml(cfg.to_dict()))
            return 0
        KillPlan.from_env(os.environ)  # a malformed drill fails here, not after Ray has started
        return run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(cfg: TrainConfig) -> int:
    """The command after its config is read: prepare the data, train on Ray, evaluate the best checkpoint."""
    from pipelines.default_data import with_prepared_data

    from .metrics import format_table

    started = time.perf_counter()
    cfg = with_prepared_data(cfg)  # once, here in the driver
    check_dataset(cfg.data.path)  # bad data and impossible requests fail before Ray starts
    driver.check_gpu_request(cfg.use_gpu)
    driver.start_ray()
    capacity = driver.check_fits_cluster(cfg)
    code, table, path = train_and_evaluate(cfg, capacity.autoscaling)
    if code:
        return code
    print(f"\n{cfg.run_name}: loss={cfg.loss}, {cfg.optim.epochs} epochs, {cfg.workers} workers, "
          f"{time.perf_counter() - started:.0f} s")
    print(f"best checkpoint (val balanced accuracy): {path}")
    print(format_table(table))
    return 0


def fit(cfg: TrainConfig, autoscaling: bool = False):
    """Run ``cfg`` (its ``data.path`` prepared and checked by the command, before Ray started) as a
    Ray Train TorchTrainer under ``storage_path/run_name``; re-running the same name resumes from
    its last checkpoint. ``autoscaling``: the workers may wait for the autoscaler's nodes."""
    from .loop import train_loop_per_worker

    return driver.run_trainer(train_loop_per_worker, cfg, name=cfg.run_name, storage_path=cfg.storage_path,
                              keep=cfg.keep_checkpoints, autoscaling=autoscaling)


def train_and_evaluate(cfg: TrainConfig, autoscaling: bool = False) -> tuple[int, dict | None, str | None]:
    """Fit ``cfg`` on Ray, pick its best checkpoint by SELECTION_METRIC, evaluate it on the
    validation and test splits on a node of the run's kind, and write the run folder's
    results.json: (exit code, the table, the checkpoint). A failed run prints one line and gives
    1, or 2 when a worker refused its input (a checkpoint trained with other settings, bad data)."""
    import ray.train

    try:
        result = fit(cfg, autoscaling)
    except ray.train.TrainingFailedError as err:
        print(f"error: training failed (max_failures: {cfg.max_failures}): {driver.failure_line(err, cfg)}",
              file=sys.stderr)
        bad_input = any(isinstance(e, InputError) for e in getattr(err, "worker_failures", {}).values())
        return (2 if bad_input else 1), None, None
    path = best_checkpoint(result_checkpoints(result), cfg.storage_path)
    if path is None:
        raise CheckpointError(f"run {result.path!r} reported no checkpoint")
    uri = to_uri(cfg.storage_path, path)
    table, _ = driver.evaluate_on_cluster(uri, cfg)
    write_text(*filesystem(to_uri(cfg.storage_path, f"{result.path}/{RESULTS}")),
               to_json({"best_checkpoint": uri, "metric": SELECTION_METRIC, "splits": table}))
    return 0, table, uri


if __name__ == "__main__":
    sys.exit(main())
