"""Ray Tune end to end on the shared Ray cluster: a 4-trial ASHA search (local storage), and a
killed driver resumed from an experiment that lives in the S3 test bucket, data included."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import event_tags, read, registered_epoch
from paco_ray import tune as tune_cli
from paco_ray.checkpoint import load_state
from paco_ray.config import load_config
from paco_ray.search_space import load_space, resolve_trials
from paco_ray.storage import exists, filesystem, subdirectories
from paco_ray.loop import train
from paco_ray.session import LocalSession
from pipelines.writer import publish

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def space_file(tmp_path, dataset, epochs=4, **overrides):
    raw = {
        "base": {"data": {"path": str(dataset), "loader": "torch", "batch_size": 16},  # K below: 37, 50
                 "paco": {"queue_size": 37}, "optim": {"epochs": epochs, "warmup_epochs": 0}},
        "search": {"optim": {"lr": {"grid": [0.02, 1e-6]}}, "paco": {"queue_size": {"choice": [37, 50]}}},
        "scheduler": {"max_t": 3, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 2, "max_concurrent_trials": 2,
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "trial_driver_cpus": 0.1},
        "checkpoints": {"keep_per_trial": 1, "keep_trials": 2},
        "storage_path": str(tmp_path / "runs"), "name": "search",
    }
    for key, value in overrides.items():
        raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_results(fs, experiment: str) -> dict[str, list[dict]]:
    """Every result Tune recorded, per trial id, from the trials' result.json files."""
    out = {}
    for folder in subdirectories(fs, experiment):
        if folder.rsplit("/", 1)[-1].startswith("run_trial_") and exists(fs, f"{folder}/result.json"):
            rows = [json.loads(line) for line in read(fs, f"{folder}/result.json").splitlines() if line.strip()]
            if rows:
                out[rows[0]["trial_id"]] = rows
    return out


def test_asha_search_stops_bad_trials_keeps_best_checkpoints_and_exports_a_config(
        ray_cluster, easy_dataset, tmp_path, capsys):
    path = space_file(tmp_path, easy_dataset)
    assert tune_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "runs" / "search"
    assert "stopped early by ASHA" in out and "test split of the best checkpoint" in out

    # the trials Tune ran are the ones --dry-run announces (seeded sampling, grid order)
    results = trial_results(*filesystem(str(experiment)))
    space = load_space(path)
    expected = sorted((t["optim"]["lr"], t["paco"]["queue_size"]) for t in resolve_trials(space))
    assert sorted((r[0]["config"]["optim"]["lr"], r[0]["config"]["paco"]["queue_size"])
                  for r in results.values()) == expected
    epochs = {t: max(r["epoch"] for r in rows) for t, rows in results.items()}
    best = {t: max(r["val_balanced_acc"] for r in rows) for t, rows in results.items()}
    lr = {t: rows[0]["config"]["optim"]["lr"] for t, rows in results.items()}
    assert len(results) == 4
    # the learning-rate-1e-6 trials cannot beat the first good one at rung 1: ASHA stops them
    stopped = [t for t, e in epochs.items() if e < 3]
    assert stopped and all(lr[t] == 1e-6 for t in stopped)
    assert all(epochs[t] == 3 for t in results if lr[t] == 0.02)
    assert f"{sum(epochs.values())} trial-epochs of the 12" in out

    # policy: the best checkpoint of each of the best 2 trials survives, nothing else
    ranked = sorted(results, key=lambda t: -best[t])
    left = sorted(p for p in experiment.glob("train/*/checkpoint_*") if p.is_dir())
    assert sorted(p.parent.name for p in left) == sorted(ranked[:2])
    for checkpoint in left:
        state = load_state(checkpoint)
        assert state["metrics"]["val_balanced_acc"] == best[checkpoint.parent.name]

    # TensorBoard event files per trial from the trials' own tensorboardX writer, and only from it
    assert not list(experiment.glob("run_trial_*/events.out.tfevents.*"))
    for trial in results:
        (event_file,) = (experiment / "train" / trial / "tensorboard").glob("events.out.tfevents.*")
        assert {"val/balanced_acc", "train/train_loss", "val/per_class_accuracy"} <= event_tags(event_file)

    # the exported config is the best trial's, at the full budget, and it trains
    cfg = load_config(experiment / "best_config.yaml")
    assert cfg.optim.lr == lr[ranked[0]] and cfg.optim.epochs == 4 and cfg.name == "retrain"
    assert cfg.storage_path == str(experiment)  # a retrain of it is recorded with the experiment
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1, 0
    session = LocalSession(tmp_path / "best")
    train(cfg, session)
    assert session.reports[-1]["epoch"] == 1
    summary = (experiment / "summary.txt").read_text()
    assert summary.splitlines()[0].startswith("trial") and "best checkpoint:" in summary


def test_an_interrupted_grid_search_keeps_its_checkpoints_and_resumes_from_the_bucket(ray_cluster, easy_dataset, s3,
                                                                                     tmp_path, capsys):
    """Ctrl-C (SIGINT) on a driver whose grid of 3 trials (num_samples 1) has one done: the search
    is reported as interrupted, nothing is pruned, and --resume --then-train completes it and
    retrains exactly the exported best config."""
    dataset = s3.uri("datasets/easy-tune")
    publish(Path(easy_dataset), dataset)
    epochs = 3  # trial length and full budget
    path = space_file(tmp_path, dataset, epochs=epochs, search={"optim": {"lr": {"grid": [0.02, 0.03, 0.04]}}},
                      scheduler={"max_t": epochs, "grace_period": epochs, "reduction_factor": 2}, num_samples=1,
                      max_concurrent_trials=1, storage_path=s3.uri("tune"),
                      resources={"workers": 1, "cpus_per_worker": 1, "trial_driver_cpus": 0.1})
    fs, experiment = s3.fs, f"{s3.bucket}/tune/search"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-m", "paco_ray.tune", str(path)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:  # interrupt the driver once the second trial has a registered checkpoint
        while time.time() < deadline:
            runs = sorted(subdirectories(fs, f"{experiment}/train")) if exists(fs, f"{experiment}/train") else []
            if len(runs) >= 2 and registered_epoch(fs, runs[1]) >= 1:
                break
            assert driver.poll() is None, "the search finished before it could be interrupted"
            time.sleep(0.2)
        else:
            pytest.fail("the second trial never registered a checkpoint")
    finally:
        driver.send_signal(signal.SIGINT)
        err = driver.communicate(timeout=120)[1]
    assert driver.returncode == 1 and "error: interrupted with 2 unfinished trials; continue with --resume" in err, \
        err[-3000:]
    assert not exists(fs, f"{experiment}/summary.txt")  # not summarised: nothing pruned
    registered = {run.rsplit("/", 1)[-1]: registered_epoch(fs, run) for run in runs}  # named by trial id
    before = trial_results(fs, experiment)
    finished = [t for t, rows in before.items() if max(r["epoch"] for r in rows) == epochs]
    assert finished, "no trial had finished before the interruption"

    assert tune_cli.main([str(path), "--resume", "--then-train"]) == 0
    out = capsys.readouterr().out
    after = trial_results(fs, experiment)
    assert len(after) == 3
    for trial, rows in after.items():
        seen = [r["epoch"] for r in rows]
        assert max(seen) == epochs
        if trial in finished:  # not run again
            assert seen == [r["epoch"] for r in before[trial]]
        else:  # resumed from its own last registered checkpoint, not from epoch 1 again (the report of an
            # epoch in flight at the interruption may never have reached Tune: its checkpoint did)
            assert seen.count(1) <= 1 and len(seen) - len(set(seen)) <= 1 and epochs in seen
            # a restored trial counts training_iteration from 1 again: its first epoch after the resume
            resumed_at = [r["epoch"] for r in rows if r["training_iteration"] == 1][-1]
            assert resumed_at >= registered.get(trial, 0) + 1, \
                f"trial {trial} had registered epoch {registered[trial]} but began again at {resumed_at}: {seen}"
    assert min(registered.values()) >= 1  # every trial started had a checkpoint to continue from
    # --then-train: exactly the exported best config, recorded with the experiment
    exported = yaml.safe_load(read(fs, f"{experiment}/best_config.yaml"))
    assert yaml.safe_load(read(fs, f"{experiment}/retrain/config.yaml")) == exported
    assert f"retraining best_config.yaml for {epochs} epochs, as exported (1 worker, global batch 16" in out
    assert any(p.rsplit("/", 1)[-1].startswith("checkpoint_") for p in subdirectories(fs, f"{experiment}/retrain"))
    summary = read(fs, f"{experiment}/summary.txt")
    assert f"retrained best_config.yaml for {epochs} epochs, as exported" in summary and "retrained best checkpoint:" in summary
    assert json.loads(read(fs, f"{experiment}/retrain/results.json"))["splits"]["test"]["balanced_acc"] >= 0
    # the checkpoint policy pruned objects in the bucket: the best checkpoint of each of the 2 best trials
    kept = [c for run in subdirectories(fs, f"{experiment}/train") for c in subdirectories(fs, run)
            if c.rsplit("/", 1)[-1].startswith("checkpoint_")]
    assert len(kept) == 2, kept
    assert "best_config.yaml" in read(fs, f"{experiment}/summary.txt")


def test_more_concurrent_trials_than_fit_are_capped_and_the_search_finishes(ray_cluster, easy_dataset, tmp_path,
                                                                           capsys):
    """Two trials of 1.85 CPU each on 2 CPUs: both trial drivers (0.1 CPU each) at once would leave
    1.8 CPU, less than one worker needs, and no trial would ever train."""
    path = space_file(tmp_path, easy_dataset, search={"optim": {"lr": {"grid": [0.02, 0.03]}}}, num_samples=1,
                      scheduler={"max_t": 1, "grace_period": 1, "reduction_factor": 2}, max_concurrent_trials=2,
                      resources={"workers": 1, "cpus_per_worker": 1.85, "trial_driver_cpus": 0.1})
    assert tune_cli.main([str(path), "--set", "base.optim.epochs=1"]) == 0
    captured = capsys.readouterr()
    assert "warning: max_concurrent_trials=2 but 1 trial(s) fit the cluster now; running 1 at once" in captured.err
    assert "2 trials in" in captured.out
