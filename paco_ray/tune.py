"""Hyperparameter search with Ray Tune and ASHA:
``python -m paco_ray.tune SPACE.yaml [--resume] [--set key=value ...] [--dry-run] [--then-train]``.

Each trial is a Tune function trainable that runs a Ray Train ``TorchTrainer``; the Train run
reports every epoch through ``TuneReportCallback``, so ASHA stops weak trials on the validation
metric. At the end the command prints the trial table, keeps the best trials' checkpoints (the
rest are deleted), writes the best config as a ready-to-train YAML, evaluates the best checkpoint
on the test split and, with ``--then-train``, retrains the best config on the whole cluster.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time

if __name__ == "__main__":  # the command's options first: --help answers before the heavy imports
    from paco_ray.commands import tune_parser
    tune_parser().parse_args()

from dataclasses import dataclass  # noqa: E402
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CheckpointError
from .commands import tune_parser
from .config import TrainConfig
from .data.prepared import DatasetError
from .data.staging import check_dataset
from .capacity import Capacity, fmt
from .driver import best_checkpoint, environ
from .errors import InputError
from .evaluate import evaluate_checkpoint, format_table
from .schema import ConfigError, flatten, set_dotted
from .session import trial_run_name
from .search_space import SearchSpace, load_space, param_space, parse, resolve_trials, upgrade_space
from .storage import exists, filesystem, read_text, subdirectories, to_uri, write_text

SNAPSHOT = "search_space.yaml"
BEST_CONFIG = "best_config.yaml"
SUMMARY = "summary.txt"

# ----------------------------------------------------------------------------- the trainable


def run_trial(config: dict[str, Any], space: dict[str, Any], autoscaling: bool = False) -> None:
    """One Tune trial: a TorchTrainer on the trial's config, reporting each epoch to Tune.

    The Train run is named by the trial id, so a restored trial resumes from its own checkpoint.
    ``autoscaling``: its workers may wait for the autoscaler's nodes.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .driver import run_trainer
    from .train import train_loop_per_worker

    search = parse(space)
    trial_id = ray.tune.get_context().get_trial_id()
    # raises ray.train.TrainingFailedError: Tune marks the trial as errored
    run_trainer(train_loop_per_worker, search.trial_config(config), name=trial_run_name(search.name, trial_id),
                storage_path=search.storage_path, keep=search.checkpoints.keep_per_trial,
                metric=search.scheduler.metric, callbacks=[TuneReportCallback()], autoscaling=autoscaling)


# ----------------------------------------------------------------------------- resources


def trial_bundles(space: SearchSpace) -> tuple[dict[str, float], dict[str, float]]:
    """(one worker's resources, the trial driver's resources) of a trial."""
    r = space.resources
    return {"CPU": r.cpus_per_worker, **({"GPU": 1.0} if r.use_gpu else {})}, r.trial_driver()


def trials_that_fit(space: SearchSpace, capacity: Capacity, limit: int = 256) -> int:
    """How many trials (workers and trial driver each) the cluster holds at once at its largest,
    up to ``limit``; raises, in one line, when not even one ever fits."""
    worker, driver = trial_bundles(space)
    workers = space.resources.workers
    problem = capacity.placement_problem(worker, workers, space.full_config().placement_strategy)
    if problem:
        raise ConfigError(f"resources: one trial can never be placed: {problem}")
    fits = 0
    while fits < limit and capacity.fits([worker] * (workers * (fits + 1)) + [driver] * (fits + 1), spread=worker):
        fits += 1
    if fits == 0:
        where = " on the head" if space.resources.trial_driver_on_head else ""
        raise ConfigError(f"resources: one trial ({workers} x {fmt(worker)} + {fmt(driver)} for its trial driver{where}) "
                          f"can never be placed: {capacity.kinds_text()}")
    return fits


def concurrency(space: SearchSpace, capacity: Capacity, trials: int = 256) -> int:
    """Trials at once: ``max_concurrent_trials`` (0: as many as fit), never more than fit the
    cluster at its largest (more would wait for workers that never start), nor than ``trials``."""
    fits = trials_that_fit(space, capacity, limit=max(1, trials))
    if space.max_concurrent_trials == 0 or space.max_concurrent_trials <= fits:
        return min(space.max_concurrent_trials or fits, fits)
    where = "at its largest" if capacity.autoscaling else "now"
    sys.stderr.write(f"warning: max_concurrent_trials={space.max_concurrent_trials} but {fits} trial(s) fit the "
                     f"cluster {where}; running {fits} at once\n")
    return fits


def scale_to_cluster(cfg: TrainConfig, capacity: Capacity) -> TrainConfig:
    """The same config on every worker the cluster can hold at its largest: the per-worker batch
    is kept, the global batch grows with the workers and the learning rate scales linearly with it."""
    per_worker_batch = cfg.data.batch_size // cfg.workers
    cpus_per_worker = cfg.cpus_per_worker
    if cfg.use_gpu:
        gpu = {"GPU": 1.0}
        workers = capacity.slots(gpu)
        if workers < 1:
            raise ConfigError(f"resources.use_gpu: no node can hold a GPU worker: {capacity.kinds_text()}")
        used = [k for k, _, _ in capacity.largest(gpu) if k.copies(gpu) >= 1 and k.resources is not None]
        cpus_per_worker = min([cpus_per_worker] + [max(1.0, math.floor(k.resources.get("CPU", 0) / k.resources["GPU"]))
                                                   for k in used])
    else:
        workers = capacity.slots({"CPU": cpus_per_worker})
        if workers < 1:
            raise ConfigError(f"resources.cpus_per_worker: no node holds {cpus_per_worker:g} CPU: {capacity.kinds_text()}")
    if math.isinf(workers):
        raise ConfigError(f"the cluster has no limit on its nodes ({capacity.kinds_text()}): set the workers "
                          "to retrain on instead of scaling to the cluster")
    workers, batch = int(workers), per_worker_batch * int(workers)
    return dataclasses.replace(cfg, workers=workers, cpus_per_worker=cpus_per_worker,
                               data=dataclasses.replace(cfg.data, batch_size=batch),
                               optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * batch / cfg.data.batch_size))


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
    kept = deleted = 0
    ranked = [t for t in rows if math.isfinite(t.best)]
    survivors = {t.trial_id for t in ranked[:space.checkpoints.keep_trials]}
    for t in rows:
        keep: set[str] = set()
        if t.trial_id in survivors:
            present = [p for _, p in t.checkpoints if exists(fs, p)]
            keep = set(present[:space.checkpoints.keep_per_trial])
        run_dir = trial_run_name(root, t.trial_id)
        if t.status == "error" or not exists(fs, run_dir):
            continue
        for path in subdirectories(fs, run_dir):
            if not path.rsplit("/", 1)[-1].startswith("checkpoint_"):
                continue
            if path in keep:
                kept += 1
            else:
                fs.delete_dir(path)
                deleted += 1
    return kept, deleted


def best_trial(rows: list[TrialSummary], space: SearchSpace) -> tuple[TrialSummary, str | None]:
    """The best trial and its best checkpoint still stored (None: none left)."""
    best = next((t for t in rows if math.isfinite(t.best)), None)
    if best is None:
        raise CheckpointError(f"{space.experiment_path}: no trial reported {space.scheduler.metric}")
    return best, best_checkpoint(best.checkpoints, space.experiment_path)


def evaluate_test(space: SearchSpace, path: str) -> dict[str, dict] | None:
    """The best checkpoint (a path in the experiment's storage) on the test split (None when the
    dataset has no test split)."""
    try:
        results, _ = evaluate_checkpoint(to_uri(space.storage_path, path), ["test"])
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


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".") or "(top level)"


def open_experiment(space: SearchSpace, resume: bool):
    """(filesystem, path) of the experiment folder: a new one, or (``--resume``) one started with
    these very settings."""
    fs, exp_path = filesystem(space.experiment_path)
    snapshot = f"{exp_path}/{SNAPSHOT}"
    if not resume:
        if exists(fs, exp_path):
            raise ConfigError(f"name: experiment {space.experiment_path} exists; pass --resume to continue it "
                              "or --set name=<new name> for a new one")
        return fs, exp_path
    if not exists(fs, snapshot):
        raise ConfigError(f"--resume: no experiment at {space.experiment_path} (nothing to resume)")
    try:
        stored = yaml.safe_load(read_text(fs, snapshot))
    except yaml.YAMLError:
        raise ConfigError(f"--resume: {space.experiment_path}/{SNAPSHOT} is not valid YAML") from None
    differs = _first_difference(upgrade_space(stored)[0] if isinstance(stored, dict) else stored, space.to_dict())
    if differs:
        raise ConfigError(f"--resume: {differs} differs from the experiment's {SNAPSHOT}; "
                          "resume with the settings it started with")
    return fs, exp_path


def check_space_data(space: SearchSpace) -> None:
    """The dataset a search would read exists and is complete (the embedded default, empty
    ``data.path``, is prepared when the search runs)."""
    path = space.full_config().data.path
    if path:
        check_dataset(path)


def with_prepared_data(space: SearchSpace) -> SearchSpace:
    """``space`` whose base reads a prepared dataset: the embedded default is prepared here, once."""
    from pipelines.default_data import with_prepared_data as prepared

    path = prepared(space.full_config()).data.path
    check_dataset(path)  # a bad dataset fails here in one line, not in every trial
    base = copy.deepcopy(space.base)
    set_dotted(base, "data.path", path)
    return dataclasses.replace(space, base=base)


def build_tuner(space: SearchSpace, resume: bool, max_concurrent: int, autoscaling: bool = False):
    """A new Tuner over the space's trials, or the interrupted experiment restored."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space.to_dict(), autoscaling=autoscaling),
                                    space.resources.trial_driver())
    if resume:
        if not tune.Tuner.can_restore(space.experiment_path):
            raise ConfigError(f"--resume: {space.experiment_path} holds no Tune experiment state")
        return tune.Tuner.restore(space.experiment_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    s = space.scheduler
    return tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode="max", num_samples=space.num_samples,
            search_alg=BasicVariantGenerator(random_state=space.search_seed, max_concurrent=max_concurrent),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period,
                                    reduction_factor=s.reduction_factor)),
        run_config=tune.RunConfig(name=space.name, storage_path=space.storage_path, verbose=1,
                                  callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))


def report_results(rows: list[TrialSummary], space: SearchSpace, elapsed: float) -> tuple[str, TrainConfig]:
    """Prune checkpoints, write the best config and the summary into the experiment folder and
    evaluate the best checkpoint on the test split; returns (summary text, best config)."""
    fs, exp_path = filesystem(space.experiment_path)
    kept, deleted = prune_checkpoints(rows, space)
    run_epochs = sum(t.epochs for t in rows)
    budget = len(rows) * space.scheduler.max_t
    report = [format_trials(rows, space), "",
              f"{len(rows)} trials in {elapsed:.0f} s; {sum(t.status == 'stopped early' for t in rows)} stopped early "
              f"by ASHA; {run_epochs} trial-epochs of the {budget} that running every trial to max_t would take "
              f"({100 * (1 - run_epochs / max(budget, 1)):.0f}% saved)",
              f"checkpoints: kept {kept}, deleted {deleted} (best {space.checkpoints.keep_per_trial} of the best "
              f"{space.checkpoints.keep_trials} trials)"]
    best, path = best_trial(rows, space)
    best_cfg = dataclasses.replace(space.trial_config(best.config, epochs=space.base_epochs),
                                   storage_path=space.storage_path, name=f"{space.name}-best")
    write_text(fs, f"{exp_path}/{BEST_CONFIG}", yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
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
    write_text(fs, f"{exp_path}/{SUMMARY}", text + "\n")
    return text, best_cfg


def retrain_best(best_cfg: TrainConfig, capacity: Capacity) -> int:
    """``--then-train``: the best config to its full budget on every worker the cluster holds."""
    import ray.train

    from .driver import failure_line, result_checkpoints
    from .train import fit

    cfg = scale_to_cluster(best_cfg, capacity)
    print(f"\nretraining the best config for {cfg.optim.epochs} epochs on {cfg.workers} workers "
          f"(global batch {cfg.data.batch_size}, lr {cfg.optim.lr:g})", flush=True)
    try:
        result = fit(cfg, capacity.autoscaling)
    except ray.train.TrainingFailedError as err:
        print(f"error: retraining failed: {failure_line(err, cfg)}", file=sys.stderr)
        return 1
    final = best_checkpoint(result_checkpoints(result), cfg.storage_path)
    if final is None:
        raise CheckpointError(f"run {result.path!r} reported no checkpoint")
    table, _ = evaluate_checkpoint(to_uri(cfg.storage_path, final))
    print(f"retrained: {final}\n{format_table(table)}")
    return 0


def unfinished_trials(results, space: SearchSpace) -> int:
    """Trials that neither finished nor failed: still running when the search was interrupted, or
    never started (a best config from such a search would come from a smaller budget)."""
    return max(0, space.num_samples - results.num_terminated - results.num_errors)


def run(space: SearchSpace, resume: bool, then_train: bool) -> int:
    """The search, step by step: open (or resume) the experiment, prepare the data, fit the Tuner,
    summarise and prune, and optionally retrain the best config."""
    from .capacity import read_capacity
    from .driver import check_gpu_request, start_ray

    fs, exp_path = open_experiment(space, resume)
    declared, space = space.to_dict(), with_prepared_data(space)  # bad data fails before Ray starts
    check_gpu_request(space.full_config().use_gpu)
    start_ray()
    capacity = read_capacity()
    max_concurrent = concurrency(space, capacity, len(resolve_trials(space)))
    tuner = build_tuner(space, resume, max_concurrent, capacity.autoscaling)
    if not resume:
        write_text(fs, f"{exp_path}/{SNAPSHOT}", yaml.safe_dump(declared, sort_keys=False))
    started = time.perf_counter()
    with environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):  # TensorBoard comes from the trials' own writer
        results = tuner.fit()
    unfinished = unfinished_trials(results, space)
    if unfinished:  # interrupted (Ctrl-C): keep every checkpoint for --resume
        print(f"error: interrupted with {unfinished} unfinished trials; continue with --resume", file=sys.stderr)
        return 1
    rows = summarize(results, space)
    text, best_cfg = report_results(rows, space, time.perf_counter() - started)
    print("\n" + text)
    if then_train and (code := retrain_best(best_cfg, read_capacity())):
        return code
    return 1 if all(t.status == "error" for t in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = tune_parser().parse_args(argv)
    try:
        space = load_space(args.space, args.set)
        if args.dry_run:  # the trials, then whether the search could start (its data)
            print(describe(space, resolve_trials(space)), flush=True)
            check_space_data(space)
            return 0
        return run(space, args.resume, args.then_train)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Re-enter through the package so Ray pickles run_trial by reference.
    from paco_ray.tune import main as package_main

    sys.exit(package_main())
