"""Shared fixtures: a tiny Fashion-MNIST in its real IDX layout, tiny configs, one Ray cluster."""
import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from paco_ray.config import load_config
from paco_ray.data.idx import write_idx


def make_fashion_root(root, per_class=30, test_per_class=4):
    """A tiny dataset in the exact IDX layout of Fashion-MNIST; pixel (0, 0) holds the label."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    test_labels = np.repeat(np.arange(10), test_per_class).astype(np.uint8)

    def images(labels):
        out = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        out[:, 0, 0] = labels
        return out

    train_images = images(train_labels)
    write_idx(root / "train-images-idx3-ubyte.gz", train_images)
    write_idx(root / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(root / "t10k-images-idx3-ubyte", images(test_labels))  # uncompressed works too
    write_idx(root / "t10k-labels-idx1-ubyte", test_labels)
    return root, train_labels, train_images


def write_cifar(src, variant, per_class, rng, data=None):
    """CIFAR-10 (5 data batches) or CIFAR-100 (train/test) python batches with meta files; random
    pixels unless ``data`` (N x 3072 uint8, N = classes x per_class) is given."""
    src.mkdir(parents=True)
    num_classes = 10 if variant == "cifar10" else 100
    key = "labels" if variant == "cifar10" else "fine_labels"
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    if data is None:
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    test_labels = np.repeat(np.arange(num_classes), 2)
    test = {b"data": rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8), key.encode(): test_labels.tolist()}
    names = [f"class{c}".encode() for c in range(num_classes)]
    if variant == "cifar10":  # protocol 2, like the published files
        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            batch = {b"data": data[part], b"labels": labels[part].tolist(), b"batch_label": b"training"}
            (src / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        (src / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
        (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    else:
        (src / "train").write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels.tolist()}))
        (src / "test").write_bytes(pickle.dumps(test))
        (src / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    return labels, data


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory):
    root, *_ = make_fashion_root(tmp_path_factory.mktemp("fashion"), per_class=40, test_per_class=6)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(fashion_root, tmp_path_factory):
    """The tiny Fashion-MNIST prepared by the real pipeline (IF 10, 30 images in the head class)."""
    from pipelines.fashion_mnist import prepare
    return prepare(fashion_root, tmp_path_factory.mktemp("prepared") / "tiny", imbalance_factor=10,
                   max_per_class=30, val_per_class=5)


@pytest.fixture
def ffcv_uncompiled():
    """Run FFCV pipelines uncompiled: same operations, no numba compile wait."""
    from ffcv.pipeline.compiler import Compiler
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


@pytest.fixture
def tiny_config(tiny_dataset, tmp_path):
    """Overrides -> a config that trains a few steps per epoch on the tiny dataset (torch loader)."""
    def make(*overrides):
        return load_config(None, [
            f"data.path={tiny_dataset}", "data.loader=torch", "data.num_workers=0", "data.batch_size=16",
            "workers=1", "optim.epochs=2", "paco.queue_size=37", f"storage_path={tmp_path / 'runs'}", *overrides])
    return make


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    fs: object  # pyarrow S3FileSystem on the server, for setting up and inspecting objects
    port: int
    server: object = None

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def start(self) -> None:
        """Listen on the same port again (moto keeps its buckets in this process across restarts)."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server (moto's server mode) on 127.0.0.1, reached over HTTP through the
    standard environment (AWS_ENDPOINT_URL and keys) exactly as AWS would be, with one bucket.
    Session-wide and set before Ray starts, so Ray's workers inherit the environment."""
    import logging

    import pyarrow.fs
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = S3Server(f"http://127.0.0.1:{port}", "paco-test", None, port)
    server.start()
    host = "127.0.0.1"
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server.fs = pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    server.fs.create_dir("paco-test")
    yield server
    server.stop()
    _restore(saved)


def _restore(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3):
    """One local Ray instance for every Ray test (2 CPUs); its auth token lives in a temp HOME.
    The S3 test server runs first, so every Ray process sees its endpoint."""
    ray = pytest.importorskip("ray")
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_TRAIN_V2_ENABLED")}
    os.environ["HOME"] = str(home)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # workers' gauges reach the exporter within 1 s
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    _restore(saved)


@pytest.fixture(scope="session")
def easy_raw(tmp_path_factory):
    """Fashion-MNIST's IDX files (120 train and 6 test images per class) for a dataset that a good
    learning rate separates within one epoch: the class sets the brightness."""
    root = tmp_path_factory.mktemp("easy-raw")
    rng = np.random.default_rng(0)

    def images(labels):
        noise = rng.integers(0, 6, (len(labels), 28, 28))
        return (labels[:, None, None].astype(np.int64) * 25 + 5 + noise).astype(np.uint8)

    train_labels = rng.permutation(np.repeat(np.arange(10), 120)).astype(np.uint8)
    test_labels = np.repeat(np.arange(10), 6).astype(np.uint8)
    write_idx(root / "train-images-idx3-ubyte", images(train_labels))
    write_idx(root / "train-labels-idx1-ubyte", train_labels)
    write_idx(root / "t10k-images-idx3-ubyte", images(test_labels))
    write_idx(root / "t10k-labels-idx1-ubyte", test_labels)
    return root


@pytest.fixture(scope="session")
def easy_dataset(easy_raw, tmp_path_factory):
    """``easy_raw`` through the real pipeline, IF 10 (403 train, 100 val images; no class above
    the many-shot threshold of 100)."""
    from pipelines.fashion_mnist import prepare

    return prepare(easy_raw, tmp_path_factory.mktemp("easy") / "easy", imbalance_factor=10, max_per_class=100,
                   val_per_class=10)


class RunsCode:
    """Pickled, it calls Path.touch(marker) when loaded: stands in for any code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def event_tags(event_file: Path) -> set[str]:
    """Summary tags in a TensorBoard event file (TFRecord framing, tensorboardX protobufs)."""
    from tensorboardX.proto import event_pb2

    tags, data = set(), event_file.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        tags.update(v.tag for v in event.summary.value)
        offset += 12 + length + 4
    return tags


EPOCHS, BATCH = 4, 16


def run_args(dataset, storage, name, *extra):
    """Two deterministic CPU workers on the tiny dataset; every checkpoint kept."""
    return ["--workers", "2", "--set", f"data.path={dataset}", "--set", "data.loader=torch",
            "--set", f"data.batch_size={BATCH}", "--set", f"optim.epochs={EPOCHS}", "--set", "paco.queue_size=37",
            "--set", "cpus_per_worker=0.5", "--set", "deterministic=true", "--set", f"storage_path={storage}",
            "--set", f"name={name}", "--set", "keep_checkpoints=10", "--set", "paco.shuffle_keys=true",
            "--set", "model.projector=mlp_bn", *extra]


def final_state(run_dir: Path) -> dict:
    """The state of a run's newest checkpoint."""
    from paco_ray.checkpoint import load_state

    return max((load_state(p) for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda s: s["epoch"])


@pytest.fixture(scope="session")
def uninterrupted(ray_cluster, tiny_dataset, tmp_path_factory):
    """The reference Ray run through the CLI (2 deterministic workers, local data and storage):
    (run directory, stdout). Shared by every test that compares weights with it."""
    from paco_ray import train as train_cli

    storage = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_cli.main(run_args(tiny_dataset, storage, "uninterrupted")) == 0
    return storage / "uninterrupted", out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes(markers: list[str]) -> None:
    """Stop the processes whose command line holds a marker (and their children) only; `ray stop`
    would stop every Ray instance on the machine."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(marker in cmdline for marker in markers):
            found.add(process)
            try:
                found.update(process.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    for process in found:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(found, timeout=15)
    for process in alive:
        process.kill()


REPO = Path(__file__).resolve().parent.parent
FAKE_HEAD_TYPE = "ray.head.default"  # the names Ray's fake_multinode provider gives its head
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
EMPTY_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
               "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
               "rsync_filter")


NO_CAPACITY_TYPE = "gpu_xlarge"  # a node type whose every launch fails as a cloud with no capacity left
NO_CAPACITY = ["InsufficientInstanceCapacity", "We currently do not have sufficient p5.48xlarge capacity in the "
               "Availability Zone you requested"]


def fake_autoscaling_config(cluster: dict, gcs_address: str, cpu_scale: float = 0.5, max_nodes: int = 2) -> dict:
    """``cluster.yaml``'s own node types on Ray's ``fake_multinode`` provider (as the test
    provider autoscaler_provider.CloudLikeProvider: each node its own IP), scaled down to this
    machine: each worker type keeps its name and resource keys (GPUs stay, as logical resources),
    its CPUs times ``cpu_scale`` (at least 1), at most ``max_nodes`` nodes of it and in all, none
    up at the start; the head holds 1 CPU (the drivers' node, as on the real cluster). One more
    type, NO_CAPACITY_TYPE (64 CPUs and 8 GPUs on one node, more than any type of cluster.yaml
    has, so that only a request no other type holds goes there: Ray's v1 scorer prefers the node a
    request fills most), can never be launched: the provider fails it with the cloud's NO_CAPACITY
    reason."""
    types = {FAKE_HEAD_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}}
    for name, spec in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        resources = {k: (max(1, int(v * cpu_scale)) if k == "CPU" else v) for k, v in spec["resources"].items()}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                       "max_workers": min(spec["max_workers"], max_nodes)}
    types[NO_CAPACITY_TYPE] = {"resources": {"CPU": 64, "GPU": 8}, "node_config": {}, "min_workers": 0, "max_workers": 1}
    config = {"cluster_name": "paco-fake", "max_workers": min(cluster["max_workers"], max_nodes),
              "upscaling_speed": cluster["upscaling_speed"], "idle_timeout_minutes": 0.25,
              "provider": {"type": "external", "module": "autoscaler_provider.CloudLikeProvider",
                           "use_node_id_as_ip": False, "disable_node_updaters": True,
                           "disable_launch_config_check": True, "gcs_address": gcs_address,
                           "fail_launches": {NO_CAPACITY_TYPE: NO_CAPACITY}},
              "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE, "auth": {}, "docker": {},
              "file_mounts": {}, "file_mounts_sync_continuously": False}
    return {**config, **{key: [] for key in EMPTY_LISTS}}


@dataclass
class AutoscalingCluster:
    address: str                 # GCS address (RAY_ADDRESS)
    dashboard: str               # http://127.0.0.1:PORT (ray job submit --address)
    token: str
    env: dict                    # for drivers and `ray` commands on this cluster (token auth on)
    config: dict                 # the autoscaler's config
    stage_dirs: Path             # PACO_RAY_STAGE_DIR is stage_dirs/{node_id}: one cache per node
    config_path: Path            # the autoscaler's config file (its monitor's --autoscaling-config)

    def rest(self, path: str):
        import json
        import urllib.request

        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def nodes(self) -> list[dict]:
        """The cluster's alive nodes (dashboard summaries)."""
        return [n for n in self.rest("/nodes?view=summary")["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]

    def worker_node_ids(self) -> list[str]:
        return sorted(n["raylet"]["nodeId"] for n in self.nodes() if n["raylet"]["nodeId"] != FAKE_HEAD_NODE_ID)


@contextlib.contextmanager
def autoscaling_cluster_running(v2: bool = False):
    """A head with Ray's own autoscaler (``v2``: autoscaler v2, KubeRay's default) on the
    ``fake_multinode`` provider and no worker node: the node types of cluster.yaml, scaled down
    (fake_autoscaling_config). Token auth on (the session cluster's token); the S3 test server's
    environment reaches every node the autoscaler adds. Stopped when the block ends: while two
    Ray clusters run on one machine, a process of the session cluster that asks Ray's state API
    without an address (Train's placement-group cleaner, after Tune stops a trial) cannot tell
    which is meant, and the stopped trial's workers stay placed."""
    import yaml

    token = (Path(os.environ["HOME"]) / ".ray" / "auth_token").read_text().strip()
    temp = Path(tempfile.mkdtemp(prefix="pras", dir="/tmp"))  # short: Ray's socket paths are length-limited
    gcs, dashboard = free_port(), free_port()
    from ray._private.services import get_node_ip_address

    host = get_node_ip_address()  # the address `ray start` binds and the provider's nodes join
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = fake_autoscaling_config(cluster, f"{host}:{gcs}")
    (temp / "autoscaler").mkdir()  # a directory of its own: a test may hide it from a driver
    (temp / "autoscaler" / "autoscaler.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5", "PACO_RAY_STAGE_DIR": str(temp / "stage" / "{node_id}")}
    if v2:
        env["RAY_enable_autoscaler_v2"] = "1"
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", f"--temp-dir={temp}/ray",
                        f"--autoscaling-config={temp / 'autoscaler' / 'autoscaler.yaml'}", "--num-cpus=1", "--disable-usage-stats",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        f"--metrics-export-port={free_port()}"],
                       # RAY_ADDRESS: this cluster's own processes find it beside the session cluster; the
                       # cloud instance id and node type name are what autoscaler v2 knows the head by
                       env={**env, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_NODE_TYPE_NAME": FAKE_HEAD_TYPE,
                            "RAY_ADDRESS": f"{host}:{gcs}"}, check=True,
                       capture_output=True, timeout=180)
        driver_env = {k: v for k, v in env.items() if k not in ("RAY_FAKE_CLUSTER", "AUTOSCALER_HEARTBEAT_TIMEOUT_S")}
        yield AutoscalingCluster(f"{host}:{gcs}", f"http://127.0.0.1:{dashboard}", token,
                                 {**driver_env, "RAY_ADDRESS": f"{host}:{gcs}"}, config, temp / "stage",
                                 temp / "autoscaler" / "autoscaler.yaml")
    finally:
        stop_processes([str(temp), f":{gcs}"])
        shutil.rmtree(temp, ignore_errors=True)
        forget_cluster(f":{gcs}")


@pytest.fixture(scope="module")
def autoscaling_cluster(ray_cluster, s3):
    """Ray's autoscaler v1 on the fake provider, for one test module (autoscaling_cluster_running)."""
    with autoscaling_cluster_running() as cluster:
        yield cluster


# ----------------------------------------------------------------------------- drivers on the autoscaling clusters


def cluster_train(cluster, *args, timeout=600) -> subprocess.CompletedProcess:
    """``python -m paco_ray.train`` as a driver on the autoscaling cluster."""
    return subprocess.run([sys.executable, "-m", "paco_ray.train", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def downloads_per_node(cluster) -> dict[str, int]:
    """{Ray node id: downloads logged in that node's own cache}."""
    from paco_ray.data.staging import DOWNLOAD_LOG

    return {log.parent.parent.name: len(log.read_text().splitlines())
            for log in cluster.stage_dirs.glob(f"*/*/{DOWNLOAD_LOG}")}


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


CAPACITY_PROBE = """
import json, ray
from paco_ray.autoscaler_status import read_status
from paco_ray.capacity import read_capacity
ray.init(log_to_driver=False)
capacity, status = read_capacity(), read_status()
print(json.dumps({"up": {k.name: k.up for k in capacity.kinds if k.up}, "types_by_ip": status.types_by_ip,
                  "types_by_node_id": status.types_by_node_id, "source": capacity.source,
                  "known": capacity.known, "ips": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}}))
"""


def capacity_seen_by_a_driver(cluster) -> dict:
    """What a driver on the head reads of the cluster (read_capacity and the autoscaler's status)."""
    done = subprocess.run([sys.executable, "-c", CAPACITY_PROBE], env=cluster.env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])



def forget_cluster(marker: str) -> None:
    """Remove `ray start`'s record of a cluster we started and stopped (ray.init() and `ray`
    commands would look for it)."""
    from paco_ray.driver import RAY_CURRENT_CLUSTER

    record = Path(RAY_CURRENT_CLUSTER)
    if record.is_file() and marker in record.read_text():
        record.unlink()


def read(fs, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def registered_epoch(fs, run_dir: str) -> int:
    """The epoch of the newest checkpoint Ray Train has registered for a run (what a restore resumes
    from; a checkpoint directory in storage may not be registered yet). 0: none."""
    try:
        snapshot = json.loads(read(fs, f"{run_dir}/checkpoint_manager_snapshot.json"))
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # not yet written, or being written
        return 0
