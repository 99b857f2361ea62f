"""Images/s of the views' photometric ops image by image (``reference_augment.photometric``: timm's
RandAugment on PIL, torchvision's ops on tensors; the reference) against the batched
implementation the loaders run (``augment.batched_photometric``), batch 128 of uint8 RGB images,
on the CPU and on CUDA when present.

python benchmarks/augment.py [--batch 128] [--repeats 5] [--threads 1]

Views: the RandAugment query alone (timm rand-n2-m10-mstd0.5) at 32 and 224 px, then each
published recipe at its family's size: CIFAR (32 px) autoaugment_cutout / sim_cifar, ImageNet
(224 px) randcls / sim. On CUDA the per-sample reference runs on the CPU (as a loader would run
it: timm needs PIL) and its batch is copied to the device. Prints the median images/s of each
over --repeats batches and their ratio (goal: batched >= 10x).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.config import DataConfig  # noqa: E402
from paco_ray.data.augment import batched_photometric  # noqa: E402
from paco_ray.data.reference_augment import photometric  # noqa: E402

FILL = (124, 116, 104)  # ImageNet's mean colour
CASES = [("randaugment", 32), ("randaugment", 224), ("autoaugment_cutout", 32), ("sim_cifar", 32),
         ("randcls", 224), ("sim", 224)]


def images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth random colour images (upsampled noise), uint8."""
    low = torch.randint(0, 256, (batch, 3, size // 4 + 1, size // 4 + 1), dtype=torch.float32)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").to(torch.uint8).to(device)


def rate(fn, batch: torch.Tensor, repeats: int, device: torch.device) -> float:
    fn(batch)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch intra-op)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = DataConfig(randaugment_ops=2, randaugment_magnitude=10, randaugment_std=0.5, cutout=16)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ratios = []
    for device in devices:
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} thread(s))"
        for view, size in CASES:
            reference, batched = v2.Compose(photometric(view, cfg, FILL)), batched_photometric(view, cfg, FILL)
            generator = torch.Generator().manual_seed(0)
            batch = images(args.batch, size, device)
            loop = rate(lambda b: torch.stack([reference(x) for x in b.cpu()]).to(device), batch, args.repeats, device)
            fast = rate(lambda b: batched(b, generator), batch, args.repeats, device)
            ratios.append(fast / loop)
            print(f"{name} {view} {size}px: per-sample {loop:,.0f} img/s, batched {fast:,.0f} img/s, "
                  f"ratio {fast / loop:.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
