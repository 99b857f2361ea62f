"""Ray Train end to end: the CLI trains 2 DDP workers (gloo, CPU) and reports checkpoints."""
from pathlib import Path

import pytest

from paco_ray import evaluate as evaluate_cli
from paco_ray import train as train_cli
from paco_ray.checkpoint import load_state
from paco_ray.data.prepared import PreparedDataset

pytestmark = pytest.mark.ray


def test_two_worker_run_reports_metrics_and_checkpoints(ray_cluster, tiny_dataset, tmp_path, capsys):
    storage = tmp_path / "runs"
    args = ["--workers", "2", "--set", f"data.path={tiny_dataset}", "--set", "data.batch_size=16",
            "--set", "optim.epochs=2", "--set", "paco.queue_size=37", "--set", "cpus_per_worker=0.5",
            "--set", f"storage_path={storage}", "--set", "name=two-workers", "--set", "keep_checkpoints=5"]
    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "two-workers: loss=paco, 2 epochs, 2 workers" in out
    assert "val " in out and "test " in out and "balanced_acc" in out

    checkpoints = sorted(p for p in Path(storage, "two-workers").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    states = [load_state(c) for c in checkpoints]
    assert sorted(s["epoch"] for s in states) == [1, 2]
    metrics = max(states, key=lambda s: s["epoch"])["metrics"]
    n_train = PreparedDataset.open(tiny_dataset).size("train")
    # the two workers' shards are disjoint and together cover the split (but the drop_last tail)
    assert metrics["train_duplicate_samples"] == 0
    assert metrics["train_samples"] == (n_train // 16) * 16
    assert 0 <= metrics["val_balanced_acc"] <= 100 and metrics["queue_fill"] > 0

    assert evaluate_cli.main([str(checkpoints[-1]), "--split", "test", "--per-class"]) == 0
    report = capsys.readouterr().out
    assert report.startswith("split") and "Ankle boot" in report


def test_too_many_workers_for_the_cluster_fail_fast(ray_cluster, tiny_dataset, tmp_path, capsys):
    assert train_cli.main(["--workers", "4", "--set", f"data.path={tiny_dataset}",
                           "--set", f"storage_path={tmp_path}", "--set", "data.batch_size=16"]) == 2
    assert "workers: 4 workers x 1 CPU exceed the cluster's 2 CPU" in capsys.readouterr().err


def test_strict_spread_needs_a_node_per_worker(ray_cluster, tiny_dataset, tmp_path, capsys):
    assert train_cli.main(["--workers", "2", "--set", f"data.path={tiny_dataset}", "--set", f"storage_path={tmp_path}",
                           "--set", "placement_strategy=STRICT_SPREAD", "--set", "cpus_per_worker=0.5"]) == 2
    assert "placement_strategy: STRICT_SPREAD puts each of the 2 workers on its own node but the cluster has 1" \
        in capsys.readouterr().err


def test_bad_dataset_path_fails_in_the_driver_with_one_line(ray_cluster, tmp_path, capsys):
    assert train_cli.main(["--set", f"data.path={tmp_path / 'nowhere'}", "--set", f"storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.path:") and "nowhere is not a directory" in err and "\n" not in err
