"""Image root + "path label" list files (ImageNet-LT, Places-LT, iNaturalist 2018) -> prepared dataset.

python -m pipelines.txt_list --root /data/imagenet --train-list ImageNet_LT_train.txt \\
    --val-list ImageNet_LT_val.txt --test-list ImageNet_LT_test.txt --out data/imagenet_lt

Images are stored as JPEG (default) or raw pixels, resized so the longer side is at most
--max-resolution. Lines are "relative/path.jpg <integer label>"; blank lines are ignored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paco_ray.data.longtail import FEW_SHOT, MANY_SHOT
from paco_ray.data.prepared import NORMALIZATION
from paco_ray.data.sources import read_source

from paco_ray.errors import MissingInputError

from .writer import PipelineError, Sample, check_at_least, run_cli, write_prepared


def read_list(list_file: Path, root: Path, num_classes: int | None) -> list[Sample]:
    """Parse a list file; each error names the file and line."""
    if not list_file.is_file():
        raise MissingInputError(f"list file {list_file} not found")
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{number}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise PipelineError(f"{where}: expected 'path label', got {line.strip()!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise PipelineError(f"{where}: label {label_text!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise PipelineError(f"{where}: label {label} outside {bound}")
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise PipelineError(f"{where}: path {rel!r} escapes the image root {root}")
        samples.append(Sample(str(path), label, lambda p=str(path): read_source(p)))
    if not samples:
        raise PipelineError(f"{list_file}: no 'path label' lines")
    return samples


def read_class_names(path: Path) -> list[str]:
    """One name per line, optionally prefixed by its id ("0 tench")."""
    if not path.is_file():
        raise MissingInputError(f"--class-names {path} not found")
    names = []
    for line in path.read_text().splitlines():
        if line.strip():
            first, _, rest = line.strip().partition(" ")
            names.append(rest.strip() if first.isdigit() and rest.strip() else line.strip())
    return names


def prepare(root: str | Path, out: str | Path, *, train_list: str | Path, val_list: str | Path,
            test_list: str | Path | None = None, class_names: str | Path | None = None, write_mode: str = "jpg",
            max_resolution: int = 256, skip_bad: bool = False, force: bool = False, num_workers: int = 1,
            normalization: str = "") -> Path:
    check_at_least("--max-resolution", max_resolution, 1)
    check_at_least("--num-workers", num_workers, 1)
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInputError(f"--root {root} is not a directory")
    names = read_class_names(Path(class_names)) if class_names else None
    lists = {"train": Path(train_list), "val": Path(val_list)} | ({"test": Path(test_list)} if test_list else {})
    splits = {split: read_list(path, root, len(names) if names else None) for split, path in lists.items()}
    if names is None:
        names = [str(c) for c in range(1 + max(s.label for samples in splits.values() for s in samples))]
    fingerprint = {"pipeline": "txt_list", "source": str(root),
                   "lists": {k: str(v.resolve()) for k, v in lists.items()}, "class_names": names}
    return write_prepared(out, fingerprint=fingerprint, class_names=names, splits=splits,
                          thresholds=(MANY_SHOT, FEW_SHOT), write_mode=write_mode, max_resolution=max_resolution,
                          skip_bad=skip_bad, force=force, num_workers=num_workers, normalization=normalization)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.txt_list", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", "--src", dest="root", required=True, help="directory the list paths are relative to")
    parser.add_argument("--train-list", required=True)
    parser.add_argument("--val-list", required=True)
    parser.add_argument("--test-list")
    parser.add_argument("--class-names", help="file with one class name per line (optionally 'id name')")
    parser.add_argument("--out", required=True, help="prepared dataset directory, or an object-storage URI (s3://bucket/prefix, gs://...)")
    parser.add_argument("--write-mode", choices=("jpg", "raw"), default="jpg")
    parser.add_argument("--max-resolution", type=int, default=256, help="longer side after resizing")
    parser.add_argument("--skip-bad", action="store_true", help="record unreadable images in the manifest and go on")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is prepared")
    parser.add_argument("--normalization", choices=[n for n, v in NORMALIZATION.items() if len(v.mean) == 3],
                        default="", help="mean/std the training normalises with (default: ImageNet's; iNaturalist: inat)")
    args = parser.parse_args(argv)
    return run_cli(lambda a: prepare(a.root, a.out, train_list=a.train_list, val_list=a.val_list,
                                     test_list=a.test_list, class_names=a.class_names, write_mode=a.write_mode,
                                     max_resolution=a.max_resolution, skip_bad=a.skip_bad, force=a.force,
                                     num_workers=a.num_workers, normalization=a.normalization), args)


if __name__ == "__main__":
    sys.exit(main())
