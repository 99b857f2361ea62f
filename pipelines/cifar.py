"""CIFAR-10 / CIFAR-100 (python pickle batches) -> CIFAR-LT prepared dataset, the benchmark split.

python -m pipelines.cifar --src cifar-100-python --out data/cifar100_lt_if100 --imbalance-factor 100

The training split is the published one (the official ``dataset/imbalance_cifar.py``, from
LDAM-DRW): n_max = the per-class count (500 / 5000), n_c = int(n_max * (1/IF)^(c/(C-1))); with
numpy's global generator seeded once with 0, each class's indices (file order) are shuffled in
class order and the first n_c kept. The validation split takes the next --val-per-class shuffled
images of each class, which training never uses; a class that uses (nearly) all its images -- the
head class uses all 500 -- completes its validation images with its last selected training images,
which are then in both splits (recorded; see the README). The test split stays balanced. Shot
groups use the published thresholds (many > 100, few < 20 training images).
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from paco_ray.data.longtail import FEW_SHOT, MANY_SHOT
from paco_ray.data.sources import cifar_images, load_cifar_batch

from paco_ray.errors import MissingInputError

from .writer import PipelineError, Sample, check_at_least, run_cli, write_prepared

LAYOUTS = {  # variant -> (train files, test file, meta file, label key, names key)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", "labels", "label_names"),
    "cifar100": (["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def detect_variant(src: Path) -> str:
    for variant, (train, test, meta, *_) in LAYOUTS.items():
        if (src / meta).is_file() and (src / test).is_file():
            return variant
    raise MissingInputError(f"--src {src}: neither a cifar-10-batches-py nor a cifar-100-python directory "
                            "(batches.meta + test_batch, or meta + test)")


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if isinstance(err, pickle.UnpicklingError) else type(err).__name__


def _read(src: Path, files: list[str], label_key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    sources, labels, images = [], [], []
    for name in files:
        path = src / name
        if not path.is_file():
            raise MissingInputError(f"--src: {path} not found")
        try:
            batch = load_cifar_batch(path)
            batch_images, batch_labels = cifar_images(batch), np.asarray(batch[label_key], dtype=np.int64)
        except Exception as err:
            raise PipelineError(f"{path}: not a CIFAR python batch ({_why(err)})") from None
        if len(batch_images) != len(batch_labels):
            raise PipelineError(f"{path}: {len(batch_images)} images but {len(batch_labels)} labels")
        sources += [f"{path}#{i}" for i in range(len(batch_labels))]
        labels.append(batch_labels)
        images.append(batch_images)
    return sources, np.concatenate(labels), np.concatenate(images)


def published_split(labels: np.ndarray, num_classes: int, imbalance_factor: float, val_per_class: int,
                    max_per_class: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(train rows, validation rows, rows in both) of the published CIFAR-LT split (module
    docstring); the train rows in the official order (class by class, shuffled within a class)."""
    rng = np.random.RandomState(seed)  # np.random.seed(seed) and np.random.shuffle, as the official code
    train, val, shared = [], [], 0
    for c in range(num_classes):
        n = int(max_per_class * (1.0 / imbalance_factor) ** (c / (num_classes - 1.0))) if num_classes > 1 \
            else int(max_per_class)
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        unused = members[n:n + val_per_class]
        borrowed = members[:n][len(members[:n]) - (val_per_class - len(unused)):] if len(unused) < val_per_class else []
        train.append(members[:n])
        val.append(np.concatenate([unused, borrowed]).astype(np.int64))
        shared += len(borrowed)
    return np.concatenate(train), np.sort(np.concatenate(val)), shared


def prepare(src: str | Path, out: str | Path, *, imbalance_factor: float = 100.0, max_per_class: int | None = None,
            val_per_class: int | None = None, force: bool = False) -> Path:
    check_at_least("--imbalance-factor", imbalance_factor, 1)
    check_at_least("--max-per-class", max_per_class, 1)
    check_at_least("--val-per-class", val_per_class, 1)
    src = Path(src).resolve()
    variant = detect_variant(src)
    train_files, test_file, meta_file, label_key, names_key = LAYOUTS[variant]
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in load_cifar_batch(src / meta_file)[names_key]]
    except Exception as err:
        raise PipelineError(f"{src / meta_file}: not a CIFAR meta file ({_why(err)})") from None
    train_src, train_labels, train_images = _read(src, train_files, label_key)
    test_src, test_labels, test_images = _read(src, [test_file], label_key)
    for labels, part in ((train_labels, "train"), (test_labels, "test")):
        bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
        if len(bad):
            raise PipelineError(f"{(train_src if part == 'train' else test_src)[bad[0]]}: label {labels[bad[0]]} "
                                f"outside 0..{len(names) - 1}")
    per_class = int(np.bincount(train_labels, minlength=len(names)).min())
    if val_per_class is None:
        val_per_class = max(1, per_class // 25)  # 20 for CIFAR-100, 200 for CIFAR-10
    max_per_class = per_class if max_per_class is None else max_per_class
    if max_per_class > per_class or val_per_class >= per_class:
        raise PipelineError(f"--max-per-class/--val-per-class: {max_per_class} / {val_per_class} but each class has "
                            f"{per_class} training images")
    train_idx, val_idx, shared = published_split(train_labels, len(names), imbalance_factor, val_per_class,
                                                 float(max_per_class))
    if shared:
        print(f"validation: {shared} images of the head class(es) are also training images (they use nearly all "
              "their images)", file=sys.stderr)

    def samples(rows, sources, labels, images):
        return [Sample(sources[r], int(labels[r]), lambda r=r: images[r]) for r in rows]

    fingerprint = {"pipeline": "cifar", "variant": variant, "source": str(src), "imbalance_factor": imbalance_factor,
                   "max_per_class": max_per_class, "val_per_class": val_per_class}
    return write_prepared(out, fingerprint={**fingerprint, "split": "published"}, class_names=names,
                          thresholds=(MANY_SHOT, FEW_SHOT),
                          splits={"train": samples(train_idx, train_src, train_labels, train_images),
                                  "val": samples(val_idx, train_src, train_labels, train_images),
                                  "test": samples(range(len(test_labels)), test_src, test_labels, test_images)},
                          write_mode="raw", force=force, normalization="cifar")  # the official CIFAR statistics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cifar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="cifar-10-batches-py or cifar-100-python directory")
    parser.add_argument("--out", required=True, help="prepared dataset directory, or an object-storage URI (s3://bucket/prefix, gs://...)")
    parser.add_argument("--imbalance-factor", type=float, default=100.0, help="10, 50 or 100 in the literature")
    parser.add_argument("--max-per-class", type=int, help="head-class size n_max (default: the per-class count, "
                        "500 / 5000, as published)")
    parser.add_argument("--val-per-class", type=int, help="validation images per class (default: 4%%)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is prepared")
    args = parser.parse_args(argv)
    return run_cli(lambda a: prepare(a.src, a.out, imbalance_factor=a.imbalance_factor, max_per_class=a.max_per_class,
                                     val_per_class=a.val_per_class, force=a.force), args)


if __name__ == "__main__":
    sys.exit(main())
