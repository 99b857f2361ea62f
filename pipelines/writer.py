"""The writer every pipeline shares.

A prepared dataset directory holds:
  manifest.parquet  one row per sample: split, index (row in the split's .beton, -1 if skipped),
                    label, source (file path or array reference), skipped, error
  classes.parquet   class_id, name, train_count, shot_group, many_threshold, few_threshold
  {split}.beton     FFCV file per split with fields image, label, index
  The manifest's Parquet metadata records the pipeline and its arguments (the fingerprint).

The manifest's metadata also records the size and SHA-256 of every other file.

Each .beton is written by FFCV's DatasetWriter under a watchdog (watchdog.py): a writer worker
that raises or dies ends the pipeline in one line instead of leaving it waiting.

Outputs appear atomically: everything is written into a temporary sibling directory that is
renamed into place only when complete. An object-storage output (``--out s3://bucket/prefix``,
``gs://...``) is built locally, uploaded, then marked complete by the ``_COMPLETE`` object,
written last (paco_ray.data.staging reads nothing without it). Re-running with the same
fingerprint is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paco_ray.data.longtail import shot_group
from paco_ray.data.prepared import FILES_KEY, NORMALIZATION, NORMALIZATION_KEY
from paco_ray.data.staging import MANIFEST, MARKER, file_digest
from paco_ray.errors import InputError
from paco_ray.storage import check_no_credentials, exists, filesystem, is_uri, storage_error, write_text

from .fingerprint import FINGERPRINT_KEY, differences, read_fingerprint

FORMAT_VERSION = 1  # bump when the layout of a prepared directory changes
MANIFEST_SCHEMA = pa.schema([
    ("split", pa.string()), ("index", pa.int64()), ("label", pa.int64()),
    ("source", pa.string()), ("skipped", pa.bool_()), ("error", pa.string()),
])


class PipelineError(InputError):
    """Bad input to a pipeline; the message names the culprit (file, line, class or directory)."""


class PipelineFailure(Exception):
    """The pipeline could not finish for a reason outside its input (a writer worker killed)."""


def check_at_least(option: str, value, minimum: int) -> None:
    """Refuse a numeric option below ``minimum`` (or NaN, or infinite) in one line naming it;
    None (not given) passes."""
    if value is not None and not (math.isfinite(value) and value >= minimum):
        raise PipelineError(f"{option}: must be >= {minimum}, got {value!r}")


@dataclass
class Sample:
    source: str                          # path or "file#row", recorded in the manifest
    label: int
    load: Callable[[], np.ndarray]       # -> HxWxC uint8 (C = 1 or 3)


def _check_output(out: Path, fingerprint: dict, force: bool) -> bool:
    """True when ``out`` already holds exactly this preparation (nothing to do)."""
    if not out.exists() or force:
        return False
    existing = read_fingerprint(out)
    if existing is None:
        raise PipelineError(f"--out {out}: exists and is not a prepared dataset; choose another directory")
    if existing == fingerprint:
        missing = [f"{s}.beton" for s in existing.get("splits", []) if not (out / f"{s}.beton").is_file()]
        if not missing:
            return True
        raise PipelineError(f"--out {out}: {', '.join(missing)} missing; pass --force to rebuild it")
    raise PipelineError(f"--out {out}: was prepared from a different source or settings "
                        f"({differences(fingerprint, existing, out)}); pass --force to replace it")


def _check_remote_output(uri: str, fingerprint: dict, force: bool) -> bool:
    """True when ``uri`` already holds exactly this preparation, uploaded completely."""
    import pyarrow.parquet as pq

    fs, root = filesystem(uri)
    bucket = root.split("/", 1)[0]
    if not _storage(lambda: exists(fs, bucket), uri):  # before any work, not after the build
        raise PipelineError(f"--out {uri}: bucket {bucket!r} does not exist")
    if not _storage(lambda: exists(fs, f"{root}/{MANIFEST}"), uri):
        if _storage(lambda: exists(fs, root), uri):
            raise PipelineError(f"--out {uri}: exists and is not a prepared dataset; choose another prefix")
        return False
    complete = _storage(lambda: exists(fs, f"{root}/{MARKER}"), uri)
    meta = _storage(lambda: pq.read_schema(f"{root}/{MANIFEST}", filesystem=fs).metadata or {}, uri)
    existing = json.loads(meta[FINGERPRINT_KEY]) if FINGERPRINT_KEY in meta else None
    if not complete or force:  # an upload that never completed is replaced
        return False
    if existing == fingerprint:
        return True
    raise PipelineError(f"--out {uri}: was prepared from a different source or settings "
                        f"({differences(fingerprint, existing or {}, uri)}); pass --force to replace it")


def publish(local: Path, uri: str) -> None:
    """Upload the prepared directory ``local`` to ``uri``: the old marker goes first, the new one last."""
    fs, root = filesystem(uri)
    marker = f"{root}/{MARKER}"
    if _storage(lambda: exists(fs, marker), uri):
        fs.delete_file(marker)
    for name in sorted(p.name for p in local.iterdir() if p.name != MANIFEST) + [MANIFEST]:
        _storage(lambda: _upload(local / name, fs, f"{root}/{name}"), uri)
    record = json.dumps({MANIFEST: file_digest(local / MANIFEST)})
    _storage(lambda: write_text(fs, marker, record), uri)


def _upload(path: Path, fs, destination: str) -> None:
    with open(path, "rb") as source, fs.open_output_stream(destination) as stream:
        while chunk := source.read(8 << 20):
            stream.write(chunk)


def _storage(action, uri: str):
    """Run a storage call; an OSError becomes one line naming ``--out`` (bucket, credentials)."""
    try:
        return action()
    except OSError as err:
        raise PipelineError(f"--out {uri}: {storage_error(err, uri)}") from None


def stored_shape(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """(H, W) after FFCV's writer shrinks the longer side to max_resolution."""
    ratio = max_resolution / max(height, width) if max_resolution else 1.0
    return (int(ratio * height), int(ratio * width)) if ratio < 1 else (height, width)


def _common_square_side(shapes: set[tuple[int, int]]) -> int:
    """The side when every stored image is the same square; 0 when sizes vary (data.image_size needed)."""
    if len(shapes) != 1:
        return 0
    (height, width), = shapes
    return height if height == width else 0


def _load_checked(samples: Sequence[Sample], skip_bad: bool, max_resolution: int | None):
    """Decode every sample once; bad ones raise (naming the source) or are collected when skipping.
    Returns (good, bad, channels, the set of stored shapes)."""
    good, bad, channels, shapes = [], [], None, set()
    for sample in samples:
        try:
            image = sample.load()
            if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (1, 3):
                raise ValueError(f"unexpected image array {image.dtype} {image.shape}")
        except Exception as err:  # PIL and numpy raise many types for broken files
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            if not skip_bad:
                raise PipelineError(f"{sample.source}: unreadable image ({reason}); --skip-bad records it "
                                    "in the manifest instead") from None
            bad.append((sample, reason))
            continue
        channels = max(channels or 0, image.shape[2])
        shapes.add(stored_shape(image.shape[0], image.shape[1], max_resolution))
        good.append(sample)
    return good, bad, channels or 3, shapes


class _BetonSource:
    """Indexable (image HxWx3, label, index) view of samples for ffcv's DatasetWriter."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = self.samples[i].load()
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return np.ascontiguousarray(image), self.samples[i].label, i


def write_beton(path: Path, samples: Sequence[Sample], *, write_mode: str, max_resolution: int | None,
                jpeg_quality: int = 90, num_workers: int = 1) -> None:
    """Write ``samples`` to the .beton ``path`` with FFCV's writer, watched (pipelines/watchdog.py):
    a writer worker that raises or dies is a PipelineError naming the file and the sample."""
    from ffcv.fields import IntField, RGBImageField

    from .watchdog import WriterFailed, WriterKilled, write_guarded

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField()}
    try:
        write_guarded(str(path), fields, _BetonSource(samples), num_workers=num_workers, label=path.name,
                      describe=lambda i: samples[i].source)
    except WriterKilled as err:
        raise PipelineFailure(f"writing {path.name}: {err}") from None
    except WriterFailed as err:
        raise PipelineError(f"writing {path.name}: {err}") from None


def write_prepared(out: str | Path, *, fingerprint: dict, class_names: Sequence[str],
                   splits: dict[str, Sequence[Sample]], thresholds: tuple[int, int], write_mode: str = "raw",
                   max_resolution: int | None = None, skip_bad: bool = False, force: bool = False,
                   num_workers: int = 1, normalization: str = "") -> Path | str:
    """Validate, then write manifest, classes and one .beton per split into ``out`` (a directory,
    or an object-storage URI) atomically; returns where the dataset is."""
    remote = is_uri(str(out))
    if remote:
        check_no_credentials("--out", str(out))
    out = str(out).rstrip("/") if remote else Path(out).resolve()
    fingerprint = {**fingerprint, "format": FORMAT_VERSION, "splits": list(splits), "write_mode": write_mode,
                   "max_resolution": max_resolution, "skip_bad": skip_bad,
                   **({"normalization": normalization} if normalization else {})}
    if _check_remote_output(out, fingerprint, force) if remote else _check_output(out, fingerprint, force):
        print(f"{out}: already prepared with these inputs (use --force to rebuild)")
        return out
    num_classes = len(class_names)
    for split, samples in splits.items():
        for s in samples:
            if not 0 <= s.label < num_classes:
                raise PipelineError(f"{s.source}: label {s.label} outside 0..{num_classes - 1} ({split} split)")
    rows, kept, channels, shapes = [], {}, 1, set()
    for split, samples in splits.items():
        good, bad, split_channels, split_shapes = _load_checked(samples, skip_bad, max_resolution)
        if not good:  # FFCV cannot write an empty file
            raise PipelineError(f"the {split} split has no images"
                                + (f" ({len(bad)} unreadable, skipped)" if bad else ""))
        channels = max(channels, split_channels)
        shapes |= split_shapes
        kept[split] = good
        rows += [(split, i, s.label, s.source, False, "") for i, s in enumerate(good)]
        rows += [(split, -1, s.label, s.source, True, reason) for s, reason in bad]
    if normalization and len(NORMALIZATION.get(normalization, ((),))[0]) != channels:
        raise PipelineError(f"--normalization: {normalization!r} is not one of the {channels}-channel statistics "
                            f"({', '.join(k for k, v in NORMALIZATION.items() if len(v.mean) == channels)})")
    train_counts = np.bincount([s.label for s in kept.get("train", [])], minlength=num_classes)
    empty = [class_names[c] for c in range(num_classes) if train_counts[c] == 0]
    if empty:
        raise PipelineError(f"class {empty[0]!r} has no training images"
                            + (f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""))

    tmp = Path(tempfile.mkdtemp(prefix="paco_ray_prepare_")) if remote else out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_classes(tmp, class_names, train_counts, thresholds, channels, shapes, normalization)
        for split, good in kept.items():
            write_beton(tmp / f"{split}.beton", good, write_mode=write_mode, max_resolution=max_resolution,
                        num_workers=num_workers)
        files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
        table = pa.Table.from_pylist([dict(zip(MANIFEST_SCHEMA.names, r)) for r in rows], schema=MANIFEST_SCHEMA)
        table = table.replace_schema_metadata({FINGERPRINT_KEY: json.dumps(fingerprint).encode(),
                                               FILES_KEY: json.dumps(files).encode()})
        pq.write_table(table, tmp / MANIFEST)  # written last: its presence marks completion
        if remote:
            publish(tmp, out)
            shutil.rmtree(tmp)
        else:
            _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    skipped = sum(r[4] for r in rows)
    print(f"{out}: " + ", ".join(f"{s} {len(g)}" for s, g in kept.items())
          + (f"; {skipped} bad images skipped (see manifest)" if skipped else ""))
    return out


def _write_classes(directory: Path, class_names: Sequence[str], train_counts: np.ndarray,
                   thresholds: tuple[int, int], channels: int, shapes: set[tuple[int, int]],
                   normalization: str) -> None:
    many, few = thresholds
    num_classes = len(class_names)
    pq.write_table(pa.table({
        "class_id": np.arange(num_classes, dtype=np.int64), "name": list(class_names),
        "train_count": train_counts.astype(np.int64),
        "shot_group": [shot_group(int(n), many, few) for n in train_counts],
        "many_threshold": np.full(num_classes, many, dtype=np.int64),
        "few_threshold": np.full(num_classes, few, dtype=np.int64),
    }).replace_schema_metadata({
        b"paco_ray.channels": str(channels).encode(),
        b"paco_ray.image_size": str(_common_square_side(shapes)).encode(),
        NORMALIZATION_KEY: normalization.encode(),
    }), directory / "classes.parquet")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` into place, replacing an older ``out`` whole."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def run_cli(prepare: Callable[..., Path], args) -> int:
    """Shared CLI tail: run a pipeline, turning bad input (exit 2) and a failure of the machine
    (exit 1: a writer worker killed) into one line."""
    try:
        prepare(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PipelineFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
