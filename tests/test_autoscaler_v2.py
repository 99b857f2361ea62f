"""Runs on Ray's autoscaler v2 (``RAY_enable_autoscaler_v2=1``, KubeRay's default) on the
``fake_multinode`` provider with an IP per node: a run that waits for the node it needs, a
request no node type holds refused at once, a driver that cannot read the node types (the
autoscaler's config out of its reach, as from another container) starting and ended by the
autoscaler's own infeasibility report, and a launch the cloud refuses."""
import re
import subprocess
import sys
import time

import pytest
import yaml

from conftest import (FAKE_HEAD_NODE_ID, NO_CAPACITY_TYPE, REPO, autoscaling_cluster_running, capacity_seen_by_a_driver,
                      cluster_train)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def v2_cluster(ray_cluster, s3):
    with autoscaling_cluster_running(v2=True) as cluster:
        yield cluster


def base_args(dataset, storage) -> list[str]:
    return ["--workers", "1", "--set", f"data.path={dataset}", "--set", "data.loader=torch", "--set",
            "data.batch_size=16", "--set", f"storage_path={storage}", "--set", "progress_every_s=1",
            "--set", "paco.queue_size=37", "--set", "optim.warmup_epochs=0"]


def test_a_run_waits_for_the_v2_autoscalers_node_and_completes(v2_cluster, tiny_dataset, tmp_path):
    cluster = v2_cluster
    assert cluster.worker_node_ids() == []
    done = cluster_train(cluster, *base_args(tiny_dataset, tmp_path), "--set", "cpus_per_worker=2",
                         "--set", "optim.epochs=1", "--set", "name=v2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "waiting for the autoscaler: 1 x {CPU: 2} pending (0 of 1 placed, " in done.stdout
    assert "the autoscaler is launching 1 gpu_small" in done.stdout
    seen = capacity_seen_by_a_driver(cluster)
    (added,) = set(seen["ips"]) - {FAKE_HEAD_NODE_ID}
    assert seen["ips"][added].startswith("127.0.0.") and seen["ips"][added] != added
    # node types as v2 keys them: by node id (its ray_node_type_name); the IP is not the id
    assert seen["types_by_node_id"][added] == "gpu_small" and seen["types_by_node_id"][FAKE_HEAD_NODE_ID] \
        == "ray.head.default", seen
    assert seen["up"] == {"ray.head.default": 1, "gpu_small": 1} and seen["source"].startswith("the autoscaler's config")


def test_what_no_node_type_of_the_v2_autoscaler_holds_is_refused_at_once(v2_cluster, tiny_dataset, tmp_path):
    started = time.time()
    done = cluster_train(v2_cluster, *base_args(tiny_dataset, tmp_path), "--set", "cpus_per_worker=100")
    assert done.returncode == 2 and time.time() - started < 120, done.stdout[-2000:] + done.stderr[-2000:]
    # (a node an earlier test added may still be up: "N up")
    assert re.fullmatch(
        r"error: workers: one worker needs \{CPU: 100\} but no node type has that much CPU: gpu_large \{GPU: 4, CPU: "
        r"24\} \(up to 2, \d up\); gpu_small \{GPU: 1, CPU: 2\} \(up to 2, \d up\); gpu_xlarge \{GPU: 8, CPU: 64\} "
        r"\(up to 1, 0 up\); ray.head.default \{CPU: 1\}; at most 2 worker nodes \(from the autoscaler's config "
        + re.escape(str(v2_cluster.config_path)) + r"\)", done.stderr.strip()), done.stderr

    # a node_types file that contradicts the running autoscaler is said once; the running one is used
    declared = yaml.safe_load(v2_cluster.config_path.read_text())
    declared["available_node_types"]["gpu_small"]["max_workers"] = 5
    (tmp_path / "declared.yaml").write_text(yaml.safe_dump(declared))
    again = cluster_train(v2_cluster, *base_args(tiny_dataset, tmp_path), "--set", "cpus_per_worker=100",
                          "--set", f"node_types={tmp_path / 'declared.yaml'}")
    warning, error = again.stderr.strip().splitlines()
    assert warning == (f"warning: node_types differs from the running autoscaler's (gpu_small: {{'CPU': 2.0, 'GPU': 1.0}} "
                       f"up to 5 in {tmp_path / 'declared.yaml'}, {{'CPU': 2.0, 'GPU': 1.0}} up to 2 in the autoscaler's "
                       f"config {v2_cluster.config_path}); using the running autoscaler's"), again.stderr
    assert error == done.stderr.strip() and again.returncode == 2


def without_the_config(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m paco_ray.train`` in a mount namespace of its own where the autoscaler's config
    directory is an empty tmpfs: the driver sees the autoscaler's monitor but cannot read its
    config, as a driver in another container cannot."""
    hide = f'mount -t tmpfs tmpfs {cluster.config_path.parent} && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", hide, "sh", sys.executable, "-m", "paco_ray.train", *args],
                          env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_without_node_types_a_run_starts_and_the_v2_autoscalers_report_ends_it(v2_cluster, tiny_dataset, tmp_path):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("unshare --mount needs CAP_SYS_ADMIN here")
    started = time.time()
    done = without_the_config(v2_cluster, *base_args(tiny_dataset, tmp_path), "--set", "cpus_per_worker=100",
                              "--set", "node_wait_s=300", "--set", "node_infeasible_s=5")
    elapsed = time.time() - started
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: the cluster's node types are unknown here (no node_types key, no cluster config in "
                     f"Ray's GCS, the autoscaler's config {v2_cluster.config_path} cannot be read here "
                     "(FileNotFoundError), not in a KubeRay pod): starting without a capacity check; the autoscaler "
                     "decides whether the workers can be placed"], done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: training failed (max_failures: 0): the 1 workers ({CPU: 100} each) can never be placed: the "
        "autoscaler reports 1 x {CPU: 100} infeasible (no node type it may launch holds them), reported for "), errors
    assert "ending this attempt: the autoscaler reports 1 x {CPU: 100} infeasible" in done.stdout
    print(f"autoscaler v2's infeasibility report ended the wait after {elapsed:.0f} s (node_wait_s=300)")
    assert elapsed < 200  # far from node_wait_s


def test_a_launch_the_cloud_refuses_is_reported_under_v2(v2_cluster, tiny_dataset, tmp_path):
    """v2 reports each failed launch (Ray 2.60's adapter of v1 providers drops the cloud's
    reason, so the line says the autoscaler gives none)."""
    done = cluster_train(v2_cluster, "--workers", "1", "--set", "cpus_per_worker=40", "--set", f"data.path={tiny_dataset}",
                         "--set", f"storage_path={tmp_path}", "--set", "data.batch_size=16", "--set", "node_wait_s=20",
                         "--set", "progress_every_s=1", timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: training failed (max_failures: 0): the 1 workers ({CPU: 40} each) were not placed within "
        f"node_wait_s=20 s; launching {NO_CAPACITY_TYPE} failed "), errors
    assert errors[0].endswith("time(s): the autoscaler gives no reason"), errors
    assert f"launching {NO_CAPACITY_TYPE} failed " in done.stdout
