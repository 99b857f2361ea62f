"""Hyperparameter search with Ray Tune and ASHA:
``python -m paco_ray.tune SPACE.yaml [--resume] [--set key=value ...] [--dry-run] [--then-train]``.

Each trial is a Tune function trainable that runs a Ray Train ``TorchTrainer``; the Train run
reports every epoch through ``TuneReportCallback``, so ASHA stops weak trials on the validation
metric. At the end the command prints the trial table, keeps the best trials' checkpoints (the
rest are deleted), writes the best config as a ready-to-train YAML, evaluates the best checkpoint
on the test split and, with ``--then-train``, retrains the best config on the whole cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, flatten
from .data.prepared import DatasetError, PreparedDataset, resolve_dataset
from .evaluate import evaluate_checkpoint, format_table
from .search_space import SearchSpace, load_space, param_space, parse, resolve_trials

SNAPSHOT = "search_space.yaml"
BEST_CONFIG = "best_config.yaml"
SUMMARY = "summary.txt"

# ----------------------------------------------------------------------------- the trainable


def run_trial(config: dict[str, Any], space: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer on the trial's config, reporting each epoch to Tune.

    The Train run is named by the trial id, so a restored trial resumes from its own checkpoint.
    """
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import scaling_config, train_loop_per_worker

    search = parse(space)
    cfg = search.trial_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=f"{search.name}/train/{trial_id}", storage_path=search.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=search.checkpoints.keep_per_trial,
                                                         checkpoint_score_attribute=search.scheduler.metric,
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError: Tune marks the trial as errored


# ----------------------------------------------------------------------------- storage


def filesystem(uri_or_path: str):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// gs:// ... URI."""
    import pyarrow.fs

    if "://" in uri_or_path:
        return pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return pyarrow.fs.LocalFileSystem(), uri_or_path


def _exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _write_text(fs, path: str, text: str) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path + ".tmp") as stream:
        stream.write(text.encode())
    fs.move(path + ".tmp", path)


def _read_text(fs, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


# ----------------------------------------------------------------------------- resources


def trials_that_fit(space: SearchSpace, cluster: dict[str, float]) -> int:
    """How many trials the cluster runs at once; raises when not even one fits."""
    need = space.resources.per_trial()
    fits = math.inf
    for name, amount in need.items():
        have = cluster.get(name, 0.0)
        if amount > have + 1e-9:
            r = space.resources
            detail = (f"{r.workers} workers x 1 GPU" if name == "GPU" else
                      f"{r.workers} workers x {r.cpus_per_worker:g} CPU + {r.trial_driver_cpus:g} for the trial driver")
            raise ConfigError(f"resources: one trial needs {amount:g} {name} ({detail}) but the cluster has {have:g} {name}")
        fits = min(fits, int((have + 1e-9) // amount))
    return int(fits)


def concurrency(space: SearchSpace, cluster: dict[str, float]) -> int:
    fits = trials_that_fit(space, cluster)
    if space.max_concurrent_trials == 0:
        return fits
    if space.max_concurrent_trials > fits:
        sys.stderr.write(f"warning: max_concurrent_trials={space.max_concurrent_trials} but only {fits} trials fit "
                         "the cluster now; the others wait for resources\n")
    return space.max_concurrent_trials


def scale_to_cluster(cfg: TrainConfig, cluster: dict[str, float]) -> TrainConfig:
    """The same config on every worker the cluster can hold: the per-worker batch is kept, the
    global batch grows with the workers and the learning rate scales linearly with it."""
    per_worker_batch = cfg.data.batch_size // cfg.workers
    if cfg.use_gpu:
        workers = int(cluster.get("GPU", 0))
        if workers < 1:
            raise ConfigError("resources.use_gpu: the cluster has no GPU to retrain on")
        cfg.cpus_per_worker = min(cfg.cpus_per_worker, max(1.0, math.floor(cluster.get("CPU", 0) / workers)))
    else:
        workers = int((cluster.get("CPU", 0) + 1e-9) // cfg.cpus_per_worker)
        if workers < 1:
            raise ConfigError(f"resources.cpus_per_worker: {cfg.cpus_per_worker:g} CPU exceeds the cluster's CPUs")
    batch = per_worker_batch * workers
    cfg.optim.lr *= batch / cfg.data.batch_size
    cfg.workers, cfg.data.batch_size = workers, batch
    return cfg


# ----------------------------------------------------------------------------- results


@dataclass
class TrialSummary:
    trial_id: str
    config: dict[str, Any]     # the sampled values, dotted keys
    epochs: int
    best: float                # best validation metric over the trial's epochs (nan: none)
    status: str                # "completed" | "stopped early" | "error"
    checkpoints: list[tuple[float, str]]  # (metric, path) of every reported checkpoint, best first


def summarize(results, space: SearchSpace) -> list[TrialSummary]:
    """One row per trial from a Tune ResultGrid, best trial first."""
    metric, rows = space.scheduler.metric, []
    for result in results:
        frame = result.metrics_dataframe
        records = [] if frame is None else frame.to_dict("records")
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        epochs = int(max((r.get("epoch", 0) for r in records), default=0))
        scores = [r[metric] for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        checkpoints = sorted(((r[metric], r["checkpoint_path"]) for r in records
                              if isinstance(r.get("checkpoint_path"), str)), key=lambda mp: -mp[0])
        if result.error is not None:
            status = "error"
        elif epochs < space.scheduler.max_t:
            status = "stopped early"
        else:
            status = "completed"
        rows.append(TrialSummary(trial_id, flatten(result.config or {}), epochs, max(scores, default=math.nan),
                                 status, checkpoints))
    rows.sort(key=lambda t: -t.best if math.isfinite(t.best) else math.inf)
    return rows


def format_trials(rows: list[TrialSummary], space: SearchSpace) -> str:
    keys = list(space.search)
    widths = [max(len(k), 10) for k in keys]
    header = f"{'trial':<14}" + "".join(f"{k:>{w + 2}}" for k, w in zip(keys, widths)) + \
        f"{'epochs':>8}{space.scheduler.metric:>18}  status"
    lines = [header]
    for t in rows:
        cells = "".join(f"{_fmt(t.config.get(k)):>{w + 2}}" for k, w in zip(keys, widths))
        best = "-" if math.isnan(t.best) else f"{t.best:.2f}"
        lines.append(f"{t.trial_id:<14}{cells}{t.epochs:>8}{best:>18}  {t.status}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def prune_checkpoints(rows: list[TrialSummary], space: SearchSpace) -> tuple[int, int]:
    """Apply the checkpoint policy: the best ``keep_per_trial`` checkpoints of the best
    ``keep_trials`` trials survive; every other checkpoint directory is deleted, except those of
    errored trials (``--resume`` retries them from their last checkpoint). Returns (kept, deleted)."""
    fs, root = filesystem(space.experiment_path)
    import pyarrow.fs

    kept = deleted = 0
    ranked = [t for t in rows if math.isfinite(t.best)]
    survivors = {t.trial_id for t in ranked[:space.checkpoints.keep_trials]}
    for t in rows:
        keep: set[str] = set()
        if t.trial_id in survivors:
            present = [p for _, p in t.checkpoints if _exists(fs, p)]
            keep = set(present[:space.checkpoints.keep_per_trial])
        run_dir = f"{root}/train/{t.trial_id}"
        if t.status == "error" or not _exists(fs, run_dir):
            continue
        for info in fs.get_file_info(pyarrow.fs.FileSelector(run_dir)):
            if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            if info.path in keep:
                kept += 1
            else:
                fs.delete_dir(info.path)
                deleted += 1
    return kept, deleted


def best_checkpoint(rows: list[TrialSummary], space: SearchSpace) -> tuple[TrialSummary, str | None]:
    best = next((t for t in rows if math.isfinite(t.best)), None)
    if best is None:
        raise CheckpointError(f"{space.experiment_path}: no trial reported {space.scheduler.metric}")
    fs, _ = filesystem(space.experiment_path)
    path = next((p for _, p in best.checkpoints if _exists(fs, p)), None)
    return best, path


def evaluate_test(space: SearchSpace, path: str) -> dict[str, dict] | None:
    """The best checkpoint on the test split (None when the dataset has no test split)."""
    fs, _ = filesystem(space.experiment_path)
    with tempfile.TemporaryDirectory() as local:
        if "://" in space.storage_path:  # fetch the checkpoint from remote storage
            import pyarrow.fs

            pyarrow.fs.copy_files(path, local, source_filesystem=fs)
            path = local
        try:
            results, _ = evaluate_checkpoint(path, ["test"])
        except DatasetError as err:
            if "has no test split" not in str(err):
                raise
            return None
    return results


# ----------------------------------------------------------------------------- the command


def describe(space: SearchSpace, trials: list[dict[str, Any]]) -> str:
    r, s = space.resources, space.scheduler
    need = ", ".join(f"{v:g} {k}" for k, v in r.per_trial().items())
    lines = [
        f"experiment   {space.experiment_path}",
        f"scheduler    ASHA on {s.metric} (max): max_t={s.max_t} epochs, grace_period={s.grace_period}, "
        f"reduction_factor={s.reduction_factor:g}",
        f"per trial    {r.workers} worker{'s' if r.workers > 1 else ''} x ({r.cpus_per_worker:g} CPU{' + 1 GPU' if r.use_gpu else ''}) "
        f"+ {r.trial_driver_cpus:g} CPU trial driver = {need}",
        f"concurrency  {space.max_concurrent_trials or 'as many trials as fit the cluster'}",
        f"checkpoints  best {space.checkpoints.keep_per_trial} per trial, of the best "
        f"{space.checkpoints.keep_trials} trials",
        f"full budget  {space.base_epochs} epochs (--then-train)",
        f"{len(trials)} trials (search_seed={space.search_seed}):",
    ]
    keys = list(space.search)
    lines.append("  #  " + "".join(f"{k:>22}" for k in keys))
    for i, trial in enumerate(trials):
        flat = flatten(trial)
        lines.append(f"{i:>3}  " + "".join(f"{_fmt(flat.get(k)):>22}" for k in keys))
    return "\n".join(lines)


@contextlib.contextmanager
def _environ(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".") or "(top level)"


def run(space: SearchSpace, resume: bool, then_train: bool) -> int:
    import ray
    import ray.train
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    fs, exp_path = filesystem(space.experiment_path)
    snapshot, declared = f"{exp_path}/{SNAPSHOT}", space.to_dict()
    if resume:
        if not _exists(fs, snapshot):
            raise ConfigError(f"--resume: no experiment at {space.experiment_path} (nothing to resume)")
        try:
            stored = yaml.safe_load(_read_text(fs, snapshot))
        except yaml.YAMLError:
            raise ConfigError(f"--resume: {space.experiment_path}/{SNAPSHOT} is not valid YAML") from None
        differs = _first_difference(stored, declared)
        if differs:
            raise ConfigError(f"--resume: {differs} differs from the experiment's {SNAPSHOT}; "
                              "resume with the settings it started with")
    elif _exists(fs, exp_path):
        raise ConfigError(f"name: experiment {space.experiment_path} exists; pass --resume to continue it "
                          "or --set name=<new name> for a new one")

    if not ray.is_initialized():
        ray.init(dashboard_host="127.0.0.1", configure_logging=False)
    cluster = ray.cluster_resources()
    max_concurrent = concurrency(space, cluster)
    data_path = str(resolve_dataset(space.full_config().data))  # prepare once, in the driver
    PreparedDataset.open(data_path)
    space.base.setdefault("data", {})["path"] = data_path

    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space.to_dict()),
                                    {"cpu": space.resources.trial_driver_cpus})
    started = time.perf_counter()
    if resume:
        if not tune.Tuner.can_restore(space.experiment_path):
            raise ConfigError(f"--resume: {space.experiment_path} holds no Tune experiment state")
        tuner = tune.Tuner.restore(space.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        _write_text(fs, snapshot, yaml.safe_dump(declared, sort_keys=False))
        s = space.scheduler
        tuner = tune.Tuner(
            trainable, param_space=param_space(space),
            tune_config=tune.TuneConfig(
                metric=s.metric, mode="max", num_samples=space.num_samples,
                search_alg=BasicVariantGenerator(random_state=space.search_seed, max_concurrent=max_concurrent),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period,
                                        reduction_factor=s.reduction_factor)),
            run_config=tune.RunConfig(name=space.name, storage_path=space.storage_path, verbose=1,
                                      callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))
    with _environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):  # TensorBoard comes from the trials' own writer
        results = tuner.fit()
    elapsed = time.perf_counter() - started
    unfinished = len(results) - results.num_terminated - results.num_errors
    if unfinished:  # interrupted (Ctrl-C): keep every checkpoint for --resume
        print(f"error: interrupted with {unfinished} unfinished trials; continue with --resume", file=sys.stderr)
        return 1

    rows = summarize(results, space)
    kept, deleted = prune_checkpoints(rows, space)
    run_epochs = sum(t.epochs for t in rows)
    budget = len(rows) * space.scheduler.max_t
    report = [format_trials(rows, space), "",
              f"{len(rows)} trials in {elapsed:.0f} s; {sum(t.status == 'stopped early' for t in rows)} stopped early "
              f"by ASHA; {run_epochs} trial-epochs of the {budget} that running every trial to max_t would take "
              f"({100 * (1 - run_epochs / max(budget, 1)):.0f}% saved)",
              f"checkpoints: kept {kept}, deleted {deleted} (best {space.checkpoints.keep_per_trial} of the best "
              f"{space.checkpoints.keep_trials} trials)"]
    best, path = best_checkpoint(rows, space)
    best_cfg = space.trial_config(best.config, epochs=space.base_epochs)
    best_cfg.storage_path, best_cfg.name = space.storage_path, f"{space.name}-best"
    best_yaml = f"{exp_path}/{BEST_CONFIG}"
    _write_text(fs, best_yaml, yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    report += [f"best trial {best.trial_id}: {space.scheduler.metric} {best.best:.2f} with "
               + ", ".join(f"{k}={_fmt(v)}" for k, v in best.config.items()),
               f"best config ({space.base_epochs} epochs): {space.experiment_path}/{BEST_CONFIG}",
               f"best checkpoint: {path}"]
    if path is not None:
        test = evaluate_test(space, path)
        report.append("test split of the best checkpoint:" if test else "the dataset has no test split")
        if test:
            report.append(format_table(test))
    text = "\n".join(report)
    _write_text(fs, f"{exp_path}/{SUMMARY}", text + "\n")
    print("\n" + text)
    failed = sum(t.status == "error" for t in rows)

    if then_train:
        from .train import best_checkpoint as train_best_checkpoint
        from .train import failure_line, fit

        cfg = scale_to_cluster(best_cfg, ray.cluster_resources())
        print(f"\nretraining the best config for {cfg.optim.epochs} epochs on {cfg.workers} workers "
              f"(global batch {cfg.data.batch_size}, lr {cfg.optim.lr:g})", flush=True)
        try:
            result = fit(cfg)
        except ray.train.TrainingFailedError as err:
            print(f"error: retraining failed: {failure_line(err)}", file=sys.stderr)
            return 1
        final = train_best_checkpoint(result)
        table, _ = evaluate_checkpoint(final)
        print(f"retrained: {final}\n{format_table(table)}")
    return 1 if failed == len(rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paco_ray.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("space", help="search-space YAML (search_spaces/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the space file, e.g. --set num_samples=4 --set base.optim.lr=0.05")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and resources, run nothing")
    parser.add_argument("--then-train", action="store_true",
                        help="retrain the best config to the full epoch budget on the whole cluster")
    args = parser.parse_args(argv)
    try:
        space = load_space(args.space, args.set)
        if args.dry_run:
            print(describe(space, resolve_trials(space)))
            return 0
        return run(space, args.resume, args.then_train)
    except (ConfigError, CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Re-enter through the package so Ray pickles run_trial by reference.
    from paco_ray.tune import main as package_main

    sys.exit(package_main())
