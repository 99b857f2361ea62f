"""Fashion-MNIST (IDX files, gzip or not) -> Fashion-MNIST-LT prepared dataset.

python -m pipelines.fashion_mnist --src /usr/share/datasets/fashion-mnist --out data/fmnist_lt_if100
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paco_ray.data.datasets import DatasetSplits, ImageSet, fashion_mnist_lt

from .writer import PipelineError, Sample, run_cli, write_prepared

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"


def samples(images: ImageSet) -> list[Sample]:
    array = images.images.permute(0, 2, 3, 1).numpy()  # N, H, W, 1
    return [Sample(src, int(y), lambda i=i: array[i]) for i, (src, y) in enumerate(zip(images.sources, images.labels))]


def write(data: DatasetSplits, src: str | Path, out: str | Path, *, imbalance_factor: float, max_per_class: int,
          val_per_class: int, force: bool = False) -> Path:
    """Write already-loaded Fashion-MNIST-LT splits as a prepared dataset."""
    fingerprint = {"pipeline": "fashion_mnist", "source": str(Path(src).resolve()),
                   "imbalance_factor": imbalance_factor, "max_per_class": max_per_class,
                   "val_per_class": val_per_class}
    return write_prepared(out, fingerprint=fingerprint, class_names=data.classes.names,
                          splits={s: samples(data.split(s)) for s in ("train", "val", "test")},
                          thresholds=(data.classes.many_threshold, data.classes.few_threshold),
                          write_mode="raw", force=force)


def prepare(src: str | Path, out: str | Path, *, imbalance_factor: float = 100.0, max_per_class: int = 5000,
            val_per_class: int = 500, force: bool = False) -> Path:
    """Load and write, with errors phrased for this CLI's flags."""
    try:
        data = fashion_mnist_lt(src, imbalance_factor, max_per_class, val_per_class)
    except ValueError as err:
        raise PipelineError(str(err).replace("data.root", "--src").replace(
            "data.max_per_class/data.val_per_class", "--max-per-class/--val-per-class")) from None
    except FileNotFoundError as err:
        raise FileNotFoundError(str(err).replace("data.root", "--src")) from None
    return write(data, src, out, imbalance_factor=imbalance_factor, max_per_class=max_per_class,
                 val_per_class=val_per_class, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.fashion_mnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=DEFAULT_SRC, help="directory with the four IDX files")
    parser.add_argument("--out", required=True, help="prepared dataset directory")
    parser.add_argument("--imbalance-factor", type=float, default=100.0)
    parser.add_argument("--max-per-class", type=int, default=5000)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="unused: the split takes images in file order")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is prepared")
    args = parser.parse_args(argv)
    return run_cli(lambda a: prepare(a.src, a.out, imbalance_factor=a.imbalance_factor,
                                     max_per_class=a.max_per_class, val_per_class=a.val_per_class,
                                     force=a.force), args)


if __name__ == "__main__":
    sys.exit(main())
