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
import copy
import dataclasses
import math
import sys
import time

from typing import Any

import yaml

from .capacity import Capacity
from .resources import format_resources
from .config import TrainConfig
from .data.prepared import DatasetError
from .data.staging import check_dataset
from .driver import environ
from .errors import InputError
from .schema import ConfigError, first_difference, flatten, set_dotted
from .search_results import (TrialSummary, best_trial, format_trials, prune_checkpoints, saved_statuses, summarize,
                             unfinished_trials)
from .search_results import format_value
from .search_space import RESUME_MAY_CHANGE, SearchSpace, load_space, param_space, parse, resolve_trials
from .storage import exists, filesystem, read_text, to_uri, write_text

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

SNAPSHOT = "search_space.yaml"
BEST_CONFIG = "best_config.yaml"
SUMMARY = "summary.txt"
RETRAIN = "retrain"  # the retrained best config's run folder, inside the experiment folder
HPARAMS = "hparams"  # TensorBoard HParams of the trials, inside the experiment folder

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
        raise ConfigError(f"resources: one trial ({workers} x {format_resources(worker)} + "
                          f"{format_resources(driver)} for its trial driver{where}) "
                          f"can never be placed: {capacity.kinds_text()}")
    return fits


def concurrency(space: SearchSpace, capacity: Capacity, trials: int = 256) -> int:
    """Trials at once: ``max_concurrent_trials`` (0: as many as fit), never more than fit the
    cluster at its largest (more would wait for workers that never start), nor than ``trials``.
    Where the node types are unknown: ``max_concurrent_trials``, or (0) what fits the nodes up
    now, at least one."""
    if not capacity.known:
        if space.max_concurrent_trials:
            return min(space.max_concurrent_trials, max(1, trials))
        now = dataclasses.replace(capacity, known=True, note="")
        try:
            fits = trials_that_fit(space, now, limit=max(1, trials))
        except ConfigError:
            fits = 1
        sys.stderr.write(f"warning: max_concurrent_trials=0 with unknown node types: running {fits} at once (what "
                         "fits the nodes up now); set max_concurrent_trials for more\n")
        return fits
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
    if not capacity.known:
        raise ConfigError(f"--scale-to-cluster: {capacity.note.split(':')[0]}; set node_types (a cluster.yaml or "
                          "RayCluster manifest) or retrain as exported")
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


def evaluate_test(space: SearchSpace, best: TrialSummary, path: str) -> dict[str, dict] | None:
    """The best checkpoint (a path in the experiment's storage) on the test split, on a node of
    the trials' kind (None when the dataset has no test split)."""
    from .driver import evaluate_on_cluster

    try:
        results, _ = evaluate_on_cluster(to_uri(space.storage_path, path), space.trial_config(best.config), ["test"])
    except DatasetError as err:
        if "has no test split" not in str(err):
            raise
        return None
    return results


def write_hparams(space: SearchSpace, rows: list[TrialSummary]) -> None:
    """TensorBoard HParams of the trials: sampled values against their final metrics."""
    from .telemetry import write_hparams as write

    metric = space.scheduler.metric
    write(*filesystem(f"{space.experiment_path}/{HPARAMS}"),
          [(t.trial_id, t.config, {metric: t.best, "epochs": t.epochs, "best_epoch": t.best_epoch,
                                   "completed": float(t.status == "completed")}) for t in rows])


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
        f"{len(trials)} trials (search_seed={space.search_seed}):" if space.search_alg == "random" else
        f"{space.num_samples} trials by TPE (search_seed={space.search_seed}); the first {len(trials)}, sampled before "
        "any result, are:",
    ]
    keys = list(space.search)
    lines.append("  #  " + "".join(f"{k:>22}" for k in keys))
    for i, trial in enumerate(trials):
        flat = flatten(trial)
        lines.append(f"{i:>3}  " + "".join(f"{format_value(flat.get(k)):>22}" for k in keys))
    return "\n".join(lines)


def open_experiment(space: SearchSpace, resume: bool):
    """(filesystem, path) of the experiment folder: a new one, or (``--resume``) one started with
    the same search; only what RESUME_MAY_CHANGE names (how many trials at once, and on what
    resources) may differ, each change said in one line."""
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
        stored = parse(stored, snapshot).to_dict()
    except yaml.YAMLError:
        raise ConfigError(f"--resume: {space.experiment_path}/{SNAPSHOT} is not valid YAML") from None
    mine = space.to_dict()
    differs = first_difference({k: v for k, v in stored.items() if k not in RESUME_MAY_CHANGE},
                               {k: v for k, v in mine.items() if k not in RESUME_MAY_CHANGE})
    if differs:
        raise ConfigError(f"--resume: {differs} differs from the experiment's {SNAPSHOT}; "
                          "resume with the settings it started with")
    for key in RESUME_MAY_CHANGE:
        if first_difference(stored[key], mine[key]):
            print(f"resuming with {key} {format_value(mine[key])} (the experiment started with "
                  f"{format_value(stored[key])})", file=sys.stderr)
    return fs, exp_path


def check_space_data(space: SearchSpace) -> None:
    """The dataset a search would read exists and is complete (the embedded default, empty
    ``data.path``, is prepared when the search runs)."""
    path = space.full_config().data.path
    if path:
        check_dataset(path)


def with_prepared_space(space: SearchSpace) -> SearchSpace:
    """``space`` whose base reads a prepared dataset: the embedded default is prepared here, once."""
    from pipelines.default_data import with_prepared_data

    path = with_prepared_data(space.full_config()).data.path
    check_dataset(path)  # a bad dataset fails here in one line, not in every trial
    base = copy.deepcopy(space.base)
    set_dotted(base, "data.path", path)
    return dataclasses.replace(space, base=base)


def build_tuner(space: SearchSpace, resume: bool, max_concurrent: int, autoscaling: bool = False,
                retry_errored: bool = False):
    """A new Tuner over the space's trials, or the interrupted experiment restored: unfinished
    trials continue from their own checkpoints, errored ones only with ``retry_errored``, and at
    most ``max_concurrent`` trials run at once (computed anew on resume)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .search_algorithms import ResumableASHA, searcher, set_concurrency
    from .trial import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space.to_dict(), autoscaling=autoscaling),
                                    space.resources.trial_driver())
    if resume:
        if not tune.Tuner.can_restore(space.experiment_path):
            raise ConfigError(f"--resume: {space.experiment_path} holds no Tune experiment state")
        tuner = tune.Tuner.restore(space.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
        set_concurrency(tuner._local_tuner._tune_config.search_alg, max_concurrent)  # Tune has no public handle
        return tuner
    s = space.scheduler
    return tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode="max", num_samples=space.num_samples,
            search_alg=searcher(space.search_alg, space.search_seed, max_concurrent, space.tpe_startup_trials),
            scheduler=ResumableASHA(space.experiment_path, time_attr="epoch", max_t=s.max_t,
                                    grace_period=s.grace_period, reduction_factor=s.reduction_factor)),
        run_config=tune.RunConfig(name=space.name, storage_path=space.storage_path, verbose=1,
                                  callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))


def report_results(rows: list[TrialSummary], space: SearchSpace, elapsed: float) -> tuple[list[str], TrainConfig]:
    """Prune checkpoints, write the best config, the trials' TensorBoard HParams and the summary
    into the experiment folder, evaluate the best checkpoint on the test split; returns (the
    summary's lines, the best config)."""
    from .metrics import format_table

    fs, exp_path = filesystem(space.experiment_path)
    kept, deleted = prune_checkpoints(rows, space)
    run_epochs = sum(t.epochs for t in rows)
    budget = len(rows) * space.scheduler.max_t
    report = [format_trials(rows, space), "",
              f"{len(rows)} trials in {elapsed:.0f} s; {sum(t.status == 'stopped early' for t in rows)} stopped early "
              f"by ASHA; {run_epochs} trial-epochs of the {budget} that running every trial to max_t would take "
              f"({100 * (1 - run_epochs / max(budget, 1)):.0f}% saved)",
              f"checkpoints: kept {kept}, deleted {deleted} (best {space.checkpoints.keep_per_trial} of the best "
              f"{space.checkpoints.keep_trials} trials without an error)"]
    best, path = best_trial(rows, space)
    best_cfg = dataclasses.replace(space.trial_config(best.config, epochs=space.base_epochs),
                                   storage_path=space.experiment_path, name=RETRAIN)
    write_text(fs, f"{exp_path}/{BEST_CONFIG}", yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    write_hparams(space, rows)
    report += [f"best trial {best.trial_id}: {space.scheduler.metric} {best.best:.2f} at epoch {best.best_epoch} "
               "with " + ", ".join(f"{k}={format_value(v)}" for k, v in best.config.items())
               + " (ties: fewer epochs, then the earlier trial; errored trials are never selected)",
               f"best config ({space.base_epochs} epochs): {space.experiment_path}/{BEST_CONFIG}",
               f"best checkpoint: {path}"]
    if path is not None:
        test = evaluate_test(space, best, path)
        report.append("test split of the best checkpoint:" if test else "the dataset has no test split")
        if test:
            report.append(format_table(test))
    report.append(f"TensorBoard HParams of the trials: tensorboard --logdir {space.experiment_path}/{HPARAMS}")
    write_text(fs, f"{exp_path}/{SUMMARY}", "\n".join(report) + "\n")
    return report, best_cfg


def retrain_best(best_cfg: TrainConfig, space: SearchSpace, report: list[str], scale: bool) -> int:
    """``--then-train``: the exported best config as it is (its full epoch budget), or with
    ``scale`` on every worker the cluster can hold; its config, results and table go to
    ``<experiment>/retrain/`` and into summary.txt."""
    from .capacity import read_capacity
    from .metrics import format_table
    from .train import train_and_evaluate

    capacity = read_capacity(best_cfg.node_types)
    cfg = scale_to_cluster(best_cfg, capacity) if scale else best_cfg
    how = (f"scaled to the cluster: {best_cfg.workers} -> {cfg.workers} workers, global batch "
           f"{best_cfg.data.batch_size} -> {cfg.data.batch_size}, lr {best_cfg.optim.lr:g} -> {cfg.optim.lr:g}; the "
           "steps per epoch, the key encoder's pace and the queue's turnover change with them" if scale else
           f"as exported ({cfg.workers} worker{'s' if cfg.workers != 1 else ''}, global batch {cfg.data.batch_size}, "
           f"lr {cfg.optim.lr:g})")
    print(f"\nretraining {BEST_CONFIG} for {cfg.optim.epochs} epochs, {how}", flush=True)
    code, table, final = train_and_evaluate(cfg, capacity.autoscaling)
    run_folder = f"{space.experiment_path}/{RETRAIN}"
    lines = [f"retrained {BEST_CONFIG} for {cfg.optim.epochs} epochs, {how}: {run_folder}"]
    if code == 0:
        lines += [f"retrained best checkpoint: {final}", format_table(table)]
        print("\n".join(lines[1:]))
    else:
        lines.append(f"retraining failed (exit {code}); {run_folder} holds what it wrote")
    fs, exp_path = filesystem(space.experiment_path)
    write_text(fs, f"{exp_path}/{SUMMARY}", "\n".join(report + [""] + lines) + "\n")
    return code


def run(space: SearchSpace, resume: bool, then_train: bool, retry_errored: bool = False,
        scale: bool = False) -> int:
    """The search, step by step: open (or resume) the experiment, prepare the data, size the
    search from the cluster's capacity, fit the Tuner, summarise and prune, and optionally retrain
    the best config."""
    from .capacity import read_capacity
    from .driver import check_gpu_request, start_ray

    fs, exp_path = open_experiment(space, resume)
    declared, space = space.to_dict(), with_prepared_space(space)  # bad data fails before Ray starts
    check_gpu_request(space.full_config().use_gpu)
    start_ray()
    capacity = read_capacity(space.full_config().node_types)
    if capacity.note:
        print(f"note: {capacity.note}", file=sys.stderr)
    max_concurrent = concurrency(space, capacity, space.trial_count())
    tuner = build_tuner(space, resume, max_concurrent, capacity.autoscaling, retry_errored)
    if not resume:
        write_text(fs, f"{exp_path}/{SNAPSHOT}", yaml.safe_dump(declared, sort_keys=False))
    started = time.perf_counter()
    with environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):  # TensorBoard comes from the trials' own writer
        results = tuner.fit()
    unfinished = unfinished_trials(saved_statuses(space), space)
    if unfinished:  # interrupted (Ctrl-C): keep every checkpoint for --resume
        print(f"error: interrupted with {unfinished} unfinished trials; continue with --resume", file=sys.stderr)
        return 1
    rows = summarize(results, space)
    report, best_cfg = report_results(rows, space, time.perf_counter() - started)
    print("\n" + "\n".join(report))
    if then_train and (code := retrain_best(best_cfg, space, report, scale)):
        return code
    return 1 if all(t.status == "error" for t in rows) else 0


def parser(prog: str = "paco-tune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=TUNE_DESCRIPTION, epilog=TUNE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        space = load_space(args.space, args.set)
        if args.dry_run:  # the trials, then whether the search could start (its data)
            print(describe(space, resolve_trials(space)), flush=True)
            check_space_data(space)
            return 0
        if args.scale_to_cluster and not args.then_train:
            raise ConfigError("--scale-to-cluster: scales the retraining; give it with --then-train")
        return run(space, args.resume, args.then_train, args.retry_errored, args.scale_to_cluster)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
