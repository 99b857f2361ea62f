"""The shipped cluster's flow on Ray's own autoscaler v1 (the ``fake_multinode`` provider with an
IP per node, node types derived from cluster.yaml, no worker node at the start): runs that wait
for the nodes they need, requests that can never fit refused at once, a launch the cloud refuses,
a node lost mid-run, and a search submitted as a Ray job, stopped and resumed. One autoscaling
cluster for all of them (conftest.autoscaling_cluster); autoscaler v2 in test_autoscaler_v2.py."""
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from conftest import (FAKE_HEAD_NODE_ID, NO_CAPACITY, NO_CAPACITY_TYPE, REPO, capacity_seen_by_a_driver, cluster_train,
                      downloads_per_node, final_state, run_args, wait_until)
from pipelines.writer import publish

pytestmark = pytest.mark.ray
EPOCHS = 4


@pytest.fixture(scope="module")
def bucket_data(s3, tiny_dataset):
    uri = s3.uri("datasets/tiny-autoscaling")
    publish(Path(tiny_dataset), uri)
    return uri


def test_a_run_waits_for_the_autoscaler_and_ends_as_on_a_static_cluster(autoscaling_cluster, uninterrupted,
                                                                         bucket_data, tmp_path):
    cluster = autoscaling_cluster
    assert cluster.worker_node_ids() == []  # the cluster starts with its head only
    # STRICT_SPREAD: worker 1 needs a second node, which only the autoscaler can add
    done = cluster_train(cluster, *run_args(bucket_data, tmp_path, "autoscaled", "--set", "cpus_per_worker=1",
                                    "--set", "placement_strategy=STRICT_SPREAD", "--set", "progress_every_s=1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "waiting for the autoscaler: 2 x {CPU: 1} pending (0 of 2 placed," in done.stdout + done.stderr
    waited = re.findall(r"waiting for the autoscaler: .* placed, (?:(\d+)m)?(\d+)s\)", done.stdout + done.stderr)
    print(f"the autoscaler's nodes: the workers waited {max(int(m or 0) * 60 + int(s) for m, s in waited)} s")

    reference = final_state(uninterrupted[0])
    state = final_state(tmp_path / "autoscaled")
    assert state["epoch"] == reference["epoch"] == EPOCHS
    different = [k for k in reference["model"] if not torch.equal(reference["model"][k], state["model"][k])]
    assert not different, different[:5]
    # the dataset in the bucket was staged once on each node that trained: the head and the one added
    per_node = downloads_per_node(cluster)
    assert sorted(per_node.values()) == [1, 1] and FAKE_HEAD_NODE_ID in per_node, per_node
    (added,) = set(per_node) - {FAKE_HEAD_NODE_ID}
    # idle, the added node is removed again (idle_timeout_minutes)
    wait_until(lambda: added not in cluster.worker_node_ids(), 120, "the idle node to be removed", every=2)


def test_what_can_never_fit_is_refused_at_once_naming_the_resource_and_the_node_types(
        autoscaling_cluster, tiny_dataset, tmp_path):
    cluster = autoscaling_cluster
    base = ["--set", f"data.path={tiny_dataset}", "--set", f"storage_path={tmp_path}", "--set", "data.batch_size=16"]
    started = time.time()
    big = cluster_train(cluster, "--workers", "1", "--set", "cpus_per_worker=100", *base)
    spread = cluster_train(cluster, "--workers", "4", "--set", "placement_strategy=STRICT_SPREAD", *base)
    assert time.time() - started < 120  # no wait for nodes: refused before any worker starts
    for done in (big, spread):
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    big_line = [line for line in big.stderr.splitlines() if line.startswith("error:")]
    assert big_line == [big_line[0]] and "one worker needs {CPU: 100} but no node type has that much CPU" \
        in big_line[0] and "gpu_small {GPU: 1, CPU: 2}" in big_line[0] and "gpu_large {GPU: 4, CPU: 24}" in big_line[0]
    assert "STRICT_SPREAD puts each of the 4 workers on its own node but the cluster may have 3 that hold one" \
        in spread.stderr


def test_a_launch_the_cloud_refuses_is_reported_with_its_reason(autoscaling_cluster, tiny_dataset, tmp_path):
    """A worker of 40 CPUs: only NO_CAPACITY_TYPE holds it, and the provider fails
    every launch of it as a cloud without capacity does. The autoscaler tries; the waiting line
    and the run's one-line error give the cloud's reason."""
    cluster = autoscaling_cluster
    done = cluster_train(cluster, "--workers", "1", "--set", "cpus_per_worker=40", "--set", f"data.path={tiny_dataset}", "--set", f"storage_path={tmp_path}",
                 "--set", "data.batch_size=16", "--set", "node_wait_s=20", "--set", "progress_every_s=1", timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    reason = f"launching {NO_CAPACITY_TYPE} failed: {NO_CAPACITY[0]}: {NO_CAPACITY[1]}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training failed (max_failures: 0): the 1 workers ({CPU: 40} each) were not "
                      f"placed within node_wait_s=20 s; {reason}"], done.stdout[-3000:] + done.stderr[-2000:]
    assert "waiting for the autoscaler: 1 x {CPU: 40} pending (0 of 1 placed, " in done.stdout
    assert reason in done.stdout


def worker_nodes_of_run(cluster) -> set[str]:
    actors = cluster.rest("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    return {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"}


def kill_node(node_id: str) -> int:
    """SIGKILL every process of a fake node (raylet, agents, workers), as when a spot instance is
    reclaimed; the autoscaler notices the missing heartbeats and terminates it."""
    killed = 0
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                process.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return killed


def run_and_lose_a_node(cluster, s3, args: list[str], run: str, freeze_at: int,
                        marker: Path) -> tuple[subprocess.CompletedProcess, str]:
    """Start a training driver whose worker stops training at global step ``freeze_at`` (the drill's
    ``hold``, once per ``marker``), then kill that worker's node once the run registered its
    checkpoint of the epoch before; returns (the finished driver, the lost node's id). However
    fast the machine, the node is lost at that step."""
    from conftest import registered_epoch
    from paco_ray.faults import KILL_WORKER_ENV

    env = {**cluster.env, KILL_WORKER_ENV: f"0:{freeze_at}:{marker}:hold"}
    driver = subprocess.Popen([sys.executable, "-m", "paco_ray.train", *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (marker.exists() and registered_epoch(s3.fs, run) >= 1) or driver.poll() is not None,
                   300, "the held worker's registered checkpoint", every=0.2)
        assert driver.poll() is None, "the run ended before its node could be lost"
        (node,) = worker_nodes_of_run(cluster)
        check_types_keyed_by_ip(cluster, node)
        epoch, killed = registered_epoch(s3.fs, run), time.time()
        assert epoch == 1 and node != FAKE_HEAD_NODE_ID and kill_node(node) > 0
        wait_until(lambda: registered_epoch(s3.fs, run) > epoch or driver.poll() is not None, 600,
                   "the run to go on", every=0.2)
        print(f"node lost: {time.time() - killed:.0f} s from the kill to the next checkpoint (or the run's end)")
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    return subprocess.CompletedProcess(args, driver.returncode, out, err), node


def check_types_keyed_by_ip(cluster, node: str) -> None:
    """A driver counts the worker's node as the type Ray's autoscaler gives it: by the node's IP
    (v1's key), which is not its id."""
    seen = capacity_seen_by_a_driver(cluster)
    ip = seen["ips"][node]
    assert ip.startswith("127.0.0.") and ip != node
    node_type = seen["types_by_ip"][ip]
    assert seen["up"] == {"ray.head.default": 1, node_type: 1} and seen["source"].startswith("the autoscaler's config"), \
        seen


def checkpoint_epochs(s3, run: str) -> Counter:
    from paco_ray.storage import subdirectories

    return Counter(int(p.rsplit("_", 1)[1]) for p in subdirectories(s3.fs, run) if "/checkpoint_epoch_" in p)


def test_a_node_lost_mid_run_is_replaced_or_named_and_the_run_goes_on(autoscaling_cluster, bucket_data, tiny_dataset,
                                                                       s3, tmp_path):
    from paco_ray.data.prepared import PreparedDataset

    cluster, epochs = autoscaling_cluster, EPOCHS
    first_of_epoch_2 = PreparedDataset.open(tiny_dataset).size("train") // 16 + 1
    common = ["--workers", "1", "--set", f"data.path={bucket_data}", "--set", "data.loader=torch",
              "--set", "data.batch_size=16", "--set", f"optim.epochs={epochs}", "--set", "cpus_per_worker=2",
              "--set", "keep_checkpoints=10", "--set", f"storage_path={s3.uri('lost')}", "--set", "progress_every_s=1"]
    # max_failures 1: the worker group restarts on a replacement node from the last checkpoint in the bucket
    staged_before = set(downloads_per_node(cluster))  # nodes of earlier tests, removed since, left their caches
    done, lost = run_and_lose_a_node(cluster, s3, [*common, "--set", "name=replaced", "--set", "max_failures=1"],
                                     f"{s3.bucket}/lost/replaced", first_of_epoch_2, tmp_path / "held-replaced")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = checkpoint_epochs(s3, f"{s3.bucket}/lost/replaced")
    assert seen == Counter(range(1, epochs + 1)), seen  # epoch 2 was in flight: redone, registered once
    per_node = {n: count for n, count in downloads_per_node(cluster).items() if n not in staged_before}
    print(f"downloads per node: {per_node}")
    replacements = [n for n in per_node if n not in (lost, FAKE_HEAD_NODE_ID)]
    assert per_node.get(lost) == 1 and len(replacements) == 1 and per_node[replacements[0]] == 1, per_node

    # max_failures 0: one line names the lost node; the same command again resumes and completes
    args = [*common, "--set", "name=named"]
    done, lost = run_and_lose_a_node(cluster, s3, args, f"{s3.bucket}/lost/named", first_of_epoch_2,
                                     tmp_path / "held-named")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: training failed (max_failures: 0): worker 0 died: its node {lost} was lost"], \
        done.stderr[-3000:]
    before = checkpoint_epochs(s3, f"{s3.bucket}/lost/named")
    assert before == Counter([1]), before  # the worker was held at the first step of epoch 2
    again = cluster_train(cluster, *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming at epoch 2" in again.stdout
    after = checkpoint_epochs(s3, f"{s3.bucket}/lost/named")
    assert set(after) == set(range(1, epochs + 1)) and all(after[e] == 1 for e in before), (before, after)


def search_space(tmp_path: Path, data: str, name: str, max_t: int) -> Path:
    import yaml

    space = {
        "base": {"data": {"path": data, "loader": "torch", "batch_size": 16}, "paco": {"queue_size": 37},
                 "optim": {"epochs": max_t, "warmup_epochs": 0}, "progress_every_s": 0.001},
        "search": {"optim": {"lr": {"grid": [0.02, 0.03]}}},
        "scheduler": {"max_t": max_t, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 1, "max_concurrent_trials": 2,
        "resources": {"workers": 1, "cpus_per_worker": 2, "trial_driver_cpus": 0.1},  # a node per trial
        "storage_path": str(tmp_path / "runs"), "name": name,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def job(cluster, *args: str, check: bool = True) -> str:
    """A `ray job` command against the cluster's dashboard (token auth), its output."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    done = subprocess.run([ray_bin, "job", args[0], "--address", cluster.dashboard, *args[1:]], env=cluster.env,
                          capture_output=True, text=True, timeout=600)
    assert not check or done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def jobs_client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})


def job_status(cluster, job_id: str) -> str:
    return str(jobs_client(cluster).get_job_status(job_id).value)


def wait_for_job(cluster, job_id: str, timeout: float = 600) -> str:
    finished = ("SUCCEEDED", "FAILED", "STOPPED")
    return wait_until(lambda: (lambda s: s if s in finished else None)(job_status(cluster, job_id)), timeout,
                      f"job {job_id}", every=3)


def tune_entrypoint(space: Path, *extra: str) -> list[str]:
    return ["--", sys.executable, "-m", "paco_ray.tune", str(space), *extra]


@pytest.fixture
def jobs_stopped_after(autoscaling_cluster):
    """Stops, after the test, every job it left running: a failed test leaves the cluster's nodes free."""
    from ray.job_submission import JobStatus

    yield
    for details in jobs_client(autoscaling_cluster).list_jobs():
        if details.submission_id and details.status in (JobStatus.PENDING, JobStatus.RUNNING):
            job(autoscaling_cluster, "stop", details.submission_id, check=False)


def test_a_search_submitted_as_a_ray_job_runs_on_added_nodes_and_a_stopped_one_resumes(
        autoscaling_cluster, bucket_data, tmp_path, jobs_stopped_after):
    """Two concurrent trials of one 2-CPU worker each on a head of 1 CPU: each trains on a node the
    autoscaler adds for it; `ray job stop` mid-way leaves an experiment that --resume completes."""
    from conftest import registered_epoch
    from paco_ray.storage import exists, filesystem, subdirectories

    cluster = autoscaling_cluster
    # an idle node left by an earlier test would hold a staged copy already: start from the head alone
    wait_until(lambda: cluster.worker_node_ids() == [], 120, "the idle nodes of earlier tests to be removed", every=2)
    before = set(downloads_per_node(cluster))
    space = search_space(tmp_path, bucket_data, "stopped", max_t=4)
    job(cluster, "submit", "--no-wait", "--submission-id", "paco-stopped", *tune_entrypoint(space))
    fs, experiment = filesystem(str(tmp_path / "runs" / "stopped"))

    def both_trials_registered() -> bool:
        train = f"{experiment}/train"
        epochs = [registered_epoch(fs, run) for run in subdirectories(fs, train)] if exists(fs, train) else []
        return len(epochs) == 2 and min(epochs) >= 1

    try:
        wait_until(both_trials_registered, 400, "a checkpoint of both trials")
    except BaseException:
        print(job(cluster, "logs", "paco-stopped", check=False)[-6000:])
        raise
    added = set(downloads_per_node(cluster)) - before - {FAKE_HEAD_NODE_ID}
    assert len(added) == 2, downloads_per_node(cluster)  # each trial trains on a node added for it
    drivers = trial_driver_nodes(cluster)
    assert len(drivers) == 2 and set(drivers.values()) == {FAKE_HEAD_NODE_ID}, drivers  # the trial drivers stay on the head
    logs = job(cluster, "logs", "paco-stopped")
    assert "waiting for the autoscaler: 1 x {CPU: 2} pending" in logs
    assert " step " in logs and "img/s" in logs and "val balanced" in logs

    job(cluster, "stop", "paco-stopped")
    assert wait_for_job(cluster, "paco-stopped") == "STOPPED"
    assert not (tmp_path / "runs" / "stopped" / "summary.txt").exists()
    registered = {run.rsplit("/", 1)[1]: registered_epoch(fs, run) for run in subdirectories(fs, f"{experiment}/train")}
    assert all(epoch >= 1 for epoch in registered.values()), registered
    job(cluster, "submit", "--no-wait", "--submission-id", "paco-resumed", *tune_entrypoint(space, "--resume"))
    try:
        assert wait_for_job(cluster, "paco-resumed") == "SUCCEEDED"
    except BaseException:
        print(job(cluster, "logs", "paco-resumed", check=False)[-6000:])
        raise
    resumed_logs = job(cluster, "logs", "paco-resumed")
    assert "best trial" in resumed_logs
    rows = [json.loads(line) for f in (tmp_path / "runs" / "stopped").glob("run_trial_*/result.json")
            for line in f.read_text().splitlines() if line.strip()]
    trials = {r["trial_id"] for r in rows}
    assert len(trials) == 2 and all(max(r["epoch"] for r in rows if r["trial_id"] == t) >= 1 for t in trials)
    assert (tmp_path / "runs" / "stopped" / "summary.txt").is_file()
    # resumed, not restarted: each trial went on from its registered checkpoint, so no epoch it had
    # registered before the stop was reported to Tune a second time
    assert set(registered) == trials
    for trial, epoch in registered.items():
        reported = Counter(r["epoch"] for r in rows if r["trial_id"] == trial)
        assert epoch >= 1 and all(reported[e] == 1 for e in range(1, epoch + 1)), (trial, epoch, reported)


def trial_driver_nodes(cluster) -> dict[str, str]:
    """{actor id: node id} of the live Tune trial actors (the trial drivers)."""
    actors = cluster.rest("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    return {a["actor_id"]: a["node_id"] for a in actors if a["class_name"] == "ImplicitFunc" and a["state"] == "ALIVE"}
