"""Staging a prepared dataset from object storage vs a plain local copy of the same files, and
the cost of a warm start (the node already holds a valid copy).

python benchmarks/staging.py [--mb 256] [--repeats 3]

Runs a local S3-protocol server (moto's server mode, a test dependency) on 127.0.0.1, uploads a
prepared dataset whose .beton holds --mb MB of random bytes through the pipelines' own upload
(publish), then times, side by side: shutil.copytree of the local directory; a cold ``stage``
(download, SHA-256 of every byte, renames) and a plain pyarrow download of the same objects; a warm ``stage`` (marker and size checks only); a warm
``stage`` with ``verify_checksums=True`` (re-reads every byte). Medians over --repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fake_dataset(directory: Path, megabytes: int) -> None:
    """A prepared directory whose train.beton is ``megabytes`` of random bytes (staging reads bytes,
    not images), with the manifest metadata the writer records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paco_ray.data.prepared import FILES_KEY
    from paco_ray.data.staging import file_digest

    directory.mkdir(parents=True)
    with open(directory / "train.beton", "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    pq.write_table(pa.table({"class_id": [0]}), directory / "classes.parquet")
    files = {name: file_digest(directory / name) for name in ("train.beton", "classes.parquet")}
    pq.write_table(pa.table({"split": ["train"]}).replace_schema_metadata({FILES_KEY: json.dumps(files)}),
                   directory / "manifest.parquet")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    from paco_ray.data.staging import stage
    from pipelines.writer import publish

    pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bench")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fake_dataset(tmp / "local", args.mb)
        uri = "s3://bench/dataset"
        upload = timed(lambda: publish(tmp / "local", uri))
        size_mb = sum(p.stat().st_size for p in (tmp / "local").iterdir()) / 1e6
        copy, raw, cold, warm, verify = [], [], [], [], []
        for i in range(args.repeats):
            shutil.rmtree(tmp / "copy", ignore_errors=True)
            copy.append(timed(lambda: shutil.copytree(tmp / "local", tmp / "copy")))
            shutil.rmtree(tmp / "raw", ignore_errors=True)
            (tmp / "raw").mkdir()
            raw.append(timed(lambda: pyarrow.fs.copy_files(uri, str(tmp / "raw"))))
            cache = tmp / f"cache{i}"
            cold.append(timed(lambda: stage(uri, cache)))
            warm.append(timed(lambda: stage(uri, cache)))
            verify.append(timed(lambda: stage(uri, cache, verify_checksums=True)))
    server.stop()
    med = {name: statistics.median(v) for name, v in
           (("copy", copy), ("raw", raw), ("cold", cold), ("warm", warm), ("verify", verify))}
    print(f"dataset: {size_mb:.0f} MB; upload through publish: {size_mb / upload:.0f} MB/s")
    print(f"local copy (shutil.copytree): {size_mb / med['copy']:.0f} MB/s ({med['copy']:.2f} s)")
    print(f"plain download (pyarrow copy_files, no checks): {size_mb / med['raw']:.0f} MB/s ({med['raw']:.2f} s)")
    print(f"cold stage from the local S3 server: {size_mb / med['cold']:.0f} MB/s ({med['cold']:.2f} s), "
          f"{med['cold'] / med['raw']:.2f}x the plain download's time, {med['cold'] / med['copy']:.1f}x the local copy's")
    print(f"warm stage (marker + size checks): {1000 * med['warm']:.1f} ms "
          f"({med['warm'] / med['cold']:.4f} of a cold stage)")
    print(f"warm stage with verify_checksums: {med['verify']:.2f} s ({size_mb / med['verify']:.0f} MB/s)")


if __name__ == "__main__":
    main()
