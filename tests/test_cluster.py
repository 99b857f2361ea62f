"""A real two-node Ray cluster on this machine (two `ray start` nodes, token auth, each with its
own node-local cache): DDP with one worker per node on a dataset in the S3 test bucket equals the
reference run on one node (conftest.uninterrupted, the local copy), each node downloads the dataset
once, checkpoints land in the shared storage, the project's metrics reach each node's Prometheus
endpoint, and the dashboard's REST API shows the job."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from paco_ray.checkpoint import load_state
from paco_ray.data.staging import DOWNLOAD_LOG, STAGE_DIR_ENV
from conftest import EPOCHS, final_state, forget_cluster, free_port, run_args, stop_processes
from pipelines.writer import publish

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class TwoNodes:
    address: str
    dashboard: str
    token: str
    metrics_ports: tuple[int, int]
    env: dict
    caches: tuple[Path, Path]  # each node's PACO_RAY_STAGE_DIR

    def rest(self, path: str):
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


@pytest.fixture(scope="module")
def two_nodes(ray_cluster):
    """Head (1 CPU) + one more node (1 CPU); the token is the one the session cluster wrote to HOME."""
    token = (Path(os.environ["HOME"]) / ".ray" / "auth_token").read_text().strip()
    temp = Path(tempfile.mkdtemp(prefix="prn", dir="/tmp"))  # short: Ray's socket paths are length-limited
    gcs, dashboard, client = free_port(), free_port(), free_port()
    metrics = (free_port(), free_port())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_metrics_report_interval_ms": "500",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--disable-usage-stats"]
    caches = (temp / "cache-head", temp / "cache-node2")
    try:
        subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--temp-dir={temp}/head",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        f"--ray-client-server-port={client}", f"--metrics-export-port={metrics[0]}",
                        f"--dashboard-agent-listen-port={free_port()}", *common],
                       env={**env, STAGE_DIR_ENV: str(caches[0])}, check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp}/node2",
                        f"--metrics-export-port={metrics[1]}", f"--dashboard-agent-listen-port={free_port()}",
                        *common], env={**env, STAGE_DIR_ENV: str(caches[1])}, check=True, capture_output=True,
                       timeout=180)
        yield TwoNodes(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", token, metrics, env, caches)
    finally:
        stop_processes([str(temp), f":{gcs}"])
        shutil.rmtree(temp, ignore_errors=True)
        forget_cluster(f":{gcs}")


PROM_LINE = re.compile(r"^(ray_paco_\w+)\{([^}]*)\} (\S+)$")


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """The project's gauges in a node's Prometheus text: (name, tags, value)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        match = PROM_LINE.match(line)
        if match:
            out.append((match[1], dict(re.findall(r'(\w+)="([^"]*)"', match[2])), float(match[3])))
    return out


def assert_kept_best_and_latest(run_dir: Path, keep: int, epochs: int) -> None:
    """Ray Train keeps the best ``keep`` checkpoints by the metric and always the latest one."""
    scores = {m["epoch"]: m["val_balanced_acc"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    kept = {load_state(p)["epoch"] for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    assert epochs in kept and len(scores) == epochs
    best = kept - {epochs} if len(kept) > keep else kept
    assert len(best) == keep and len(kept) <= keep + 1, (kept, scores)
    assert min(scores[e] for e in best) >= max((s for e, s in scores.items() if e not in kept), default=-1), (kept, scores)


def test_two_node_ddp_equals_one_node_and_is_observable(uninterrupted, two_nodes, tiny_dataset, s3, tmp_path):
    shared = tmp_path / "shared"  # one path both nodes see: the cluster's shared storage
    bucket_copy = s3.uri("datasets/tiny-two-nodes")
    publish(Path(tiny_dataset), bucket_copy)  # the upload step of a pipeline writing to the bucket
    driver = subprocess.Popen(
        [sys.executable, "-m", "paco_ray.train", *run_args(bucket_copy, shared, "two-nodes",
                                                          "--set", "placement_strategy=STRICT_SPREAD",
                                                          "--set", "keep_checkpoints=2")],
        env={**two_nodes.env, "RAY_ADDRESS": two_nodes.address}, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[tuple[int, str, str], float] = {}  # (metrics port, worker, gauge) -> last value
    deadline = time.time() + 400
    while driver.poll() is None and time.time() < deadline:
        for port in two_nodes.metrics_ports:
            for name, tags, value in scrape(port):
                if tags.get("trial") == "two-nodes":
                    seen[(port, tags["worker"], name)] = value
        time.sleep(0.5)
    output = driver.communicate(timeout=60)[0]
    assert driver.returncode == 0, output[-3000:]

    # one worker on each node, and the workers on the two nodes reached their own node's exporter
    nodes = {n["raylet"]["nodeId"] for n in two_nodes.rest("/nodes?view=summary")["data"]["summary"]}
    actors = two_nodes.rest("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(nodes) == 2 and {a["node_id"] for a in workers} == nodes
    by_port = {port: {w for (p, w, _) in seen if p == port} for port in two_nodes.metrics_ports}
    assert sorted(w for ws in by_port.values() for w in ws) == ["0", "1"], by_port
    assert all(len(ws) == 1 for ws in by_port.values())  # each node exports exactly its own worker
    for (port, worker, name), value in seen.items():
        if name == "ray_paco_images_per_s":
            assert value > 0
        elif name.startswith("ray_paco_val_"):
            assert 0 <= value <= 100
        elif name == "ray_paco_lr":
            assert 0 <= value <= 0.1
        elif name == "ray_paco_queue_fill":
            assert 0 < value <= 1
    assert {name for (_, _, name) in seen} >= {"ray_paco_images_per_s", "ray_paco_train_loss", "ray_paco_lr",
                                               "ray_paco_queue_fill", "ray_paco_epoch", "ray_paco_val_top1",
                                               "ray_paco_val_balanced_acc"}

    # the dashboard's REST API lists the training job
    jobs = two_nodes.rest("/api/jobs/")
    assert any(j["type"] == "DRIVER" and "paco_ray.train" in (j.get("entrypoint") or "")
               and j["status"] == "SUCCEEDED" for j in jobs)

    # each node staged the dataset into its own cache, once
    logs = [list(cache.glob(f"*/{DOWNLOAD_LOG}")) for cache in two_nodes.caches]
    assert [len(found) for found in logs] == [1, 1], logs
    assert [len(found[0].read_text().splitlines()) for found in logs] == [1, 1]

    # checkpoints in the shared storage path: the best keep_checkpoints (2) by val balanced
    # accuracy plus the latest, whichever epochs those are; the same seed on one node (the session
    # cluster's reference run, local data) gives the same model
    assert_kept_best_and_latest(shared / "two-nodes", keep=2, epochs=EPOCHS)
    two, one = final_state(shared / "two-nodes"), final_state(uninterrupted[0])
    assert two["epoch"] == one["epoch"] == EPOCHS
    for key, tensor in one["model"].items():
        assert torch.equal(tensor, two["model"][key]), key
    assert two["metrics"]["val_balanced_acc"] == one["metrics"]["val_balanced_acc"]
    assert two["metrics"]["train_loss"] == one["metrics"]["train_loss"]
    per_node = {p: v for (p, _, n), v in seen.items() if n == "ray_paco_images_per_s"}
    print(f"\ntwo nodes: {per_node} img/s per node (last epoch gauge); epoch time two-node "
          f"{two['metrics']['epoch_time_s']:.2f} s vs one-node {one['metrics']['epoch_time_s']:.2f} s")
