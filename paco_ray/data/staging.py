"""Prepared datasets in object storage, staged once per node.

A dataset uploaded by a pipeline (``--out s3://...``) is complete when its marker object
``_COMPLETE`` exists: written last, it records the size and SHA-256 of ``manifest.parquet``, whose
metadata records those of every other file. ``stage`` copies such a dataset into a node-local
cache: one process per node downloads (a file lock), the others wait for it; files arrive under a
temporary name and are renamed once their size and checksum match; a valid copy is reused after a
size check (``verify_checksums`` re-reads every byte), a stale or damaged one is replaced.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..storage import filesystem, is_uri, storage_error
from .prepared import FILES_KEY, DatasetError, PreparedDataset

MARKER = "_COMPLETE"
MANIFEST = "manifest.parquet"
DOWNLOAD_LOG = "downloads.log"  # one line per completed download of the dataset into this cache
STAGE_DIR_ENV = "PACO_RAY_STAGE_DIR"  # a node's own cache directory, set when the node is started
CHUNK = 8 << 20
STAGE_TIMEOUT_S = 3600.0  # how long a process waits for another one on its node to finish staging


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex digest} of a local file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # not a Ray process
        return ""


def stage_dir(configured: str) -> Path:
    """The node-local cache: ``data.stage_dir``, else $PACO_RAY_STAGE_DIR, else
    ~/.cache/paco_ray/staged. ``{node_id}`` in it becomes the Ray node's id: one cache per Ray
    node where several nodes share a disk."""
    chosen = configured or os.environ.get(STAGE_DIR_ENV) or "~/.cache/paco_ray/staged"
    if "{node_id}" in chosen:
        chosen = chosen.replace("{node_id}", ray_node_id() or "local")
    return Path(chosen).expanduser().resolve()


def writable_cache(local: Path, configured: str) -> None:
    """Create ``local`` (a dataset's folder in the stage directory), or fail in one line naming the
    directory that cannot be written."""
    try:
        local.mkdir(parents=True, exist_ok=True)
        probe = local / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        key = STAGE_DIR_ENV if not configured and os.environ.get(STAGE_DIR_ENV) else "data.stage_dir"
        raise DatasetError(f"{key}: cannot write the node's dataset cache {local.parent} on {socket.gethostname()} "
                           f"({err.strerror or type(err).__name__}); make it writable for this user or set "
                           "data.stage_dir to a writable local directory") from None


def local_dataset(path: str, configured_stage_dir: str = "", timeout_s: float = STAGE_TIMEOUT_S) -> Path:
    """A local prepared directory for ``data.path``: itself, or a URI staged into the node's cache."""
    if not is_uri(path):
        return Path(path)
    return stage(path, stage_dir(configured_stage_dir), timeout_s=timeout_s, configured=configured_stage_dir)


def check_dataset(path: str) -> None:
    """Fail fast in a driver: a local dataset must open; one in object storage must be complete."""
    if is_uri(path):
        read_marker(path)
    else:
        PreparedDataset.open(path)


def read_marker(uri: str, fs=None, root: str | None = None) -> dict[str, Any]:
    """The completion marker of the dataset at ``uri`` (through ``fs`` and ``root``, its filesystem
    and path there, when the caller has resolved them); one-line DatasetErrors for a missing
    bucket, missing credentials or permissions, and an upload that never completed."""
    if fs is None:
        fs, root = filesystem(uri)
    try:
        with fs.open_input_stream(f"{root}/{MARKER}") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        pass
    except OSError as err:
        raise DatasetError(f"data.path: {uri}: {storage_error(err, uri)}") from None
    bucket = root.split("/", 1)[0]
    if fs.get_file_info(bucket).type.name == "NotFound":
        raise DatasetError(f"data.path: {uri}: bucket {bucket!r} does not exist")
    if fs.get_file_info(f"{root}/{MANIFEST}").type.name != "NotFound":
        raise DatasetError(f"data.path: {uri}: the upload never completed (no {MARKER} marker); "
                           "run the pipeline again")
    raise DatasetError(f"data.path: {uri} holds no prepared dataset (prepare one with python -m pipelines... --out {uri})")


def stage(uri: str, cache: Path, *, timeout_s: float = STAGE_TIMEOUT_S, verify_checksums: bool = False,
          progress_every_s: float = 10.0, configured: str = "") -> Path:
    """The dataset at ``uri`` as a local directory under ``cache``, downloaded at most once per
    node (concurrent callers wait up to ``timeout_s`` for the one that downloads)."""
    fs, root = filesystem(uri)
    marker = read_marker(uri, fs, root)
    local = cache / _slug(uri)
    writable_cache(local, configured)
    with _node_lock(local / ".lock", timeout_s, uri):
        if _is_valid(local, marker, verify_checksums):
            return local
        for stale in local.iterdir():  # an old version, or what a killed download left
            if stale.name not in (".lock", DOWNLOAD_LOG):
                stale.unlink()
        started = time.perf_counter()
        _download(fs, root, local, MANIFEST, marker[MANIFEST], uri, progress_every_s)
        files = manifest_files(local / MANIFEST)
        for name, expected in files.items():
            _download(fs, root, local, name, expected, uri, progress_every_s)
        (local / MARKER).write_text(json.dumps(marker))  # last: this copy is complete
        total = sum(f["size"] for f in files.values()) + marker[MANIFEST]["size"]
        seconds = time.perf_counter() - started
        with open(local / DOWNLOAD_LOG, "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} node {ray_node_id() or '-'} "
                      f"pid {os.getpid()} {total} bytes in {seconds:.2f} s\n")
    return local


def manifest_files(manifest: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "sha256"}} recorded in a prepared dataset's manifest."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(manifest).metadata or {}
    if FILES_KEY not in meta:
        raise DatasetError(f"data.path: {manifest} records no file checksums (prepared by an older paco_ray: "
                           "prepare it again to use it from object storage)")
    return json.loads(meta[FILES_KEY])


def _slug(uri: str) -> str:
    """A cache folder name for ``uri``: readable, and unique through a hash of the whole URI."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _is_valid(local: Path, marker: dict[str, Any], verify_checksums: bool) -> bool:
    """Whether ``local`` is a complete copy of the dataset that ``marker`` describes."""
    try:
        if json.loads((local / MARKER).read_text()) != marker:
            return False
        expected = {MANIFEST: marker[MANIFEST], **manifest_files(local / MANIFEST)}
    except (OSError, ValueError, DatasetError):
        return False
    for name, want in expected.items():
        path = local / name
        if not path.is_file() or path.stat().st_size != want["size"]:
            return False
        if verify_checksums and file_digest(path)["sha256"] != want["sha256"]:
            return False
    return True


def _download(fs, root: str, local: Path, name: str, expected: dict[str, Any], uri: str,
              progress_every_s: float) -> None:
    """Copy one object into ``local/name`` through a temporary name, checking size and SHA-256."""
    partial = local / f".{name}.partial"
    digest, size = hashlib.sha256(), 0
    started = last = time.perf_counter()
    try:
        with fs.open_input_stream(f"{root}/{name}") as stream, open(partial, "wb") as out:
            while chunk := stream.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                now = time.perf_counter()
                if now - last >= progress_every_s:
                    last = now
                    sys.stderr.write(f"staging {uri}/{name}: {size / 1e6:.0f} of {expected['size'] / 1e6:.0f} MB "
                                     f"({size / 1e6 / (now - started):.1f} MB/s)\n")
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"data.path: {uri}/{name} is missing (the dataset is incomplete; run the pipeline "
                           "again)") from None
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"data.path: {uri}/{name}: {storage_error(err, uri)}") from None
    if size != expected["size"] or digest.hexdigest() != expected["sha256"]:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"data.path: {uri}/{name}: checksum mismatch ({size} bytes, sha256 "
                           f"{digest.hexdigest()[:12]}..., the manifest says {expected['size']} bytes, "
                           f"{expected['sha256'][:12]}...): the object is corrupt or changed; upload the dataset again")
    os.replace(partial, local / name)


class _node_lock:
    """An exclusive flock on ``path`` (released by the kernel if its holder dies), waited for up to
    ``timeout_s`` with a one-line error naming the node and the object."""

    def __init__(self, path: Path, timeout_s: float, uri: str):
        self.path, self.timeout_s, self.uri = path, timeout_s, uri

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise DatasetError(f"data.path: node {socket.gethostname()} waited {self.timeout_s:g} s for another "
                                   f"process to stage {self.uri} into {self.path.parent}; it is still at it or stuck")
            time.sleep(0.2)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
