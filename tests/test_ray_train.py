"""Ray Train end to end: the CLI trains 2 DDP workers (gloo, CPU) and reports checkpoints; a worker
killed mid-epoch is restarted from the last checkpoint and ends with the uninterrupted run's weights."""
import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from paco_ray import evaluate as evaluate_cli
from paco_ray import train as train_cli
from paco_ray.checkpoint import load_state
from paco_ray.data.prepared import PreparedDataset
from paco_ray.faults import KILL_WORKER_ENV
from conftest import BATCH, EPOCHS, run_args

pytestmark = pytest.mark.ray

def checkpoints(run_dir: Path) -> list[dict]:
    """Every checkpoint of a run, in the order written."""
    return [load_state(c) for c in sorted(run_dir.glob("checkpoint_*")) if c.is_dir()]


def last_state(run_dir: Path) -> dict:
    return max(checkpoints(run_dir), key=lambda s: s["epoch"])


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def digest(run_dir: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def kill_step(dataset, epoch, step):
    """The global step of (1-based) ``step`` in (1-based) ``epoch``."""
    return (epoch - 1) * (PreparedDataset.open(dataset).size("train") // BATCH) + step


def test_two_worker_run_reports_metrics_and_checkpoints(uninterrupted, tiny_dataset, capsys):
    run_dir, out = uninterrupted
    assert f"uninterrupted: loss=paco, {EPOCHS} epochs, 2 workers" in out
    assert "val " in out and "test " in out and "balanced_acc" in out

    states = checkpoints(run_dir)
    assert [s["epoch"] for s in states] == list(range(1, EPOCHS + 1))
    metrics = states[-1]["metrics"]
    n_train = PreparedDataset.open(tiny_dataset).size("train")
    # the two workers' shards are disjoint and together cover the split (but the drop_last tail)
    assert metrics["train_duplicate_samples"] == 0
    assert metrics["train_samples"] == (n_train // BATCH) * BATCH
    assert 0 <= metrics["val_balanced_acc"] <= 100 and metrics["queue_fill"] > 0

    # the cluster's auth token reaches no file of the run (checkpoints, TensorBoard, Ray's records)
    token = (Path(os.environ["HOME"]) / ".ray" / "auth_token").read_bytes().strip()
    assert len(token) >= 16 and token not in out.encode()
    assert not [p for p in run_dir.rglob("*") if p.is_file() and token in p.read_bytes()]

    last = sorted(c for c in run_dir.glob("checkpoint_*") if c.is_dir())[-1]
    assert evaluate_cli.main([str(last), "--split", "test", "--per-class"]) == 0
    report = capsys.readouterr().out
    assert report.startswith("split") and "Ankle boot" in report


def test_killed_worker_restarts_from_the_last_checkpoint_and_matches_the_uninterrupted_run(
        uninterrupted, tiny_dataset, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(KILL_WORKER_ENV, f"1:{kill_step(tiny_dataset, 3, 3)}:{marker}")  # rank 1, mid epoch 3
    assert train_cli.main(run_args(tiny_dataset, tmp_path, "killed", "--set", "max_failures=1")) == 0
    assert marker.exists(), "the worker was never killed"

    epochs = Counter(s["epoch"] for s in checkpoints(tmp_path / "killed"))
    assert set(epochs) == set(range(1, EPOCHS + 1))
    assert epochs[1] == 1, "the restart began from scratch, not from the last checkpoint"
    # the epoch in flight is redone; a report made just before the kill may be redone too
    assert sum(epochs.values()) - EPOCHS <= 1, f"more than one epoch recomputed: {dict(epochs)}"
    assert_same_weights(last_state(tmp_path / "killed")["model"], last_state(uninterrupted[0])["model"])


def test_a_run_out_of_restarts_fails_in_one_line_and_resumes_when_run_again(
        uninterrupted, tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KILL_WORKER_ENV, f"1:{kill_step(tiny_dataset, 3, 2)}:{tmp_path / 'killed-once'}")
    args = run_args(tiny_dataset, tmp_path, "lost")
    assert train_cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: training failed (max_failures: 0): worker 1 died " \
                  "(its process exited or stopped answering health checks)"
    run_dir = tmp_path / "lost"
    assert sorted(s["epoch"] for s in checkpoints(run_dir)) == [1, 2]  # finished epochs stay on disk
    before = digest(run_dir)

    # resuming it with other training settings is refused by the workers, in one line, writing nothing
    assert train_cli.main(args + ["--set", "paco.alpha=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: training failed (max_failures: 0): worker 0: CheckpointError: "
                                              "checkpoint was trained with other settings: paco.alpha")
    assert {k: v for k, v in digest(run_dir).items() if "/checkpoint_" in k} == \
        {k: v for k, v in before.items() if "/checkpoint_" in k}

    # the same command again resumes from the last checkpoint Ray registered (epoch 2, or epoch 1
    # when the kill came within Ray's 2 s poll of the epoch-2 report) and ends where the
    # uninterrupted run ended
    assert train_cli.main(args) == 0
    epochs = Counter(s["epoch"] for s in checkpoints(run_dir))
    assert set(epochs) == set(range(1, EPOCHS + 1)) and epochs[1] == 1 and sum(epochs.values()) - EPOCHS <= 1
    assert_same_weights(last_state(run_dir)["model"], last_state(uninterrupted[0])["model"])


def test_too_many_workers_for_the_cluster_fail_fast(ray_cluster, tiny_dataset, tmp_path, capsys):
    assert train_cli.main(["--workers", "4", "--set", f"data.path={tiny_dataset}",
                           "--set", f"storage_path={tmp_path}", "--set", "data.batch_size=16"]) == 2
    assert "workers: 4 workers x {CPU: 1} exceed what the cluster can hold (2): node " in capsys.readouterr().err


def test_strict_spread_needs_a_node_per_worker(ray_cluster, tiny_dataset, tmp_path, capsys):
    assert train_cli.main(["--workers", "2", "--set", f"data.path={tiny_dataset}", "--set", f"storage_path={tmp_path}",
                           "--set", "placement_strategy=STRICT_SPREAD", "--set", "cpus_per_worker=0.5"]) == 2
    assert "placement_strategy: STRICT_SPREAD puts each of the 2 workers on its own node but the cluster has 1 " \
        "that hold one ({CPU: 0.5})" in capsys.readouterr().err


def test_bad_dataset_path_fails_in_the_driver_with_one_line(ray_cluster, tmp_path, capsys):
    assert train_cli.main(["--set", f"data.path={tmp_path / 'nowhere'}", "--set", f"storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.path:") and "nowhere is not a directory" in err and "\n" not in err
