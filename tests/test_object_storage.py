"""Prepared datasets in object storage, against a real S3-protocol server on 127.0.0.1 (moto's
server mode, reached over HTTP through pyarrow): upload with a completion marker, staging once
per node, and each fault as a one-line error naming the object with nothing partial used."""
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paco_ray.data.prepared import DatasetError, PreparedDataset
from paco_ray.data.staging import DOWNLOAD_LOG, MARKER, file_digest, manifest_files, stage
from pipelines import fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--imbalance-factor", "10", "--max-per-class", "30", "--val-per-class", "5"]


@pytest.fixture(scope="module")
def uploaded(s3, fashion_root):
    """The tiny Fashion-MNIST-LT prepared straight into the bucket by the pipeline CLI."""
    uri = s3.uri("datasets/tiny")
    assert fashion_mnist.main(["--src", str(fashion_root), "--out", uri, *ARGS]) == 0
    return uri


def downloads(local: Path) -> int:
    log = local / DOWNLOAD_LOG
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_pipeline_uploads_a_dataset_that_stages_to_the_local_preparation(uploaded, s3, tiny_dataset, fashion_root,
                                                                        tmp_path, capsys):
    marker = json.loads(s3.fs.open_input_stream(f"{s3.bucket}/datasets/tiny/{MARKER}").read())
    local = stage(uploaded, tmp_path / "cache")
    assert file_digest(local / "manifest.parquet") == marker["manifest.parquet"]
    files = manifest_files(local / "manifest.parquet")
    assert sorted(files) == ["classes.parquet", "test.beton", "train.beton", "val.beton"]
    for name, recorded in files.items():  # what the manifest records is what arrived, and what is local
        assert file_digest(local / name) == recorded == file_digest(Path(tiny_dataset) / name)
    staged, prepared = PreparedDataset.open(local), PreparedDataset.open(tiny_dataset)
    assert staged.labels == prepared.labels and staged.sources == prepared.sources
    assert staged.classes == prepared.classes

    capsys.readouterr()
    assert fashion_mnist.main(["--src", str(fashion_root), "--out", uploaded, *ARGS]) == 0
    assert "already prepared with these inputs" in capsys.readouterr().out
    other = [*ARGS[:1], "5", *ARGS[2:]]  # another imbalance factor
    assert fashion_mnist.main(["--src", str(fashion_root), "--out", uploaded, *other]) == 2
    assert "was prepared from a different source or settings" in capsys.readouterr().err
    assert json.loads(s3.fs.open_input_stream(f"{s3.bucket}/datasets/tiny/{MARKER}").read()) == marker  # untouched


def test_one_download_per_node_whatever_the_number_of_processes(uploaded, tmp_path):
    cache = tmp_path / "cache"
    script = f"from paco_ray.data.staging import stage; from pathlib import Path; print(stage({uploaded!r}, Path({str(cache)!r})))"
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    local = Path(paths.pop())
    assert downloads(local) == 1
    assert stage(uploaded, cache) == local and downloads(local) == 1  # warm: a size check, no download


def test_a_stale_or_damaged_copy_is_replaced(uploaded, tmp_path):
    cache = tmp_path / "cache"
    local = stage(uploaded, cache)
    with open(local / "train.beton", "r+b") as f:  # truncated on the node's disk
        f.truncate(100)
    assert stage(uploaded, cache) == local and downloads(local) == 2
    assert file_digest(local / "train.beton") == manifest_files(local / "manifest.parquet")["train.beton"]
    (local / MARKER).write_text(json.dumps({"manifest.parquet": {"size": 1, "sha256": "0"}}))  # another upload
    stage(uploaded, cache)
    assert downloads(local) == 3


def copy_prefix(s3, source: str, target: str) -> None:
    from pyarrow.fs import FileSelector

    for info in s3.fs.get_file_info(FileSelector(f"{s3.bucket}/{source}")):
        name = info.path.rsplit("/", 1)[-1]
        s3.fs.copy_file(info.path, f"{s3.bucket}/{target}/{name}")


def test_an_object_corrupted_after_upload_fails_on_its_checksum(uploaded, s3, tmp_path):
    copy_prefix(s3, "datasets/tiny", "datasets/corrupt")
    path = f"{s3.bucket}/datasets/corrupt/val.beton"
    data = bytearray(s3.fs.open_input_stream(path).read())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    with s3.fs.open_output_stream(path) as stream:
        stream.write(bytes(data))
    with pytest.raises(DatasetError, match=r"datasets/corrupt/val.beton: checksum mismatch") as err:
        stage(s3.uri("datasets/corrupt"), tmp_path / "cache")
    assert "\n" not in str(err.value)
    local = next((tmp_path / "cache").iterdir())
    assert not (local / MARKER).exists() and not list(local.glob(".*.partial"))  # nothing half-staged is usable


def test_an_upload_that_never_completed_is_not_used(uploaded, s3, tmp_path):
    copy_prefix(s3, "datasets/tiny", "datasets/half")
    s3.fs.delete_file(f"{s3.bucket}/datasets/half/{MARKER}")
    with pytest.raises(DatasetError, match=r"datasets/half: the upload never completed \(no _COMPLETE marker\)"):
        stage(s3.uri("datasets/half"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_bucket_and_missing_dataset(s3, tmp_path):
    with pytest.raises(DatasetError, match="s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        stage("s3://no-such-bucket/x", tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"s3://paco-test/nothing-here holds no prepared dataset"):
        stage(s3.uri("nothing-here"), tmp_path / "cache")


def test_pretrained_weights_load_from_the_bucket(s3):
    import torch
    import torchvision

    from paco_ray.backbones import build_backbone, load_pretrained

    reference = torchvision.models.resnet18(weights=None)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    with s3.fs.open_output_stream(f"{s3.bucket}/weights/resnet18.pth") as out:
        out.write(buffer.getvalue())
    trunk, _ = build_backbone("resnet18", 3)
    loaded, total = load_pretrained(trunk, s3.uri("weights/resnet18.pth"))
    assert loaded == total and torch.equal(trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_a_download_killed_midway_leaves_nothing_that_is_read(uploaded, tmp_path):
    cache = tmp_path / "cache"
    killer = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import paco_ray.data.staging as staging
        staging.CHUNK = 4096
        real = staging.hashlib.sha256
        class Dying:  # SIGKILL after the third chunk of train.beton has been written
            def __init__(self, *data):
                self.inner, self.n = real(*data), 0
            def update(self, chunk):
                self.inner.update(chunk)
                self.n += 1
                if self.n == 3 and any(p.name == ".train.beton.partial" for p in Path({str(cache)!r}).rglob("*")):
                    os.kill(os.getpid(), signal.SIGKILL)
            def hexdigest(self):
                return self.inner.hexdigest()
        staging.hashlib.sha256 = Dying
        staging.stage({uploaded!r}, Path({str(cache)!r}))
    """)
    done = subprocess.run([sys.executable, "-c", killer], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    local = next(cache.iterdir())
    assert (local / ".train.beton.partial").exists() and not (local / MARKER).exists()
    assert stage(uploaded, cache) == local  # the lock died with its holder; this attempt completes
    assert not list(local.glob(".*.partial")) and downloads(local) == 1
    for name, recorded in manifest_files(local / "manifest.parquet").items():
        assert file_digest(local / name) == recorded


def test_without_credentials_the_error_says_so(tmp_path):
    """A second server that enforces authentication: unknown keys are refused (HTTP 403)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; from moto.server import ThreadedMotoServer; "
         f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(120)"],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        check = ("import sys; from paco_ray.data.staging import stage; from pathlib import Path\n"
                 "try:\n    stage('s3://locked/data', Path(sys.argv[1]))\n"
                 "except Exception as err:\n    print(type(err).__name__, err)")
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for _ in range(50):  # the server takes a moment to listen
            out = subprocess.run([sys.executable, "-c", check, str(tmp_path)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60).stdout.strip()
            if "access denied" in out:
                break
        assert out.startswith("DatasetError data.path: s3://locked/data: access denied (no or wrong credentials")
    finally:
        server.kill()


def test_credentials_in_an_output_uri_are_refused_without_echoing_them(fashion_root, capsys):
    assert fashion_mnist.main(["--src", str(fashion_root), "--out", "s3://AKIA123:hunter2@bucket/x", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "must not carry credentials" in err and "hunter2" not in err


@pytest.mark.ray
def test_a_run_with_data_and_results_in_the_bucket_matches_the_local_run(uninterrupted, uploaded, s3, tmp_path,
                                                                          capsys):
    """2 gloo workers, data.path and storage_path both in the bucket: the dataset is staged once on
    this node, checkpoints and TensorBoard files land in the bucket, the CLI evaluates the best
    checkpoint from there, and the weights equal the run from local data and storage."""
    from pyarrow.fs import FileSelector

    from paco_ray import evaluate as evaluate_cli
    from paco_ray import train as train_cli
    from paco_ray.checkpoint import load_state
    from conftest import EPOCHS, run_args

    stage_dir = tmp_path / "node-cache"
    args = run_args(uploaded, s3.uri("runs"), "from-bucket", "--set", f"data.stage_dir={stage_dir}")
    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "best checkpoint (val balanced accuracy): s3://paco-test/runs/from-bucket/checkpoint_" in out and "test " in out

    (local,) = stage_dir.iterdir()
    assert downloads(local) == 1  # two workers on one node, one download
    run = f"{s3.bucket}/runs/from-bucket"
    folders = [i.path for i in s3.fs.get_file_info(FileSelector(run)) if i.type.name == "Directory"]
    assert f"{run}/tensorboard" in folders
    last = max((n for n in folders if n.rsplit("/", 1)[-1].startswith("checkpoint_")),
               key=lambda n: load_state(evaluate_cli_fetch(n, tmp_path))["epoch"])
    state = load_state(evaluate_cli_fetch(last, tmp_path))
    reference = max((load_state(c) for c in uninterrupted[0].glob("checkpoint_*") if c.is_dir()),
                    key=lambda s: s["epoch"])
    assert state["epoch"] == reference["epoch"] == EPOCHS
    different = [k for k in state["model"] if not (state["model"][k] == reference["model"][k]).all()]
    assert different == []

    assert evaluate_cli.main([f"s3://{last}", "--split", "val"]) == 0  # a checkpoint URI evaluates as is
    assert "val " in capsys.readouterr().out


def evaluate_cli_fetch(fs_path: str, tmp_path: Path) -> str:
    """A local copy of a checkpoint directory in the bucket."""
    from paco_ray.storage import fetch_dir

    target = tmp_path / "fetched" / fs_path.rsplit("/", 1)[-1]
    target.mkdir(parents=True, exist_ok=True)
    return fetch_dir(f"s3://{fs_path}", str(target))


@pytest.mark.ray
def test_storage_lost_mid_run_fails_in_one_line_and_the_last_good_checkpoint_resumes(uninterrupted, uploaded, s3,
                                                                                     tmp_path, capsys):
    """The S3 server stops after the run has stored its epoch-2 checkpoint: the next checkpoint
    upload fails, the CLI ends with one line, and once storage is back the same command resumes
    from the last good checkpoint and ends with the uninterrupted run's weights."""
    import threading

    from pyarrow.fs import FileSelector

    from paco_ray import train as train_cli
    from paco_ray.checkpoint import load_state
    from conftest import EPOCHS, run_args

    run = f"{s3.bucket}/runs/storage-lost"
    stopped = threading.Event()

    def stop_after_epoch_2():
        deadline = __import__("time").monotonic() + 300
        while __import__("time").monotonic() < deadline:
            try:
                snapshot = json.loads(s3.fs.open_input_stream(f"{run}/checkpoint_manager_snapshot.json").read())
                if snapshot["latest_checkpoint_result"]["metrics"]["epoch"] >= 2:
                    s3.stop()
                    stopped.set()
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass
            __import__("time").sleep(0.05)

    watcher = threading.Thread(target=stop_after_epoch_2, daemon=True)
    args = run_args(uploaded, s3.uri("runs"), "storage-lost", "--set", f"data.stage_dir={tmp_path / 'cache'}")
    watcher.start()
    try:
        code = train_cli.main(args)
    finally:
        watcher.join(timeout=5)
        if stopped.is_set():
            s3.start()
    assert stopped.is_set(), "the run ended before its storage could be stopped"
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and err.startswith("error: training failed (max_failures: 0): "), err

    assert train_cli.main(args) == 0  # storage back: resumes from the last registered checkpoint
    capsys.readouterr()
    folders = [i.path for i in s3.fs.get_file_info(FileSelector(run)) if i.type.name == "Directory"
               and i.base_name.startswith("checkpoint_")]
    states = [load_state(evaluate_cli_fetch(f, tmp_path)) for f in folders]
    assert sorted(s["epoch"] for s in states).count(1) == 1  # epoch 1 was not trained again
    final = max(states, key=lambda s: s["epoch"])
    reference = max((load_state(c) for c in uninterrupted[0].glob("checkpoint_*") if c.is_dir()),
                    key=lambda s: s["epoch"])
    assert final["epoch"] == EPOCHS
    assert [k for k in final["model"] if not (final["model"][k] == reference["model"][k]).all()] == []


def test_a_pipeline_writing_to_a_missing_bucket_fails_in_one_line(s3, fashion_root, capsys):
    assert fashion_mnist.main(["--src", str(fashion_root), "--out", "s3://no-such-bucket/fm", *ARGS]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: --out s3://no-such-bucket/fm: bucket 'no-such-bucket' does not exist"
    assert captured.out == ""  # refused before anything was built


def test_a_node_waiting_too_long_for_staging_names_the_node_and_the_object(uploaded, tmp_path):
    import fcntl
    import socket

    from paco_ray.data.staging import _slug

    local = tmp_path / "cache" / _slug(uploaded)
    local.mkdir(parents=True)
    with open(local / ".lock", "w") as held:  # another process on this node is staging
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DatasetError, match=rf"node {socket.gethostname()} waited 0.5 s for another process to "
                                               rf"stage {uploaded} into "):
            stage(uploaded, tmp_path / "cache", timeout_s=0.5)
    assert stage(uploaded, tmp_path / "cache") == local  # free again: it stages


def test_evaluating_a_checkpoint_uri_that_does_not_exist(s3, capsys):
    from paco_ray import evaluate as evaluate_cli

    assert evaluate_cli.main([s3.uri("runs/nothing/checkpoint_000")]) == 2
    assert capsys.readouterr().err.strip() == "error: checkpoint or run folder 's3://paco-test/runs/nothing/checkpoint_000' does not exist"


def test_an_unwritable_stage_directory_is_one_line_naming_it(uploaded, tmp_path, monkeypatch):
    from paco_ray.data.staging import STAGE_DIR_ENV, local_dataset, stage_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # even root cannot create a directory below a file
    monkeypatch.setenv(STAGE_DIR_ENV, str(blocker / "paco_ray"))
    with pytest.raises(DatasetError) as caught:
        local_dataset(uploaded)
    message = str(caught.value)
    assert message.startswith(f"{STAGE_DIR_ENV}: cannot write the node's dataset cache {blocker / 'paco_ray'} on ")
    assert "\n" not in message and "make it writable" in message
    with pytest.raises(DatasetError, match=r"^data.stage_dir: cannot write"):
        local_dataset(uploaded, str(blocker / "configured"))
    # {node_id} gives every Ray node sharing a disk its own cache ("local" outside Ray)
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    assert stage_dir(str(tmp_path / "stage-{node_id}")) == tmp_path / f"stage-{node}"
