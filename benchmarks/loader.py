"""Images/s of the FFCV two-view training loader vs the torchvision DataLoader fallback (PIL JPEG
files), on the same generated JPEG set, same augmentations, batch size and worker count.

python benchmarks/loader.py [--images 10000] [--batch 256] [--workers 2] [--epochs 4]

Each loader runs --epochs epochs; the first (FFCV: numba compilation) is reported separately and
the steady state is the median of the others. Three recipes are measured (RECIPES): pad-crop + flip
on fixed-size 32 px JPEGs (the loaders alone), the published CIFAR views on the same files, and the
published ImageNet views (randcls / sim) on variable-size JPEGs cropped to 32 px.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.config import DataConfig  # noqa: E402
from paco_ray.data.loaders import build_loaders  # noqa: E402
from paco_ray.data.prepared import PreparedDataset  # noqa: E402
from pipelines import txt_list  # noqa: E402


def make_jpegs(root: Path, n: int, classes: int, fixed: int | None, seed: int = 0) -> dict[str, Path]:
    """n natural-ish JPEGs (smooth noise, so they compress like photos) and train/val lists."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        size = (fixed, fixed) if fixed else tuple(int(s) for s in rng.integers(40, 72, 2))
        low = rng.integers(0, 256, (size[0] // 4 + 1, size[1] // 4 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size[1], size[0]), Image.BILINEAR)
        rel = f"img/{i % classes}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel, quality=90)
        lines.append(f"{rel} {i % classes}")
    lists = {"train": root / "train.txt", "val": root / "val.txt"}
    lists["train"].write_text("\n".join(lines) + "\n")
    lists["val"].write_text("\n".join(lines[:classes]) + "\n")
    return lists


RECIPES = {  # name -> (family, query view, key view)
    "small_crop_flip": ("small", "crop_flip", "crop_flip"),
    "cifar_autoaugment_cutout_sim_cifar": ("small", "autoaugment_cutout", "sim_cifar"),
    "imagenet_randcls_sim": ("imagenet", "randcls", "sim"),
}


def epoch_rates(loaders, epochs: int) -> list[float]:
    rates = []
    for epoch in range(epochs):
        start, n = time.perf_counter(), 0
        for x_q, x_k, labels, _ in loaders.train(epoch):
            n += 2 * len(labels)  # two views per image
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {torch.get_num_threads()} torch thread, {args.workers} loader workers, "
          f"{args.images} JPEGs, batch {args.batch}, {args.epochs} epochs")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {}
        for family, fixed in (("small", 32), ("imagenet", None)):
            root = Path(tmp) / family
            lists = make_jpegs(root, args.images, classes=10, fixed=fixed)
            txt_list.prepare(root, root / "prepared", train_list=lists["train"], val_list=lists["val"],
                             write_mode="jpg", max_resolution=64, num_workers=args.workers)
            prepared[family] = PreparedDataset.open(root / "prepared")
        for name, (family, query, key) in RECIPES.items():
            rates = {}
            for loader in ("ffcv", "torch"):
                cfg = DataConfig(path=str(prepared[family].path), loader=loader, batch_size=args.batch,
                                 num_workers=args.workers, augment=family, image_size=32 if family == "imagenet" else 0,
                                 crop_padding=4, query_view=query, key_view=key, randaugment_ops=2)
                loaders = build_loaders(prepared[family], cfg, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
                per_epoch = epoch_rates(loaders, args.epochs)
                rates[loader] = statistics.median(per_epoch[1:])
                print(f"{name}_{loader}_first_epoch_img_per_s: {per_epoch[0]:.0f}")
                print(f"{name}_{loader}_steady_img_per_s: {rates[loader]:.0f}")
            ratios[name] = rates["ffcv"] / rates["torch"]
            print(f"{name}_ffcv_over_torch: {ratios[name]:.2f}", flush=True)
    print(f"ratio_ffcv_over_torch_small: {ratios['small_crop_flip']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
